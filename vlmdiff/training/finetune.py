"""Fine-tuning a trained model on new normal images of one class (new or known), in two phases.

1. The quick phase (`steps=0`, seconds): the class's images become its normal-feature memory and
   its threshold is calibrated on them out of fold; the class is usable at once, with the
   model's generic reconstruction.
2. The diffusion phase (`steps>0`): the images are captioned and diffusion training continues on
   them mixed with the model's replay set, so the class gets its own reconstructions; the memory
   and threshold are set as in phase 1, then the class's reconstruction weight is chosen from
   synthetic anomalies of its images (`vlmdiff.training.fusion`; the threshold refitted when it is
   above 0).
Either way the new model is staged in a scratch folder and swapped in only when complete
(`replace_model`): on any failure or kill the previous model is left as it was, and the target's
files that are not part of the model are kept.
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from vlmdiff.config import DEFAULT_BATCH_SIZE
from vlmdiff.data.validation import read_image
from vlmdiff.images import ImageInput, image_size, images_to_tensor
from vlmdiff.model_folder import (
    check_output_folder, read_training_record, replace_model, resolve_model_folder, save_derived_model,
    staging_folder,
)
from vlmdiff.pipeline import AUTO_CLASS, VLMDiffPipeline
from vlmdiff.progress import Phase, Progress, no_progress, within
from vlmdiff.thresholds import DEFAULT_QUANTILE
from vlmdiff.training.calibration import fit_thresholds, memorise_and_score_out_of_fold
from vlmdiff.training.data import TrainingSet
from vlmdiff.training.diffusion import DiffusionTrainConfig, train_diffusion
from vlmdiff.training.fusion import choose_fusion
from vlmdiff.training.replay import load_replay, save_replay, select_replay

CLASS_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,47}$")
MIN_IMAGES = 4


@dataclass
class FinetuneConfig:
    steps: int = 100  # diffusion training steps; 0: the quick phase only (memory + threshold)
    batch_size: int = DEFAULT_BATCH_SIZE
    learning_rate: float = 1e-4
    replay_fraction: float = 0.5  # share of each batch drawn from earlier classes
    folds: int = 5  # the new images are scored out of fold to calibrate the threshold
    memory_vectors: int = 0  # coreset size of the class in the memory; 0: the memory's coreset ratio
    replay_per_class: int = 4
    threshold_quantile: float = DEFAULT_QUANTILE
    seed: int = 0
    fusion: bool = True  # after the diffusion phase, choose the class's reconstruction weight (training/fusion.py)


@dataclass
class FinetuneSummary:
    class_name: str
    images_used: int
    steps: int
    seconds: float
    threshold: float
    expected_fpr: float
    output_dir: Path
    final_loss: float | None  # None when the diffusion was not trained
    reconstruction_weight: float = 0.0  # of the class's reconstruction map in its score (0: the memory alone)


def validate_class_name(name: str) -> str:
    name = (name or "").strip()
    if not CLASS_NAME.match(name) or name == AUTO_CLASS:
        raise ValueError(
            f"invalid class name {name!r}: use 1-48 letters, digits, '_' or '-', starting with a letter or digit"
        )
    return name


def _new_images(
    pipeline: VLMDiffPipeline, images: list[ImageInput], class_name: str, caption: bool, progress: Progress,
    batch_size: int,
) -> TrainingSet:
    """The images as a training set; decoded and captioned only when the diffusion will train on them. For the
    quick phase image files are only checked from their headers here; the memory decodes each once when it
    embeds it (`calibration.working_image`), naming a file that turns out damaged."""
    if len(images) < MIN_IMAGES:
        raise ValueError(f"fine-tuning needs at least {MIN_IMAGES} normal images; got {len(images)}")
    if not caption:
        for image in images:
            if isinstance(image, (str, Path)):
                image_size(image)  # raises ImageInputError naming a missing or unreadable file
        return TrainingSet.of_sources(list(images), class_name)
    from vlmdiff.captioning import create_captioner

    captioner = create_captioner(pipeline.config.captioner)
    phase = Phase(progress, "reading and captioning")
    tensor = torch.empty(len(images), 3, pipeline.config.resolution, pipeline.config.resolution, dtype=torch.uint8)
    pil_images, captions = [], []
    for start in range(0, len(images), batch_size):
        batch = [read_image(image) for image in images[start : start + batch_size]]  # names a bad file
        captions += captioner.caption(batch)
        tensor[start : start + len(batch)] = (images_to_tensor(batch, pipeline.config.resolution) * 255).round().byte()
        pil_images += batch
        phase(len(pil_images), len(images), "images")
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
    progress: Progress | None = None,
    overwrite: bool = False,
) -> FinetuneSummary:
    """Fine-tune `model_dir` on normal images of `class_name`; writes `output_dir` (None: model_dir in place).

    The new model keeps the source's weight dtype, extra files and training record (plus this run).
    Where it may go is `check_output_folder`'s rule: `output_dir` neither holds the source nor lies
    inside it; a model already there (the source named as output_dir too) is replaced only with
    `overwrite`, keeping the folder's other files; any other non-empty folder never; a read-only
    folder (the shipped model) only when named with `overwrite`.
    """
    config = config or FinetuneConfig()
    report = progress or no_progress
    started = time.time()
    class_name = validate_class_name(class_name)
    source = resolve_model_folder(model_dir)
    output_dir = check_output_folder(model_dir, source, output_dir, overwrite)
    record = read_training_record(source)
    report(0.0, "loading the model")
    pipeline = VLMDiffPipeline.from_pretrained(source)
    new = _new_images(pipeline, images, class_name, config.steps > 0, within(report, 0.02, 0.1), config.batch_size)
    replay = load_replay(source)
    if replay is not None:  # a class being re-tuned is replaced by its new images
        keep = [i for i, name in enumerate(replay.class_names) if name != class_name]
        replay = replay.subset(keep) if keep else None
    with staging_folder(output_dir) as scratch:
        stats = {"steps": 0, "final_loss": None}
        if config.steps:
            training = DiffusionTrainConfig(
                max_steps=config.steps, batch_size=config.batch_size, learning_rate=config.learning_rate,
                checkpoint_every=config.steps + 1, seed=config.seed,
            )
            phase = Phase(within(report, 0.1, 0.8), "training the diffusion")
            stats = train_diffusion(pipeline, _mixed(new, replay, config.replay_fraction), scratch / "run", training,
                                    lambda step, total: phase(step, total, "steps"))
        fusion = bool(config.steps and config.fusion and pipeline.memory is not None)  # a memory to fuse with
        add_class(pipeline, new, class_name, config, within(report, 0.8 if config.steps else 0.02, 0.85 if fusion else 0.97))
        weight = 0.0
        if fusion:  # the class has its own reconstruction now: is it worth adding to the memory's map?
            weight = choose_fusion(pipeline, new, class_name, config.folds, config.seed, config.threshold_quantile,
                                   within(report, 0.85, 0.97)).weight
        summary = FinetuneSummary(
            class_name, len(new), stats["steps"], time.time() - started,
            pipeline.thresholds.get(class_name).value, pipeline.thresholds.get(class_name).expected_fpr,
            output_dir, stats["final_loss"], weight,
        )
        record.setdefault("finetunes", []).append(_finetune_entry(summary, config))
        report(0.97, "saving the model")
        staged = scratch / "model"
        save_derived_model(pipeline, source, staged, record)
        if config.steps:  # the replay set holds captioned images the diffusion was trained on
            new_replay = select_replay(new, config.replay_per_class, config.seed)
            save_replay(new_replay if replay is None else replay.concat(new_replay), staged)
        replace_model(staged, output_dir)
    report(1.0, "done")
    return summary


def _finetune_entry(summary: FinetuneSummary, config: FinetuneConfig) -> dict:
    """What the training record keeps of one fine-tune."""
    entry = {**asdict(summary), "config": asdict(config)}
    del entry["output_dir"]
    return entry


@torch.no_grad()
def add_class(
    pipeline: VLMDiffPipeline, new: TrainingSet, class_name: str, config: FinetuneConfig,
    progress: Progress | None = None,
) -> None:
    """The quick phase: the class's memory from all its images, its threshold from their out-of-fold scores
    (each image read and embedded once; time linear in the images, memory bounded)."""
    rows = memorise_and_score_out_of_fold(pipeline, new, {class_name}, config.folds, config.seed,
                                          vectors=config.memory_vectors, progress=progress)
    fit_thresholds(pipeline, rows, config.threshold_quantile)
    pipeline.config.classes = tuple(sorted(set(pipeline.config.classes) | {class_name}))
    if class_name in pipeline.config.anomaly.class_weights:  # chosen for its former memory and threshold
        class_weights = {name: w for name, w in pipeline.config.anomaly.class_weights.items() if name != class_name}
        pipeline.config.anomaly = replace(pipeline.config.anomaly, class_weights=class_weights)
