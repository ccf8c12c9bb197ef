"""Anomaly scoring: named component maps, their weights and scales, fusion, blur and the image score.

A component map is one way to say "this pixel is not normal" (the registry `COMPONENT_MAPS`):
- RECONSTRUCTION: input vs reconstruction features, the published VLMDiff / DiAD map;
- MEMORY: distance of each patch to the nearest normal patches of its class (kNN memory).
Each raw map is divided by its scale (its 99th percentile on held-out normal images), the
weighted sum is blurred, and the image score is the max after repeated average pooling.
A map is computed from tensors in the `ScoringBatch` (the compared features, the memory maps), which
the pipeline puts there; adding a map from those means registering a `ComponentMap` here.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from PIL import Image

from vlmdiff.anomaly import DISTANCES, gaussian_blur, image_scores, reconstruction_map, scaled_sigma
from vlmdiff.features import FEATURE_RECIPE
from vlmdiff.memory import ClassMatch
from vlmdiff.memory_guidance import Regeneration

if TYPE_CHECKING:
    from vlmdiff.pipeline import VLMDiffPipeline

RECONSTRUCTION = "reconstruction"
MEMORY = "memory"
SCALE_QUANTILE = 0.99  # a map's scale: this quantile of its values on held-out normal images


@dataclass
class AnomalyMapConfig:
    """How input and reconstruction are compared, how the component maps are fused, and the image score."""

    backbone: str = FEATURE_RECIPE.backbone  # registered name or a transformers hub id
    layers: tuple[int, ...] = (2, 4, 10)
    compare: str = "image"  # "image": backbone on both images; "latent": feature-space latents
    distance: str = "cosine"  # "cosine" (published) or "l2"
    match_window: int = 1  # >1: each input position matches the best reconstructed one in this window (GLAD)
    blur_sigma: float = 5.0  # at 256 px, scaled with resolution
    pool_size: int = 8  # image score: max after repeated pool_size x pool_size average pooling
    pool_repeats: int = 2
    # weight of each component map in the fused map; the published setting is the reconstruction alone
    weights: dict[str, float] = field(default_factory=lambda: {RECONSTRUCTION: 1.0, MEMORY: 0.0})
    # each map is divided by its scale before fusion (set by calibration; 1 when missing)
    scales: dict[str, float] = field(default_factory=dict)
    # a class's own weights, in place of `weights` for its images (chosen by vlmdiff.training.fusion)
    class_weights: dict[str, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        self.weights, self.scales = dict(self.weights), dict(self.scales)
        if self.compare not in ("image", "latent"):
            raise ValueError(f"compare must be 'image' or 'latent', got {self.compare!r}")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {sorted(DISTANCES)}, got {self.distance!r}")
        if self.match_window < 1 or self.match_window % 2 == 0:
            raise ValueError(f"match_window must be an odd number >= 1, got {self.match_window}")
        self.class_weights = {name: dict(weights) for name, weights in self.class_weights.items()}
        for where, weights in (("weights", self.weights),
                               *((f"class_weights[{name!r}]", w) for name, w in self.class_weights.items())):
            unknown = set(weights) - set(COMPONENT_MAPS)
            if unknown:
                raise ValueError(f"{where}: unknown component maps {sorted(unknown)}; known: {list(COMPONENT_MAPS)}")
            if any(weight < 0 for weight in weights.values()) or not any(weights.values()):
                raise ValueError(f"{where}: map weights must be non-negative and not all zero, got {weights}")


@dataclass
class ScoringBatch:
    """What the component maps of a batch are computed from."""

    pil_images: list[Image.Image]
    images: torch.Tensor  # (B, 3, R, R) in [0, 1]
    class_names: list[str]
    memory_features: list[torch.Tensor] | None = None  # each (C, h, w), when the model has a memory
    latents: torch.Tensor | None = None  # (B, C, h, w), when the diffusion ran
    denoised: torch.Tensor | None = None
    reconstructions: torch.Tensor | None = None  # (B, 3, R, R)
    regeneration: Regeneration | None = None  # the regenerated cells, for a memory-guided reconstruction
    class_matches: list[ClassMatch | None] | None = None  # per image, when its class was guessed
    memory_maps: list[torch.Tensor] | None = None  # raw (h, w) memory maps, when the model has a memory
    # the feature pyramids the reconstruction map compares, each [(B, C_i, h_i, w_i), ...]
    input_features: list[torch.Tensor] | None = None
    reconstruction_features: list[torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.class_matches is None:
            self.class_matches = [None] * len(self.pil_images)


@dataclass(frozen=True)
class ComponentMap:
    """One registered map: its name, what it says in words, what it is computed from, and how.

    The pipeline puts what a map needs into the batch: the compared features when it needs the
    reconstruction, the memory maps when it needs the memory."""

    name: str
    description: str
    needs_reconstruction: bool
    needs_memory: bool
    compute: Callable[[ScoringBatch, AnomalyMapConfig], list[torch.Tensor]]  # raw (h, w) maps

    def ready(self, batch: ScoringBatch) -> bool:
        """Whether the batch holds what this map is computed from."""
        features = batch.input_features is not None and batch.reconstruction_features is not None
        return (features or not self.needs_reconstruction) and (batch.memory_maps is not None or not self.needs_memory)


def _reconstruction_maps(batch: ScoringBatch, config: AnomalyMapConfig) -> list[torch.Tensor]:
    size = batch.images.shape[-2:]
    return list(reconstruction_map(
        batch.input_features, batch.reconstruction_features, size, config.distance, config.match_window
    ))


def _memory_maps(batch: ScoringBatch, config: AnomalyMapConfig) -> list[torch.Tensor]:
    return batch.memory_maps


COMPONENT_MAPS: dict[str, ComponentMap] = {
    component.name: component
    for component in (
        ComponentMap(RECONSTRUCTION, "input vs reconstruction", True, False, _reconstruction_maps),
        ComponentMap(MEMORY, "normal-feature memory", False, True, _memory_maps),
    )
}


def needs_reconstruction(names: tuple[str, ...]) -> bool:
    """Whether any of these maps needs the diffusion's reconstruction."""
    return any(COMPONENT_MAPS[name].needs_reconstruction for name in names)


class AnomalyScorer:
    """Fuses component maps under weights and scales (the model's AnomalyMapConfig) into a map and a score.

    Each class is scored with its own weights where the config has some (`class_weights`), else with
    `weights`. `weights` given here overrides the configured ones for every class (to score another
    fusion of the same maps).
    """

    def __init__(self, config: AnomalyMapConfig, weights: dict[str, float] | None = None) -> None:
        self.config = replace(config, weights={**config.weights, **weights}, class_weights={}) if weights else config

    @property
    def weights(self) -> dict[str, float]:
        return self.config.weights

    def weights_of(self, class_name: str | None) -> dict[str, float]:
        """The weights the images of `class_name` are scored with."""
        return self.config.class_weights.get(class_name, self.weights)

    def active_of(self, class_name: str | None) -> tuple[str, ...]:
        """The maps with a positive weight for `class_name`."""
        return tuple(name for name, weight in self.weights_of(class_name).items() if weight > 0)

    @property
    def active(self) -> tuple[str, ...]:
        """The maps some class weights positively: what a batch of any classes needs computed."""
        names = {name for weights in (self.weights, *self.config.class_weights.values())
                 for name, weight in weights.items() if weight > 0}
        return tuple(name for name in COMPONENT_MAPS if name in names)

    @property
    def needs_reconstruction(self) -> bool:
        return needs_reconstruction(self.active)

    def uses_reconstruction(self, class_name: str | None) -> bool:
        """Whether the score of `class_name` depends on the diffusion's reconstruction."""
        return needs_reconstruction(self.active_of(class_name))

    @property
    def reconstruction_classes(self) -> list[str]:
        """The classes with their own weights whose score uses the reconstruction."""
        return sorted(name for name in self.config.class_weights if self.uses_reconstruction(name))

    def describe(self, class_name: str | None = None) -> str:
        """Which maps make the score of `class_name`, in words, with their weights when there are several."""
        weights = self.weights_of(class_name)
        active = self.active_of(class_name)
        if len(active) == 1:
            return COMPONENT_MAPS[active[0]].description
        return " + ".join(f"{weights[name]:g} x {COMPONENT_MAPS[name].description}" for name in active)

    def fuse(self, components: dict[str, torch.Tensor], size: tuple[int, int],
             class_name: str | None = None) -> tuple[torch.Tensor, float]:
        """Weighted sum (the weights of `class_name`) of the scaled component maps at `size` (h, w), blurred:
        ((h, w) map, image score)."""
        weights = self.weights_of(class_name)
        active = self.active_of(class_name)
        missing = [name for name in active if name not in components]
        if missing:
            raise ValueError(f"component maps {missing} were not computed")
        fused = sum(
            weights[name] / self.config.scales.get(name, 1.0)
            * F.interpolate(components[name][None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            for name in active
        )
        fused = gaussian_blur(fused[None], scaled_sigma(self.config.blur_sigma, max(size)))
        return fused[0], float(image_scores(fused, self.config.pool_size, self.config.pool_repeats)[0])


def compute_component_maps(
    batch: ScoringBatch, config: AnomalyMapConfig, names: tuple[str, ...]
) -> list[dict[str, torch.Tensor]]:
    """The raw maps `names` of every image of the batch: one {name: (h, w) map} per image."""
    components: list[dict[str, torch.Tensor]] = [{} for _ in batch.pil_images]
    for name in names:
        component = COMPONENT_MAPS[name]
        if not component.ready(batch):
            needed = "the reconstruction" if component.needs_reconstruction else "a normal-feature memory"
            raise ValueError(f"the {component.description} map needs {needed}; give it weight 0 without it")
        for parts, raw in zip(components, component.compute(batch, config)):
            parts[name] = raw
    return components


def computable_maps(pipeline: "VLMDiffPipeline") -> tuple[str, ...]:
    """Every registered map this model can compute (the memory's only with a memory)."""
    has_memory = pipeline.memory is not None
    return tuple(name for name, component in COMPONENT_MAPS.items() if has_memory or not component.needs_memory)


def fit_scales(components: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Each map's scale: the SCALE_QUANTILE of its values over held-out normal images."""
    scales = {}
    for name in components[0]:
        values = torch.cat([parts[name].flatten() for parts in components])
        values = values[:: max(1, len(values) // 200_000)]
        scales[name] = float(torch.quantile(values, SCALE_QUANTILE).clamp_min(1e-8))
    return scales
