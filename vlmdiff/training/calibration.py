"""After training: the normal-feature memory, the map scales for fusion, and per-class thresholds.

Per class a few normal images are held out of the memory; their raw maps give each
component's scale (99th percentile) and their fused scores the class threshold (a
quantile of normal scores, the rule for normal-only data).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmdiff.memory import NormalFeatureMemory
from vlmdiff.pipeline import VLMDiffPipeline
from vlmdiff.training.data import TrainingSet

BATCH = 8


@dataclass
class CalibrationConfig:
    memory: bool = True
    vectors_per_class: int = 8000  # coreset size per class
    holdout_per_class: int = 8
    threshold_quantile: float = 0.99
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
def held_out_scores(pipeline: VLMDiffPipeline, data: TrainingSet, indices: list[int], seed: int) -> list[tuple]:
    """(raw component maps, working size, class name) of each chosen image, known classes given.

    Both maps are computed, so that their scales are known whichever weights are used later.
    """
    maps = ("reconstruction", "memory") if pipeline.memory is not None else ("reconstruction",)
    rows = []
    for start in range(0, len(indices), BATCH):
        chunk = indices[start : start + BATCH]
        images = [data.original(i) for i in chunk]
        classes = [data.class_names[i] for i in chunk]
        components, names, _ = pipeline.component_maps(
            images, pipeline.config.strength, pipeline.config.num_inference_steps, seed, class_names=classes, maps=maps
        )
        rows += [(parts, pipeline.working_size(*image.size), name) for parts, image, name in zip(components, images, names)]
    return rows


def fit_thresholds(pipeline: VLMDiffPipeline, rows: list[tuple], quantile: float) -> None:
    """Per-class quantile thresholds of the fused scores of held-out normal images."""
    scores: dict[str, list[float]] = {}
    for parts, size, name in rows:
        scores.setdefault(name, []).append(pipeline.fuse(parts, size)[1])
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
    pipeline.config.map_scales = {"reconstruction": 1.0, "memory": 1.0}
    rows = held_out_scores(pipeline, data, held, config.seed)
    for name in rows[0][0]:
        values = torch.cat([parts[name].flatten() for parts, _, _ in rows])
        pipeline.config.map_scales[name] = float(torch.quantile(values[:: max(1, len(values) // 200_000)], 0.99).clamp_min(1e-8))
    fit_thresholds(pipeline, rows, config.threshold_quantile)
    return {
        "map_scales": dict(pipeline.config.map_scales),
        "thresholds": {c: pipeline.thresholds.get(c).value for c in pipeline.thresholds.classes},
    }
