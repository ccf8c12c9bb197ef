"""Anomaly detection metrics: image/pixel AUROC, AP, F1-max and AUPRO.

Every metric is computed per class from one descending sort of the scores and
vectorised cumulative sums, so pixel metrics scale to tens of millions of
pixels. AUROC and AP reproduce scikit-learn's tie handling (one curve point per
distinct score); AUPRO follows the official MVTec AD evaluation code.

Masks mark a pixel as anomalous where their value is > 0.5, which works for
bool, {0, 1}, {0, 255} and bilinearly resized float masks alike.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
from scipy import ndimage

DEFAULT_FPR_LIMIT = 0.3

_REGION_CONNECTIVITY = np.ones((3, 3), dtype=int)  # 8-connected regions, as MVTec AD


class F1Max(NamedTuple):
    """Best F1 score over all thresholds, and the (highest) threshold reaching it."""

    f1: float
    threshold: float


@dataclass(frozen=True)
class ClassMetrics:
    """The seven per-class numbers reported for multi-class anomaly detection.

    Values are fractions in [0, 1]; NaN marks a metric that is undefined for the
    class (e.g. no anomalous images, or no ground-truth masks).
    """

    image_auroc: float = math.nan
    image_ap: float = math.nan
    image_f1max: float = math.nan
    pixel_auroc: float = math.nan
    pixel_ap: float = math.nan
    pixel_f1max: float = math.nan
    aupro: float = math.nan


_COLUMN_TITLES = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "image_f1max": "I-F1max",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "pixel_f1max": "P-F1max",
    "aupro": "AUPRO",
}


# --------------------------------------------------------------------------- input checks


def _scores(values: npt.ArrayLike, name: str) -> np.ndarray:
    """Return scores as a numeric array (dtype kept, so float32 stays float32), checked non-empty and finite."""
    array = np.asarray(values)
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        array = array.astype(np.float64)
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _binary_labels(values: npt.ArrayLike, name: str) -> np.ndarray:
    """Return labels as a bool array, checking that every value is 0 or 1."""
    array = np.asarray(values)
    if array.dtype != bool:
        if not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} must contain only 0 (normal) and 1 (anomalous)")
        array = array.astype(bool)
    return array


def _image_stack(values: np.ndarray, name: str) -> np.ndarray:
    """Reshape one (H, W) map, (N, H, W) maps or (N, 1, H, W) maps into an (N, H, W) stack."""
    if values.ndim == 2:
        return values[np.newaxis]
    if values.ndim == 4 and values.shape[1] == 1:
        return values[:, 0]
    if values.ndim != 3:
        raise ValueError(f"{name} must have shape (H, W), (N, H, W) or (N, 1, H, W); got {values.shape}")
    return values


def _image_inputs(scores: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate image-level scores and labels: 1-D, same length, finite, binary."""
    score_array = _scores(scores, "scores").ravel()
    label_array = _binary_labels(labels, "labels").ravel()
    if score_array.shape != label_array.shape:
        raise ValueError(f"scores and labels differ in length: {score_array.size} vs {label_array.size}")
    return score_array, label_array


def _pixel_inputs(anomaly_maps: npt.ArrayLike, masks: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate anomaly maps and masks and return them as (N, H, W) stacks (scores, bool masks)."""
    map_stack = _image_stack(_scores(anomaly_maps, "anomaly_maps"), "anomaly_maps")
    mask_stack = _image_stack(np.asarray(masks) > 0.5, "masks")
    if map_stack.shape != mask_stack.shape:
        raise ValueError(f"anomaly_maps and masks differ in shape: {map_stack.shape} vs {mask_stack.shape}")
    return map_stack, mask_stack


# --------------------------------------------------------------------------- sort-once curves


@dataclass(frozen=True)
class _Ranking:
    """Scores sorted once, highest first, with one curve point per distinct score."""

    order: np.ndarray  # permutation putting the flattened scores in descending order
    run_ends: np.ndarray  # sorted positions of the last element of each run of tied scores
    thresholds: np.ndarray  # the distinct scores, descending

    @classmethod
    def of(cls, scores: np.ndarray) -> _Ranking:
        """Sort flattened scores (tie order is irrelevant: only run ends are read)."""
        flat = scores.ravel()
        order = np.argsort(flat)[::-1]
        sorted_scores = flat[order]
        run_ends = np.append(np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1)
        return cls(order, run_ends, sorted_scores[run_ends])

    def cumulative(self, weights: np.ndarray) -> np.ndarray:
        """Running sum of per-element weights in score order, read at the end of every tie run."""
        return np.cumsum(weights.ravel()[self.order], dtype=np.float64)[self.run_ends]


@dataclass(frozen=True)
class _BinaryCurve:
    """True/false positive counts at each distinct threshold, highest threshold first.

    These are the points of scikit-learn's ROC and precision-recall curves.
    """

    thresholds: np.ndarray
    tps: np.ndarray
    fps: np.ndarray

    @classmethod
    def of(cls, ranking: _Ranking, positive: np.ndarray) -> _BinaryCurve:
        """Count positives and negatives above each threshold of the ranking."""
        tps = ranking.cumulative(positive)
        return cls(ranking.thresholds, tps, ranking.run_ends + 1.0 - tps)

    def auroc(self) -> float:
        """Area under the ROC curve (trapezoid), NaN without both positives and negatives."""
        n_pos, n_neg = self.tps[-1], self.fps[-1]
        if n_pos == 0 or n_neg == 0:
            return math.nan
        tpr = np.concatenate(([0.0], self.tps / n_pos))
        fpr = np.concatenate(([0.0], self.fps / n_neg))
        return float(np.trapezoid(tpr, fpr))

    def average_precision(self) -> float:
        """Sum of precision times recall increase (sklearn's AP), NaN without positives."""
        n_pos = self.tps[-1]
        if n_pos == 0:
            return math.nan
        precision = self.tps / (self.tps + self.fps)
        recall_increase = np.diff(self.tps, prepend=0.0) / n_pos
        return float(np.sum(recall_increase * precision))

    def f1max(self) -> F1Max:
        """Best F1 = 2PR/(P+R) = 2TP/(TP+FP+#positives) over thresholds, NaN without positives."""
        n_pos = self.tps[-1]
        if n_pos == 0:
            return F1Max(math.nan, math.nan)
        f1 = 2.0 * self.tps / (self.tps + self.fps + n_pos)
        best = int(np.argmax(f1))
        return F1Max(float(f1[best]), float(self.thresholds[best]))


def _image_curve(scores: npt.ArrayLike, labels: npt.ArrayLike) -> _BinaryCurve:
    score_array, label_array = _image_inputs(scores, labels)
    return _BinaryCurve.of(_Ranking.of(score_array), label_array)


def _pixel_curve(anomaly_maps: npt.ArrayLike, masks: npt.ArrayLike) -> _BinaryCurve:
    map_stack, mask_stack = _pixel_inputs(anomaly_maps, masks)
    return _BinaryCurve.of(_Ranking.of(map_stack), mask_stack)


# --------------------------------------------------------------------------- AUPRO


def _region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Weight 1/|region| for every pixel of each 8-connected mask region (0 elsewhere), and the region count."""
    weights = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    for index, mask in enumerate(masks):
        labeled, count = ndimage.label(mask, structure=_REGION_CONNECTIVITY)
        if count:
            sizes = np.bincount(labeled.ravel())
            inverse_sizes = np.concatenate(([0.0], 1.0 / sizes[1:]))
            weights[index] = inverse_sizes[labeled]
        n_regions += count
    return weights, n_regions


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under ascending x up to x_max, with y linearly interpolated at x_max (MVTec AD rule)."""
    end = int(np.searchsorted(x, x_max, side="right"))
    area = float(np.trapezoid(y[:end], x[:end]))
    if x[end - 1] < x_max:
        x0, x1, y0, y1 = x[end - 1], x[end], y[end - 1], y[end]
        y_at_max = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at_max) * (x_max - x0)
    return float(area)


def _aupro(ranking: _Ranking, masks: np.ndarray, fpr_limit: float) -> float:
    """Normalised area under the PRO curve up to fpr_limit, from an existing pixel ranking."""
    normal = ~masks
    n_normal = int(np.count_nonzero(normal))
    region_weights, n_regions = _region_weights(masks)
    if n_normal == 0 or n_regions == 0:
        return math.nan
    fpr = np.clip(ranking.cumulative(normal) / n_normal, 0.0, 1.0)
    pro = np.clip(ranking.cumulative(region_weights) / n_regions, 0.0, 1.0)
    fpr = np.concatenate(([0.0], fpr, [1.0]))
    pro = np.concatenate(([0.0], pro, [1.0]))
    return _area_up_to(fpr, pro, fpr_limit) / fpr_limit


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")


# --------------------------------------------------------------------------- public metrics


def image_auroc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Image-level ROC AUC (labels: 1 = anomalous); NaN if only one class is present."""
    return _image_curve(scores, labels).auroc()


def image_ap(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    """Image-level average precision, as sklearn's average_precision_score; NaN without anomalies."""
    return _image_curve(scores, labels).average_precision()


def image_f1max(scores: npt.ArrayLike, labels: npt.ArrayLike) -> F1Max:
    """Image-level maximum F1 over thresholds (score >= threshold is anomalous) and that threshold."""
    return _image_curve(scores, labels).f1max()


def pixel_auroc(anomaly_maps: npt.ArrayLike, masks: npt.ArrayLike) -> float:
    """Pixel-level ROC AUC over all pixels of all maps; NaN without both mask and background pixels."""
    return _pixel_curve(anomaly_maps, masks).auroc()


def pixel_ap(anomaly_maps: npt.ArrayLike, masks: npt.ArrayLike) -> float:
    """Pixel-level average precision over all pixels of all maps; NaN without mask pixels."""
    return _pixel_curve(anomaly_maps, masks).average_precision()


def pixel_f1max(anomaly_maps: npt.ArrayLike, masks: npt.ArrayLike) -> F1Max:
    """Pixel-level maximum F1 over thresholds and that threshold; NaN without mask pixels."""
    return _pixel_curve(anomaly_maps, masks).f1max()


def aupro(anomaly_maps: npt.ArrayLike, masks: npt.ArrayLike, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
    """Area under the per-region-overlap curve up to fpr_limit, divided by fpr_limit (official MVTec AD).

    Regions are the 8-connected components of every mask; PRO averages the
    overlap over all regions of all images. NaN without regions or without
    normal pixels.
    """
    _check_fpr_limit(fpr_limit)
    map_stack, mask_stack = _pixel_inputs(anomaly_maps, masks)
    return _aupro(_Ranking.of(map_stack), mask_stack, fpr_limit)


def evaluate_class(
    image_scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    anomaly_maps: npt.ArrayLike | None = None,
    masks: npt.ArrayLike | None = None,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
) -> ClassMetrics:
    """All seven metrics of one class; pixel metrics are NaN unless both maps and masks are given.

    Normal images belong in the pixel metrics too, with all-zero masks. Image
    and pixel scores are each sorted once and shared by their metrics.
    """
    _check_fpr_limit(fpr_limit)
    image_curve = _image_curve(image_scores, labels)
    image_part = {
        "image_auroc": image_curve.auroc(),
        "image_ap": image_curve.average_precision(),
        "image_f1max": image_curve.f1max().f1,
    }
    if anomaly_maps is None or masks is None:
        return ClassMetrics(**image_part)
    map_stack, mask_stack = _pixel_inputs(anomaly_maps, masks)
    ranking = _Ranking.of(map_stack)
    pixel_curve = _BinaryCurve.of(ranking, mask_stack)
    return ClassMetrics(
        **image_part,
        pixel_auroc=pixel_curve.auroc(),
        pixel_ap=pixel_curve.average_precision(),
        pixel_f1max=pixel_curve.f1max().f1,
        aupro=_aupro(ranking, mask_stack, fpr_limit),
    )


def mean_over_classes(per_class: dict[str, ClassMetrics]) -> ClassMetrics:
    """Mean of every metric over classes, ignoring NaN (NaN only where all classes are NaN)."""
    if not per_class:
        raise ValueError("per_class is empty: no class metrics to average")
    means = {}
    for field in fields(ClassMetrics):
        values = np.array([getattr(metrics, field.name) for metrics in per_class.values()], dtype=np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN column: NaN is the answer
            means[field.name] = float(np.nanmean(values))
    return ClassMetrics(**means)


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100.0 * value:.1f}"


def to_markdown_table(per_class: dict[str, ClassMetrics]) -> str:
    """Markdown table with one row per class and a final mean row, values in % with one decimal."""
    names = [field.name for field in fields(ClassMetrics)]
    rows = [*per_class.items(), ("mean", mean_over_classes(per_class))]
    lines = [
        "| class | " + " | ".join(_COLUMN_TITLES[name] for name in names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for class_name, metrics in rows:
        cells = " | ".join(_percent(getattr(metrics, name)) for name in names)
        lines.append(f"| {class_name} | {cells} |")
    return "\n".join(lines) + "\n"
