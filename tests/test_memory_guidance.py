"""Memory-guided reconstruction: what the memory flags is regenerated, the rest is the input's."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from PIL import Image

from tests.conftest import STEPS, build_pipeline, fit_memory, noisy_colour
from vlmdiff.memory_guidance import Inpainting, composite, fill_flagged, regeneration_mask
from vlmdiff.pipeline import DetectionSettings
from vlmdiff.scoring import MEMORY


def test_regeneration_mask_flags_cells_above_the_threshold_and_grows_them():
    hot = torch.zeros(8, 12)
    hot[2, 3] = 5.0  # 2.5 scales
    mask = regeneration_mask([hot], scale=2.0, threshold=1.0, size=(8, 12), dilation=1)
    assert mask.shape == (1, 1, 8, 12)
    assert mask[0, 0, 1:4, 2:5].eq(1).all()  # the cell and its 8 neighbours
    assert mask.sum() == 9
    assert regeneration_mask([hot], scale=2.0, threshold=3.0, size=(8, 12)).sum() == 0  # 2.5 scales < 3


def test_regeneration_mask_resizes_each_map_to_the_latent_grid():
    left_half = torch.zeros(6, 10)
    left_half[:, :5] = 3.0
    mask = regeneration_mask([left_half, torch.zeros(3, 3)], scale=1.0, threshold=1.0, size=(4, 4), dilation=0)
    assert mask.shape == (2, 1, 4, 4)
    assert mask[0, 0, :, 0].eq(1).all() and mask[0, 0, :, 3].eq(0).all() and mask[1].sum() == 0


def test_fill_flagged_puts_the_mean_of_the_other_cells_in_the_flagged_ones():
    latents = torch.randn(2, 3, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, 0, :2] = 1
    filled = fill_flagged(latents, mask)
    assert torch.equal(filled[1], latents[1])  # nothing flagged: unchanged
    assert torch.equal(filled[0, :, 2:], latents[0, :, 2:])
    expected = latents[0, :, 2:].mean((1, 2))
    assert torch.allclose(filled[0, :, 0, 0], expected, atol=1e-6)


def test_inpainting_blend_keeps_the_input_outside_the_mask():
    scheduler = DDIMScheduler()
    latents, noise, x = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1, 1] = 1
    inpainting = Inpainting(latents, noise, mask)
    final = inpainting.blend(x, None, scheduler)
    assert torch.equal(final[..., 1, 1], x[..., 1, 1])
    outside = mask.expand_as(x) == 0
    assert torch.equal(final[outside], latents[outside])
    midway = inpainting.blend(x, 500, scheduler)
    noised = scheduler.add_noise(latents, noise, torch.tensor([500]))
    assert torch.allclose(midway[outside], noised[outside])


def test_composite_keeps_the_input_and_matches_the_regeneration_colours():
    images = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 2:8, 2:8] = 1  # pixels 16-63
    duller = images * 0.5 + 0.1  # a decoder that halves contrast and shifts colour
    assert torch.allclose(composite(images, duller, mask), images, atol=1e-4)  # undone by the colour matching
    flat = torch.full_like(images, 0.9)
    shown = composite(images, flat, mask)
    assert torch.allclose(shown[..., 96:, 96:], images[..., 96:, 96:], atol=1e-5)  # far from the flagged cells: the input
    centre = shown[..., 36:44, 36:44]  # 20 px (5 seam sigmas) inside: the regeneration, at the input's mean colour
    kept_mean = images[..., 80:, :].mean((2, 3), keepdim=True)
    assert torch.allclose(centre, kept_mean.expand_as(centre), atol=0.01)
    assert torch.allclose(composite(images, flat, torch.zeros(1, 1, 16, 16)), images, atol=1e-6)


@pytest.fixture(scope="module")
def guided_pipe():
    """A tiny pipeline whose memory knows one red class."""
    pipe = build_pipeline("tiny")
    pipe.memory = fit_memory([noisy_colour(seed) for seed in range(4)], ["red"] * 4)
    pipe.config.anomaly.scales = {MEMORY: 1.0}
    return pipe


def _defective() -> Image.Image:
    pixels = np.asarray(noisy_colour(99)).copy()
    pixels[20:44, 20:44] = (30, 200, 30)  # a green square on the red class
    return Image.fromarray(pixels)


@torch.inference_mode()
def test_guided_reconstruction_regenerates_only_the_flagged_cells(guided_pipe):
    image = _defective()
    batch = guided_pipe.prepare_batch([image], ["red"], DetectionSettings(strength=0.7, num_inference_steps=STEPS,
                                                                          memory_guidance=0.0).resolved(guided_pipe.config))
    raw = guided_pipe.component_maps(batch, (MEMORY,))[0][MEMORY]
    threshold = float(raw.quantile(0.7))  # flags the top of the map: the square
    settings = DetectionSettings(strength=0.7, num_inference_steps=STEPS, memory_guidance=threshold).resolved(guided_pipe.config)
    guided = guided_pipe.prepare_batch([image], ["red"], settings)
    mask = regeneration_mask(guided.memory_maps, 1.0, threshold, guided.latents.shape[-2:])
    assert 0 < mask.mean() < 1
    kept = mask.expand_as(guided.latents) == 0
    assert torch.equal(guided.denoised[kept], guided.latents[kept])  # the input where nothing was flagged
    assert not torch.allclose(guided.denoised[~kept], guided.latents[~kept])  # regenerated where flagged
    assert not torch.allclose(batch.denoised[kept], batch.latents[kept])  # unguided: everything is denoised
    assert torch.equal(guided_pipe.component_maps(guided, (MEMORY,))[0][MEMORY], raw)  # reused, not recomputed


def test_memory_guidance_resolves_against_the_model():
    config = build_pipeline("tiny").config
    for configured, requested, expected in ((0.0, None, 0.0), (0.0, True, 1.0), (0.0, False, 0.0), (0.0, 0.3, 0.3),
                                            (2.5, None, 2.5), (2.5, True, 2.5), (2.5, False, 0.0), (2.5, 0.0, 0.0)):
        config.memory_guidance = configured
        assert DetectionSettings(memory_guidance=requested).resolved(config).memory_guidance == expected


def test_memory_guidance_is_checked_and_regenerates_what_it_flags(guided_pipe):
    with pytest.raises(ValueError, match="memory_guidance"):
        guided_pipe(_defective(), memory_guidance=-1.0, num_inference_steps=STEPS)
    image = _defective()
    pixels = np.asarray(image).astype(int)
    plain, nothing, everything = (guided_pipe(image, class_names="red", strength=0.7, num_inference_steps=STEPS,
                                              memory_guidance=g)[0] for g in (0.0, 1e9, 1e-6))
    assert np.abs(np.asarray(plain.reconstruction).astype(int) - pixels).mean() > 20  # unguided: all redrawn
    # nothing flagged: the input itself, and the tiny preset's score (input vs reconstruction latents) is 0
    assert np.array_equal(np.asarray(nothing.reconstruction), np.asarray(image)) and nothing.score == 0.0
    red, green, _ = np.asarray(everything.reconstruction)[26:38, 26:38].reshape(-1, 3).mean(0)
    assert red > green  # the green square, all flagged, is redrawn in the image's own (red) colours


def test_guided_reconstruction_is_composited_at_the_input_size(guided_pipe):
    """A 192 x 128 image (3 x 2 model resolutions, noise down to single pixels): the reconstruction has its
    size, is the input pixel for pixel far from the regenerated cells, and the flagged rectangle is redrawn."""
    pixels = np.asarray(noisy_colour(7, size=(192, 128))).copy()
    pixels[:32, :48] = (30, 200, 30)  # a green rectangle in a corner of the red class
    image = Image.fromarray(pixels)
    settings = DetectionSettings(strength=0.7, num_inference_steps=STEPS).resolved(guided_pipe.config)
    raw = guided_pipe.component_maps(guided_pipe.prepare_batch([image], ["red"], settings, False), (MEMORY,))[0][MEMORY]
    threshold = float(raw.quantile(0.8))  # the rectangle's cells
    result = guided_pipe(image, class_names="red", strength=0.7, num_inference_steps=STEPS, memory_guidance=threshold)[0]
    shown = np.asarray(result.reconstruction).astype(int)
    assert shown.shape == pixels.shape
    mask = regeneration_mask([raw], 1.0, threshold, (8, 8))  # the tiny model's latent grid: 24 x 16 px cells
    seams = F.max_pool2d(mask, 5, 1, 2)  # the seams' blur reaches 2 cells (4 sigmas of half a cell) further
    far = F.interpolate(seams, size=(128, 192), mode="nearest")[0, 0].numpy() == 0
    assert 0.3 < far.mean() < 0.9 and not far[:32, :48].any()
    assert np.abs(shown - pixels)[far].max() <= 1  # the input's own pixels, not resampled through 64 x 64
    assert np.abs(shown[:32, :48] - pixels[:32, :48]).mean() > 40  # the rectangle itself redrawn
