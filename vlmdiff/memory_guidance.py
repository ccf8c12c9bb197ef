"""Memory-guided reconstruction: the diffusion regenerates what the normal-feature memory flags.

The memory map of each image (in units of its calibrated scale) marks the latent cells that look
abnormal. Those cells are replaced by the mean of the image's other cells and regenerated from
noise; every other cell follows the input latent noised to the current step (blended-latent
inpainting), so the reconstruction keeps the normal part of the image and fills the flagged part
with what the denoiser (and the caption) say belongs there. The SG hint, when the model has one,
is blanked in the flagged cells too. The image shown is the input where nothing was flagged (its
latent was kept, only the autoencoder would blur it) and the decoded regeneration where something
was, its colours matched to the input's kept pixels (vlmdiff.colour); it is
composited at the model resolution for scoring and at the input's own size for display.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler

from vlmdiff.anomaly import gaussian_blur
from vlmdiff.colour import match_colours

SEAM_CELLS = 0.5  # latent cells: softness of the edge between kept input and regenerated pixels


def guidance_threshold(requested: float | bool | None, configured: float, default: float) -> float:
    """The threshold a detection uses, in memory scales (0: off): `requested` itself; the model's
    (`configured`) for None; off for False; for True the model's, or `default` when the model's is off."""
    if requested is None:
        return configured
    if requested is True:
        return configured if configured > 0 else default
    return float(requested)


def regeneration_mask(
    memory_maps: list[torch.Tensor], scale: float, threshold: float, size: tuple[int, int], dilation: int = 1
) -> torch.Tensor:
    """(B, 1, h, w) mask of the latent cells to regenerate: memory map / scale above `threshold`,
    grown by `dilation` cells. Each map covers its whole image, so it is resized like the image."""
    maps = torch.stack([F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0] for m in memory_maps])
    mask = (maps / scale > threshold).float()
    if dilation > 0:
        mask = F.max_pool2d(mask, 2 * dilation + 1, 1, dilation)
    return mask


def fill_flagged(latents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The latents with every flagged cell replaced by the mean of the image's unflagged cells."""
    kept = 1 - mask
    mean = (latents * kept).sum((2, 3), keepdim=True) / kept.sum((2, 3), keepdim=True).clamp_min(1)
    return latents * kept + mean * mask


def guide(
    latents: torch.Tensor, hint: torch.Tensor, noise: torch.Tensor, memory_maps: list[torch.Tensor], scale: float,
    threshold: float, whole: list[bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, "Inpainting"]:
    """(start latents, hint, inpainting) of a memory-guided reconstruction: the cells the memory maps flag
    above `threshold` scales are filled and blanked in the SG hint (B, 3, R, R); the rest follows the input.
    The images `whole` marks are reconstructed whole instead (all cells regenerated from their own noised
    latents), as without guidance."""
    mask = regeneration_mask(memory_maps, scale, threshold, latents.shape[-2:])
    whole_images = torch.tensor(whole or [False] * len(latents)).view(-1, 1, 1, 1)
    hint = torch.where(whole_images, hint, hint * (1 - F.interpolate(mask, size=hint.shape[-2:], mode="nearest")))
    start = torch.where(whole_images, latents, fill_flagged(latents, mask))
    mask = torch.where(whole_images, torch.ones_like(mask), mask)
    return start, hint, Inpainting(latents, noise, mask)


@dataclass
class Inpainting:
    """What the unflagged cells follow during denoising: the input latents under the call's noise."""

    latents: torch.Tensor  # (B, C, h, w) clean input latents
    noise: torch.Tensor  # the noise the start latents were made with
    mask: torch.Tensor  # (B, 1, h, w), 1 = regenerate

    def blend(self, x: torch.Tensor, next_timestep: int | None, scheduler: DDIMScheduler) -> torch.Tensor:
        """x after one DDIM step, with unflagged cells reset to the input noised to `next_timestep`
        (the clean input after the last step)."""
        known = self.latents if next_timestep is None else scheduler.add_noise(
            self.latents, self.noise, torch.tensor([next_timestep] * len(x))
        )
        return x * self.mask + known * (1 - self.mask)


def composite(images: torch.Tensor, decoded: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) reconstructions: `images` where `mask` (B, 1, h, w) is 0, `decoded` (resized to H x W)
    where it is 1, with soft seams; `decoded` first gets, per channel, the mean and spread of `images`
    (both measured on the kept pixels, where they show the same content)."""
    size = images.shape[-2:]
    if decoded.shape[-2:] != size:
        decoded = F.interpolate(decoded, size=size, mode="bilinear", align_corners=False)
    soft = F.interpolate(mask, size=size, mode="nearest")[:, 0]
    soft = gaussian_blur(soft, SEAM_CELLS * max(size) / max(mask.shape[-2:])).clamp(0, 1)[:, None]  # (B, 1, H, W)
    weight = (1 - soft) + 1e-3  # an all-flagged image falls back to the whole image's statistics
    matched = match_colours(images, decoded, weight)
    return images * (1 - soft) + matched * soft


@dataclass
class Regeneration:
    """A memory-guided reconstruction before compositing: the decoded regeneration and the cells it replaces."""

    decoded: torch.Tensor  # (B, 3, R, R) in [0, 1]
    mask: torch.Tensor  # (B, 1, h, w), 1 = regenerated

    def composite(self, images: torch.Tensor, index: slice = slice(None)) -> torch.Tensor:
        """The reconstructions of `images` (those of `index`, at any one size): the input where nothing was
        regenerated, pixel for pixel."""
        return composite(images, self.decoded[index], self.mask[index])
