"""Decoded images take the input's colours: per channel, its mean and spread."""
from __future__ import annotations

import numpy as np
import torch

from tests.conftest import STEPS, build_pipeline, noisy_colour
from vlmdiff.colour import match_colours


def test_match_colours_gives_each_channel_the_input_mean_and_spread():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=generator) * torch.tensor([0.2, 0.5, 0.1]).view(1, 3, 1, 1) + 0.3
    grey_green = torch.rand(2, 3, 32, 32, generator=generator) * 0.3 + torch.tensor([0.4, 0.5, 0.4]).view(1, 3, 1, 1)
    matched = match_colours(images, grey_green)
    assert torch.allclose(matched.mean((2, 3)), images.mean((2, 3)), atol=1e-4)
    assert torch.allclose(matched.std((2, 3)), images.std((2, 3)), atol=1e-3)
    assert torch.allclose(match_colours(images, images), images, atol=1e-5)  # already matched: unchanged


def test_match_colours_measures_only_where_the_weights_are():
    images = torch.full((1, 3, 8, 8), 0.2)
    images[..., 4:] = 0.9  # the right half differs (a defect the regeneration replaces)
    weight = torch.zeros(1, 1, 8, 8)
    weight[..., :4] = 1
    decoded = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    matched = match_colours(images, decoded, weight)
    assert torch.allclose(matched[..., :4].mean((2, 3)), torch.full((1, 3), 0.2), atol=1e-4)


def test_whole_image_reconstructions_have_the_input_colours():
    """A tiny random decoder renders anything; the reconstruction shown has the blue input's mean colour."""
    pipe = build_pipeline("tiny")
    image = noisy_colour(3, colour=(40, 60, 200))
    result = pipe(image, strength=0.5, num_inference_steps=STEPS, class_names="any", memory_guidance=0.0)[0]
    shown = np.asarray(result.reconstruction, np.float64).mean((0, 1))
    assert np.abs(shown - np.asarray(image, np.float64).mean((0, 1))).max() < 2.0
