"""The `Captioner` protocol and the registry that builds captioners by id (timm-style factory)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol, runtime_checkable

from PIL import Image

from vlmdiff.captioning.prompts import PROMPT_DESCRIBE, resolve_prompt

DEFAULT_CAPTIONER = "offline-efficientnet"
VLM_BACKEND = "transformers"  # builds any id that is not registered: a hub id or a local model folder


@runtime_checkable
class Captioner(Protocol):
    """Describes images in words. `name` and `model_id` are stored with the captions it writes; `title` says
    what it is to a person (the app's caption box is named by it)."""

    name: str
    title: str
    model_id: str
    prompt: str

    def caption(self, images: list[Image.Image]) -> list[str]:
        """One caption per RGB image, in order."""
        ...


@dataclass(frozen=True)
class CaptionerOptions:
    """Options every captioner factory receives; each uses those that apply to it."""

    prompt: str = PROMPT_DESCRIBE
    device: str | None = None  # None: the best available
    dtype: str | None = None  # "float32", "float16", "bfloat16"; None: bfloat16 on GPU, float32 on CPU
    max_new_tokens: int = 128
    trust_remote_code: bool = False


CaptionerFactory = Callable[[str, CaptionerOptions], Captioner]
CAPTIONERS: dict[str, CaptionerFactory] = {}


def register_captioner(captioner_id: str) -> Callable[[CaptionerFactory], CaptionerFactory]:
    """Register a factory `(captioner_id, options) -> Captioner` under an id."""

    def decorate(factory: CaptionerFactory) -> CaptionerFactory:
        CAPTIONERS[captioner_id] = factory
        return factory

    return decorate


def create_captioner(captioner_id: str = DEFAULT_CAPTIONER, prompt: str = "pd", **options: Any) -> Captioner:
    """A registered captioner by id, otherwise a transformers VLM by hub id or local folder.

    `prompt` is a published prompt's short name (pd, pa, coco) or any text; `options` are
    `CaptionerOptions` fields (device, dtype, max_new_tokens, trust_remote_code).
    """
    settings = replace(CaptionerOptions(**options), prompt=resolve_prompt(prompt))
    factory = CAPTIONERS.get(captioner_id, CAPTIONERS[VLM_BACKEND])
    return factory(captioner_id, settings)


def error_reason(error: BaseException) -> str:
    """The first sentence of an error's message, for one-line messages (transformers' run over many lines)."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0].split(". ")[0].rstrip(".")
