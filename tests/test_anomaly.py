"""Anomaly-map primitives: distances between feature pyramids, blur and image scores."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from conftest import RESOLUTION, fused_maps
from vlmdiff.anomaly import gaussian_blur, image_scores, reconstruction_map, scaled_sigma
from vlmdiff.images import images_to_tensor
from vlmdiff.models import encode_latents


def pyramid(batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, c, s, s, generator=generator) for c, s in ((24, 16), (40, 8), (112, 4))]


# ---------------------------------------------------------------- reconstruction map
@pytest.mark.parametrize("distance", ["cosine", "l2"])
def test_reconstruction_map_is_zero_for_identical_features(distance):
    features = pyramid()
    maps = reconstruction_map(features, [f.clone() for f in features], (64, 48), distance)
    assert maps.shape == (2, 64, 48)
    assert float(maps.abs().max()) < 1e-5


def test_reconstruction_map_sums_layers_and_locates_the_change():
    features = pyramid(batch=1)
    changed = [f.clone() for f in features]
    changed[0] = -changed[0]  # the whole 16x16 layer: 1 - cos = 2 everywhere
    changed[1][:, :, 2, 5] = -changed[1][:, :, 2, 5]  # one position of the 8x8 layer
    maps = reconstruction_map(features, changed, (8, 8), "cosine")[0]  # the 8x8 layer's own grid
    expected = torch.full((8, 8), 2.0)
    expected[2, 5] = 4.0
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=0)
    upsampled = reconstruction_map(features, changed, (64, 64), "cosine")[0]
    row, col = divmod(int(upsampled.argmax()), 64)
    assert (2 * 8 <= row < 3 * 8) and (5 * 8 <= col < 6 * 8)


def test_pipeline_map_is_zero_when_the_reconstruction_equals_the_input(tiny_kl_pipe, tiny_pipe, astronaut):
    assert tiny_kl_pipe.config.anomaly.compare == "image" and tiny_pipe.config.anomaly.compare == "latent"
    images = images_to_tensor([astronaut], RESOLUTION)
    with torch.no_grad():
        image_mode = fused_maps(tiny_kl_pipe, images, images.clone())
        latents = encode_latents(tiny_pipe.autoencoder, images)
        latent_mode = fused_maps(tiny_pipe, images, images.clone(), latents, latents.clone())
    for maps in (image_mode, latent_mode):
        assert maps.shape == (1, RESOLUTION, RESOLUTION)
        assert float(maps.abs().max()) < 1e-5


@pytest.mark.parametrize("corner", [(8, 40), (40, 8), (20, 24), (44, 44)])
def test_pipeline_map_peaks_where_a_patch_was_altered(corner, tiny_kl_pipe, astronaut):
    images = images_to_tensor([astronaut], RESOLUTION)
    altered = images.clone()
    top, left, side = *corner, 12
    altered[:, :, top : top + side, left : left + side] = torch.tensor([0.0, 1.0, 0.0])[:, None, None]  # a green square
    with torch.no_grad():
        maps = fused_maps(tiny_kl_pipe, images, altered)[0]
    row, col = divmod(int(maps.argmax()), RESOLUTION)
    margin = 4
    assert top - margin <= row < top + side + margin and left - margin <= col < left + side + margin
    inside = maps[top : top + side, left : left + side].mean()
    outside = maps.clone()
    outside[max(top - 16, 0) : top + side + 16, max(left - 16, 0) : left + side + 16] = float("nan")
    assert float(inside) > 3 * float(outside.nanmean())


# ---------------------------------------------------------------- blur and scores
def test_blur_preserves_a_constant_map():
    maps = torch.full((2, 40, 56), 0.37)
    blurred = gaussian_blur(maps, 5.0)
    assert blurred.shape == maps.shape
    torch.testing.assert_close(blurred, maps, atol=1e-6, rtol=0)


@pytest.mark.parametrize("sigma", [1.25, 2.0, 5.0, 12.0])
@pytest.mark.parametrize("shape", [(64, 48), (7, 9)])
def test_blur_matches_scipy_gaussian_filter(sigma, shape):
    maps = np.random.default_rng(0).random((2, *shape)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    reference = np.stack([gaussian_filter(m.astype(np.float64), sigma, mode="reflect", truncate=4.0) for m in maps])
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_blur_with_sigma_zero_is_identity():
    maps = torch.rand(1, 16, 16)
    assert torch.equal(gaussian_blur(maps, 0.0), maps)


def test_blur_sigma_scales_with_resolution():
    assert scaled_sigma(5.0, 256) == 5.0
    assert scaled_sigma(5.0, 64) == 1.25
    assert scaled_sigma(5.0, 512) == 10.0


def test_image_score_is_higher_with_a_hot_region():
    calm = torch.full((1, 64, 64), 0.1)
    hot = calm.clone()
    hot[0, 20:36, 30:46] = 1.0
    calm_score, hot_score = image_scores(torch.cat([calm, hot]), 8, 2)
    assert calm_score.item() == pytest.approx(0.1)
    assert hot_score.item() > calm_score.item() + 0.5
    # one hot pixel is averaged away by the pooling: the score is robust to single-pixel noise
    speck = calm.clone()
    speck[0, 10, 10] = 1.0
    assert image_scores(speck, 8, 2).item() < hot_score.item() / 5


def test_window_match_forgives_a_one_cell_shift_but_not_a_change():
    from vlmdiff.anomaly import window_distance

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(1, 8, 12, 12, generator=generator)
    shifted = torch.roll(a, shifts=1, dims=3)  # the same content, one cell to the right
    assert window_distance(a, shifted, "l2", 1)[0, 2:-2, 2:-2].min() > 0.5
    assert window_distance(a, shifted, "l2", 3)[0, 2:-2, 2:-2].max() < 1e-5
    changed = shifted.clone()
    changed[..., 5, 6] += 10.0  # a real change at the shifted position of a[5, 5]
    window = window_distance(a, changed, "l2", 3)[0, 2:-2, 2:-2]  # inside: away from the wrapped edge
    assert window[3, 3] > 1.0 and window.max() == window[3, 3]  # only a[5, 5] lost its match
    assert torch.equal(window_distance(a, changed, "cosine", 1), 1 - torch.nn.functional.cosine_similarity(a, changed, dim=1))
