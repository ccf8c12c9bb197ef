"""A PatchCore nearest-neighbour baseline on the model's backbone (the reference the memory must beat).

PatchCore (Roth et al., 2022) keeps a memory bank of locally aggregated patch features of
normal training images, subsampled by a greedy (k-center) coreset, and scores a test image
by each patch's distance to its nearest normal patch: the map is upsampled, Gaussian
blurred, and the image score is its maximum.

Here the features, the coreset and the kNN are vlmdiff's own `NormalFeatureMemory`
(frozen EfficientNet-Lite0 blocks, 3x3 neighbourhood average, upsampled to the 1/8 grid,
per-class two-stage greedy coreset, L2 kNN), with the model memory's feature settings unless
other blocks, a long side or a coreset are given; bench_quality's reference is blocks 4 + 10 at
256 px with a 1% coreset. The map is blurred (sigma given at 256 px, scaled) and the score is the
plain maximum (PatchCore), not the pipeline's pooled maximum.

    baseline = PatchCoreBaseline.like(pipeline.memory, coreset=0.01, layers=(4, 10), long_side=256, blur_sigma=4)
    baseline.fit(train_images, train_class_names)
    anomaly_map, score = baseline.predict(image, class_name)   # map at the image's own size
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vlmdiff.anomaly import REFERENCE_RESOLUTION, gaussian_blur
from vlmdiff.features import EFFICIENTNET_LITE0_BLOCKS
from vlmdiff.memory import GRID_STRIDE, NormalFeatureMemory

DEFAULT_RATIO = 0.1  # PatchCore's 10% coreset when the model's memory gives no size to copy


def feature_config(memory: NormalFeatureMemory | None = None, layers: Sequence[int] | None = None) -> dict:
    """The feature settings of `memory` (or the memory's defaults), optionally other EfficientNet-Lite0 blocks."""
    config = (memory if memory is not None else NormalFeatureMemory()).recipe
    config["layers"] = tuple(config["layers"])
    if layers is not None:
        config["layers"] = tuple(sorted(layers))
        config["feature_channels"] = sum(EFFICIENTNET_LITE0_BLOCKS[layer][0] for layer in config["layers"])
    return config


def class_sizes(memory: NormalFeatureMemory) -> dict[str, int]:
    """Rows of the model memory's coreset per class."""
    counts = torch.bincount(memory.bank_class, minlength=len(memory.config.class_names)).tolist()
    return dict(zip(memory.config.class_names, counts))


class PatchCoreBaseline:
    """Memory bank of normal patches + greedy coreset + kNN map, blurred, max score."""

    def __init__(
        self,
        config: dict | None = None,
        coreset: str | float | int = DEFAULT_RATIO,
        resolution: int = REFERENCE_RESOLUTION,
        blur_sigma: float = 5.0,
        seed: int = 0,
        reference_sizes: dict[str, int] | None = None,
    ) -> None:
        """coreset: a ratio in (0, 1] of each class's patches, a count per class (int > 1), or "auto":
        the model memory's per-class size (`reference_sizes`), else DEFAULT_RATIO."""
        self.config = dict(config or feature_config())
        self.coreset = coreset
        self.resolution = resolution
        self.blur_sigma = blur_sigma
        self.seed = seed
        self.reference_sizes = reference_sizes or {}
        self.memory = NormalFeatureMemory(**self.config)
        self.class_counts: dict[str, int] = {}
        self.fit_seconds = float("nan")

    @classmethod
    def like(cls, memory: NormalFeatureMemory | None, coreset="auto", layers=None, long_side: int | None = None,
             **options) -> "PatchCoreBaseline":
        """A baseline on the features of a model's memory (None: the memory's defaults), optionally on other
        EfficientNet-Lite0 blocks and another working long side."""
        sizes = class_sizes(memory) if memory is not None and layers is None else None
        config = feature_config(memory, layers)
        if long_side is not None:
            config["long_side"] = long_side
        return cls(config, coreset=coreset, reference_sizes=sizes, **options)

    def patches_per_image(self, image: Image.Image) -> int:
        height, width = self.memory.input_size(*image.size)
        return (height // GRID_STRIDE) * (width // GRID_STRIDE)

    def coreset_size(self, class_name: str, images: Sequence[Image.Image]) -> int:
        patches = sum(self.patches_per_image(image) for image in images)
        coreset = self.coreset
        if coreset == "auto":
            if class_name in self.reference_sizes:
                return min(patches, self.reference_sizes[class_name])
            if self.reference_sizes:  # a class the model never saw: its typical size
                return min(patches, int(np.median(list(self.reference_sizes.values()))))
            coreset = DEFAULT_RATIO
        coreset = float(coreset)
        if coreset > 1:
            return min(patches, int(coreset))
        if not 0 < coreset <= 1:
            raise ValueError(f"coreset must be 'auto', a ratio in (0, 1] or a count; got {self.coreset!r}")
        return max(1, math.ceil(coreset * patches))

    @torch.no_grad()
    def fit(self, images: Sequence[Image.Image], class_names: Sequence[str]) -> "PatchCoreBaseline":
        """Memory bank of the normal training images, one coreset per class."""
        started = time.perf_counter()
        for name in sorted(set(class_names)):
            members = [image for image, n in zip(images, class_names) if n == name]
            count = self.coreset_size(name, members)
            self.class_counts[name] = count
            self.memory = self.memory.with_class(members, name, count, self.seed)
        self.fit_seconds = time.perf_counter() - started
        return self

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        """(h, w): the image's aspect with the long side at `resolution` (as the pipeline's maps)."""
        scale = self.resolution / max(width, height)
        return max(8, round(height * scale)), max(8, round(width * scale))

    @torch.inference_mode()
    def predict(self, image: Image.Image, class_name: str | None = None) -> tuple[np.ndarray, float]:
        """(anomaly map at the image's own (H, W), image score = max of the blurred map)."""
        features = self.memory.embed(image)
        distances = self.memory.distance_map(features, class_name)  # searches all classes if unknown
        size = self.working_size(*image.size)
        maps = F.interpolate(distances[None, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        maps = gaussian_blur(maps, self.blur_sigma * max(size) / REFERENCE_RESOLUTION)
        score = float(maps.max())
        width, height = image.size
        full = F.interpolate(maps[None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
        return full.numpy().astype(np.float32), score
