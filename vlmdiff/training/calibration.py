"""After training: the normal-feature memory, the map scales for fusion, and per-class thresholds.

Every normal image is scored out of fold: the images of a class are split into `folds` folds,
and each fold is scored by a memory built from the other folds only, so no image is scored
against itself. These held-out raw maps give each component's scale (its 99th percentile) and
their fused scores the class threshold (a quantile of normal scores, the rule for normal-only
data) with its expected false-positive rate. The memory kept in the model holds all images.

Work is shared between the memory and its folds, so the cost is linear in the images: each image
is read and embedded once, and its per-image coreset candidates (`image_candidates`) serve the
model's memory and every fold's. A fold's memory continues the class's second-stage selection
(`select_coreset` from its rows outside the fold): it takes only the steps the fold's rows leave open.
At most MAX_SCORED images of a class are scored out of fold (evenly spread over its images);
when only the memory's map is needed their features are kept (float16) and scored without
embedding them again, and every other image's features are dropped once its candidates are taken.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable
import torch
from PIL import Image

from vlmdiff.allocator import release_freed_memory
from vlmdiff.config import DEFAULT_BATCH_SIZE
from vlmdiff.data.validation import read_image
from vlmdiff.images import read_ahead
from vlmdiff.memory import Coreset, ImageCandidates, NormalFeatureMemory, image_candidates, projection_matrix
from vlmdiff.pipeline import DetectionSettings, VLMDiffPipeline
from vlmdiff.progress import Phase, Progress, no_progress, within
from vlmdiff.scoring import MEMORY, computable_maps, fit_scales, needs_reconstruction
from vlmdiff.thresholds import DEFAULT_QUANTILE, Thresholds
from vlmdiff.training.data import TrainingSet

MAX_SCORED = 300  # images of a class scored out of fold at most (the 0.99 quantile of 300 scores: 3 above it)


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


def scored_images(data: TrainingSet, classes: set[str], limit: int = MAX_SCORED) -> list[int]:
    """The images of `classes` scored out of fold: all of them, or `limit` per class evenly spread over it."""
    chosen = []
    for name in sorted(classes):
        members = [i for i, n in enumerate(data.class_names) if n == name]
        step = max(1.0, len(members) / limit)
        chosen += sorted({members[int(k * step)] for k in range(min(limit, len(members)))})
    return sorted(chosen)


def working_image(data: TrainingSet, index: int) -> Image.Image:
    """An image at the working size, as the pipeline reads it for detection."""
    return read_image(data.sources[index]) if data.sources is not None else data.original(index)


@dataclass
class ClassFeatures:
    """What calibration keeps of each image of the classes once embedded: its per-image coreset candidates
    (one per turn) and, for the scored images when only the memory map is needed, its features (float16)
    and working size."""

    candidates: dict[int, list[ImageCandidates]] = field(default_factory=dict)
    kept: dict[int, tuple[torch.Tensor, tuple[int, int]]] = field(default_factory=dict)
    coresets: dict[str, Coreset] = field(default_factory=dict)  # each class's coreset of all its images

    def of_class(self, data: TrainingSet, name: str) -> list[tuple[int, ImageCandidates]]:
        """(image index, candidates) of every feature map of class `name`, in image order."""
        return [(i, c) for i, turns in sorted(self.candidates.items()) if data.class_names[i] == name for c in turns]


@torch.no_grad()
def embed_once(
    pipeline: VLMDiffPipeline, data: TrainingSet, classes: set[str], folds: int, seed: int, keep: set[int],
    vectors: int = 0, progress: Progress | None = None,
) -> ClassFeatures:
    """Read and embed each image of `classes` once: its candidates, enough for the memory of any set of folds
    but one (`candidate_limit`), and the features of the images in `keep`."""
    memory = pipeline.memory
    projection = projection_matrix(memory.config.feature_channels, seed)
    members = [i for i, name in enumerate(data.class_names) if name in classes]
    per_class = {name: data.class_names.count(name) for name in classes}
    # the fewest feature maps a memory of the class is built from: all its images but the largest fold
    fewest = {name: (n - -(-n // folds)) * memory.config.rotations if n > 1 else memory.config.rotations
              for name, n in per_class.items()}
    result = ClassFeatures()
    phase = Phase(progress or no_progress, "embedding")
    images = read_ahead(lambda i: working_image(data, i), members)
    for done, (i, image) in enumerate(zip(members, images)):
        turns = memory.training_features(image)
        limits = [memory.candidate_limit(f[0].numel(), fewest[data.class_names[i]], vectors or None) for f in turns]
        result.candidates[i] = [image_candidates(f, limit, projection) for f, limit in zip(turns, limits)]
        if i in keep:
            result.kept[i] = (turns[0].half(), pipeline.working_size(*image.size))
        del turns
        release_freed_memory()  # the backbone's freed activations, pinned in the heap by the candidates kept after them
        phase(done + 1, len(members), "images")
    return result


def fold_memory(
    full: NormalFeatureMemory, data: TrainingSet, classes: set[str], features: ClassFeatures, fold: list[int], k: int,
    vectors: int = 0,
) -> NormalFeatureMemory:
    """`full` with each of `classes` held by the images outside fold `k` only (`fold`: each image's fold):
    each class's coreset continued from its rows outside the fold, when it is known."""
    memory = full
    for name in classes:
        entries = features.of_class(data, name)
        places = [p for p, (i, _) in enumerate(entries) if fold[i] != k]
        if places:
            start = features.coresets[name].restricted(places) if name in features.coresets else None
            memory = memory.with_candidates([entries[p][1] for p in places], name, vectors or None, start)
    return memory


@torch.no_grad()
def out_of_fold_components(
    pipeline: VLMDiffPipeline, data: TrainingSet, classes: set[str], folds: int, seed: int,
    maps: tuple[str, ...] | None = None, vectors: int = 0, features: ClassFeatures | None = None,
    scored: list[int] | None = None, progress: Progress | None = None,
) -> list[tuple]:
    """`held_out_components` of the `scored` images of `classes` (default: all), each scored by a memory
    without its fold.

    The pipeline's memory must already hold these classes' images (each fold's memory replaces
    only them); it is left as it was. `features`: each image's candidates (and kept features), when known.
    """
    full = pipeline.memory
    fold = fold_of(data, folds)
    members = [i for i, name in enumerate(data.class_names) if name in classes]
    scored = members if scored is None else scored
    if full is not None and features is None:
        features = embed_once(pipeline, data, classes, folds, seed, set(), vectors)
    rows = []
    phase = Phase(progress or no_progress, "out-of-fold scoring")
    try:
        for k in range(folds):
            held = [i for i in scored if fold[i] == k]
            if not held:
                continue
            memory = fold_memory(full, data, classes, features, fold, k, vectors) if full is not None else None
            pipeline.memory = memory
            from_features = [i for i in held if features is not None and i in features.kept]
            for i in from_features:  # the memory map only, from the features kept when embedding
                kept, size = features.kept[i]
                rows.append(({MEMORY: memory.distance_map(kept.float(), data.class_names[i])}, size, data.class_names[i]))
                release_freed_memory()  # the search's blocks, freed between smaller allocations, fragment the heap
                phase(len(rows), len(scored), "images")
            rows += held_out_components(pipeline, data, [i for i in held if i not in from_features], seed, maps,
                                        lambda done: phase(len(rows) + done, len(scored), "images"))
            del memory
            release_freed_memory()
    finally:
        pipeline.memory = full
    return rows


@torch.no_grad()
def memorise_and_score_out_of_fold(
    pipeline: VLMDiffPipeline, data: TrainingSet, classes: set[str], folds: int, seed: int,
    maps: tuple[str, ...] | None = None, vectors: int = 0, progress: Progress | None = None,
) -> list[tuple]:
    """Each of `classes` gets all its images in the pipeline's memory (when it has one, embedded once),
    then `out_of_fold_components` of at most MAX_SCORED images per class (`scored_images`)."""
    report = progress or no_progress
    maps = pipeline.scorer.active if maps is None else maps
    scored = scored_images(data, classes)
    features = None
    if pipeline.memory is not None:
        keep = set(scored) if tuple(maps) == (MEMORY,) else set()  # scored from the kept features
        features = embed_once(pipeline, data, classes, folds, seed, keep, vectors, within(report, 0.0, 0.6))
        phase = Phase(within(report, 0.6, 0.7), "coreset")
        for done, name in enumerate(sorted(classes)):
            own = [c for _, c in features.of_class(data, name)]
            features.coresets[name] = pipeline.memory.select(own, vectors or None)
            pipeline.memory = pipeline.memory.with_coreset(features.coresets[name], own, name)
            phase(done + 1, len(classes), "classes")
    return out_of_fold_components(pipeline, data, classes, folds, seed, maps, vectors, features, scored,
                                  within(report, 0.7, 1.0))


@torch.no_grad()
def held_out_components(
    pipeline: VLMDiffPipeline, data: TrainingSet, indices: list[int], seed: int, maps: tuple[str, ...] | None = None,
    done: Callable[[int], None] | None = None,
) -> list[tuple]:
    """(raw component maps, working size, class name) of each chosen image, its class given.

    `maps` defaults to those the configured weights use; the diffusion runs only if one of them needs it.
    `done` is told how many images are scored after each batch.
    """
    maps = pipeline.scorer.active if maps is None else maps
    # whole-image reconstructions: the reconstruction map's scale is for the classes that weigh it, which are
    # reconstructed whole (memory-guided ones are zero wherever the memory flags nothing)
    settings = DetectionSettings(seed=seed, memory_guidance=0.0).resolved(pipeline.config)
    reconstruct = needs_reconstruction(maps)
    rows = []
    for start in range(0, len(indices), DEFAULT_BATCH_SIZE):
        chunk = indices[start : start + DEFAULT_BATCH_SIZE]
        images = [working_image(data, i) for i in chunk]
        batch = pipeline.prepare_batch(images, [data.class_names[i] for i in chunk], settings, reconstruct)
        components = pipeline.component_maps(batch, maps)
        rows += [(parts, pipeline.working_size(*image.size), name) for parts, image, name in zip(components, images, batch.class_names)]
        if done is not None:
            done(len(rows))
    return rows


def fit_thresholds(pipeline: VLMDiffPipeline, rows: list[tuple], quantile: float) -> None:
    """Per-class quantile thresholds of the fused scores of held-out normal images."""
    scorer = pipeline.scorer
    scores: dict[str, list[float]] = {}
    for parts, size, name in rows:
        scores.setdefault(name, []).append(scorer.fuse(parts, size, name)[1])
    for name, class_scores in scores.items():
        pipeline.thresholds.fit_quantile(name, class_scores, quantile)


def calibrate(
    pipeline: VLMDiffPipeline, data: TrainingSet, config: CalibrationConfig, progress: Progress | None = None
) -> dict:
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
    rows = score(pipeline, data, classes, config.folds, config.seed, computable_maps(pipeline), config.vectors_per_class,
                 progress=progress)
    pipeline.config.anomaly.scales = fit_scales([parts for parts, _, _ in rows])
    fit_thresholds(pipeline, rows, config.threshold_quantile)
    return {
        "map_scales": dict(pipeline.config.anomaly.scales),
        "thresholds": {c: pipeline.thresholds.get(c).value for c in pipeline.thresholds.classes},
        "expected_fpr": {c: pipeline.thresholds.get(c).expected_fpr for c in pipeline.thresholds.classes},
    }
