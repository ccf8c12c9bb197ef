"""Latent spaces the diffusion model denoises.

Two interchangeable autoencoders share two functions, `encode_latents` and
`decode_latents` (images in [0, 1]):
- diffusers' `AutoencoderKL`, the paper's pixel VAE (KL-f8);
- `FeatureAutoencoder`, whose encoder is a frozen pretrained CNN: its feature maps,
  standardised and PCA-whitened, are the latent (the role the pretrained SD VAE plays in
  the paper), and a small learned decoder only renders the latent as an image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from vlmdiff.features import FEATURE_RECIPE, create_feature_extractor

LATENT_STRIDE = 8


def upsample_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(in_channels, out_channels, 3, padding=1),
        nn.GroupNorm(8, out_channels),
        nn.SiLU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1),
        nn.SiLU(),
    )


class FeatureAutoencoder(ModelMixin, ConfigMixin):
    """Frozen CNN features (whitened to `latent_channels`) as the latent, plus a learned image decoder."""

    @register_to_config
    def __init__(
        self,
        backbone: str = FEATURE_RECIPE.backbone,
        layers: tuple[int, ...] = FEATURE_RECIPE.layers,
        feature_channels: int = FEATURE_RECIPE.channels,
        latent_channels: int = 32,
        decoder_channels: tuple[int, ...] = (128, 64, 32),
    ) -> None:
        super().__init__()
        # Fitted on normal training features by `fit_latent_space` (saved with the model).
        self.register_buffer("feature_mean", torch.zeros(feature_channels))
        self.register_buffer("feature_std", torch.ones(feature_channels))
        self.register_buffer("components", torch.eye(latent_channels, feature_channels))  # (L, C)
        self.register_buffer("component_std", torch.ones(latent_channels))
        blocks = [nn.Conv2d(latent_channels, decoder_channels[0], 3, padding=1), nn.SiLU()]
        widths = (decoder_channels[0], *decoder_channels)
        blocks += [upsample_block(a, b) for a, b in zip(widths[:-1], widths[1:])]
        blocks.append(nn.Conv2d(decoder_channels[-1], 3, 3, padding=1))
        self.decoder = nn.Sequential(*blocks)
        # The frozen encoder is built from its package weights on first use (outside any
        # meta-device loading context) and is never saved with the model.
        self._encoder: list[nn.Module] = []

    @property
    def encoder(self) -> nn.Module:
        if not self._encoder:
            self._encoder.append(create_feature_extractor(self.config.backbone, tuple(self.config.layers)))
        return self._encoder[0]

    @torch.no_grad()
    def standardized_features(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features on the 1/8 grid, standardised per channel: (B, C, H/8, W/8)."""
        self.encoder.to(images.device)
        size = (images.shape[-2] // LATENT_STRIDE, images.shape[-1] // LATENT_STRIDE)
        maps = [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in self.encoder(images)]
        features = torch.cat(maps, dim=1)
        return (features - self.feature_mean[:, None, None]) / self.feature_std[:, None, None]

    @torch.no_grad()
    def fit_latent_space(self, images: torch.Tensor) -> None:
        """Fit the per-channel standardisation and the PCA whitening on normal images."""
        self.feature_mean.zero_()
        self.feature_std.fill_(1.0)
        features = self.standardized_features(images).permute(0, 2, 3, 1).reshape(-1, self.config.feature_channels)
        self.feature_mean.copy_(features.mean(0))
        self.feature_std.copy_(features.std(0).clamp_min(1e-6))
        features = (features - self.feature_mean) / self.feature_std
        _, singular_values, right = torch.linalg.svd(features, full_matrices=False)
        count = self.config.latent_channels
        self.components.copy_(right[:count])
        self.component_std.copy_((singular_values[:count] / (features.shape[0] - 1) ** 0.5).clamp_min(1e-6))

    def encode_latents(self, images: torch.Tensor) -> torch.Tensor:
        features = self.standardized_features(images)  # (B, C, h, w)
        latents = torch.einsum("lc,bchw->blhw", self.components, features)
        return latents / self.component_std[:, None, None]  # (B, L, h, w), ~unit variance

    def latent_features(self, latents: torch.Tensor) -> torch.Tensor:
        """Back-project latents to standardised feature space (the PCA subspace): (B, C, h, w)."""
        return torch.einsum("lc,blhw->bchw", self.components, latents * self.component_std[:, None, None])

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(latents))  # (B, 3, 8h, 8w) in [0, 1]


def encode_latents(autoencoder: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> scaled latents, for either autoencoder."""
    if isinstance(autoencoder, AutoencoderKL):
        posterior = autoencoder.encode(images * 2 - 1).latent_dist
        return posterior.mode() * autoencoder.config.scaling_factor
    return autoencoder.encode_latents(images)


def decode_latents(autoencoder: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [0, 1], for either autoencoder."""
    if isinstance(autoencoder, AutoencoderKL):
        images = autoencoder.decode(latents / autoencoder.config.scaling_factor).sample
        return ((images + 1) / 2).clamp(0, 1)
    return autoencoder.decode_latents(latents)
