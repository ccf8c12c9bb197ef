"""Metrics checked against published reference values and scikit-learn."""

import math
from bisect import bisect_right

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from vlmdiff.metrics import (
    ClassMetrics,
    aupro,
    evaluate_class,
    image_ap,
    image_auroc,
    image_f1max,
    mean_over_classes,
    pixel_ap,
    pixel_auroc,
    pixel_f1max,
    to_markdown_table,
)


def _column_masks(columns: list[int]) -> np.ndarray:
    mask = np.zeros((400, 7))
    mask[:, columns] = 1
    return mask


ANOMALIB_SCORES = (np.arange(2800) / 2800).reshape(400, 7)


# --------------------------------------------------------------------------- AUPRO


@pytest.mark.parametrize("columns", [[3], [1, 3, 5]])
def test_aupro_matches_anomalib_reference(columns):
    # anomalib's AUPRO unit test: expected 1/6 at fpr_limit 1/3. The exact staircase
    # value of the MVTec algorithm differs from 1/6 by ~1e-6 (2800 discrete pixels).
    assert aupro(ANOMALIB_SCORES, _column_masks(columns), fpr_limit=1 / 3) == pytest.approx(1 / 6, abs=2e-6)


def test_aupro_of_perfect_and_inverted_maps():
    mask = _column_masks([3])
    assert aupro(mask, mask) == pytest.approx(1.0)
    assert aupro(1 - mask, mask) == pytest.approx(0.0, abs=1e-12)


def test_aupro_accepts_batch_with_channel_axis_and_regions_per_image():
    masks = np.stack([_column_masks([3]), _column_masks([1, 3, 5])])[:, None]
    maps = np.stack([ANOMALIB_SCORES, ANOMALIB_SCORES])[:, None]
    assert 0.0 < aupro(maps, masks, fpr_limit=1 / 3) < 1.0


def _brute_force_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """PRO curve from its definition, one threshold at a time, integrated as in the official MVTec AD code."""
    regions = []
    for score_map, mask in zip(maps, masks):
        labeled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [score_map[labeled == k] for k in range(1, count + 1)]
    normal_scores = maps[masks == 0]
    xs, ys = [0.0], [0.0]
    for threshold in np.unique(maps)[::-1]:
        xs.append(float(np.mean(normal_scores >= threshold)))
        ys.append(float(np.mean([np.mean(region >= threshold) for region in regions])))
    xs.append(1.0)
    ys.append(1.0)
    end = bisect_right(xs, limit)
    area = sum(0.5 * (ys[i] + ys[i + 1]) * (xs[i + 1] - xs[i]) for i in range(end - 1))
    if xs[end - 1] < limit:
        y_limit = ys[end - 1] + (ys[end] - ys[end - 1]) * (limit - xs[end - 1]) / (xs[end] - xs[end - 1])
        area += 0.5 * (ys[end - 1] + y_limit) * (limit - xs[end - 1])
    return area / limit


@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_aupro_equals_per_threshold_definition_with_ties(limit):
    rng = np.random.default_rng(3)
    masks = np.zeros((4, 24, 24), dtype=np.uint8)
    masks[0, 2:6, 3:9] = 255
    masks[0, 7, 8] = 255  # touches the first region diagonally: same 8-connected region
    masks[1, 10:20, 1:3] = 255
    masks[1, 0, 23] = 255
    masks[2, 5:9, 5:9] = 255  # image 3 is normal: all-zero mask
    maps = np.round(rng.random(masks.shape) + 0.4 * (masks > 0), 1)
    assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(_brute_force_aupro(maps, masks, limit), abs=1e-12)


def test_aupro_is_nan_without_regions_and_rejects_bad_limit():
    assert math.isnan(aupro(np.random.default_rng(0).random((2, 8, 8)), np.zeros((2, 8, 8))))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(ANOMALIB_SCORES, _column_masks([3]), fpr_limit=0.0)


# --------------------------------------------------------------------------- F1-max


def test_f1max_reference_values():
    assert tuple(image_f1max([0.1, 0.5, 0.9, 1.0], [0, 1, 1, 1])) == pytest.approx((1.0, 0.5))
    assert image_f1max([0.1, 0.5, 0.9, 0.1], [0, 1, 1, 1]).f1 == pytest.approx(6 / 7)


def _sklearn_f1max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    best = int(np.argmax(f1[:-1]))
    return float(f1[best]), float(thresholds[best])


# --------------------------------------------------------------------------- scikit-learn equivalence


def _random_image_data(decimals, dtype, seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(2000) < 0.3
    scores = rng.random(2000) + 0.4 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    return scores.astype(dtype), labels.astype(int)


@pytest.mark.parametrize("decimals", [None, 2, 1])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_image_metrics_equal_sklearn(decimals, dtype):
    scores, labels = _random_image_data(decimals, dtype, seed=decimals or 0)
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_ap(scores, labels) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert tuple(image_f1max(scores, labels)) == pytest.approx(_sklearn_f1max(labels, scores), abs=1e-12)


@pytest.mark.parametrize("decimals", [None, 1])
def test_pixel_metrics_equal_sklearn(decimals):
    rng = np.random.default_rng(7)
    masks = np.zeros((6, 40, 40), dtype=bool)
    masks[0, 5:15, 5:25] = True
    masks[1, 30:38, 2:6] = True
    masks[2, 0:3, :] = True  # images 3-5 are normal
    maps = rng.random(masks.shape) + 0.5 * masks
    if decimals is not None:
        maps = np.round(maps, decimals)
    maps = maps.astype(np.float32)
    flat_labels, flat_scores = masks.ravel(), maps.ravel()
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(flat_labels, flat_scores), abs=1e-12)
    assert pixel_ap(maps, masks) == pytest.approx(average_precision_score(flat_labels, flat_scores), abs=1e-12)
    assert tuple(pixel_f1max(maps, masks)) == pytest.approx(_sklearn_f1max(flat_labels, flat_scores), abs=1e-12)


def test_inputs_are_validated():
    with pytest.raises(ValueError, match="NaN"):
        image_auroc([0.1, np.nan], [0, 1])
    with pytest.raises(ValueError, match="length"):
        image_auroc([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="0 .normal. and 1"):
        image_auroc([0.1, 0.2], [0, 2])
    with pytest.raises(ValueError, match="shape"):
        pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))


# --------------------------------------------------------------------------- per-class evaluation


def test_evaluate_class_with_maps_matches_single_metrics():
    rng = np.random.default_rng(11)
    labels = np.array([0, 0, 1, 1, 0, 1])
    masks = np.zeros((6, 16, 16))
    masks[2, 2:6, 2:6] = masks[3, 8:12, 1:4] = masks[5, 0:2, 0:16] = 1
    maps = rng.random(masks.shape) + 0.5 * masks
    image_scores = maps.max(axis=(1, 2))
    result = evaluate_class(image_scores, labels, maps, masks)
    assert result == ClassMetrics(
        image_auroc=image_auroc(image_scores, labels),
        image_ap=image_ap(image_scores, labels),
        image_f1max=image_f1max(image_scores, labels).f1,
        pixel_auroc=pixel_auroc(maps, masks),
        pixel_ap=pixel_ap(maps, masks),
        pixel_f1max=pixel_f1max(maps, masks).f1,
        aupro=aupro(maps, masks),
    )


def test_class_without_anomalous_images_gives_nan_without_crashing():
    maps = np.random.default_rng(1).random((3, 8, 8))
    result = evaluate_class([0.2, 0.1, 0.3], [0, 0, 0], maps, np.zeros((3, 8, 8)))
    assert all(math.isnan(value) for value in vars(result).values())


def test_class_without_masks_has_image_metrics_only():
    result = evaluate_class([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1], anomaly_maps=np.zeros((4, 8, 8)))
    assert (result.image_auroc, result.image_ap, result.image_f1max) == (1.0, 1.0, 1.0)
    assert all(math.isnan(value) for value in (result.pixel_auroc, result.pixel_ap, result.pixel_f1max, result.aupro))


def test_mean_over_classes_ignores_nan_and_table_has_mean_row():
    per_class = {
        "bottle": ClassMetrics(0.9, 0.8, 0.7, 0.95, 0.5, 0.55, 0.85),
        "cable": ClassMetrics(0.7, 0.6, 0.5),
    }
    mean = mean_over_classes(per_class)
    assert mean.image_auroc == pytest.approx(0.8)
    assert mean.pixel_auroc == pytest.approx(0.95)
    lines = to_markdown_table(per_class).strip().splitlines()
    assert lines[0].startswith("| class | I-AUROC |")
    assert lines[2] == "| bottle | 90.0 | 80.0 | 70.0 | 95.0 | 50.0 | 55.0 | 85.0 |"
    assert lines[3] == "| cable | 70.0 | 60.0 | 50.0 | n/a | n/a | n/a | n/a |"
    assert lines[4] == "| mean | 80.0 | 70.0 | 60.0 | 95.0 | 50.0 | 55.0 | 85.0 |"
    with pytest.raises(ValueError, match="empty"):
        mean_over_classes({})
