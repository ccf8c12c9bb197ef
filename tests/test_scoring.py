"""The scoring module: the component-map registry, weights and scales, fusion and the image score."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import STEPS, build_pipeline, fit_memory, noisy_colour
from vlmdiff.anomaly import gaussian_blur, image_scores, scaled_sigma
from vlmdiff.pipeline import STAGES, DetectionSettings
from vlmdiff.scoring import (
    MEMORY, RECONSTRUCTION, AnomalyMapConfig, AnomalyScorer, ScoringBatch, compute_component_maps,
    computable_maps, fit_scales,
)


def test_component_maps_are_computed_from_the_batch_tensors():
    """No pipeline: the reconstruction map is the Euclidean distance of hand-made compared features at the
    image size, the memory map is the batch's; a map without what it needs is refused."""
    features_in, features_rec = torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 8, 8)
    features_rec[0, :, 2, 3] = torch.tensor([3.0, 4.0])  # 5 away from the input at (2, 3), equal elsewhere
    memory_map = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    batch = ScoringBatch([None], torch.zeros(1, 3, 8, 8), ["a"], memory_maps=[memory_map],
                         input_features=[features_in], reconstruction_features=[features_rec])
    maps = compute_component_maps(batch, AnomalyMapConfig(distance="l2"), (RECONSTRUCTION, MEMORY))[0]
    expected = torch.zeros(8, 8)
    expected[2, 3] = 5.0
    assert torch.allclose(maps[RECONSTRUCTION], expected)
    assert torch.equal(maps[MEMORY], memory_map)
    with pytest.raises(ValueError, match="needs a normal-feature memory"):
        compute_component_maps(replace(batch, memory_maps=None), AnomalyMapConfig(), (MEMORY,))
    with pytest.raises(ValueError, match="needs the reconstruction"):
        compute_component_maps(replace(batch, input_features=None), AnomalyMapConfig(), (RECONSTRUCTION,))


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="compare"):
        AnomalyMapConfig(compare="pixels")
    with pytest.raises(ValueError, match="distance"):
        AnomalyMapConfig(distance="manhattan")
    with pytest.raises(ValueError, match="not all zero"):
        AnomalyMapConfig(weights={RECONSTRUCTION: 0.0, MEMORY: 0.0})
    with pytest.raises(ValueError, match="non-negative"):
        AnomalyMapConfig(weights={RECONSTRUCTION: -1.0})
    with pytest.raises(ValueError, match="unknown component maps"):
        AnomalyMapConfig(weights={"texture": 1.0})


def test_scorer_overrides_weights_without_touching_the_config():
    config = AnomalyMapConfig(weights={RECONSTRUCTION: 1.0, MEMORY: 0.0})
    scorer = AnomalyScorer(config, {MEMORY: 2.0})
    assert scorer.weights == {RECONSTRUCTION: 1.0, MEMORY: 2.0} and config.weights[MEMORY] == 0.0
    assert scorer.active == (RECONSTRUCTION, MEMORY) and scorer.needs_reconstruction
    memory_only = AnomalyScorer(config, {RECONSTRUCTION: 0.0, MEMORY: 1.0})
    assert memory_only.active == (MEMORY,) and not memory_only.needs_reconstruction
    assert memory_only.describe() == "normal-feature memory"
    with pytest.raises(ValueError, match="not all zero"):
        AnomalyScorer(config, {RECONSTRUCTION: 0.0})


def test_fuse_is_the_weighted_sum_of_scaled_maps_blurred_and_pooled():
    generator = torch.Generator().manual_seed(0)
    parts = {RECONSTRUCTION: torch.rand(32, 32, generator=generator), MEMORY: torch.rand(8, 8, generator=generator)}
    config = AnomalyMapConfig(weights={RECONSTRUCTION: 0.5, MEMORY: 2.0}, scales={RECONSTRUCTION: 4.0, MEMORY: 0.5})
    fused, score = AnomalyScorer(config).fuse(parts, (32, 32))
    memory = torch.nn.functional.interpolate(parts[MEMORY][None, None], size=(32, 32), mode="bilinear", align_corners=False)[0, 0]
    expected = gaussian_blur((0.5 / 4.0 * parts[RECONSTRUCTION] + 2.0 / 0.5 * memory)[None], scaled_sigma(5.0, 32))
    torch.testing.assert_close(fused, expected[0])
    assert score == pytest.approx(float(image_scores(expected, 8, 2)[0]))
    with pytest.raises(ValueError, match="were not computed"):
        AnomalyScorer(config).fuse({MEMORY: parts[MEMORY]}, (32, 32))


def test_scales_are_the_99th_percentile_of_each_map():
    values = torch.arange(1000, dtype=torch.float32)
    scales = fit_scales([{RECONSTRUCTION: values[:500].view(20, 25)}, {RECONSTRUCTION: values[500:].view(20, 25)}])
    assert scales == {RECONSTRUCTION: pytest.approx(float(torch.quantile(values, 0.99)))}


def test_computable_maps_follow_the_model():
    pipe = build_pipeline("tiny-kl")
    assert computable_maps(pipe) == (RECONSTRUCTION,)
    pipe.memory = fit_memory([noisy_colour(0), noisy_colour(1)], ["flat", "flat"], vectors_per_class=20)
    assert computable_maps(pipe) == (RECONSTRUCTION, MEMORY)


def test_memory_only_scoring_skips_the_diffusion_unless_a_reconstruction_is_asked_for():
    pipe = build_pipeline("tiny-kl", num_inference_steps=STEPS)
    pipe.memory = fit_memory([noisy_colour(0), noisy_colour(1)], ["flat", "flat"], vectors_per_class=20)
    pipe.config.anomaly.weights = {RECONSTRUCTION: 0.0, MEMORY: 1.0}
    seen: list[str] = []

    def record(name):
        seen.append(name)
        return torch.no_grad()

    pipe.stage_hook = record
    quick = pipe(noisy_colour(5), return_reconstruction=False)[0]
    assert "denoise" not in seen and "encode" not in seen and quick.reconstruction is None
    seen.clear()
    full = pipe(noisy_colour(5))[0]
    assert seen == list(STAGES)
    assert full.reconstruction is not None and full.score == quick.score  # the score does not use the diffusion
    pipe.config.anomaly.weights[RECONSTRUCTION] = 1.0
    seen.clear()
    pipe(noisy_colour(5), return_reconstruction=False)
    assert "denoise" in seen  # a weighted map needs it


def test_settings_resolve_to_the_model_defaults():
    pipe = build_pipeline("tiny-kl", strength=0.4, num_inference_steps=7)
    settings = DetectionSettings(seed=3).resolved(pipe.config)
    assert (settings.strength, settings.num_inference_steps, settings.seed) == (0.4, 7, 3)
    assert DetectionSettings(strength=0.9).resolved(pipe.config).strength == 0.9
    with pytest.raises(ValueError, match="strength"):
        DetectionSettings(strength=1.5).resolved(pipe.config)


def test_class_weights_are_checked_and_name_the_class():
    with pytest.raises(ValueError, match=r"class_weights\['bottle'\].*not all zero"):
        AnomalyMapConfig(class_weights={"bottle": {MEMORY: 0.0}})
    with pytest.raises(ValueError, match=r"class_weights\['bottle'\].*unknown component maps"):
        AnomalyMapConfig(class_weights={"bottle": {MEMORY: 1.0, "texture": 1.0}})


def test_each_class_is_fused_with_its_own_weights():
    """Memory-only weights for all, memory + 0.5 x reconstruction for 'bottle': only bottle's map and score
    see the reconstruction map, and the scorer says so."""
    config = AnomalyMapConfig(weights={MEMORY: 1.0, RECONSTRUCTION: 0.0}, scales={MEMORY: 2.0, RECONSTRUCTION: 4.0},
                              class_weights={"bottle": {MEMORY: 1.0, RECONSTRUCTION: 0.5}}, blur_sigma=0.0,
                              pool_size=1)
    scorer = AnomalyScorer(config)
    memory_map, reconstruction_map = torch.full((16, 16), 2.0), torch.zeros(16, 16)
    reconstruction_map[4:12, 4:12] = 16.0
    parts = {MEMORY: memory_map, RECONSTRUCTION: reconstruction_map}
    fused, score = scorer.fuse(parts, (16, 16), "bottle")
    assert torch.allclose(fused[8, 8], torch.tensor(1.0 + 0.5 * 16.0 / 4.0)) and score == pytest.approx(3.0)
    plain, plain_score = scorer.fuse(parts, (16, 16), "box")
    assert torch.allclose(plain, torch.ones(16, 16)) and plain_score == pytest.approx(1.0)
    assert scorer.active == (RECONSTRUCTION, MEMORY) and scorer.active_of("box") == (MEMORY,)
    assert scorer.reconstruction_classes == ["bottle"] and not scorer.uses_reconstruction("box")
    assert scorer.describe("box") == "normal-feature memory"
    assert scorer.describe("bottle") == "1 x normal-feature memory + 0.5 x input vs reconstruction"
    assert AnomalyScorer(config, {MEMORY: 1.0}).reconstruction_classes == []  # overriding weights apply to all


@torch.inference_mode()
def test_a_class_fused_with_the_reconstruction_is_reconstructed_whole_and_scored_by_the_strength():
    """Two classes in one memory-guided model, 'red' fused with its reconstruction: its image is
    reconstructed whole (not the input, though nothing is flagged) and its score moves with the strength;
    'blue' keeps the memory's score and the input where nothing is flagged."""
    pipe = build_pipeline("tiny")
    blue = (40, 60, 200)
    pipe.memory = fit_memory([noisy_colour(s) for s in range(3)] + [noisy_colour(s, colour=blue) for s in range(3)],
                             ["red"] * 3 + ["blue"] * 3)
    pipe.config.anomaly = replace(pipe.config.anomaly, weights={MEMORY: 1.0, RECONSTRUCTION: 0.0},
                                  scales={MEMORY: 1.0, RECONSTRUCTION: 1.0},
                                  class_weights={"red": {MEMORY: 1.0, RECONSTRUCTION: 1.0}})
    images = {"red": noisy_colour(9), "blue": noisy_colour(9, colour=blue)}
    runs = {strength: pipe(list(images.values()), strength=strength, num_inference_steps=10,  # 0.3: t <= 300
                           class_names=list(images), memory_guidance=1e9)
            for strength in (0.3, 0.9)}
    red, blue_result = runs[0.3]
    assert np.array_equal(np.asarray(blue_result.reconstruction), np.asarray(images["blue"]))  # nothing flagged
    assert not np.array_equal(np.asarray(red.reconstruction), np.asarray(images["red"]))  # reconstructed whole
    assert runs[0.9][1].score == blue_result.score  # the memory's alone
    assert runs[0.9][0].score != red.score  # the reconstruction's part moves with the strength
