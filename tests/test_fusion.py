"""Per-class fusion chosen from normal images: synthetic anomalies and the reconstruction weight."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_pipeline, fit_memory, noisy_colour
from vlmdiff.data.synthetic import KINDS, synthetic_anomaly
from vlmdiff.scoring import MEMORY, RECONSTRUCTION
from vlmdiff.training import fusion
from vlmdiff.training.data import TrainingSet
from vlmdiff.training.fusion import FUSION_WEIGHTS, choose_fusion, pick_weight


def _textured(seed: int, size=(96, 64)) -> Image.Image:
    """Coloured stripes with noise: every region differs from the others, so any move changes pixels."""
    rng = np.random.default_rng(seed)
    x = np.arange(size[0])[None, :, None]
    y = np.arange(size[1])[:, None, None]
    pixels = 128 + 60 * np.sin(x / 5.0 + np.array([0, 2, 4])) + 40 * np.cos(y / 7.0) + rng.normal(0, 4, (size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_synthetic_anomaly_changes_its_mask_and_nothing_else(kind):
    image = _textured(0)
    for seed in range(5):
        anomalous, mask = synthetic_anomaly(image, np.random.default_rng(seed), kind)
        before, after = np.asarray(image, int), np.asarray(anomalous, int)
        assert anomalous.size == image.size and mask.shape == before.shape[:2]
        assert 0.01 <= mask.mean() <= 0.35, (kind, mask.mean())
        assert np.array_equal(before[~mask], after[~mask])  # outside the mask: the normal image
        assert np.abs(before[mask] - after[mask]).mean() > 3  # inside: changed


def test_synthetic_anomalies_follow_the_seed():
    image = _textured(1)
    first, again = (synthetic_anomaly(image, np.random.default_rng(7)) for _ in range(2))
    assert np.array_equal(np.asarray(first[0]), np.asarray(again[0])) and np.array_equal(first[1], again[1])


def test_pick_weight_needs_a_clear_gain_of_image_and_pixel_level_over_the_memory():
    flat = {0.0: 0.90, 0.25: 0.90, 0.5: 0.90, 1.0: 0.90}
    assert pick_weight({0.0: 0.80, 0.25: 0.81, 0.5: 0.79, 1.0: 0.70}, flat) == 0.0  # +1 point: not enough
    assert pick_weight({0.0: 0.80, 0.25: 0.85, 0.5: 0.85, 1.0: 0.70}, flat) == 0.25  # a tie goes to the smaller
    assert pick_weight({0.0: 0.90, 0.25: 0.80, 0.5: 0.70, 1.0: 0.60}, flat) == 0.0
    # +5 image-level points at 1.0 cost 4 of AUPRO, at 0.5 +3 cost 0.6: 0.25 (+2.5, -0.2) is the best that keeps it
    auroc = {0.0: 0.80, 0.25: 0.825, 0.5: 0.83, 1.0: 0.85}
    assert pick_weight(auroc, {0.0: 0.90, 0.25: 0.898, 0.5: 0.894, 1.0: 0.86}) == 0.25
    assert pick_weight(auroc, {0.0: 0.90, 0.25: 0.90, 0.5: 0.90, 1.0: 0.90}) == 1.0  # nothing lost: the best sum


@pytest.fixture
def fused_pipe():
    """A tiny pipeline with a memory of two classes, memory-only weights and thresholds fitted elsewhere."""
    pipe = build_pipeline("tiny")
    blue = (40, 60, 200)
    pipe.memory = fit_memory([noisy_colour(s) for s in range(6)] + [noisy_colour(s, colour=blue) for s in range(6)],
                             ["red"] * 6 + ["blue"] * 6)
    pipe.config.anomaly.weights = {MEMORY: 1.0, RECONSTRUCTION: 0.0}
    pipe.config.anomaly.scales = {MEMORY: 1.0, RECONSTRUCTION: 1.0}
    pipe.thresholds.set_manual("red", 123.0)
    return pipe


def test_choose_fusion_sets_the_chosen_weight_and_refits_the_threshold(fused_pipe, monkeypatch):
    data = TrainingSet.of_sources([noisy_colour(s) for s in range(6)], "red")
    memory = fused_pipe.memory
    seen = []
    monkeypatch.setattr(fusion, "pick_weight", lambda auroc, aupro: seen.append(auroc) or 0.5)  # as if 0.5 won
    choice = choose_fusion(fused_pipe, data, "red", folds=3, quantile=0.99)
    assert seen == [choice.auroc] and set(choice.auroc) == set(FUSION_WEIGHTS) and choice.images == 6
    assert all(0.0 <= value <= 1.0 for value in [*choice.auroc.values(), *choice.aupro.values()])
    assert set(choice.aupro) == set(FUSION_WEIGHTS) and len(set(choice.aupro.values())) > 1  # measured per weight
    assert choice.weight == 0.5
    assert fused_pipe.config.anomaly.class_weights == {"red": {MEMORY: 1.0, RECONSTRUCTION: 0.5}}
    assert fused_pipe.thresholds.get("red").value != 123.0  # refitted from the fused normal scores
    assert fused_pipe.memory is memory  # the folds' memories were temporary
    assert fused_pipe.scorer.reconstruction_classes == ["red"]

    monkeypatch.setattr(fusion, "pick_weight", lambda auroc, aupro: 0.0)  # the reconstruction adds nothing now
    again = choose_fusion(fused_pipe, data, "red", folds=3)
    assert again.weight == 0.0 and fused_pipe.config.anomaly.class_weights == {}


def test_choose_fusion_needs_the_class_in_the_memory(fused_pipe):
    with pytest.raises(ValueError, match="no normal-feature memory"):
        choose_fusion(fused_pipe, TrainingSet.of_sources([noisy_colour(0)] * 4, "green"), "green")
