"""A resumable JSON caption store and the loop that fills it, on one process or many (accelerate).

File format: {"metadata": {"captioner", "model_id", "prompt", "created"},
              "captions": {"<image path relative to the dataset root>": "<caption>"}}
"""
from __future__ import annotations

import json
import os
import tempfile
from textwrap import shorten
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Sequence

from PIL import Image

from vlmdiff.captioning.base import Captioner
from vlmdiff.config import DEFAULT_BATCH_SIZE

IDENTITY_FIELDS = ("captioner", "model_id", "prompt")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass(frozen=True)
class CaptionMetadata:
    """Who wrote the captions: a file only ever holds captions of one captioner, model and prompt."""

    captioner: str
    model_id: str
    prompt: str
    created: str = field(default_factory=_now)

    @classmethod
    def of(cls, captioner: Captioner) -> CaptionMetadata:
        return cls(captioner.name, captioner.model_id, captioner.prompt)

    def mismatch(self, other: CaptionMetadata) -> str | None:
        """The first identity field that differs, or None."""
        return next((name for name in IDENTITY_FIELDS if getattr(self, name) != getattr(other, name)), None)


class CaptionStore:
    """Captions keyed by image path relative to the dataset root, saved atomically as JSON."""

    def __init__(self, path: str | Path, metadata: CaptionMetadata, captions: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.metadata = metadata
        self.captions: dict[str, str] = dict(captions or {})

    @classmethod
    def load(cls, path: str | Path) -> CaptionStore:
        """An existing caption file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"caption file not found: {path}")
        try:
            data = json.loads(path.read_text())
            return cls(path, CaptionMetadata(**data["metadata"]), data["captions"])
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path} is not a vlmdiff caption file ({error})") from error

    @classmethod
    def open(cls, path: str | Path, metadata: CaptionMetadata, overwrite: bool = False) -> CaptionStore:
        """Resume the file at `path` if it was written by the same captioner, model and prompt.

        With `overwrite`, an existing file is ignored (and replaced on the next save).
        """
        path = Path(path)
        if overwrite or not path.exists():
            return cls(path, metadata)
        store = cls.load(path)
        differs = store.metadata.mismatch(metadata)
        if differs:
            raise ValueError(
                f"{path} holds captions with another {differs} ({shorten(getattr(store.metadata, differs), 70)!r}); "
                f"pass --overwrite (overwrite=True) to replace them or choose another output file"
            )
        return store

    def __len__(self) -> int:
        return len(self.captions)

    def __contains__(self, key: str) -> bool:
        return key in self.captions

    def add(self, key: str, caption: str) -> None:
        self.captions[key] = caption

    def save(self) -> None:
        """Write to a temporary file beside the target, then rename: a crash never leaves half a file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"metadata": asdict(self.metadata), "captions": dict(sorted(self.captions.items()))}
        handle, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        with os.fdopen(handle, "w") as file:
            json.dump(data, file, indent=1, ensure_ascii=False)
        os.replace(temporary, self.path)


@dataclass(frozen=True)
class CaptionJob:
    """One image to caption and the key its caption is stored under."""

    key: str
    path: Path


def _batches(items: Sequence[CaptionJob], size: int) -> Iterator[Sequence[CaptionJob]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def caption_into(store: CaptionStore, captioner: Captioner, jobs: Sequence[CaptionJob], batch_size: int = DEFAULT_BATCH_SIZE,
                 save_every: int = 32, progress: bool = True) -> int:
    """Caption the jobs not yet in the store, saving every `save_every` images; returns how many were new."""
    from tqdm import tqdm

    todo = [job for job in jobs if job.key not in store]
    unsaved = 0
    with tqdm(total=len(todo), desc=f"caption ({captioner.name})", unit="img", disable=not progress) as bar:
        for batch in _batches(todo, batch_size):
            images = []
            for job in batch:
                with Image.open(job.path) as image:
                    images.append(image.convert("RGB"))
            for job, caption in zip(batch, captioner.caption(images)):
                store.add(job.key, caption)
            unsaved += len(batch)
            bar.update(len(batch))
            if unsaved >= save_every:
                store.save()
                unsaved = 0
    store.save()
    return len(todo)


def shard_path(path: Path, rank: int) -> Path:
    """Where process `rank` keeps its part of a distributed run."""
    return path.with_name(f"{path.stem}.part{rank}{path.suffix}")


def _merge_shards(store: CaptionStore) -> None:
    for shard in sorted(store.path.parent.glob(f"{store.path.stem}.part*{store.path.suffix}")):
        part = CaptionStore.load(shard)
        if part.metadata.mismatch(store.metadata) is None:
            store.captions.update(part.captions)
        shard.unlink()
    store.save()


def run_captioning(captioner: Captioner, jobs: Sequence[CaptionJob], out: str | Path, batch_size: int = DEFAULT_BATCH_SIZE,
                   save_every: int = 32, overwrite: bool = False) -> CaptionStore:
    """Caption `jobs` into the JSON file `out`, resuming it; under `accelerate launch` the images are
    split across processes, each writes its own shard, and the main process merges them."""
    from accelerate import PartialState

    state = PartialState()
    metadata = CaptionMetadata.of(captioner)
    CaptionStore.open(out, metadata, overwrite)  # every process checks the file, so all fail alike
    if state.is_main_process:  # fold in shards an interrupted distributed run left behind
        _merge_shards(CaptionStore.open(out, metadata, overwrite))
    state.wait_for_everyone()
    store = CaptionStore.open(out, metadata)
    if state.num_processes == 1:
        caption_into(store, captioner, jobs, batch_size, save_every)
        return store
    todo = [job for job in jobs if job.key not in store]
    with state.split_between_processes(todo) as part:
        shard = CaptionStore(shard_path(store.path, state.process_index), metadata)
        caption_into(shard, captioner, part, batch_size, save_every, progress=state.is_local_main_process)
    state.wait_for_everyone()
    if state.is_main_process:
        _merge_shards(store)
    state.wait_for_everyone()
    return CaptionStore.load(out)
