"""`VLMDiffPipeline`: image -> latent -> noise to t0 -> DDIM with UNet + SG network -> reconstruction
-> feature-level anomaly map -> image score -> per-class verdict."""
from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image

from vlmdiff.anomaly import gaussian_blur, image_scores, reconstruction_map, scaled_sigma
from vlmdiff.config import PipelineConfig
from vlmdiff.features import create_feature_extractor
from vlmdiff.images import ImageInput, images_to_tensor, load_image, tensor_to_images
from vlmdiff.memory import NormalFeatureMemory
from vlmdiff.models import FeatureAutoencoder, SemanticGuidanceNet, decode_latents, encode_latents
from vlmdiff.presets import build_components, get_preset
from vlmdiff.text import empty_caption_context, load_text_encoder
from vlmdiff.thresholds import Thresholds

COMPONENT_CLASSES = {
    cls.__name__: cls
    for cls in (AutoencoderKL, FeatureAutoencoder, UNet2DConditionModel, SemanticGuidanceNet, DDIMScheduler, NormalFeatureMemory)
}
MODEL_INDEX = "model_index.json"
CONFIG_FILE = "pipeline_config.json"
THRESHOLDS_FILE = "thresholds.json"
AUTO_CLASS = "auto"


@dataclass
class DetectionResult:
    """What the pipeline says about one image; the map has the ORIGINAL image size."""

    reconstruction: Image.Image
    anomaly_map: np.ndarray  # (H, W) float32
    score: float
    class_name: str
    threshold: float | None = None
    is_anomalous: bool | None = None  # None until the class has a threshold
    normalized_score: float | None = None  # in [0, 1], threshold at 0.5


class VLMDiffPipeline:
    """Composes the autoencoder, UNet, SG network, DDIM scheduler and anomaly scoring."""

    def __init__(
        self,
        autoencoder: torch.nn.Module,
        unet: UNet2DConditionModel,
        guidance: SemanticGuidanceNet,
        scheduler: DDIMScheduler,
        config: PipelineConfig,
        memory: NormalFeatureMemory | None = None,
        thresholds: Thresholds | None = None,
    ) -> None:
        self.autoencoder = autoencoder.eval()
        self.unet = unet.eval()
        self.guidance = guidance.eval()
        self.scheduler = scheduler
        self.config = config
        self.memory = memory.eval() if memory is not None else None
        self.thresholds = thresholds or Thresholds()
        self._feature_extractor: torch.nn.Module | None = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_preset(cls, name: str = "tiny", pretrained: str | None = None, **config_overrides) -> "VLMDiffPipeline":
        """A new (untrained, or SD-initialised from `pretrained`) pipeline of a preset's sizes."""
        preset = get_preset(name)
        config = PipelineConfig(**{**preset.pipeline.__dict__, **config_overrides})
        return cls(**build_components(preset, pretrained), config=config)

    def components(self) -> dict[str, object]:
        parts = dict(autoencoder=self.autoencoder, unet=self.unet, guidance=self.guidance, scheduler=self.scheduler)
        if self.memory is not None:
            parts["memory"] = self.memory
        return parts

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        """diffusers-style folder: model_index.json, one subfolder per component, configs + safetensors.

        `dtype=torch.float16` halves the weight files (loading always gives float32 models).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        index = {"_class_name": type(self).__name__}
        for name, component in self.components().items():
            if (directory / name).exists():
                shutil.rmtree(directory / name)
            if dtype is not None and isinstance(component, ModelMixin):
                component = copy.deepcopy(component).to(dtype)
            component.save_pretrained(directory / name)
            index[name] = [type(component).__module__.split(".")[0], type(component).__name__]
        (directory / MODEL_INDEX).write_text(json.dumps(index, indent=2))
        self.config.save(directory / CONFIG_FILE)
        self.thresholds.save(directory / THRESHOLDS_FILE)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path) -> "VLMDiffPipeline":
        """Load a folder written by `save_pretrained`, or download one from the Hugging Face hub."""
        directory = Path(path_or_hub_id)
        if not directory.is_dir():
            if Path(path_or_hub_id).is_absolute() or str(path_or_hub_id).startswith("."):
                raise FileNotFoundError(f"no model folder at {path_or_hub_id}")
            from huggingface_hub import snapshot_download

            directory = Path(snapshot_download(str(path_or_hub_id)))
        index_file = directory / MODEL_INDEX
        if not index_file.is_file():
            raise FileNotFoundError(f"{directory} is not a vlmdiff model folder (no {MODEL_INDEX})")
        index = json.loads(index_file.read_text())
        parts = {}
        for name, (_, class_name) in ((k, v) for k, v in index.items() if not k.startswith("_")):
            component_class = COMPONENT_CLASSES[class_name]
            options = {"torch_dtype": torch.float32} if issubclass(component_class, ModelMixin) else {}
            parts[name] = component_class.from_pretrained(directory / name, **options)
        thresholds_file = directory / THRESHOLDS_FILE
        thresholds = Thresholds.load(thresholds_file) if thresholds_file.is_file() else None
        return cls(**parts, config=PipelineConfig.load(directory / CONFIG_FILE), thresholds=thresholds)

    # ---------------------------------------------------------------- pieces
    @property
    def feature_extractor(self) -> torch.nn.Module:
        if self._feature_extractor is None:
            anomaly = self.config.anomaly
            self._feature_extractor = create_feature_extractor(anomaly.backbone, anomaly.layers)
        return self._feature_extractor

    def caption_context(self, captions: list[str] | None, batch: int) -> torch.Tensor:
        """Cross-attention context: the cached empty caption, or encoded captions."""
        if captions is None:
            return empty_caption_context(self.config.text_encoder).expand(batch, -1, -1)
        return load_text_encoder(self.config.text_encoder)(captions)

    def _hint(self, images: torch.Tensor) -> torch.Tensor:
        """The clean image as SG hint in [-1, 1], weakened by down/up-sampling when configured."""
        factor = self.config.hint_downsample
        if factor > 1:
            small = F.interpolate(images, scale_factor=1 / factor, mode="area")
            images = F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return images * 2 - 1

    def predict_noise(self, latents, timestep, context, hint) -> torch.Tensor:
        """UNet epsilon prediction with the SG network's residuals added."""
        timesteps = torch.full((latents.shape[0],), int(timestep), device=latents.device)
        residuals, middle = self.guidance(latents, timesteps, context, hint)
        return self.unet(
            latents,
            timesteps,
            encoder_hidden_states=context,
            down_block_additional_residuals=residuals,
            mid_block_additional_residual=middle,
        ).sample

    def denoise(
        self,
        latents: torch.Tensor,
        hint: torch.Tensor,
        context: torch.Tensor,
        strength: float,
        num_inference_steps: int,
        seed: int,
        guidance_scale: float = 1.0,
        uncond_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Noise the latents to t0 = strength * 999 and run DDIM (eta 0) back to a clean latent."""
        self.scheduler.set_timesteps(num_inference_steps)
        start = strength * (self.scheduler.config.num_train_timesteps - 1)
        timesteps = [t for t in self.scheduler.timesteps if t <= start]
        if not timesteps:  # strength 0: the autoencoder's own reconstruction
            return latents
        noise = torch.stack([  # the same noise for an image whether alone or in a batch
            torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(seed)) for _ in latents
        ]).to(latents)
        x = self.scheduler.add_noise(latents, noise, torch.tensor([int(timesteps[0])] * len(latents)))
        guided = guidance_scale > 1 and uncond_context is not None
        hint = self.guidance.embed_hint(hint)  # the same at every step: encode the clean image once
        for t in timesteps:
            if guided:
                eps_uncond, eps_text = self.predict_noise(
                    torch.cat([x, x]), t, torch.cat([uncond_context, context]), torch.cat([hint, hint])
                ).chunk(2)
                eps = eps_uncond + guidance_scale * (eps_text - eps_uncond)
            else:
                eps = self.predict_noise(x, t, context, hint)
            x = self.scheduler.step(eps, t, x, eta=0.0).prev_sample
        return x

    def _feature_pairs(self, images, reconstructions, latents, denoised) -> tuple[list, list]:
        """(input pyramid, reconstruction pyramid) compared by the reconstruction map."""
        if self.config.anomaly.compare == "latent":
            return [self.autoencoder.latent_features(latents)], [self.autoencoder.latent_features(denoised)]
        pyramid = self.feature_extractor(torch.cat([images, reconstructions]))  # one batched pass
        return [f[: len(images)] for f in pyramid], [f[len(images) :] for f in pyramid]

    def reconstruction_maps(self, images, reconstructions, latents, denoised) -> torch.Tensor:
        """Raw input-vs-reconstruction maps at model resolution: (B, R, R)."""
        features_in, features_rec = self._feature_pairs(images, reconstructions, latents, denoised)
        return reconstruction_map(features_in, features_rec, images.shape[-2:], self.config.anomaly.distance)

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        """(h, w) of the fused map: the image's aspect ratio with the long side at the model resolution."""
        scale = self.config.resolution / max(width, height)
        return max(8, round(height * scale)), max(8, round(width * scale))

    def fuse(
        self, components: dict[str, torch.Tensor], size: tuple[int, int], weights: dict[str, float] | None = None
    ) -> tuple[torch.Tensor, float]:
        """Weighted sum of the scaled component maps at `size`, blurred: ((h, w) map, image score).

        `weights` default to the configured ones; components of weight 0 are left out.
        """
        weights = self.map_weights() if weights is None else weights
        fused = sum(
            weights[name] / self.config.map_scales[name]
            * F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            for name, m in components.items()
            if weights[name] > 0
        )
        fused = gaussian_blur(fused[None], scaled_sigma(self.config.anomaly, max(size)))
        anomaly = self.config.anomaly
        return fused[0], float(image_scores(fused, anomaly.pool_size, anomaly.pool_repeats)[0])

    def reconstruct(self, images: torch.Tensor, strength: float, steps: int, seed: int, captions=None, guidance_scale: float = 1.0):
        """(latents, denoised latents, reconstructions) for a (B, 3, R, R) batch in [0, 1]."""
        # channels-last (NHWC) inputs: the autoencoders' convolutions run ~3% faster per image on CPU (benchmarks/)
        latents = encode_latents(self.autoencoder, images.contiguous(memory_format=torch.channels_last))
        context = self.caption_context(captions, len(images))
        uncond = self.caption_context(None, len(images)) if captions is not None else None
        denoised = self.denoise(latents, self._hint(images), context, strength, steps, seed, guidance_scale, uncond)
        return latents, denoised, decode_latents(self.autoencoder, denoised.contiguous(memory_format=torch.channels_last))

    def map_weights(self) -> dict[str, float]:
        """The configured weight of each component map."""
        anomaly = self.config.anomaly
        return {"reconstruction": anomaly.reconstruction_weight, "memory": anomaly.memory_weight}

    def component_maps(
        self, pil_images: list[Image.Image], strength: float, steps: int, seed: int,
        captions=None, guidance_scale: float = 1.0, class_names=AUTO_CLASS, maps: tuple[str, ...] | None = None,
    ) -> tuple[list[dict[str, torch.Tensor]], list[str], torch.Tensor]:
        """Raw component maps per image, the resolved class names and the reconstructions (B, 3, R, R).

        `maps` names the components to compute (default: those with a positive weight).
        """
        maps = tuple(name for name, weight in self.map_weights().items() if weight > 0) if maps is None else maps
        if "memory" in maps and self.memory is None:
            raise ValueError("this model has no normal-feature memory; set anomaly.memory_weight to 0")
        # 2. encode, 3. noise to t0 and DDIM denoise with the hint and context, 4. decode
        images = images_to_tensor(pil_images, self.config.resolution)  # (B, 3, R, R)
        latents, denoised, reconstructions = self.reconstruct(images, strength, steps, seed, captions, guidance_scale)
        # 5. component maps: input vs reconstruction, and the normal-feature memory
        components: list[dict[str, torch.Tensor]] = [{} for _ in pil_images]
        if "reconstruction" in maps:
            for parts, rec in zip(components, self.reconstruction_maps(images, reconstructions, latents, denoised)):
                parts["reconstruction"] = rec
        names = [class_names] * len(pil_images) if isinstance(class_names, (str, type(None))) else list(class_names)
        for index, image in enumerate(pil_images):
            features = self.memory.embed(image) if self.memory is not None else None
            if names[index] in (None, AUTO_CLASS):
                names[index] = self.memory.nearest_class(features) if features is not None else "unknown"
            if "memory" in maps:
                components[index]["memory"] = self.memory.distance_map(features, names[index])
        return components, names, reconstructions

    # ---------------------------------------------------------------- inference
    @torch.inference_mode()
    def __call__(
        self,
        images: ImageInput | list[ImageInput],
        strength: float | None = None,
        num_inference_steps: int | None = None,
        seed: int = 0,
        captions: list[str] | None = None,
        guidance_scale: float | None = None,
        class_names: str | list[str] | None = AUTO_CLASS,
        batch_size: int = 8,
    ) -> list[DetectionResult]:
        """Detect anomalies in images; returns one DetectionResult per image."""
        # 1. check inputs
        batch = images if isinstance(images, list) else [images]
        strength = self.config.strength if strength is None else strength
        steps = self.config.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        if not 1 <= steps <= 1000:
            raise ValueError(f"num_inference_steps must be in [1, 1000], got {steps}")
        if captions is not None and len(captions) != len(batch):
            raise ValueError(f"got {len(captions)} captions for {len(batch)} images")
        if not isinstance(class_names, (str, type(None))) and len(class_names) != len(batch):
            raise ValueError(f"got {len(class_names)} class names for {len(batch)} images")
        pil_images = [load_image(image) for image in batch]
        results = []
        for start in range(0, len(pil_images), batch_size):
            chunk = slice(start, start + batch_size)
            names = class_names if isinstance(class_names, (str, type(None))) else class_names[chunk]
            results += self._detect(
                pil_images[chunk], strength, steps, seed, captions[chunk] if captions else None, guidance_scale, names
            )
        return results

    def _detect(self, pil_images, strength, steps, seed, captions, guidance_scale, class_names) -> list[DetectionResult]:
        components, names, reconstructions = self.component_maps(
            pil_images, strength, steps, seed, captions, guidance_scale, class_names
        )
        # 6. fused map, score and verdict per image
        results = []
        for image, parts, name, reconstruction in zip(pil_images, components, names, tensor_to_images(reconstructions)):
            anomaly_map, score = self.fuse(parts, self.working_size(*image.size))
            results.append(self._result(image, reconstruction, anomaly_map, score, name))
        return results

    def _result(self, image: Image.Image, reconstruction: Image.Image, anomaly_map: torch.Tensor, score: float, class_name: str) -> DetectionResult:
        width, height = image.size
        full_map = F.interpolate(anomaly_map[None, None], size=(height, width), mode="bilinear", align_corners=False)
        result = DetectionResult(
            reconstruction=reconstruction.resize((width, height), Image.Resampling.BILINEAR),
            anomaly_map=full_map[0, 0].numpy().astype(np.float32),
            score=score,
            class_name=class_name,
        )
        if class_name in self.thresholds.classes:
            result.threshold = self.thresholds.get(class_name).value
            result.is_anomalous = self.thresholds.verdict(class_name, score)
            result.normalized_score = self.thresholds.normalized(class_name, score)
        return result
