"""A transformers VLM captioner: any image-text-to-text model by hub id or local folder.

Covers encoder-decoder captioners (BLIP, BLIP-2, InstructBLIP, Florence-2 in the transformers
format, e.g. florence-community/Florence-2-base) and chat models (SmolVLM, Qwen2-VL / Qwen2.5-VL,
LLaVA / LLaVA-NeXT, InternVL, ...) through `AutoModelForImageTextToText` (which in transformers 5
also maps BLIP to `BlipForConditionalGeneration`) and `AutoProcessor`; the processors of the
video-capable chat models need torchvision. How the instruction reaches the model depends on its
family (a registry of prompt styles by `config.model_type`); chat models get the processor's chat
template.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from PIL import Image

from vlmdiff.captioning.base import VLM_BACKEND, CaptionerOptions, error_reason, register_captioner
from vlmdiff.captioning.prompts import PROMPT_DESCRIBE

PromptStyle = Callable[[Any, str], "str | None"]  # (processor, prompt) -> text input, None for no text


def chat_prompt(processor: Any, prompt: str) -> str:
    """One user turn holding the image and the instruction, rendered by the model's chat template."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


# Families that do not take a chat-formatted instruction; every other model type uses chat_prompt.
PROMPT_STYLES: dict[str, PromptStyle] = {
    "blip": lambda processor, prompt: None,  # a captioning model: text would be a caption prefix
    "blip-2": lambda processor, prompt: f"Question: {prompt} Answer:",
    "instructblip": lambda processor, prompt: prompt,
    "florence2": lambda processor, prompt: "<MORE_DETAILED_CAPTION>",  # task token; no free-form prompt
}

DTYPES = ("float32", "float16", "bfloat16")


class TransformersCaptioner:
    """Batched captions from a transformers VLM (greedy decoding, at most `max_new_tokens` tokens)."""

    name = "transformers-vlm"
    title = "What the VLM sees (caption)"

    def __init__(self, model_id: str, prompt: str = PROMPT_DESCRIBE, max_new_tokens: int = 128,
                 device: str | None = None, dtype: str | None = None, trust_remote_code: bool = False) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as VLM_TYPES

        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"unknown dtype '{dtype}' (use one of {', '.join(DTYPES)})")
        self.model_id, self.prompt, self.max_new_tokens = model_id, prompt, max_new_tokens
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        default_dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = getattr(torch, dtype) if dtype else default_dtype
        path = Path(model_id).expanduser()
        try:
            if not path.is_dir() and (path.is_absolute() or model_id.startswith(".")):
                raise OSError(f"there is no folder {path}")  # not a hub id either
            config = AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code)
            if config.model_type not in VLM_TYPES and not trust_remote_code:
                raise ValueError(f"it is a {config.model_type} model, not an image-text-to-text VLM")
            self.processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
            model = AutoModelForImageTextToText.from_pretrained(
                model_id, config=config, dtype=self.dtype, trust_remote_code=trust_remote_code
            )
        except OSError as error:  # not a folder, not cached, and no network: say so in one line
            raise FileNotFoundError(f"cannot load VLM '{model_id}' (hub id or local model folder): "
                                    f"{error_reason(error)}") from error
        except ImportError as error:  # e.g. the video processor of Qwen2-VL or SmolVLM without torchvision
            raise ImportError(f"cannot load VLM '{model_id}': {error_reason(error)}") from error
        except ValueError as error:  # e.g. not a VLM
            raise ValueError(f"cannot load VLM '{model_id}': {error_reason(error)}") from error
        self.model = model.to(self.device).eval()
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is not None and not self.model.config.is_encoder_decoder:
            tokenizer.padding_side = "left"  # decoder-only generation continues from the right edge
        style = PROMPT_STYLES.get(self.model.config.model_type, chat_prompt)
        self.text = style(self.processor, prompt)

    def _inputs(self, images: list[Image.Image]) -> dict[str, Any]:
        if self.text is None:
            batch = self.processor(images=images, return_tensors="pt")
        else:
            batch = self.processor(images=images, text=[self.text] * len(images), return_tensors="pt", padding=True)
        return {key: value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device)
                for key, value in batch.items()}

    def caption(self, images: list[Image.Image]) -> list[str]:
        import torch

        inputs = self._inputs([image.convert("RGB") for image in images])
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        prompt_ids = inputs.get("input_ids")
        if prompt_ids is not None and output.shape[1] > prompt_ids.shape[1] \
                and torch.equal(output[:, : prompt_ids.shape[1]], prompt_ids):
            output = output[:, prompt_ids.shape[1]:]  # decoder-only models echo the prompt
        return [text.strip() for text in self.processor.batch_decode(output, skip_special_tokens=True)]


@register_captioner(VLM_BACKEND)
def _build(captioner_id: str, options: CaptionerOptions) -> TransformersCaptioner:
    return TransformersCaptioner(captioner_id, options.prompt, options.max_new_tokens, options.device,
                                 options.dtype, options.trust_remote_code)
