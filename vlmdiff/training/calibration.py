"""After training: the normal-feature memory, the map scales for fusion, and per-class thresholds.

Per class a few normal images are held out of the memory; their maps give each
component's scale (99th percentile) and their scores the class threshold (a quantile
of normal scores, the rule for normal-only data).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmdiff.anomaly import image_scores
from vlmdiff.memory import NormalFeatureMemory
from vlmdiff.pipeline import VLMDiffPipeline
from vlmdiff.training.data import TrainingSet

BATCH = 16


@dataclass
class CalibrationConfig:
    memory: bool = True
    coreset_ratio: float = 0.1
    aggregation_kernel: int = 3
    neighbours: int = 1
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
def _batched_maps(pipeline: VLMDiffPipeline, data: TrainingSet, indices: list[int], seed: int):
    """Raw component maps and memory features of chosen images, in batches."""
    components, features = {}, []
    for start in range(0, len(indices), BATCH):
        images = data.float_images(indices[start : start + BATCH])
        latents, denoised, reconstructions = pipeline.reconstruct(
            images, pipeline.config.strength, pipeline.config.num_inference_steps, seed
        )
        parts, memory_features = pipeline.map_components(images, reconstructions, latents, denoised)
        for name, maps in parts.items():
            components.setdefault(name, []).append(maps)
        features.append(memory_features)
    return {name: torch.cat(maps) for name, maps in components.items()}, torch.cat(features)


@torch.no_grad()
def memory_features(pipeline: VLMDiffPipeline, data: TrainingSet, indices: list[int]) -> torch.Tensor:
    """Input features on the 1/8 grid that the memory stores (no denoising needed)."""
    chunks = []
    for start in range(0, len(indices), BATCH):
        images = data.float_images(indices[start : start + BATCH])
        if pipeline.config.anomaly.compare == "latent":
            chunks.append(pipeline.autoencoder.standardized_features(images))
        else:
            _, _, grid = pipeline._feature_pairs(images, images, None, None)
            chunks.append(grid)
    return torch.cat(chunks)


def calibrate(pipeline: VLMDiffPipeline, data: TrainingSet, config: CalibrationConfig) -> dict:
    """Fit the memory (optional), the map scales and the per-class thresholds, in place."""
    memory_indices, held = split_holdout(data, config.holdout_per_class)
    if not held:
        raise ValueError("calibration needs more normal images than holdout_per_class in at least one class")
    if config.memory:
        features = memory_features(pipeline, data, memory_indices)
        pipeline.memory = NormalFeatureMemory.fit(
            features, [data.class_names[i] for i in memory_indices], config.coreset_ratio,
            config.aggregation_kernel, config.neighbours, config.seed,
        ).eval()
    pipeline.config.classes = tuple(sorted(set(data.class_names)))
    pipeline.config.map_scales = {"reconstruction": 1.0, "memory": 1.0}
    components, _ = _batched_maps(pipeline, data, held, config.seed)
    for name, maps in components.items():
        pipeline.config.map_scales[name] = float(torch.quantile(maps.flatten()[::7], 0.99).clamp_min(1e-8))
    scores = image_scores(pipeline.fuse(components), pipeline.config.anomaly.pool_size, pipeline.config.anomaly.pool_repeats)
    held_classes = [data.class_names[i] for i in held]
    for name in sorted(set(held_classes)):
        class_scores = [float(s) for s, c in zip(scores, held_classes) if c == name]
        pipeline.thresholds.fit_quantile(name, class_scores, config.threshold_quantile)
    return {"map_scales": dict(pipeline.config.map_scales), "thresholds": {c: pipeline.thresholds.get(c).value for c in pipeline.thresholds.classes}}
