"""After training: the normal-feature memory, the map scales for fusion, and per-class thresholds.

Every normal image is scored out of fold: the images of a class are split into `folds` folds,
and each fold is scored by a memory built from the other folds only, so no image is scored
against itself. These held-out raw maps give each component's scale (its 99th percentile) and
their fused scores the class threshold (a quantile of normal scores, the rule for normal-only
data) with its expected false-positive rate. The memory kept in the model holds all images.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmdiff.memory import NormalFeatureMemory
from vlmdiff.pipeline import DetectionSettings, VLMDiffPipeline
from vlmdiff.scoring import computable_maps, fit_scales, needs_reconstruction
from vlmdiff.thresholds import DEFAULT_QUANTILE, Thresholds
from vlmdiff.training.data import TrainingSet

BATCH = 8


@dataclass
class CalibrationConfig:
    memory: bool = True
    vectors_per_class: int = 0  # coreset size per class; 0: the memory's coreset ratio of the class's patches
    folds: int = 5  # out-of-fold scoring of the normal images
    threshold_quantile: float = DEFAULT_QUANTILE
    seed: int = 0


def fold_of(data: TrainingSet, folds: int) -> list[int]:
    """The fold of each image: images of a class take turns over the folds."""
    seen: dict[str, int] = {}
    assignment = []
    for name in data.class_names:
        assignment.append(seen.get(name, 0) % folds)
        seen[name] = seen.get(name, 0) + 1
    return assignment


@torch.no_grad()
def out_of_fold_components(
    pipeline: VLMDiffPipeline, data: TrainingSet, classes: set[str], folds: int, seed: int,
    maps: tuple[str, ...] | None = None, vectors: int = 0, features: dict[int, list[torch.Tensor]] | None = None,
) -> list[tuple]:
    """`held_out_components` of every image of `classes`, each scored by a memory without its fold.

    The pipeline's memory must already hold these classes' images (each fold's memory replaces
    only them); it is left as it was. `features`: each image's `training_features`, when known.
    """
    full = pipeline.memory
    fold = fold_of(data, folds)
    members = [i for i, name in enumerate(data.class_names) if name in classes]
    if full is not None and features is None:
        features = {i: full.training_features(data.original(i)) for i in members}
    rows = []
    try:
        for k in range(folds):
            held = [i for i in members if fold[i] == k]
            if not held:
                continue
            memory = full
            for name in classes if full is not None else ():
                rest = [f for i in members if data.class_names[i] == name and fold[i] != k for f in features[i]]
                if rest:
                    memory = memory.with_features(rest, name, vectors or None, seed)
            pipeline.memory = memory
            rows += held_out_components(pipeline, data, held, seed, maps)
    finally:
        pipeline.memory = full
    return rows


@torch.no_grad()
def memorise_and_score_out_of_fold(
    pipeline: VLMDiffPipeline, data: TrainingSet, classes: set[str], folds: int, seed: int,
    maps: tuple[str, ...] | None = None, vectors: int = 0,
) -> list[tuple]:
    """Each of `classes` gets all its images in the pipeline's memory (when it has one, embedded once),
    then `out_of_fold_components` of those images."""
    features = None
    if pipeline.memory is not None:
        features = {i: pipeline.memory.training_features(data.original(i))
                    for i, name in enumerate(data.class_names) if name in classes}
        for name in sorted(classes):
            own = [f for i, turns in features.items() if data.class_names[i] == name for f in turns]
            pipeline.memory = pipeline.memory.with_features(own, name, vectors or None, seed)
    return out_of_fold_components(pipeline, data, classes, folds, seed, maps, vectors, features)


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
    """Fit the memory (optional, from all images), the map scales and the per-class thresholds, in place.

    The model's classes become those of `data`: the thresholds and memory hold exactly them.
    """
    if config.folds < 2:
        raise ValueError(f"calibration needs at least 2 folds; got {config.folds}")
    classes = set(data.class_names)
    pipeline.config.classes = tuple(sorted(classes))
    pipeline.thresholds = Thresholds()
    # every map the model can compute, so that its scale is known whichever weights are chosen later
    score = out_of_fold_components
    if config.memory:
        pipeline.memory = NormalFeatureMemory()  # the current recipe, filled by memorise_and_score_out_of_fold
        score = memorise_and_score_out_of_fold
    rows = score(pipeline, data, classes, config.folds, config.seed, computable_maps(pipeline), config.vectors_per_class)
    pipeline.config.anomaly.scales = fit_scales([parts for parts, _, _ in rows])
    fit_thresholds(pipeline, rows, config.threshold_quantile)
    return {
        "map_scales": dict(pipeline.config.anomaly.scales),
        "thresholds": {c: pipeline.thresholds.get(c).value for c in pipeline.thresholds.classes},
        "expected_fpr": {c: pipeline.thresholds.get(c).expected_fpr for c in pipeline.thresholds.classes},
    }
