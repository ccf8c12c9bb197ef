"""Batch jobs over many images: `evaluate` (metrics, plots, qualitative grid) and `predict` (overlays, CSV).

Both run a `VLMDiffPipeline` chunk by chunk with a tqdm progress bar. `evaluate`
works class by class, so only one class's full-resolution anomaly maps are held in
memory at a time; pixel metrics use the maps at the ground-truth masks' resolution.
"""
from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from vlmdiff.data.records import ImageRecord
from vlmdiff.data.validation import list_images
from vlmdiff.images import load_image
from vlmdiff.metrics import DEFAULT_FPR_LIMIT, ClassMetrics, evaluate_class, mean_over_classes, to_markdown_table
from vlmdiff.pipeline import AUTO_CLASS, DetectionResult, VLMDiffPipeline
from vlmdiff.reconstruction_quality import ReconstructionJudge, ReconstructionQuality, summarize
from vlmdiff.visualize import (
    GridRow, mask_image, overlay_heatmap, plot_pro, plot_roc, plot_score_histogram, save_qualitative_grid,
    threshold_range,
)

TEST_SPLIT = "test"
PREDICTIONS_CSV = "predictions.csv"
PREDICTION_COLUMNS = ("image", "class", "score", "threshold", "verdict")
NO_VERDICT = "n/a"
VERDICTS = {True: "anomalous", False: "normal"}


# --------------------------------------------------------------------------- inputs


def select_test_records(
    records: Iterable[ImageRecord], classes: Sequence[str] | None = None, max_images: int | None = None
) -> list[ImageRecord]:
    """Test-split records of the chosen classes; at most max_images per class, evenly spread over the class.

    The records of a class are usually sorted by defect type, so an even spread
    keeps both normal and anomalous images in a small subset.
    """
    test = [record for record in records if record.split == TEST_SPLIT]
    if not test:
        raise ValueError("the dataset has no test images (records of split 'test')")
    available = sorted({record.class_name for record in test})
    if classes is not None:
        missing = [name for name in classes if name not in available]
        if missing:
            raise ValueError(
                f"no test images of class {missing[0]!r}; classes with test images: {', '.join(available)}"
            )
        test = [record for record in test if record.class_name in set(classes)]
    if max_images is None:
        return test
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1; got {max_images}")
    selected = []
    for name in dict.fromkeys(record.class_name for record in test):
        class_records = [record for record in test if record.class_name == name]
        count = min(max_images, len(class_records))
        keep = np.unique(np.linspace(0, len(class_records) - 1, count).round().astype(int))
        selected += [class_records[i] for i in keep]
    return selected


def collect_images(paths: Iterable[str | Path]) -> list[Path]:
    """Image files from paths that are files or folders (a folder's images, sorted, not recursive)."""
    images: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = list_images(path)
            if not found:
                raise ValueError(f"no image files in folder {path}")
            images += found
        elif path.is_file():
            images.append(path)
        else:
            raise FileNotFoundError(f"image not found: {path}")
    if not images:
        raise ValueError("no images given")
    return images


def load_mask(path: Path | None, shape: tuple[int, int]) -> np.ndarray:
    """A boolean (H, W) mask; all False for None. Masks of {0, 1} and {0, 255} (or anti-aliased) both work."""
    if path is None:
        return np.zeros(shape, dtype=bool)
    with Image.open(path) as image:
        values = np.asarray(image.convert("L"))
    return values > (0 if values.max() <= 1 else 127)


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# --------------------------------------------------------------------------- evaluate


@dataclass
class _Example:
    """An image kept for the qualitative grid until its class's map range is known."""

    record: ImageRecord
    result: DetectionResult
    mask: np.ndarray | None


@dataclass
class _ClassRun:
    """What evaluate gathers for one class."""

    scores: list[float] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)  # pixel-metric images only, at mask resolution
    masks: list[np.ndarray] = field(default_factory=list)
    map_range: tuple[float, float] = (math.inf, -math.inf)
    examples: list[_Example] = field(default_factory=list)
    qualities: list[ReconstructionQuality] = field(default_factory=list)  # with reconstruction metrics


def _grid_picks(records: Sequence[ImageRecord], count: int) -> set[Path]:
    """Up to `count` images of a class for the grid: one per defect type first, then one normal image."""
    first_per_defect: dict[str, ImageRecord] = {}
    for record in records:
        if record.is_anomalous:
            first_per_defect.setdefault(record.defect_type, record)
    normal = [r for r in records if not r.is_anomalous]
    picks = list(first_per_defect.values())[: max(count - 1, 0)] + normal[:1]
    picks += [r for r in records if r not in picks][: count - len(picks)]
    return {r.image_path for r in picks[:count]}


def _run_class(
    pipeline: VLMDiffPipeline, records: Sequence[ImageRecord], options: dict, grid_examples: int, bar: tqdm,
    judge: ReconstructionJudge | None,
) -> _ClassRun:
    run = _ClassRun()
    has_masks = any(record.mask_path is not None for record in records)
    picks = _grid_picks(records, grid_examples)
    for chunk in _chunks(records, options["batch_size"]):
        # the diffusion runs only if the score or the judge needs it; the grid's few images get theirs apart
        results = pipeline([str(r.image_path) for r in chunk], class_names=[r.class_name for r in chunk],
                           return_reconstruction=judge is not None, **options)
        for record, result in zip(chunk, results):
            if record.image_path in picks and result.reconstruction is None:
                result = pipeline([str(record.image_path)], class_names=[record.class_name], **options)[0]
            if judge is not None:
                clean = load_image(record.clean_path) if record.clean_path else None
                mask = load_mask(record.mask_path, result.anomaly_map.shape)
                run.qualities.append(judge.measure(load_image(record.image_path), result.reconstruction, clean, mask))
            run.scores.append(result.score)
            run.labels.append(record.label)
            lo, hi = run.map_range
            run.map_range = (min(lo, float(result.anomaly_map.min())), max(hi, float(result.anomaly_map.max())))
            mask = None
            if has_masks and (record.mask_path is not None or not record.is_anomalous):
                mask = load_mask(record.mask_path, result.anomaly_map.shape)
                run.maps.append(_at_shape(result.anomaly_map, mask.shape))
                run.masks.append(mask)
            if record.image_path in picks:
                run.examples.append(_Example(record, result, mask))
        bar.update(len(chunk))
    return run


def _at_shape(anomaly_map: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The map resized (bilinear) to (H, W) = shape when it differs (masks define the resolution)."""
    if anomaly_map.shape == tuple(shape):
        return anomaly_map
    return np.asarray(Image.fromarray(anomaly_map).resize(shape[::-1], Image.Resampling.BILINEAR))


def _stack_pixels(maps: list[np.ndarray], masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(N, H, W) maps and masks; images of other sizes than the most common are resized to it."""
    common = Counter(mask.shape for mask in masks).most_common(1)[0][0]
    size = common[::-1]  # PIL sizes are (W, H)
    resized_masks = [
        mask if mask.shape == common else np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
        for mask in masks
    ]
    return np.stack([_at_shape(m, common) for m in maps]), np.stack(resized_masks)


def _file_stem(class_name: str) -> str:
    """A class name usable in a file name (path separators and odd characters become '_')."""
    return re.sub(r"[^\w.-]", "_", class_name)


def _plot_class(
    plots: Path, class_name: str, run: _ClassRun, maps, masks, metrics: ClassMetrics, threshold, fpr_limit: float
) -> None:
    """plots/<class>_roc.png, _pro.png (only with masks) and _hist.png (with the threshold line, if any)."""
    stem = _file_stem(class_name)
    plot_roc(plots / f"{stem}_roc.png", run.scores, run.labels, maps, masks, title=f"{class_name}: ROC")
    if maps is not None:
        plot_pro(plots / f"{stem}_pro.png", maps, masks, fpr_limit, metrics.aupro, title=f"{class_name}: PRO")
    plot_score_histogram(
        plots / f"{stem}_hist.png", run.scores, run.labels, threshold, title=f"{class_name}: image scores"
    )


def _grid_rows(class_name: str, run: _ClassRun, alpha: float) -> list[GridRow]:
    rows = []
    for example in run.examples:
        image = load_image(example.record.image_path)
        label = f"{class_name} / {example.record.defect_type}\nscore {example.result.score:.4g}"
        rows.append(GridRow(
            label=label,
            image=image,
            reconstruction=example.result.reconstruction,
            overlay=overlay_heatmap(image, example.result.anomaly_map, alpha, run.map_range),
            ground_truth=mask_image(example.mask, image.size),
        ))
    return rows


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value


def _metrics_dict(metrics: ClassMetrics) -> dict[str, float | None]:
    return {name: _json_number(value) for name, value in asdict(metrics).items()}


def evaluate(
    pipeline: VLMDiffPipeline,
    records: Sequence[ImageRecord],
    out_dir: str | Path,
    strength: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
    grid_examples: int = 3,
    alpha: float = 0.5,
    progress: bool = True,
    reconstruction_metrics: bool = False,
) -> dict[str, ClassMetrics]:
    """Run the pipeline over the test records and write the evaluation report to out_dir.

    With `reconstruction_metrics` every image is reconstructed and metrics.json gets, per class,
    the reconstruction quality (vlmdiff.reconstruction_quality); otherwise the diffusion runs only
    if the score needs it (and for the qualitative grid).

    Writes metrics.json (seven metrics per class, their mean, image counts and
    settings; NaN as null), metrics.md (Markdown table), scores.csv (one row per
    image), plots/<class>_roc.png, _pro.png, _hist.png and qualitative.png (input |
    reconstruction | overlay | ground truth, `grid_examples` images per class).
    Records of other splits than 'test' are ignored. Returns the metrics per class.
    """
    test = [record for record in records if record.split == TEST_SPLIT]
    if not test:
        raise ValueError("no test images to evaluate (records of split 'test')")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    options = dict(
        strength=pipeline.config.strength if strength is None else strength,
        num_inference_steps=pipeline.config.num_inference_steps if steps is None else steps,
        seed=seed,
        batch_size=batch_size,
    )
    by_class: dict[str, list[ImageRecord]] = {}
    for record in test:
        by_class.setdefault(record.class_name, []).append(record)

    judge = ReconstructionJudge() if reconstruction_metrics else None
    reconstruction: dict[str, dict[str, float]] = {}
    per_class: dict[str, ClassMetrics] = {}
    counts: dict[str, dict[str, int]] = {}
    score_rows: list[tuple] = []
    grid: list[GridRow] = []
    with tqdm(total=len(test), desc="evaluate", unit="image", disable=not progress) as bar:
        for class_name in sorted(by_class):
            class_records = by_class[class_name]
            bar.set_postfix_str(class_name)
            run = _run_class(pipeline, class_records, options, grid_examples, bar, judge)
            if judge is not None:
                reconstruction[class_name] = summarize(run.qualities, run.labels)
            maps, masks = _stack_pixels(run.maps, run.masks) if run.maps else (None, None)
            run.maps.clear()  # the stacked copies are all that is kept
            run.masks.clear()
            metrics = per_class[class_name] = evaluate_class(run.scores, run.labels, maps, masks, fpr_limit)
            has_threshold = class_name in pipeline.thresholds.classes
            threshold = pipeline.thresholds.get(class_name).value if has_threshold else None
            _plot_class(out_dir / "plots", class_name, run, maps, masks, metrics, threshold, fpr_limit)
            del maps, masks
            grid += _grid_rows(class_name, run, alpha)
            labels = np.asarray(run.labels)
            counts[class_name] = {
                "normal": int((labels == 0).sum()),
                "anomalous": int((labels == 1).sum()),
                "with_mask": sum(r.mask_path is not None for r in class_records),
            }
            score_rows += [
                (str(r.image_path), class_name, r.defect_type, r.label, score)
                for r, score in zip(class_records, run.scores)
            ]

    _write_report(out_dir, per_class, counts, score_rows, {**options, "fpr_limit": fpr_limit}, reconstruction)
    save_qualitative_grid(grid, out_dir / "qualitative.png")
    return per_class


def _write_report(
    out_dir: Path, per_class: dict[str, ClassMetrics], counts: dict, score_rows: list, settings: dict,
    reconstruction: dict[str, dict[str, float]],
) -> None:
    document = {
        "classes": {name: _metrics_dict(metrics) for name, metrics in per_class.items()},
        "mean": _metrics_dict(mean_over_classes(per_class)),
        "images": counts,
        "settings": settings,
    }
    if reconstruction:
        document["reconstruction"] = {name: {k: _json_number(v) for k, v in values.items()}
                                      for name, values in reconstruction.items()}
    (out_dir / "metrics.json").write_text(json.dumps(document, indent=2) + "\n")
    (out_dir / "metrics.md").write_text(to_markdown_table(per_class))
    with open(out_dir / "scores.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(("image", "class", "defect_type", "label", "score"))
        writer.writerows(score_rows)


# --------------------------------------------------------------------------- predict


@dataclass(frozen=True)
class Prediction:
    """One row of predictions.csv and where its pictures were written."""

    image: Path
    class_name: str
    score: float
    threshold: float | None
    verdict: str  # "anomalous", "normal", or "n/a" when the class has no threshold
    overlay_path: Path
    reconstruction_path: Path | None  # None when the reconstruction was not asked for


def _output_names(paths: Sequence[Path]) -> list[str]:
    """File stems made unique (a.png and other/a.jpg -> 'a', 'a_2')."""
    seen: Counter[str] = Counter()
    names = []
    for path in paths:
        seen[path.stem] += 1
        names.append(path.stem if seen[path.stem] == 1 else f"{path.stem}_{seen[path.stem]}")
    return names


def predict(
    pipeline: VLMDiffPipeline,
    image_paths: Sequence[str | Path],
    out_dir: str | Path,
    class_name: str | None = None,
    strength: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    alpha: float = 0.5,
    progress: bool = True,
    reconstructions: bool = True,
) -> list[Prediction]:
    """Run the pipeline on image files; write <name>_overlay.png, <name>_reconstruction.png and predictions.csv.

    Without `reconstructions` no reconstruction is written and the diffusion runs only if the score needs it.

    class_name None lets the pipeline guess the class (its normal-feature memory,
    else 'unknown'). The verdict needs a threshold for the class, else it is 'n/a'.
    """
    paths = [Path(path) for path in image_paths]
    if not paths:
        raise ValueError("no images given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = dict(strength=strength, num_inference_steps=steps, seed=seed, batch_size=batch_size)
    predictions = []
    names = _output_names(paths)
    with tqdm(total=len(paths), desc="predict", unit="image", disable=not progress) as bar:
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            results = pipeline([str(p) for p in chunk], class_names=class_name or AUTO_CLASS,
                               return_reconstruction=reconstructions, **options)
            for path, name, result in zip(chunk, names[start : start + batch_size], results):
                image = load_image(path)
                overlay = overlay_heatmap(image, result.anomaly_map, alpha, threshold_range(result.threshold))
                overlay.save(out_dir / f"{name}_overlay.png")
                reconstruction_path = out_dir / f"{name}_reconstruction.png" if reconstructions else None
                if reconstruction_path:
                    result.reconstruction.save(reconstruction_path)
                verdict = NO_VERDICT if result.is_anomalous is None else VERDICTS[result.is_anomalous]
                predictions.append(Prediction(
                    path, result.class_name, result.score, result.threshold, verdict,
                    out_dir / f"{name}_overlay.png", reconstruction_path,
                ))
            bar.update(len(chunk))
    with open(out_dir / PREDICTIONS_CSV, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(PREDICTION_COLUMNS)
        for p in predictions:
            threshold = "" if p.threshold is None else repr(p.threshold)
            writer.writerow((str(p.image), p.class_name, repr(p.score), threshold, p.verdict))
    return predictions
