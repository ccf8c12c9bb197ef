"""Several anomaly-map settings scored from ONE diffusion pass per image.

The reconstruction map (published VLMDiff setting), the normal-feature memory map and
their fusion differ only in the weights given to two component maps, so a comparison of
them needs the expensive denoising once. Used by the quality benchmark and the model card.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from vlmdiff.captioning import create_captioner
from vlmdiff.config import DEFAULT_BATCH_SIZE
from vlmdiff.data import ImageRecord
from vlmdiff.evaluation import load_mask
from vlmdiff.images import load_image
from vlmdiff.metrics import ClassMetrics, evaluate_class
from vlmdiff.pipeline import DetectionSettings, VLMDiffPipeline
from vlmdiff.reconstruction_quality import ReconstructionJudge, summarize
from vlmdiff.scoring import MEMORY, RECONSTRUCTION, AnomalyScorer, computable_maps

Weights = dict[str, float]  # component map name -> weight
MAP_VARIANTS: dict[str, Weights] = {
    "fused": {RECONSTRUCTION: 1.0, MEMORY: 1.0},
    "reconstruction": {RECONSTRUCTION: 1.0, MEMORY: 0.0},
    "memory": {RECONSTRUCTION: 0.0, MEMORY: 1.0},
}


@dataclass
class VariantReport:
    """Metrics per variant and class, the share of test images whose 'auto' class was right, and time."""

    metrics: dict[str, dict[str, ClassMetrics]] = field(default_factory=dict)
    reconstruction: dict[str, dict[str, float]] = field(default_factory=dict)  # per class: reconstruction_quality.summarize
    auto_class_accuracy: float = float("nan")
    seconds_per_image: float = float("nan")


@torch.inference_mode()
def evaluate_map_variants(
    pipeline: VLMDiffPipeline,
    records: Sequence[ImageRecord],
    variants: dict[str, Weights] = MAP_VARIANTS,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    caption_images: bool = False,
) -> VariantReport:
    """The seven metrics per class for every map variant of the test records, and the quality of the
    reconstructions (fidelity on normal images, defect removal where a clean source is known).

    `caption_images`: condition each reconstruction on the model's captioner's description of the
    test image instead of the empty caption (the published industrial setting).
    """
    test = [r for r in records if r.split == "test"]
    if not test:
        raise ValueError("no test images to evaluate (records of split 'test')")
    scorers = {name: AnomalyScorer(pipeline.config.anomaly, weights) for name, weights in variants.items()}
    computed = computable_maps(pipeline)  # each once, for every variant
    missing = {name for scorer in scorers.values() for name in scorer.active} - set(computed)
    if missing:
        raise ValueError(f"the model cannot compute the {sorted(missing)} maps")
    settings = DetectionSettings(seed=seed).resolved(pipeline.config)
    judge = ReconstructionJudge()
    captioner = create_captioner(pipeline.config.captioner) if caption_images else None
    report = VariantReport(metrics={name: {} for name in variants})
    correct, seconds = 0, 0.0
    by_class: dict[str, list[ImageRecord]] = {}
    for record in test:
        by_class.setdefault(record.class_name, []).append(record)
    with tqdm(total=len(test), desc="evaluate variants", unit="image", disable=not progress) as bar:
        for class_name in sorted(by_class):
            rows = {name: ([], [], []) for name in variants}  # scores, maps, masks
            labels, qualities = [], []
            for start in range(0, len(by_class[class_name]), batch_size):
                chunk = by_class[class_name][start : start + batch_size]
                images = [load_image(r.image_path) for r in chunk]
                started = time.perf_counter()
                captions = captioner.caption(images) if captioner else None
                batch = pipeline.prepare_batch(images, [r.class_name for r in chunk], replace(settings, captions=captions))
                components = pipeline.component_maps(batch, computed)
                seconds += time.perf_counter() - started
                if batch.memory_features is not None:
                    guessed, _ = pipeline.resolve_classes([None] * len(chunk), batch.memory_features)
                    correct += sum(name == r.class_name for name, r in zip(guessed, chunk))
                for record, image, parts, reconstruction in zip(chunk, images, components,
                                                                  pipeline.shown_reconstructions(batch)):
                    labels.append(record.label)
                    mask = load_mask(record.mask_path, image.size[::-1])
                    clean = load_image(record.clean_path) if record.clean_path else None
                    qualities.append(judge.measure(image, reconstruction, clean, mask))
                    for name, scorer in scorers.items():
                        fused, score = scorer.fuse(parts, pipeline.working_size(*image.size))
                        rows[name][0].append(score)
                        rows[name][1].append(pipeline.result(image, None, fused, score, record.class_name).anomaly_map)
                        rows[name][2].append(mask)
                bar.update(len(chunk))
            report.reconstruction[class_name] = summarize(qualities, labels)
            has_masks = any(r.mask_path is not None for r in by_class[class_name])
            for name, (scores, maps, masks) in rows.items():
                report.metrics[name][class_name] = evaluate_class(
                    scores, labels, np.stack(maps) if has_masks else None, np.stack(masks) if has_masks else None
                )
    report.auto_class_accuracy = correct / len(test) if pipeline.memory is not None else float("nan")
    report.seconds_per_image = seconds / len(test)
    return report
