"""`VLMDiffPipeline`: image -> latent -> noise to t0 -> DDIM with the guided UNet -> reconstruction
-> component maps -> fused anomaly map -> image score -> per-class verdict.

`__call__` runs check_inputs, then the stages of `STAGES` in order: preprocess, embed, encode,
denoise, decode, component_maps, fuse_and_results. They run public methods (encode, prepare_hint,
prepare_latents, denoise, decode, embed, resolve_classes, component_maps, result), so that training,
calibration and the benchmarks run the same code as `__call__`; `stage_hook` wraps each stage.
"""
from __future__ import annotations

import copy
import json
import shutil
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image

from vlmdiff.bounds import Bounds, check_bounds
from vlmdiff.colour import match_colours
from vlmdiff.config import DEFAULT_BATCH_SIZE, PipelineConfig
from vlmdiff.features import create_feature_extractor
from vlmdiff.images import ImageInput, image_to_tensor, images_to_tensor, load_image, tensor_to_images
from vlmdiff.memory import ClassMatch, NormalFeatureMemory
from vlmdiff.memory_guidance import Inpainting, Regeneration, guidance_threshold, guide
from vlmdiff.model_folder import CONFIG_FILE, MODEL_INDEX, THRESHOLDS_FILE, resolve_model_folder
from vlmdiff.models import FeatureAutoencoder, SemanticGuidanceNet, decode_latents, encode_latents, guided_unet
from vlmdiff.presets import DENOISER_SETTINGS, build_components, denoiser_components, get_preset
from vlmdiff.scoring import COMPONENT_MAPS, MEMORY, AnomalyScorer, ScoringBatch, compute_component_maps
from vlmdiff.text import empty_caption_context, load_text_encoder
from vlmdiff.thresholds import Thresholds

COMPONENT_CLASSES = {
    cls.__name__: cls
    for cls in (AutoencoderKL, FeatureAutoencoder, UNet2DConditionModel, SemanticGuidanceNet, DDIMScheduler, NormalFeatureMemory)
}
# sizes in a component's saved config that allocate before its weights are read (the weights themselves
# are created empty and filled from the file, so the file's size bounds them)
SAVED_BOUNDS: dict[type, tuple[str, Bounds]] = {
    FeatureAutoencoder: ("config.json", {"feature_channels": (1, 4096), "latent_channels": (1, 4096)}),
    DDIMScheduler: ("scheduler_config.json", {"num_train_timesteps": (1, 10_000)}),
}
AUTO_CLASS = "auto"
UNKNOWN_CLASS = "unknown"
# the stages `stage_hook` sees, in the order `__call__` runs them
STAGES = ("preprocess", "embed", "encode", "denoise", "decode", "component_maps", "fuse_and_results")
StageHook = Callable[[str], AbstractContextManager]


@dataclass
class DetectionSettings:
    """How a call reconstructs; None means the model's default (its PipelineConfig)."""

    GUIDED: ClassVar[float] = 1.0  # memory_guidance=True on a model whose own is 0 (off): this many memory scales

    strength: float | None = None  # start step t0 = strength * 999
    num_inference_steps: int | None = None  # DDIM steps over the full schedule (eta 0)
    seed: int = 0  # noise seed, per image: the same image gets the same noise alone or in a batch
    guidance_scale: float | None = None  # classifier-free guidance when captions are given
    captions: list[str] | None = None  # one per image; None = the empty caption (published test setting)
    # regenerate the latent cells the memory flags above this many memory scales (memory_guidance.py);
    # 0 or False: off; True: the model's threshold, or GUIDED when the model's is off
    memory_guidance: float | bool | None = None

    def resolved(self, config: PipelineConfig) -> "DetectionSettings":
        """These settings with the model's defaults filled in, checked."""
        settings = replace(
            self,
            strength=config.strength if self.strength is None else float(self.strength),
            num_inference_steps=config.num_inference_steps if self.num_inference_steps is None else int(self.num_inference_steps),
            guidance_scale=config.guidance_scale if self.guidance_scale is None else float(self.guidance_scale),
            memory_guidance=guidance_threshold(self.memory_guidance, config.memory_guidance, self.GUIDED),
        )
        if not 0.0 <= settings.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {settings.strength}")
        if not 1 <= settings.num_inference_steps <= 1000:
            raise ValueError(f"num_inference_steps must be in [1, 1000], got {settings.num_inference_steps}")
        if settings.memory_guidance < 0:
            raise ValueError(f"memory_guidance must be >= 0 (0: off), got {settings.memory_guidance}")
        return settings


@dataclass
class DetectionResult:
    """What the pipeline says about one image; the map has the ORIGINAL image size."""

    reconstruction: Image.Image | None  # None when the call skipped the diffusion
    anomaly_map: np.ndarray  # (H, W) float32
    score: float
    class_name: str
    threshold: float | None = None
    is_anomalous: bool | None = None  # None until the class has a threshold
    normalized_score: float | None = None  # in (0, 1), threshold at 0.5
    class_match: ClassMatch | None = None  # set when the class was guessed ("auto"): how well it fits

    @property
    def unknown_class(self) -> bool:
        """The class was guessed and the image fits no known class (no verdict is given)."""
        return self.class_match is not None and not self.class_match.known


def judge(result: DetectionResult, thresholds: Thresholds) -> DetectionResult:
    """The result with the verdict of `thresholds` for its class (threshold, anomalous or not, normalised
    score); none of them for an image of no known class or of a class without a threshold."""
    name, score = result.class_name, result.score
    if name not in thresholds.classes or result.unknown_class:
        return replace(result, threshold=None, is_anomalous=None, normalized_score=None)
    return replace(result, threshold=thresholds.get(name).value, is_anomalous=thresholds.verdict(name, score),
                   normalized_score=thresholds.normalized(name, score))


def _check_saved(component_class: type, folder: Path) -> None:
    """ValueError naming the file and field when a saved component asks for sizes out of bounds."""
    if component_class is NormalFeatureMemory:
        NormalFeatureMemory.check_saved(folder)
    elif component_class in SAVED_BOUNDS:
        file_name, bounds = SAVED_BOUNDS[component_class]
        check_bounds(json.loads((folder / file_name).read_text()), bounds, f"{folder / file_name}: ")


class VLMDiffPipeline:
    """Composes the autoencoder, the guided UNet, the DDIM scheduler and anomaly scoring."""

    def __init__(
        self,
        autoencoder: torch.nn.Module,
        unet: UNet2DConditionModel,
        scheduler: DDIMScheduler,
        config: PipelineConfig,
        guidance: SemanticGuidanceNet | None = None,
        memory: NormalFeatureMemory | None = None,
        thresholds: Thresholds | None = None,
    ) -> None:
        self.autoencoder = autoencoder.eval()
        self.unet = unet.eval()
        self.guidance = guidance.eval() if guidance is not None else None
        self.scheduler = scheduler
        self.config = config
        self.memory = memory.eval() if memory is not None else None
        self.thresholds = thresholds or Thresholds()
        self.stage_hook: StageHook | None = None  # called with each stage's name; its context wraps the stage
        self._feature_extractor: torch.nn.Module | None = None

    def stage(self, name: str) -> AbstractContextManager:
        """The context one stage runs in: `stage_hook(name)`, or nothing."""
        return self.stage_hook(name) if self.stage_hook else nullcontext()

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_preset(cls, name: str = "tiny", pretrained: str | None = None, **config_overrides) -> "VLMDiffPipeline":
        """A new (untrained, or SD-initialised from `pretrained`) pipeline of a preset's sizes."""
        preset = get_preset(name)
        config = PipelineConfig(**{**preset.pipeline.__dict__, **config_overrides})
        return cls(**build_components(preset, pretrained), config=config)

    def replace_denoiser(self, preset: str) -> None:
        """A fresh (untrained) UNet, SG network and scheduler of `preset`, keeping the autoencoder and memory."""
        parts = denoiser_components(get_preset(preset))
        if parts["unet"].config.in_channels != self.unet.config.in_channels:
            raise ValueError(
                f"preset {preset!r} denoises {parts['unet'].config.in_channels}-channel latents, "
                f"this model has {self.unet.config.in_channels}"
            )
        self.unet, self.guidance, self.scheduler = parts["unet"].eval(), parts["guidance"], parts["scheduler"]
        for name in DENOISER_SETTINGS:
            setattr(self.config, name, getattr(get_preset(preset).pipeline, name))

    def components(self) -> dict[str, object]:
        parts = dict(
            autoencoder=self.autoencoder, unet=self.unet, guidance=self.guidance, scheduler=self.scheduler, memory=self.memory
        )
        return {name: part for name, part in parts.items() if part is not None}

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
                component = torch.nn.Module.to(copy.deepcopy(component), dtype)  # not ModelMixin.to: it warns needlessly
            component.save_pretrained(directory / name)
            index[name] = [type(component).__module__.split(".")[0], type(component).__name__]
        (directory / MODEL_INDEX).write_text(json.dumps(index, indent=2))
        self.config.save(directory / CONFIG_FILE)
        self.thresholds.save(directory / THRESHOLDS_FILE)

    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | Path) -> "VLMDiffPipeline":
        """Load a folder written by `save_pretrained`, or download one from the Hugging Face hub."""
        directory = resolve_model_folder(path_or_hub_id)
        index = json.loads((directory / MODEL_INDEX).read_text())
        config = PipelineConfig.load(directory / CONFIG_FILE)  # checked before any component is built
        parts = {}
        for name, (_, class_name) in ((k, v) for k, v in index.items() if not k.startswith("_")):
            component_class = COMPONENT_CLASSES[class_name]
            _check_saved(component_class, directory / name)
            # low_cpu_mem_usage=False: diffusers would otherwise build the module under accelerate's
            # init_empty_weights, which patches torch for every thread (a model built or loaded in another
            # thread meanwhile comes out on the meta device, and concurrent loads can leave torch patched)
            options = ({"torch_dtype": torch.float32, "low_cpu_mem_usage": False}
                       if issubclass(component_class, ModelMixin) else {})
            parts[name] = component_class.from_pretrained(directory / name, **options)
            if options:  # weights saved in float16 compute in float32 (nn.Module's to(): diffusers' warns needlessly)
                torch.nn.Module.to(parts[name], torch.float32)
        thresholds_file = directory / THRESHOLDS_FILE
        thresholds = Thresholds.load(thresholds_file) if thresholds_file.is_file() else None
        return cls(**parts, config=config, thresholds=thresholds)

    # ---------------------------------------------------------------- scoring parts
    @property
    def scorer(self) -> AnomalyScorer:
        """Fusion and image score under the configured weights and scales."""
        return AnomalyScorer(self.config.anomaly)

    @property
    def feature_extractor(self) -> torch.nn.Module:
        """The backbone the reconstruction map compares images with (built on first use)."""
        if self._feature_extractor is None:
            anomaly = self.config.anomaly
            self._feature_extractor = create_feature_extractor(anomaly.backbone, anomaly.layers)
        return self._feature_extractor

    def working_size(self, width: int, height: int) -> tuple[int, int]:
        """(h, w) of the fused map: the image's aspect ratio with the long side at the model resolution."""
        scale = self.config.resolution / max(width, height)
        return max(8, round(height * scale)), max(8, round(width * scale))

    # ---------------------------------------------------------------- stages
    def check_inputs(
        self, images: ImageInput | list[ImageInput], settings: DetectionSettings, class_names: str | list[str] | None
    ) -> tuple[list[Image.Image], DetectionSettings, list[str]]:
        """Images loaded (ImageInputError names a bad one), settings resolved, one class name per image."""
        batch = images if isinstance(images, list) else [images]
        settings = settings.resolved(self.config)
        if settings.captions is not None and len(settings.captions) != len(batch):
            raise ValueError(f"got {len(settings.captions)} captions for {len(batch)} images")
        if isinstance(class_names, (str, type(None))):
            names = [class_names or AUTO_CLASS] * len(batch)
        else:
            names = list(class_names)
            if len(names) != len(batch):
                raise ValueError(f"got {len(names)} class names for {len(batch)} images")
        return [load_image(image) for image in batch], settings, names

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, R, R) images in [0, 1] -> scaled latents (B, C, h, w)."""
        # channels-last (NHWC) inputs: the autoencoders' convolutions run ~3% faster per image on CPU (benchmarks/)
        return encode_latents(self.autoencoder, images.contiguous(memory_format=torch.channels_last))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (B, 3, R, R) images in [0, 1]."""
        return decode_latents(self.autoencoder, latents.contiguous(memory_format=torch.channels_last))

    def caption_context(self, captions: list[str] | None, batch: int) -> torch.Tensor:
        """Cross-attention context (B, 77, D): the cached empty caption, or encoded captions."""
        if captions is None:
            return empty_caption_context(self.config.text_encoder).expand(batch, -1, -1)
        return load_text_encoder(self.config.text_encoder)(captions)

    def prepare_hint(self, images: torch.Tensor) -> torch.Tensor:
        """The clean image as SG hint in [-1, 1], weakened by down/up-sampling when configured."""
        factor = self.config.hint_downsample
        if factor > 1:
            small = F.interpolate(images, scale_factor=1 / factor, mode="area")
            images = F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return images * 2 - 1

    def timesteps(self, settings: DetectionSettings) -> list[int]:
        """The DDIM timesteps at or below t0 = strength * 999 (none at strength 0)."""
        self.scheduler.set_timesteps(settings.num_inference_steps)
        start = settings.strength * (self.scheduler.config.num_train_timesteps - 1)
        return [int(t) for t in self.scheduler.timesteps if t <= start]

    @staticmethod
    def noise(latents: torch.Tensor, seed: int) -> torch.Tensor:
        """One seeded noise per image: the same for an image whether alone or in a batch."""
        return torch.stack([
            torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(seed)) for _ in latents
        ]).to(latents)

    def prepare_latents(self, latents: torch.Tensor, timesteps: list[int], seed: int) -> torch.Tensor:
        """The latents noised to the first timestep with `noise(latents, seed)`."""
        if not timesteps:
            return latents
        return self.scheduler.add_noise(latents, self.noise(latents, seed), torch.tensor([timesteps[0]] * len(latents)))

    def predict(self, latents: torch.Tensor, timestep: int, context: torch.Tensor, hint: torch.Tensor) -> torch.Tensor:
        """The guided UNet's prediction (epsilon, x0 or v, as the scheduler is configured) at one timestep."""
        timesteps = torch.full((latents.shape[0],), int(timestep), device=latents.device)
        return guided_unet(self.unet, self.guidance, latents, timesteps, context, hint, self.config.sg_residuals)

    def denoise(
        self,
        x: torch.Tensor,
        timesteps: list[int],
        hint: torch.Tensor,
        context: torch.Tensor,
        guidance_scale: float = 1.0,
        uncond_context: torch.Tensor | None = None,
        inpainting: Inpainting | None = None,
    ) -> torch.Tensor:
        """DDIM (eta 0) from noisy latents through `timesteps` to clean latents; with `inpainting`
        only its flagged cells are denoised, the others follow its input latents."""
        guided = guidance_scale > 1 and uncond_context is not None
        if timesteps and self.config.sg_residuals != "none":  # the same at every step: encode the clean image once
            hint = self.guidance.embed_hint(hint)
        for t, next_t in zip(timesteps, [*timesteps[1:], None]):
            if guided:
                uncond, text = self.predict(
                    torch.cat([x, x]), t, torch.cat([uncond_context, context]), torch.cat([hint, hint])
                ).chunk(2)
                prediction = uncond + guidance_scale * (text - uncond)
            else:
                prediction = self.predict(x, t, context, hint)
            x = self.scheduler.step(prediction, t, x, eta=0.0).prev_sample
            if inpainting is not None:
                x = inpainting.blend(x, next_t, self.scheduler)
        return x

    def reconstruct(
        self, images: torch.Tensor, settings: DetectionSettings, memory_maps: list[torch.Tensor] | None = None,
        whole: list[bool] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Regeneration | None]:
        """(latents, denoised latents, reconstructions, regeneration) for a (B, 3, R, R) batch in [0, 1].

        With `settings.memory_guidance` and the images' raw memory maps, only the latent cells the
        memory flags are regenerated (vlmdiff.memory_guidance), but in the images `whole` marks;
        `regeneration` (else None) keeps what composites them into the input at another size."""
        with self.stage("encode"):
            latents = self.encode(images)
        with self.stage("denoise"):
            context = self.caption_context(settings.captions, len(images))
            uncond = self.caption_context(None, len(images)) if settings.captions is not None else None
            timesteps = self.timesteps(settings)
            hint, start, inpainting = self.prepare_hint(images), latents, None
            if settings.memory_guidance > 0 and memory_maps is not None and timesteps and not all(whole or ()):
                start, hint, inpainting = guide(latents, hint, self.noise(latents, settings.seed), memory_maps,
                                                self.config.anomaly.scales.get(MEMORY, 1.0), settings.memory_guidance,
                                                whole)
            x = self.prepare_latents(start, timesteps, settings.seed)
            denoised = self.denoise(x, timesteps, hint, context, settings.guidance_scale, uncond, inpainting)
        with self.stage("decode"):
            decoded = self.decode(denoised)
            if inpainting is None:
                return latents, denoised, match_colours(images, decoded), None
            regeneration = Regeneration(decoded, inpainting.mask)
            return latents, denoised, regeneration.composite(images), regeneration

    def embed(self, pil_images: list[Image.Image]) -> list[torch.Tensor] | None:
        """Each image's normal-feature-memory features (C, h, w) at its own aspect; None without a memory."""
        return [self.memory.embed(image) for image in pil_images] if self.memory is not None else None

    def resolve_classes(
        self, class_names: list[str | None], memory_features: list[torch.Tensor] | None
    ) -> tuple[list[str], list[ClassMatch | None]]:
        """(class names, class matches): 'auto' (or None) becomes the nearest known class and keeps its
        match (how far the image is from it); 'unknown' for a model without a memory (or an empty one)."""
        names, matches = [], []
        for name, features in zip(class_names, memory_features or [None] * len(class_names)):
            if name not in (None, AUTO_CLASS):
                names.append(name)
                matches.append(None)
            elif features is None or not self.memory.config.class_names:
                names.append(UNKNOWN_CLASS)
                matches.append(None)
            else:
                matches.append(self.memory.match_class(features))
                names.append(matches[-1].name)
        return names, matches

    def prepare_batch(
        self, pil_images: list[Image.Image], class_names: list[str], settings: DetectionSettings, reconstruct: bool = True
    ) -> ScoringBatch:
        """preprocess, embed (with the classes resolved) and, when asked, encode, denoise and decode."""
        with self.stage("preprocess"):
            images = images_to_tensor(pil_images, self.config.resolution)  # (B, 3, R, R)
        with self.stage("embed"):
            features = self.embed(pil_images)
            names, matches = self.resolve_classes(class_names, features)
            batch = ScoringBatch(pil_images, images, names, features, class_matches=matches)
        if reconstruct:
            # a class whose own weights use the reconstruction is reconstructed whole, as they were chosen
            fused = set(self.scorer.reconstruction_classes)
            whole = [name in fused for name in names]
            if settings.memory_guidance > 0 and features is not None and not all(whole):
                with self.stage("component_maps"):
                    batch.memory_maps = self.memory_maps(batch)  # reused by component_maps
            batch.latents, batch.denoised, batch.reconstructions, batch.regeneration = self.reconstruct(
                images, settings, batch.memory_maps, whole)
        return batch

    def memory_maps(self, batch: ScoringBatch) -> list[torch.Tensor]:
        """Each image's raw memory map (h, w): its patches' distance to the normal patches of its class."""
        return [self.memory.distance_map(f, name) for f, name in zip(batch.memory_features, batch.class_names)]

    def compared_features(self, batch: ScoringBatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(input features, reconstruction features) the reconstruction map compares: feature-space
        latents, or backbone pyramids of the images (one batched pass)."""
        if self.config.anomaly.compare == "latent":
            return [self.autoencoder.latent_features(batch.latents)], [self.autoencoder.latent_features(batch.denoised)]
        count = len(batch.images)
        pyramid = self.feature_extractor(torch.cat([batch.images, batch.reconstructions]))
        return [f[:count] for f in pyramid], [f[count:] for f in pyramid]

    def component_maps(self, batch: ScoringBatch, names: tuple[str, ...] | None = None) -> list[dict[str, torch.Tensor]]:
        """Raw component maps per image: `names`, or the maps the configured weights use. What they
        are computed from (compared features, memory maps) is added to the batch first."""
        names = self.scorer.active if names is None else names
        with self.stage("component_maps"):
            wanted = [COMPONENT_MAPS[name] for name in names]
            reconstructed = batch.reconstructions is not None or batch.denoised is not None
            if any(c.needs_reconstruction for c in wanted) and batch.input_features is None and reconstructed:
                batch.input_features, batch.reconstruction_features = self.compared_features(batch)
            if any(c.needs_memory for c in wanted) and batch.memory_maps is None and self.memory is not None:
                batch.memory_maps = self.memory_maps(batch)
            return compute_component_maps(batch, self.config.anomaly, names)

    @staticmethod
    def shown_reconstructions(batch: ScoringBatch) -> list[Image.Image]:
        """Each reconstruction at its image's own size. A memory-guided one is composited there, so what was
        not regenerated is the input pixel for pixel; a whole-image one is resized from the model resolution."""
        if batch.regeneration is None:
            return [shown.resize(image.size, Image.Resampling.BILINEAR)
                    for shown, image in zip(tensor_to_images(batch.reconstructions), batch.pil_images)]
        return [tensor_to_images(batch.regeneration.composite(image_to_tensor(image), slice(i, i + 1)))[0]
                for i, image in enumerate(batch.pil_images)]

    def result(
        self, image: Image.Image, reconstruction: Image.Image | None, anomaly_map: torch.Tensor, score: float,
        class_name: str, class_match: ClassMatch | None = None,
    ) -> DetectionResult:
        """The map at the image's own size beside the reconstruction (at that size too) and the class's
        verdict (none for an image of no known class)."""
        width, height = image.size
        full_map = F.interpolate(anomaly_map[None, None], size=(height, width), mode="bilinear", align_corners=False)
        result = DetectionResult(
            reconstruction=reconstruction,
            anomaly_map=full_map[0, 0].numpy().astype(np.float32),
            score=score,
            class_name=class_name,
            class_match=class_match,
        )
        return judge(result, self.thresholds)

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
        batch_size: int = DEFAULT_BATCH_SIZE,
        return_reconstruction: bool = True,
        memory_guidance: float | bool | None = None,
    ) -> list[DetectionResult]:
        """Detect anomalies in images; returns one DetectionResult per image.

        With `return_reconstruction=False` the diffusion runs only when a weighted map needs it.
        """
        settings = DetectionSettings(strength, num_inference_steps, seed, guidance_scale, captions, memory_guidance)
        pil_images, settings, names = self.check_inputs(images, settings, class_names)
        scorer = self.scorer
        reconstruct = return_reconstruction or scorer.needs_reconstruction
        results = []
        for start in range(0, len(pil_images), batch_size):
            chunk = slice(start, start + batch_size)
            chunk_settings = replace(settings, captions=settings.captions[chunk] if settings.captions else None)
            batch = self.prepare_batch(pil_images[chunk], names[chunk], chunk_settings, reconstruct)
            components = self.component_maps(batch)
            with self.stage("fuse_and_results"):
                shown = self.shown_reconstructions(batch) if return_reconstruction else [None] * len(components)
                for image, parts, name, match, reconstruction in zip(
                    batch.pil_images, components, batch.class_names, batch.class_matches, shown
                ):
                    anomaly_map, score = scorer.fuse(parts, self.working_size(*image.size), name)
                    results.append(self.result(image, reconstruction, anomaly_map, score, name, match))
        return results
