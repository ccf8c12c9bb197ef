"""Decoded images take the input's colours.

The autoencoder's latents come from backbone features that carry structure far better than colour,
so its decoder renders every class in much the same grey-green (textile's blue came back green,
24 levels off per channel). A reconstruction is shown, and its pixels measured, after each channel
is given the mean and spread the input has where both show the same content. This is not a decoder
that knows the class's colours: a colour anomaly that covers much of the image is partly matched
into the reconstruction too (the latent-space map the shipped model scores with does not see it).
"""
from __future__ import annotations

import torch


def match_colours(images: torch.Tensor, decoded: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """`decoded` (B, 3, H, W) with each channel's mean and spread made those of `images` (same shape), both
    measured with the pixel weights `weight` (B, 1, H, W; None: every pixel alike); clamped to [0, 1]."""
    if weight is None:
        weight = torch.ones_like(images[:, :1])
    total = weight.sum((2, 3), keepdim=True)

    def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = (x * weight).sum((2, 3), keepdim=True) / total
        spread = (((x - mean) ** 2 * weight).sum((2, 3), keepdim=True) / total).sqrt().clamp_min(1e-3)
        return mean, spread

    (image_mean, image_spread), (decoded_mean, decoded_spread) = moments(images), moments(decoded)
    return ((decoded - decoded_mean) / decoded_spread * image_spread + image_mean).clamp(0, 1)
