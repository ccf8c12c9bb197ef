"""Stage 1: the autoencoder, trained on full normal images with pixel + perceptual losses.

- `FeatureAutoencoder`: fit the latent space (standardisation + PCA whitening of the frozen
  backbone features) unless it is kept, then train the small decoder that renders latents as
  images, from latents encoded once (with mirror images).
- `AutoencoderKL`: train from scratch or fine-tune a hub VAE with L1 + perceptual + small KL.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vlmdiff.config import DEFAULT_BATCH_SIZE
from vlmdiff.features import create_feature_extractor
from vlmdiff.models import FeatureAutoencoder
from vlmdiff.training.data import TrainingSet, encode_training_set


@dataclass
class AutoencoderTrainConfig:
    max_steps: int = 300
    batch_size: int = DEFAULT_BATCH_SIZE
    learning_rate: float = 1e-3
    perceptual_weight: float = 1.0  # EfficientNet-Lite0 feature L1 between output and input
    kl_weight: float = 1e-6  # AutoencoderKL only
    fit_images: int = 400  # images used to fit the FeatureAutoencoder latent space
    fit_latent_space: bool = True  # False keeps a trained model's latent space (its UNet and memory stay valid)
    seed: int = 0


class PerceptualLoss(torch.nn.Module):
    """L1 between frozen EfficientNet-Lite0 features (blocks 1, 4) of two images."""

    def __init__(self) -> None:
        super().__init__()
        self.features = create_feature_extractor("efficientnet_lite0", (1, 4))

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_features = self.features(target)
        return sum(F.l1_loss(a, b) for a, b in zip(self.features(output), target_features))


def _reconstruct(autoencoder: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstruction in [0, 1], KL term) of an AutoencoderKL for a training batch."""
    posterior = autoencoder.encode(images * 2 - 1).latent_dist
    decoded = autoencoder.decode(posterior.sample()).sample
    return ((decoded + 1) / 2).clamp(0, 1), posterior.kl().mean()


def train_autoencoder(autoencoder: torch.nn.Module, data: TrainingSet, config: AutoencoderTrainConfig) -> dict:
    """Train the autoencoder in place on normal images; returns the final losses."""
    generator = torch.Generator().manual_seed(config.seed)
    latents = None
    if isinstance(autoencoder, FeatureAutoencoder):
        if config.fit_latent_space:
            chosen = torch.randperm(len(data), generator=generator)[: config.fit_images]
            autoencoder.fit_latent_space(data.float_images(chosen))
        latents = encode_training_set(autoencoder, data, flip=True)  # (N, 2, C, h, w): the frozen encoder once
        parameters = list(autoencoder.decoder.parameters())
    else:
        parameters = list(autoencoder.parameters())
    autoencoder.train()
    perceptual = PerceptualLoss()
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.max_steps)
    progress = tqdm(range(config.max_steps), desc="training autoencoder")
    history: list[float] = []
    for _ in progress:
        index = torch.randint(len(data), (config.batch_size,), generator=generator)
        images = data.float_images(index)
        flip = torch.rand(config.batch_size, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        if latents is None:
            output, kl = _reconstruct(autoencoder, images)
        else:
            output, kl = autoencoder.decode_latents(latents[index, flip.long()]), torch.zeros(())
        loss = F.l1_loss(output, images) + config.perceptual_weight * perceptual(output, images) + config.kl_weight * kl
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        history.append(loss.item())
        progress.set_postfix(loss=f"{sum(history[-20:]) / len(history[-20:]):.4f}")
    autoencoder.eval()
    return {"steps": config.max_steps, "final_loss": sum(history[-20:]) / max(1, len(history[-20:]))}
