"""Each class's reconstruction weight, chosen from its normal images alone.

Some anomalies leave every local patch normal (a swapped label, a wrong liquid colour, a missing
part): the memory misses them and the reconstruction may not. Whether a class gains from adding
its reconstruction map to the memory's is chosen per class without real defects: synthetic
anomalies (`vlmdiff.data.synthetic`) are made from some of its normal images, and each normal image
and its anomalous twin are scored out of fold (by a memory without the image's fold, the
reconstruction whole at the model's strength). The weight of FUSION_WEIGHTS with the best I-AUROC +
AUPRO on them wins, a weight above 0 only when it beats the memory alone by MIN_GAIN in that sum
and loses at most AUPRO_SLACK of its AUPRO (the localisation the memory gives is kept).
A chosen weight goes into the model's `anomaly.class_weights` and the class's threshold is refitted
from the out-of-fold fused scores of its normal images.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from vlmdiff.data.synthetic import AREA, synthetic_anomaly
from vlmdiff.metrics import aupro as metrics_aupro
from vlmdiff.metrics import image_auroc
from vlmdiff.pipeline import DetectionSettings, VLMDiffPipeline
from vlmdiff.progress import Phase, Progress, no_progress
from vlmdiff.scoring import MEMORY, RECONSTRUCTION, AnomalyScorer
from vlmdiff.training.calibration import embed_once, fold_memory, fold_of, scored_images, working_image
from vlmdiff.training.data import TrainingSet

FUSION_WEIGHTS = (0.0, 0.25, 0.5, 1.0)  # of the reconstruction map, the memory's at 1
MIN_GAIN = 0.02  # I-AUROC + AUPRO on the synthetic anomalies a reconstruction weight must add to the memory's
AUPRO_SLACK = 0.005  # AUPRO on the synthetic anomalies a reconstruction weight may cost (chosen on brick, a tune class)
FUSION_IMAGES = 40  # normal images of a class (each with its synthetic twin) scored at most


@dataclass
class FusionChoice:
    """A class's reconstruction weight and the synthetic I-AUROC and AUPRO of every weight tried."""

    class_name: str
    weight: float
    auroc: dict[float, float]
    aupro: dict[float, float]
    images: int


def _weights(weight: float) -> dict[str, float]:
    return {MEMORY: 1.0, RECONSTRUCTION: weight}


def pick_weight(auroc: dict[float, float], aupro: dict[float, float]) -> float:
    """The weight of the best I-AUROC + AUPRO (the smaller on a tie) among those that keep the AUPRO of weight 0
    within AUPRO_SLACK; 0 unless it beats weight 0 by MIN_GAIN."""
    total = {w: auroc[w] + aupro[w] for w in auroc if aupro[w] >= aupro[0.0] - AUPRO_SLACK}
    best = max(total, key=lambda w: (total[w], -w))
    return best if best > 0 and total[best] >= total[0.0] + MIN_GAIN else 0.0


@torch.no_grad()
def choose_fusion(
    pipeline: VLMDiffPipeline, data: TrainingSet, class_name: str, folds: int = 5, seed: int = 0,
    quantile: float | None = None, progress: Progress | None = None, area: tuple[float, float] = AREA,
) -> FusionChoice:
    """Choose `class_name`'s reconstruction weight from its images in `data` and set it in the pipeline
    (`anomaly.class_weights`; weight 0 removes the class's own weights). With `quantile`, a class given
    a weight gets its threshold refitted at that quantile of its normal images' fused scores."""
    if pipeline.memory is None or class_name not in pipeline.memory.config.class_names:
        raise ValueError(f"class {class_name!r} has no normal-feature memory to fuse the reconstruction with")
    rng = np.random.default_rng(seed)
    scored = scored_images(data, {class_name}, FUSION_IMAGES)
    features = embed_once(pipeline, data, {class_name}, folds, seed, set())
    fold, full = fold_of(data, folds), pipeline.memory
    settings = DetectionSettings(seed=seed, memory_guidance=0.0).resolved(pipeline.config)
    rows: list[tuple[dict, tuple[int, int], np.ndarray]] = []  # (component maps, working size, defect mask)
    phase = Phase(progress or no_progress, "choosing the fusion")
    try:
        for k in range(folds):
            held = [i for i in scored if fold[i] == k]
            if not held:
                continue
            pipeline.memory = fold_memory(full, data, {class_name}, features, fold, k)
            for i in held:
                normal = working_image(data, i)
                anomalous, mask = synthetic_anomaly(normal, rng, area=area)
                size = pipeline.working_size(*normal.size)
                batch = pipeline.prepare_batch([normal, anomalous], [class_name] * 2, settings)
                parts = pipeline.component_maps(batch, (MEMORY, RECONSTRUCTION))
                small = np.asarray(Image.fromarray(mask).resize(size[::-1], Image.Resampling.NEAREST))
                rows += [(parts[0], size, np.zeros_like(small)), (parts[1], size, small)]
                phase(len(rows) // 2, len(scored), "images")
    finally:
        pipeline.memory = full
    labels = [int(mask.any()) for _, _, mask in rows]
    masks = np.stack([mask for _, _, mask in rows]) if len({m.shape for _, _, m in rows}) == 1 else None
    auroc, aupro, scores = {}, {}, {}
    for w in FUSION_WEIGHTS:
        fused = [AnomalyScorer(pipeline.config.anomaly, _weights(w)).fuse(maps, size) for maps, size, _ in rows]
        scores[w] = [score for _, score in fused]
        auroc[w] = float(image_auroc(scores[w], labels))
        # images of one size (as most classes are): AUPRO over the synthetic masks; else the image level alone
        aupro[w] = float(metrics_aupro(np.stack([m.numpy() for m, _ in fused]), masks)) if masks is not None else 0.0
    weight = pick_weight(auroc, aupro)
    class_weights = dict(pipeline.config.anomaly.class_weights)
    class_weights.pop(class_name, None)
    if weight > 0:
        class_weights[class_name] = _weights(weight)
        if quantile is not None:
            normal_scores = [score for score, label in zip(scores[weight], labels) if label == 0]
            pipeline.thresholds.fit_quantile(class_name, normal_scores, quantile)
    pipeline.config.anomaly = replace(pipeline.config.anomaly, class_weights=class_weights)
    return FusionChoice(class_name, weight, auroc, aupro, len(scored))
