"""Reconstruction quality against ground truth: fidelity to the input, defect removal against the clean source."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from conftest import brick_texture
from vlmdiff.reconstruction_quality import PSNR_CAP, ReconstructionJudge, ReconstructionQuality, summarize


@pytest.fixture(scope="module")
def judge() -> ReconstructionJudge:
    return ReconstructionJudge()


@pytest.fixture(scope="module")
def defect_case():
    """A brick crop (clean), the same with a dark square (input), and the square's mask."""
    clean = brick_texture(0, size=(96, 80))
    pixels = np.array(clean)
    pixels[20:52, 30:62] = 15
    mask = np.zeros((80, 96), bool)
    mask[20:52, 30:62] = True
    return clean, Image.fromarray(pixels), mask


def test_a_copy_is_perfect_and_noise_costs_fidelity(judge):
    image = brick_texture(1, size=(96, 80))
    copy = judge.measure(image, image)
    assert (copy.psnr, copy.ssim) == (PSNR_CAP, pytest.approx(1.0)) and copy.feature_cosine == pytest.approx(1.0)
    assert math.isnan(copy.defect_removal)
    noisy_pixels = np.clip(np.asarray(image, np.float64) + np.random.default_rng(0).normal(0, 25, (80, 96, 3)), 0, 255)
    noisy = judge.measure(image, Image.fromarray(noisy_pixels.astype(np.uint8)))
    assert 15 < noisy.psnr < 30 and noisy.ssim < 0.9 and noisy.feature_cosine < copy.feature_cosine


def test_defect_removal_is_one_for_a_copy_and_zero_for_the_clean_source(judge, defect_case):
    clean, defective, mask = defect_case
    copied = judge.measure(defective, defective, clean, mask)
    removed = judge.measure(defective, clean, clean, mask)
    assert copied.defect_removal == pytest.approx(1.0)
    assert removed.defect_removal == pytest.approx(0.0, abs=1e-6)
    assert removed.psnr_outside_defect > 60  # nothing else changed (bar resampling at the defect edge)
    half = np.array(defective)
    half[20:52, 30:46] = np.asarray(clean)[20:52, 30:46]  # half of the defect removed
    assert 0.1 < judge.measure(defective, Image.fromarray(half), clean, mask).defect_removal < 0.9


def test_summary_splits_normal_and_defective_images():
    qualities = [ReconstructionQuality(20.0, 0.5, 0.9), ReconstructionQuality(30.0, 0.7, 0.8),
                 ReconstructionQuality(10.0, 0.1, 0.1, defect_removal=0.25, psnr_outside_defect=25.0)]
    summary = summarize(qualities, [0, 0, 1])
    assert summary == {"normal_psnr": 25.0, "normal_ssim": pytest.approx(0.6), "normal_feature_cosine": pytest.approx(0.85),
                       "defect_removal": 0.25, "psnr_outside_defect": 25.0}
    assert math.isnan(summarize(qualities[:2], [0, 0])["defect_removal"])
