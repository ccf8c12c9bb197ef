"""Model presets as data: component configs for each size, built by one factory."""
from __future__ import annotations

from dataclasses import dataclass, field

from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from vlmdiff.scoring import AnomalyMapConfig
from vlmdiff.config import PipelineConfig
from vlmdiff.features import FEATURE_RECIPE
from vlmdiff.models import FeatureAutoencoder

# Stable Diffusion's schedule (the paper's): 1000 steps, scaled linear 0.00085..0.012.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="trailing",  # DDIM 10 steps start at t = 999 as published
    prediction_type="epsilon",
)
AUTOENCODERS = {"AutoencoderKL": AutoencoderKL, "FeatureAutoencoder": FeatureAutoencoder}


@dataclass(frozen=True)
class ModelPreset:
    """Sizes of every component of one model family."""

    autoencoder_class: str
    autoencoder: dict
    unet: dict
    pipeline: PipelineConfig
    hint_channels: tuple[int, ...] = (16, 32, 96, 256)
    hub_id: str | None = None  # pretrained SD-style weights, when the user has them
    scheduler: dict = field(default_factory=lambda: dict(SCHEDULER_CONFIG))


def _unet(
    channels: tuple[int, ...], layers: int, context_dim: int, latent_channels: int, heads: int, attention_from: int = 0
) -> dict:
    """UNet config; levels below `attention_from` (the finest, costliest) have no cross-attention."""
    levels = range(len(channels))
    down = tuple(
        "CrossAttnDownBlock2D" if attention_from <= i < len(channels) - 1 else "DownBlock2D" for i in levels
    )
    up = tuple("UpBlock2D" if block == "DownBlock2D" else "CrossAttnUpBlock2D" for block in reversed(down))
    return dict(
        sample_size=32,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=channels,
        layers_per_block=layers,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=context_dim,
        attention_head_dim=heads,
        norm_num_groups=32,
    )


def _kl_f8(channels: tuple[int, ...], layers: int, sample_size: int) -> dict:
    """AutoencoderKL config with SD's KL-f8 layout (4 levels, 4 latent channels)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size,
        scaling_factor=0.18215,
    )


# The feature recipe whitened to 32 channels: the CPU presets' latent, compared in that latent space by
# the reconstruction map
FEATURE_LATENT = dict(
    backbone=FEATURE_RECIPE.backbone, layers=FEATURE_RECIPE.layers, feature_channels=FEATURE_RECIPE.channels,
    latent_channels=32,
)
FEATURE_SCORING = AnomalyMapConfig(compare="latent", distance="l2", layers=FEATURE_RECIPE.layers)

PRESETS: dict[str, ModelPreset] = {
    # CPU default: diffusion in the frozen EfficientNet-Lite0 feature space (32 whitened channels at 1/8).
    "tiny": ModelPreset(
        autoencoder_class="FeatureAutoencoder",
        autoencoder=FEATURE_LATENT,
        unet=_unet((64, 128, 192), 1, 384, 32, 8, attention_from=1),
        pipeline=PipelineConfig(preset="tiny", hint_downsample=4, anomaly=FEATURE_SCORING),
    ),
    # CPU denoiser from partial noise in the same feature latent: predicts the clean latent (x0),
    # no SG network (nothing hands it a copy of the input), caption context through cross-attention.
    "tiny-x0": ModelPreset(
        autoencoder_class="FeatureAutoencoder",
        autoencoder=FEATURE_LATENT,
        unet=_unet((32, 64, 128), 1, 384, 32, 8, attention_from=1),
        pipeline=PipelineConfig(
            preset="tiny-x0", sg_residuals="none", strength=0.3, max_train_timestep=600, anomaly=FEATURE_SCORING
        ),
        scheduler=dict(SCHEDULER_CONFIG, prediction_type="sample"),
    ),
    # The published recipe at CPU size: a pixel KL-f8 VAE and a 4x32x32 latent.
    "tiny-kl": ModelPreset(
        autoencoder_class="AutoencoderKL",
        autoencoder=_kl_f8((32, 64, 128, 128), 1, 256),
        unet=_unet((64, 128, 192), 1, 384, 4, 8, attention_from=1),
        pipeline=PipelineConfig(preset="tiny-kl"),
    ),
    # The paper's sizes: SD-1.5 VAE + UNet, CLIP ViT-L/14 text context (768).
    "sd15": ModelPreset(
        autoencoder_class="AutoencoderKL",
        autoencoder=_kl_f8((128, 256, 512, 512), 2, 512),
        unet=dict(_unet((320, 640, 1280, 1280), 2, 768, 4, 8), sample_size=64),
        pipeline=PipelineConfig(preset="sd15", text_encoder="openai/clip-vit-large-patch14"),
        hint_channels=(16, 32, 96, 256),
        hub_id="stable-diffusion-v1-5/stable-diffusion-v1-5",
    ),
}


def get_preset(name: str) -> ModelPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def build_components(preset: ModelPreset, pretrained: str | None = None) -> dict:
    """Randomly initialised components (or SD weights from `pretrained`, a hub id or folder)."""
    autoencoder_class = AUTOENCODERS[preset.autoencoder_class]
    if pretrained:
        autoencoder = autoencoder_class.from_pretrained(pretrained, subfolder="vae")
        unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet")
    else:
        autoencoder = autoencoder_class(**preset.autoencoder)
        unet = UNet2DConditionModel(**preset.unet)
    return dict(autoencoder=autoencoder, **denoiser_components(preset, unet))


# PipelineConfig fields that belong to the denoiser (set with it by `replace_denoiser`)
DENOISER_SETTINGS = ("preset", "sg_residuals", "hint_downsample", "strength", "max_train_timestep", "num_inference_steps")


def denoiser_components(preset: ModelPreset, unet: UNet2DConditionModel | None = None) -> dict:
    """UNet (random unless given), SG network (None without SG residuals) and DDIM scheduler of a preset."""
    from vlmdiff.models import SemanticGuidanceNet

    unet = unet if unet is not None else UNet2DConditionModel(**preset.unet)
    uses_guidance = preset.pipeline.sg_residuals != "none"
    return dict(
        unet=unet,
        guidance=SemanticGuidanceNet.from_unet(unet, hint_channels=preset.hint_channels) if uses_guidance else None,
        scheduler=DDIMScheduler(**preset.scheduler),
    )
