"""After training: the normal-feature memory, the map scales for fusion, and per-class thresholds.

Per class a few normal images are held out of the memory; their raw maps give each
component's scale (its 99th percentile) and their fused scores the class threshold (a
quantile of normal scores, the rule for normal-only data).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmdiff.memory import DEFAULT_VECTORS_PER_CLASS, NormalFeatureMemory
from vlmdiff.pipeline import DetectionSettings, VLMDiffPipeline
from vlmdiff.scoring import computable_maps, fit_scales, needs_reconstruction
from vlmdiff.thresholds import DEFAULT_QUANTILE
from vlmdiff.training.data import TrainingSet

BATCH = 8


@dataclass
class CalibrationConfig:
    memory: bool = True
    vectors_per_class: int = DEFAULT_VECTORS_PER_CLASS  # coreset size per class
    holdout_per_class: int = 8
    threshold_quantile: float = DEFAULT_QUANTILE
    seed: int = 0


def split_holdout(data: TrainingSet, per_class: int) -> tuple[list[int], list[int]]:
    """(memory indices, held-out calibration indices): the last `per_class` images of each class."""
    held = []
    for name in sorted(set(data.class_names)):
        members = [i for i, n in enumerate(data.class_names) if n == name]
        held += members[-per_class:] if len(members) > per_class else []
    held_set = set(held)
    return [i for i in range(len(data)) if i not in held_set], held


@torch.no_grad()
def held_out_components(
    pipeline: VLMDiffPipeline, data: TrainingSet, indices: list[int], seed: int, maps: tuple[str, ...] | None = None
) -> list[tuple]:
    """(raw component maps, working size, class name) of each chosen image, its class given.

    `maps` defaults to those the configured weights use; the diffusion runs only if one of them needs it.
    """
    maps = pipeline.scorer.active if maps is None else maps
    settings = DetectionSettings(seed=seed).resolved(pipeline.config)
    reconstruct = needs_reconstruction(maps)
    rows = []
    for start in range(0, len(indices), BATCH):
        chunk = indices[start : start + BATCH]
        images = [data.original(i) for i in chunk]
        batch = pipeline.prepare_batch(images, [data.class_names[i] for i in chunk], settings, reconstruct)
        components = pipeline.component_maps(batch, maps)
        rows += [(parts, pipeline.working_size(*image.size), name) for parts, image, name in zip(components, images, batch.class_names)]
    return rows


def fit_thresholds(pipeline: VLMDiffPipeline, rows: list[tuple], quantile: float) -> None:
    """Per-class quantile thresholds of the fused scores of held-out normal images."""
    scorer = pipeline.scorer
    scores: dict[str, list[float]] = {}
    for parts, size, name in rows:
        scores.setdefault(name, []).append(scorer.fuse(parts, size)[1])
    for name, class_scores in scores.items():
        pipeline.thresholds.fit_quantile(name, class_scores, quantile)


def calibrate(pipeline: VLMDiffPipeline, data: TrainingSet, config: CalibrationConfig) -> dict:
    """Fit the memory (optional), the map scales and the per-class thresholds, in place."""
    memory_indices, held = split_holdout(data, config.holdout_per_class)
    if not held:
        raise ValueError("calibration needs more normal images than holdout_per_class in at least one class")
    if config.memory:
        pipeline.memory = NormalFeatureMemory.fit(
            [data.original(i) for i in memory_indices], [data.class_names[i] for i in memory_indices],
            config.vectors_per_class, config.seed,
        )
    pipeline.config.classes = tuple(sorted(set(data.class_names)))
    # every map the model can compute, so that its scale is known whichever weights are chosen later
    rows = held_out_components(pipeline, data, held, config.seed, computable_maps(pipeline))
    pipeline.config.anomaly.scales = fit_scales([parts for parts, _, _ in rows])
    fit_thresholds(pipeline, rows, config.threshold_quantile)
    return {
        "map_scales": dict(pipeline.config.anomaly.scales),
        "thresholds": {c: pipeline.thresholds.get(c).value for c in pipeline.thresholds.classes},
    }
