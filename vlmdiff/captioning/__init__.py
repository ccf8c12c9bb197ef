"""Captioning: the published prompts, the `Captioner` protocol and registry, an offline default
captioner, a transformers VLM backend, the captioner the app shows (a VLM by id, falling back to the
model's own) and a resumable JSON caption store."""
from vlmdiff.captioning.base import (
    CAPTIONERS, DEFAULT_CAPTIONER, Captioner, CaptionerOptions, create_captioner, register_captioner,
)
from vlmdiff.captioning.display import CAPTIONER_ENV, load_display_captioner
from vlmdiff.captioning.offline import OfflineCaptioner
from vlmdiff.captioning.prompts import PROMPT_COCO, PROMPT_DESCRIBE, PROMPT_INSPECT, PROMPTS, resolve_prompt
from vlmdiff.captioning.store import CaptionJob, CaptionMetadata, CaptionStore, run_captioning
from vlmdiff.captioning.transformers_vlm import TransformersCaptioner

__all__ = [
    "Captioner", "CaptionerOptions", "CAPTIONERS", "DEFAULT_CAPTIONER", "create_captioner", "register_captioner",
    "OfflineCaptioner", "TransformersCaptioner", "PROMPT_DESCRIBE", "PROMPT_INSPECT", "PROMPT_COCO", "PROMPTS",
    "resolve_prompt", "CaptionJob", "CaptionMetadata", "CaptionStore", "run_captioning", "CAPTIONER_ENV",
    "load_display_captioner",
]
