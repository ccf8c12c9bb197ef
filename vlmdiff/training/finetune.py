"""Fine-tuning a trained model on new normal images of one class (new or known).

Captions the images, continues diffusion training on them mixed with the model's replay
set, adds the class to the normal-feature memory, calibrates its threshold, and writes a
NEW model folder atomically: on any failure the previous model is left untouched.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from vlmdiff.data.validation import read_image
from vlmdiff.images import ImageInput, images_to_tensor
from vlmdiff.model_folder import (
    TRAINING_FILE, check_output_folder, copy_extra_files, replace_atomically, resolve_model_folder, staging_folder,
    weights_dtype,
)
from vlmdiff.pipeline import AUTO_CLASS, VLMDiffPipeline
from vlmdiff.thresholds import DEFAULT_QUANTILE
from vlmdiff.training.calibration import fit_thresholds, held_out_components, split_holdout
from vlmdiff.training.data import TrainingSet
from vlmdiff.training.diffusion import DiffusionTrainConfig, train_diffusion
from vlmdiff.training.replay import load_replay, save_replay, select_replay

CLASS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,47}$")
MIN_IMAGES = 4


@dataclass
class FinetuneConfig:
    steps: int = 100
    batch_size: int = 8
    learning_rate: float = 1e-4
    replay_fraction: float = 0.5  # share of each batch drawn from earlier classes
    holdout: int = 2  # new images kept out of the memory to calibrate the threshold
    memory_vectors: int = 2000  # coreset size of the class in the normal-feature memory
    replay_per_class: int = 4
    threshold_quantile: float = DEFAULT_QUANTILE
    seed: int = 0


@dataclass
class FinetuneSummary:
    class_name: str
    images_used: int
    steps: int
    seconds: float
    threshold: float
    output_dir: Path
    final_loss: float


def validate_class_name(name: str) -> str:
    name = (name or "").strip()
    if not CLASS_NAME.match(name) or name == AUTO_CLASS:
        raise ValueError(
            f"invalid class name {name!r}: use 1-48 letters, digits, '_' or '-', starting with a letter or digit"
        )
    return name


def _new_images(pipeline: VLMDiffPipeline, images: list[ImageInput], class_name: str) -> TrainingSet:
    if len(images) < MIN_IMAGES:
        raise ValueError(f"fine-tuning needs at least {MIN_IMAGES} normal images; got {len(images)}")
    pil_images = [read_image(image) for image in images]  # raises ImageInputError naming the bad file
    from vlmdiff.captioning import create_captioner

    captions = create_captioner(pipeline.config.captioner).caption(pil_images)
    tensor = (images_to_tensor(pil_images, pipeline.config.resolution) * 255).round().byte()
    return TrainingSet(tensor, captions, [class_name] * len(pil_images), pil_images)


def _mixed(new: TrainingSet, replay: TrainingSet | None, fraction: float) -> TrainingSet:
    """New images plus enough replay copies that about `fraction` of samples are replayed."""
    if replay is None or fraction <= 0:
        return new
    copies = max(1, round(fraction / (1 - fraction) * len(new) / len(replay)))
    mixed = new
    for _ in range(copies):
        mixed = mixed.concat(replay)
    return mixed


def finetune(
    model_dir: str | Path,
    images: list[ImageInput],
    class_name: str,
    output_dir: str | Path | None = None,
    config: FinetuneConfig | None = None,
    progress: Callable[[float, str], None] | None = None,
    overwrite: bool = False,
) -> FinetuneSummary:
    """Fine-tune `model_dir` on normal images of `class_name`; writes `output_dir` (default: replace model_dir).

    The new model keeps the source's weight dtype, extra files and training record (plus this run).
    `output_dir` must neither hold the source nor lie inside it; a model already there is replaced
    only with `overwrite`, any other non-empty folder never (check_output_folder).
    """
    config = config or FinetuneConfig()
    report = progress or (lambda fraction, message: None)
    started = time.time()
    class_name = validate_class_name(class_name)
    source = resolve_model_folder(model_dir)
    output_dir = check_output_folder(model_dir, source, output_dir, overwrite)
    record = _training_record(source)
    report(0.0, "loading model")
    pipeline = VLMDiffPipeline.from_pretrained(source)
    report(0.05, "captioning images")
    new = _new_images(pipeline, images, class_name)
    replay = load_replay(source)
    if replay is not None:  # a class being re-tuned is replaced by its new images
        keep = [i for i, name in enumerate(replay.class_names) if name != class_name]
        replay = replay.subset(keep) if keep else None
    memory_indices, held = split_holdout(new, config.holdout)
    with staging_folder(output_dir) as scratch:
        report(0.1, "training")
        training = DiffusionTrainConfig(
            max_steps=config.steps, batch_size=config.batch_size, learning_rate=config.learning_rate,
            checkpoint_every=config.steps + 1, seed=config.seed,
        )
        stats = train_diffusion(pipeline, _mixed(new, replay, config.replay_fraction), scratch / "run", training)
        report(0.8, "updating memory and threshold")
        _update_memory_and_threshold(pipeline, new, memory_indices, held, class_name, config)
        staged = scratch / "model"
        dtype = weights_dtype(source)
        pipeline.save_pretrained(staged, dtype=None if dtype == torch.float32 else dtype)
        copy_extra_files(source, staged)
        save_replay(select_replay(new, config.replay_per_class, config.seed) if replay is None
                    else replay.concat(select_replay(new, config.replay_per_class, config.seed)), staged)
        summary = FinetuneSummary(
            class_name, len(new), stats["steps"], time.time() - started,
            pipeline.thresholds.get(class_name).value, output_dir, stats["final_loss"],
        )
        record.setdefault("finetunes", []).append(_finetune_entry(summary, config))
        (staged / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        replace_atomically(staged, output_dir)
    report(1.0, "done")
    return summary


def _training_record(model_dir: Path) -> dict:
    """The model's training record (empty if it has none); ValueError naming the file if it is not a JSON object."""
    path = model_dir / TRAINING_FILE
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"the training record {path} is not valid JSON") from error
    if not isinstance(record, dict):
        raise ValueError(f"the training record {path} is not a JSON object")
    return record


def _finetune_entry(summary: FinetuneSummary, config: FinetuneConfig) -> dict:
    """What the training record keeps of one fine-tune."""
    entry = {**asdict(summary), "config": asdict(config)}
    del entry["output_dir"]
    return entry


@torch.no_grad()
def _update_memory_and_threshold(pipeline, new: TrainingSet, memory_indices, held, class_name, config) -> None:
    if pipeline.memory is not None:
        pipeline.memory = pipeline.memory.with_class(
            [new.original(i) for i in memory_indices], class_name, config.memory_vectors, config.seed
        )
    fit_thresholds(pipeline, held_out_components(pipeline, new, held, config.seed), config.threshold_quantile)
    pipeline.config.classes = tuple(sorted(set(pipeline.config.classes) | {class_name}))
