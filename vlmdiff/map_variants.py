"""Several anomaly-map settings scored from ONE diffusion pass per image.

The reconstruction map (published VLMDiff setting), the normal-feature memory map and
their fusion differ only in the weights given to two component maps, so a comparison of
them needs the expensive denoising once. Used by the quality benchmark and the model card.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vlmdiff.data import ImageRecord
from vlmdiff.evaluation import load_mask
from vlmdiff.images import load_image
from vlmdiff.metrics import ClassMetrics, evaluate_class
from vlmdiff.pipeline import VLMDiffPipeline

# name -> (reconstruction_weight, memory_weight)
MAP_VARIANTS = {"fused": (1.0, 1.0), "reconstruction": (1.0, 0.0), "memory": (0.0, 1.0)}


@dataclass
class VariantReport:
    """Metrics per variant and class, the share of test images whose 'auto' class was right, and time."""

    metrics: dict[str, dict[str, ClassMetrics]] = field(default_factory=dict)
    auto_class_accuracy: float = float("nan")
    seconds_per_image: float = float("nan")


def _fused_at(pipeline: VLMDiffPipeline, parts: dict, image_size: tuple[int, int], weights) -> tuple[np.ndarray, float]:
    """The fused map at the image's own (H, W) and the score, under the variant's weights."""
    fused, score = pipeline.fuse(
        parts, pipeline.working_size(*image_size), {"reconstruction": weights[0], "memory": weights[1]}
    )
    width, height = image_size
    full = F.interpolate(fused[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    return full.numpy().astype(np.float32), score


@torch.inference_mode()
def evaluate_map_variants(
    pipeline: VLMDiffPipeline,
    records: Sequence[ImageRecord],
    variants: dict[str, tuple[float, float]] = MAP_VARIANTS,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> VariantReport:
    """The seven metrics per class for every map variant of the test records."""
    test = [r for r in records if r.split == "test"]
    if not test:
        raise ValueError("no test images to evaluate (records of split 'test')")
    if "memory" in {n for n, w in variants.items() if w[1] > 0} and pipeline.memory is None:
        raise ValueError("the model has no normal-feature memory")
    computed = ("reconstruction", "memory") if pipeline.memory is not None else ("reconstruction",)  # once each
    report = VariantReport(metrics={name: {} for name in variants})
    correct, seconds = 0, 0.0
    by_class: dict[str, list[ImageRecord]] = {}
    for record in test:
        by_class.setdefault(record.class_name, []).append(record)
    with tqdm(total=len(test), desc="evaluate variants", unit="image", disable=not progress) as bar:
        for class_name in sorted(by_class):
            rows = {name: ([], [], []) for name in variants}  # scores, maps, masks
            labels = []
            for start in range(0, len(by_class[class_name]), batch_size):
                chunk = by_class[class_name][start : start + batch_size]
                images = [load_image(r.image_path) for r in chunk]
                started = time.perf_counter()
                components, _, _ = pipeline.component_maps(
                    images, pipeline.config.strength, pipeline.config.num_inference_steps, seed,
                    class_names=[r.class_name for r in chunk], maps=computed,
                )
                seconds += time.perf_counter() - started
                if pipeline.memory is not None:
                    correct += sum(
                        pipeline.memory.nearest_class(pipeline.memory.embed(img)) == r.class_name
                        for img, r in zip(images, chunk)
                    )
                for record, image, parts in zip(chunk, images, components):
                    labels.append(record.label)
                    mask = load_mask(record.mask_path, image.size[::-1])
                    for name, weights in variants.items():
                        full, score = _fused_at(pipeline, parts, image.size, weights)
                        rows[name][0].append(score)
                        rows[name][1].append(full)
                        rows[name][2].append(mask)
                bar.update(len(chunk))
            has_masks = any(r.mask_path is not None for r in by_class[class_name])
            for name, (scores, maps, masks) in rows.items():
                report.metrics[name][class_name] = evaluate_class(
                    scores, labels, np.stack(maps) if has_masks else None, np.stack(masks) if has_masks else None
                )
    report.auto_class_accuracy = correct / len(test) if pipeline.memory is not None else float("nan")
    report.seconds_per_image = seconds / len(test)
    return report
