"""The denoiser: the UNet's prediction with the SG network's residuals added (DiAD's controlled UNet).

One function, used by the pipeline, the trainer and the benchmarks, so all three run the
same model. `sg_residuals` says where the SG network's residuals go:
- "all": every encoder skip and the middle block (ControlNet's default);
- "mid": the middle block only (`only_mid_control = True` in the official DiAD / VLMDiff code);
- "none": no SG network at all; the UNet denoises from the noisy latent and the caption alone.
"""
from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from vlmdiff.models.semantic_guidance import SemanticGuidanceNet

SG_RESIDUALS = ("all", "mid", "none")


def guided_unet(
    unet: UNet2DConditionModel,
    guidance: SemanticGuidanceNet | None,
    latents: torch.Tensor,  # (B, C, h, w)
    timesteps: torch.Tensor,  # (B,)
    context: torch.Tensor,  # (B, 77, D)
    hint: torch.Tensor | None,  # (B, 3, H, W) in [-1, 1] or its `embed_hint` encoding
    sg_residuals: str = "all",
) -> torch.Tensor:
    """The UNet output (epsilon, x0 or v, as its scheduler predicts): (B, C, h, w)."""
    if sg_residuals not in SG_RESIDUALS:
        raise ValueError(f"sg_residuals must be one of {SG_RESIDUALS}, got {sg_residuals!r}")
    residuals = middle = None
    if sg_residuals != "none":
        if guidance is None or hint is None:
            raise ValueError(f"sg_residuals={sg_residuals!r} needs the SG network and a hint")
        residuals, middle = guidance(latents, timesteps, context, hint)
        if sg_residuals == "mid":  # diffusers adds the middle residual only together with skip residuals
            residuals = [torch.zeros_like(r) for r in residuals]
    return unet(
        latents, timesteps, encoder_hidden_states=context,
        down_block_additional_residuals=residuals, mid_block_additional_residual=middle,
    ).sample
