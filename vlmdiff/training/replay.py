"""A small replay set of normal training images kept in the model folder.

Fine-tuning on a new class mixes these with the new images so that the model keeps
reconstructing the classes it already knew.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from vlmdiff.model_folder import REPLAY_FILE
from vlmdiff.training.data import TrainingSet



def select_replay(data: TrainingSet, per_class: int, seed: int = 0) -> TrainingSet:
    """`per_class` random images of each class."""
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for name in sorted(set(data.class_names)):
        members = [i for i, n in enumerate(data.class_names) if n == name]
        order = torch.randperm(len(members), generator=generator)[:per_class]
        chosen += [members[i] for i in order.tolist()]
    return data.subset(chosen)


def save_replay(data: TrainingSet, directory: str | Path) -> None:
    metadata = {"captions": json.dumps(data.captions), "class_names": json.dumps(data.class_names)}
    save_file({"images": data.images.contiguous()}, str(Path(directory) / REPLAY_FILE), metadata=metadata)


def load_replay(directory: str | Path) -> TrainingSet | None:
    path = Path(directory) / REPLAY_FILE
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    images = load_file(str(path))["images"]
    return TrainingSet(images, json.loads(metadata["captions"]), json.loads(metadata["class_names"]))
