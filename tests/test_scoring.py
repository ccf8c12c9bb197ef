"""The scoring module: the component-map registry, weights and scales, fusion and the image score."""
from __future__ import annotations

from dataclasses import replace

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
