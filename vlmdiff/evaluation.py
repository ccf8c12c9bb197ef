"""Batch jobs over many images: `evaluate` (metrics, plots, qualitative grid) and `predict` (overlays, CSV).

Both run a `VLMDiffPipeline` chunk by chunk with a tqdm progress bar, on images decoded at the
working size (long side at most `WORK_SIDE`, as in the app), so memory stays bounded whatever
the files' pixel counts. `evaluate` works class by class, so only one class's anomaly maps are
held at a time; pixel metrics use the maps and masks at the working size. `predict` writes its
pictures at each image's original size, blended band by band. Both write each image's score as
soon as it is known, and skip files that cannot be read or masks of the wrong size (with a
warning that lists them) unless `strict`, so one bad file does not cost the run.

Under `accelerate launch` each process takes a contiguous part of the images and the main
process merges the parts, so the files written are those of one process (`_Processes`).
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import pickle
import re
import shutil
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from vlmdiff.config import DEFAULT_BATCH_SIZE
from vlmdiff.data.records import ImageRecord
from vlmdiff.data.validation import UnreadableImage, list_images, read_image
from vlmdiff.images import ImageInputError, image_size
from vlmdiff.metrics import DEFAULT_FPR_LIMIT, ClassMetrics, evaluate_class, mean_over_classes, to_markdown_table
from vlmdiff.model_folder import THRESHOLDS_FILE, resolve_model_folder
from vlmdiff.pipeline import AUTO_CLASS, DetectionResult, VLMDiffPipeline
from vlmdiff.reconstruction_quality import ReconstructionJudge, ReconstructionQuality, summarize
from vlmdiff.visualize import (
    GridRow, mask_image, overlay_heatmap, plot_pro, plot_roc, plot_score_histogram, save_qualitative_grid,
    threshold_range,
)

TEST_SPLIT = "test"
SCORES_CSV = "scores.csv"
SCORE_COLUMNS = ("image", "class", "defect_type", "label", "score")
PREDICTIONS_CSV = "predictions.csv"
PREDICTION_COLUMNS = ("image", "class", "score", "threshold", "verdict", "class_match", "score_from")
NO_VERDICT = "n/a"
UNKNOWN_VERDICT = "unknown class"
VERDICTS = {True: "anomalous", False: "normal"}
SHOWN_SKIPS = 20  # the warning lists at most this many skipped files
BAND_PIXELS = 1 << 21  # an overlay larger than the working size is blended this many pixels at a time
SHARDS = ".shards"  # under the output folder: the processes' parts of an accelerate launch run, until merged
WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")  # as accelerate reads

logger = logging.getLogger(__name__)
Item = TypeVar("Item")
Loaded = TypeVar("Loaded")


# --------------------------------------------------------------------------- inputs


def load_model(model: str | Path) -> VLMDiffPipeline:
    """The model (folder or hub id) a batch job runs; a warning when it has no thresholds file."""
    folder = resolve_model_folder(model)
    if not (folder / THRESHOLDS_FILE).is_file():
        logger.warning(
            "warning: %s has no %s, so no class has a threshold: scores only, every verdict is 'n/a'",
            folder, THRESHOLDS_FILE,
        )
    return VLMDiffPipeline.from_pretrained(folder)


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
    """A boolean (H, W) mask of its image's `shape`; all False for None. Masks of {0, 1} and {0, 255}
    (or anti-aliased) both work. ValueError naming both sizes when the mask's differs (read from its header)."""
    if path is None:
        return np.zeros(shape, dtype=bool)
    width, height = image_size(path)  # ImageInputError naming the file when it is no image
    if (height, width) != tuple(shape):
        raise ValueError(f"mask {path} is {width}x{height} but its image is {shape[1]}x{shape[0]}")
    with Image.open(path) as image:
        values = np.asarray(image.convert("L"))
    return values > (0 if values.max() <= 1 else 127)


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _readable(
    items: Iterable[Item], read: Callable[[Item], Loaded], strict: bool, skipped: list[UnreadableImage]
) -> list[tuple[Item, Loaded]]:
    """(item, read(item)) for the items whose files can be read; the others go to `skipped` (raised if strict)."""
    kept = []
    for item in items:
        try:
            kept.append((item, read(item)))
        except UnreadableImage as error:
            if strict:
                raise
            skipped.append(error)
    return kept


def _warn_skipped(skipped: Sequence[UnreadableImage], total: int) -> None:
    if not skipped:
        return
    shown = "\n".join(f"  {error}" for error in skipped[:SHOWN_SKIPS])
    more = f"\n  ... and {len(skipped) - SHOWN_SKIPS} more" if len(skipped) > SHOWN_SKIPS else ""
    logger.warning("warning: skipped %d of %d images that could not be read:\n%s%s", len(skipped), total, shown, more)


@contextmanager
def _csv_rows(path: Path, columns: Sequence[str]) -> Iterator[Callable[[Sequence], None]]:
    """A function that appends one row to the CSV file at `path` and flushes it (so a crash keeps it)."""
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)

        def write(row: Sequence) -> None:
            writer.writerow(row)
            file.flush()

        yield write


def launched_processes():
    """accelerate's PartialState when a launcher (accelerate launch, torchrun, mpirun) started several
    processes, else None: a plain process leaves accelerate's state untouched. The model runs on the CPU
    in every process, so the processes meet over gloo, which also works where GPUs are."""
    if not any(int(os.environ.get(name, 1)) > 1 for name in WORLD_SIZE_VARIABLES):
        return None
    from accelerate import PartialState

    return PartialState(cpu=True)


class _Processes:
    """The processes of an `accelerate launch` run (`launched_processes`), or the one plain process.

    Each process takes a contiguous run of the batches one process would run, so every image is scored in
    the same batch, with the same seed, as by one process. With several, each leaves its rows and results
    under out_dir/.shards (the folder must be shared by all machines) and the main process merges the
    parts in process order, which is the order one process works in; the folder is removed at the end.
    """

    def __init__(self, out_dir: Path) -> None:
        self.count, self.rank, self.is_main, self.shows_progress = 1, 0, True, True
        self.folder = out_dir / SHARDS
        self.state = launched_processes()
        if self.state is not None:
            self.count, self.rank = self.state.num_processes, self.state.process_index
            self.is_main, self.shows_progress = self.state.is_main_process, self.state.is_local_main_process
        if self.count > 1:
            if self.is_main:
                shutil.rmtree(self.folder, ignore_errors=True)  # parts an interrupted run left behind
                self.folder.mkdir(parents=True)
            self.state.wait_for_everyone()

    def part(self, batches: Sequence[Sequence[Item]]) -> list[Item]:
        """The items of this process's contiguous share of `batches` (process 0 the first; the numbers of
        batches differ by at most one)."""
        share = batches[len(batches) * self.rank // self.count : len(batches) * (self.rank + 1) // self.count]
        return [item for batch in share for item in batch]

    def csv_path(self, path: Path) -> Path:
        """Where this process appends its rows: `path` itself when it is the only process, else its own part."""
        return path if self.count == 1 else self._part_path(path.name, self.rank)

    def save(self, name: str, value: object) -> None:
        with open(self._part_path(f"{name}.pkl", self.rank), "wb") as file:
            pickle.dump(value, file)

    def load(self, name: str) -> list:
        """Every process's saved `name`, in process order (after `gather` or `wait`)."""
        parts = []
        for rank in range(self.count):
            path = self._part_path(f"{name}.pkl", rank)
            if path.is_file():
                with open(path, "rb") as file:
                    parts.append(pickle.load(file))  # written by this run's processes only (folder reset above)
        return parts

    def gather(self, name: str, value: object) -> list:
        """`value` of every process, in process order, on every process."""
        self.save(name, value)
        self.state.wait_for_everyone()
        return self.load(name)

    def merge_csv(self, path: Path) -> None:
        """Main process: the processes' CSV parts, in process order, as the one file `path` (header once)."""
        with open(path, "w", newline="") as merged:
            for rank in range(self.count):
                with open(self._part_path(path.name, rank), newline="") as part:  # rows end in \r\n, kept
                    lines = part.readlines()
                merged.writelines(lines if rank == 0 else lines[1:])

    def close(self) -> None:
        """Wait until every process is done with the parts; the main process then removes them."""
        if self.count > 1:
            self.state.wait_for_everyone()
            if self.is_main:
                shutil.rmtree(self.folder, ignore_errors=True)

    def _part_path(self, name: str, rank: int) -> Path:
        stem, dot, suffix = name.partition(".")
        return self.folder / f"{stem}.{rank}{dot}{suffix}"


def _unreadable_parts(skipped: Sequence[UnreadableImage]) -> list[tuple[Path, str]]:
    """Skipped files as picklable pairs (an exception with two arguments does not unpickle)."""
    return [(error.path, error.reason) for error in skipped]


# --------------------------------------------------------------------------- evaluate


@dataclass
class _Inputs:
    """The files of one test record, read before the model runs (so an unreadable one is skipped)."""

    image: Image.Image
    mask: np.ndarray | None  # boolean (H, W), when the record has a mask
    clean: Image.Image | None  # the defect-free source, when reconstruction quality is measured


@dataclass
class _Example:
    """An image kept for the qualitative grid until its class's map range is known."""

    record: ImageRecord
    image: Image.Image
    result: DetectionResult
    mask: np.ndarray | None


@dataclass
class _ClassRun:
    """What evaluate gathers for one class."""

    scores: list[float] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    with_mask: int = 0
    maps: list[np.ndarray] = field(default_factory=list)  # pixel-metric images only, at mask resolution
    masks: list[np.ndarray] = field(default_factory=list)
    map_range: tuple[float, float] = (math.inf, -math.inf)
    examples: list[_Example] = field(default_factory=list)
    qualities: list[ReconstructionQuality] = field(default_factory=list)  # with reconstruction metrics

    @classmethod
    def merged(cls, runs: Sequence["_ClassRun"]) -> "_ClassRun":
        """One run over a class's images from the runs over consecutive parts of them, in order."""
        merged = cls()
        for run in runs:
            for name in ("scores", "labels", "maps", "masks", "examples", "qualities"):
                getattr(merged, name).extend(getattr(run, name))
            merged.with_mask += run.with_mask
            merged.map_range = (min(merged.map_range[0], run.map_range[0]), max(merged.map_range[1], run.map_range[1]))
        return merged


@dataclass
class _EvaluationJob:
    """What every class of one evaluate run shares."""

    pipeline: VLMDiffPipeline
    options: dict
    judge: ReconstructionJudge | None
    strict: bool
    write_score: Callable[[Sequence], None]
    bar: tqdm
    skipped: list[UnreadableImage] = field(default_factory=list)


def _read_mask(record: ImageRecord, size: tuple[int, int]) -> np.ndarray:
    """The record's mask at the image's working `size` (W, H); UnreadableImage when the mask cannot be read
    or is not of the image's original size."""
    try:
        mask = load_mask(record.mask_path, image_size(record.image_path)[::-1])
    except (ImageInputError, OSError, SyntaxError, Image.DecompressionBombError) as error:
        raise UnreadableImage(record.image_path, f"its mask {record.mask_path} is not a readable image") from error
    except ValueError as error:  # another size than its image
        raise UnreadableImage(record.image_path, str(error)) from error
    if mask.shape == size[::-1]:
        return mask
    return np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))


def _read_record(record: ImageRecord, with_clean: bool) -> _Inputs:
    """The record's image and defect-free source (with_clean) at the working size, and its mask at that size;
    UnreadableImage naming the bad file."""
    image = read_image(record.image_path)
    mask = _read_mask(record, image.size) if record.mask_path is not None else None
    clean = None
    if with_clean and record.clean_path is not None:
        try:
            clean = read_image(record.clean_path)
        except UnreadableImage as error:
            raise UnreadableImage(record.image_path, f"its defect-free source {error}") from error
    return _Inputs(image, mask, clean)


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


def _run_class(job: _EvaluationJob, records: Sequence[ImageRecord], picks: set[Path], has_masks: bool) -> _ClassRun:
    """Score `records` (all or part of one class); `picks` (the grid's images) and `has_masks` (whether pixel
    metrics are computed) are decided over the whole class."""
    run = _ClassRun()
    pipeline, options = job.pipeline, job.options
    for chunk in _chunks(records, options["batch_size"]):
        read = _readable(chunk, lambda r: _read_record(r, job.judge is not None), job.strict, job.skipped)
        # the diffusion runs only if the score or the judge needs it; the grid's few images get theirs apart
        results = pipeline([inputs.image for _, inputs in read], class_names=[r.class_name for r, _ in read],
                           return_reconstruction=job.judge is not None, **options) if read else []
        for (record, inputs), result in zip(read, results):
            if record.image_path in picks and result.reconstruction is None:
                result = pipeline([inputs.image], class_names=[record.class_name], **options)[0]
            mask = inputs.mask if inputs.mask is not None else np.zeros(result.anomaly_map.shape, dtype=bool)
            if job.judge is not None:
                run.qualities.append(job.judge.measure(inputs.image, result.reconstruction, inputs.clean, mask))
            run.scores.append(result.score)
            run.labels.append(record.label)
            run.with_mask += inputs.mask is not None
            lo, hi = run.map_range
            run.map_range = (min(lo, float(result.anomaly_map.min())), max(hi, float(result.anomaly_map.max())))
            pixel_image = has_masks and (inputs.mask is not None or not record.is_anomalous)
            if pixel_image:
                run.maps.append(_at_shape(result.anomaly_map, mask.shape))
                run.masks.append(mask)
            if record.image_path in picks:
                run.examples.append(_Example(record, inputs.image, result, mask if pixel_image else None))
            job.write_score((str(record.image_path), record.class_name, record.defect_type, record.label, result.score))
        job.bar.update(len(chunk))
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
        label = f"{class_name} / {example.record.defect_type}\nscore {example.result.score:.4g}"
        rows.append(GridRow(
            label=label,
            image=example.image,
            reconstruction=example.result.reconstruction,
            overlay=overlay_heatmap(example.image, example.result.anomaly_map, alpha, run.map_range),
            ground_truth=mask_image(example.mask, example.image.size),
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
    batch_size: int = DEFAULT_BATCH_SIZE,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
    grid_examples: int = 3,
    alpha: float = 0.5,
    progress: bool = True,
    reconstruction_metrics: bool = False,
    strict: bool = False,
) -> dict[str, ClassMetrics]:
    """Run the pipeline over the test records and write the evaluation report to out_dir.

    With `reconstruction_metrics` every image is reconstructed and metrics.json gets, per class,
    the reconstruction quality (vlmdiff.reconstruction_quality); otherwise the diffusion runs only
    if the score needs it (and for the qualitative grid).

    Writes scores.csv (one row per image, as each is scored), metrics.json (seven metrics per
    class, their mean, image counts, settings and the skipped files; NaN as null), metrics.md
    (Markdown table), plots/<class>_roc.png, _pro.png, _hist.png and qualitative.png (input |
    reconstruction | overlay | ground truth, `grid_examples` images per class).
    An image (or its mask) that cannot be read is skipped with a warning; with `strict` it
    stops the run (UnreadableImage naming the file). Records of other splits than 'test' are
    ignored. Returns the metrics per class (classes with no readable image have none).
    Under `accelerate launch` the processes share the images and every one returns the metrics.
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
    report = _Report(out_dir, pipeline, fpr_limit, alpha)
    processes = _Processes(out_dir)
    classes = sorted(by_class)
    mine = processes.part([chunk for name in classes for chunk in _chunks(by_class[name], batch_size)])
    with (_csv_rows(processes.csv_path(out_dir / SCORES_CSV), SCORE_COLUMNS) as write_score,
          tqdm(total=len(mine), desc="evaluate", unit="image",
               disable=not progress or not processes.shows_progress) as bar):
        job = _EvaluationJob(pipeline, options, judge, strict, write_score, bar)
        for index, class_name in enumerate(classes):
            records = [record for record in mine if record.class_name == class_name]
            if not records:
                continue
            bar.set_postfix_str(class_name)
            everything = by_class[class_name]  # the grid's picks and pixel metrics are decided over all of it
            run = _run_class(job, records, _grid_picks(everything, grid_examples),
                             any(record.mask_path is not None for record in everything))
            if processes.count > 1:
                processes.save(f"class{index}", run)
            else:
                report.add(class_name, run)

    if processes.count > 1:
        parts = processes.gather("skipped", _unreadable_parts(job.skipped))
        job.skipped = [UnreadableImage(path, reason) for part in parts for path, reason in part]
        if processes.is_main:
            for index, class_name in enumerate(classes):
                report.add(class_name, _ClassRun.merged(processes.load(f"class{index}")))
            processes.merge_csv(out_dir / SCORES_CSV)
    if processes.is_main:
        _warn_skipped(job.skipped, len(test))
    if len(job.skipped) == len(test):
        processes.close()
        raise ValueError(f"none of the {len(test)} test images could be read (the first: {job.skipped[0]})")
    if processes.is_main:
        _write_report(out_dir, report.per_class, report.counts, {**options, "fpr_limit": fpr_limit},
                      report.reconstruction, job.skipped)
        save_qualitative_grid(report.grid, out_dir / "qualitative.png")
    processes.close()
    return report.per_class if processes.is_main else _read_metrics(out_dir / "metrics.json")


@dataclass
class _Report:
    """What evaluate writes, gathered class by class: metrics, image counts, reconstruction quality, plots
    (written as each class is added) and the qualitative grid's rows."""

    out_dir: Path
    pipeline: VLMDiffPipeline
    fpr_limit: float
    alpha: float
    per_class: dict[str, ClassMetrics] = field(default_factory=dict)
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    reconstruction: dict[str, dict[str, float]] = field(default_factory=dict)
    grid: list[GridRow] = field(default_factory=list)

    def add(self, class_name: str, run: _ClassRun) -> None:
        """The class's metrics, counts and grid rows, and its plots written; nothing when no image was scored."""
        if not run.scores:
            return  # every image of the class was skipped
        if run.qualities:
            self.reconstruction[class_name] = summarize(run.qualities, run.labels)
        maps, masks = _stack_pixels(run.maps, run.masks) if run.maps else (None, None)
        run.maps.clear()  # the stacked copies are all that is kept
        run.masks.clear()
        metrics = self.per_class[class_name] = evaluate_class(run.scores, run.labels, maps, masks, self.fpr_limit)
        thresholds = self.pipeline.thresholds
        threshold = thresholds.get(class_name).value if class_name in thresholds.classes else None
        _plot_class(self.out_dir / "plots", class_name, run, maps, masks, metrics, threshold, self.fpr_limit)
        del maps, masks
        self.grid += _grid_rows(class_name, run, self.alpha)
        labels = np.asarray(run.labels)
        self.counts[class_name] = {
            "normal": int((labels == 0).sum()), "anomalous": int((labels == 1).sum()), "with_mask": run.with_mask,
        }


def _read_metrics(path: Path) -> dict[str, ClassMetrics]:
    """The per-class metrics of a metrics.json (null as NaN)."""
    classes = json.loads(path.read_text())["classes"]
    return {name: ClassMetrics(**{key: math.nan if value is None else value for key, value in values.items()})
            for name, values in classes.items()}


def _write_report(
    out_dir: Path, per_class: dict[str, ClassMetrics], counts: dict, settings: dict,
    reconstruction: dict[str, dict[str, float]], skipped: Sequence[UnreadableImage],
) -> None:
    document = {
        "classes": {name: _metrics_dict(metrics) for name, metrics in per_class.items()},
        "mean": _metrics_dict(mean_over_classes(per_class)),
        "images": counts,
        "settings": settings,
        "skipped": {
            "count": len(skipped), "images": [{"image": str(error.path), "reason": error.reason} for error in skipped],
        },
    }
    if reconstruction:
        document["reconstruction"] = {name: {k: _json_number(v) for k, v in values.items()}
                                      for name, values in reconstruction.items()}
    (out_dir / "metrics.json").write_text(json.dumps(document, indent=2) + "\n")
    (out_dir / "metrics.md").write_text(to_markdown_table(per_class))


# --------------------------------------------------------------------------- predict


@dataclass(frozen=True)
class Prediction:
    """One row of predictions.csv and where its pictures were written."""

    image: Path
    class_name: str
    score: float
    threshold: float | None
    verdict: str  # "anomalous", "normal", "unknown class" (guessed, far from every class) or "n/a" (no threshold)
    overlay_path: Path
    reconstruction_path: Path | None  # None when the reconstruction was not asked for
    class_match: str = ""  # when the class was guessed: the nearest classes and their distances, in words
    score_from: str = ""  # which maps made the score (the class's weights), in words


def _output_names(paths: Sequence[Path]) -> list[str]:
    """File stems made unique, ignoring case (a.png, x/a.jpg, a_2.png, A.png -> 'a', 'a_2', 'a_2_2', 'A_3')."""
    taken: set[str] = set()
    names = []
    for path in paths:
        name, count = path.stem, 1
        while name.casefold() in taken:
            count += 1
            name = f"{path.stem}_{count}"
        taken.add(name.casefold())
        names.append(name)
    return names


def predict(
    pipeline: VLMDiffPipeline,
    image_paths: Sequence[str | Path],
    out_dir: str | Path,
    class_name: str | None = None,
    strength: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    alpha: float = 0.5,
    progress: bool = True,
    reconstructions: bool = True,
    strict: bool = False,
) -> list[Prediction]:
    """Run the pipeline on image files; write <name>_overlay.png, <name>_reconstruction.png and predictions.csv.

    Without `reconstructions` no reconstruction is written and the diffusion runs only if the score needs it.
    Each image's row is appended to predictions.csv as soon as it is scored. A file that cannot be
    read is skipped with a warning; with `strict` it stops the run (UnreadableImage naming it).

    class_name None lets the pipeline guess the class (its normal-feature memory,
    else 'unknown'); the class_match column then says how well the image fits it. The verdict needs a
    threshold for the class, else it is 'n/a'; an image far from every known class gets 'unknown class'.
    Under `accelerate launch` the processes share the images and every one returns all the predictions.
    """
    paths = [Path(path) for path in image_paths]
    if not paths:
        raise ValueError("no images given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    options = dict(strength=strength, num_inference_steps=steps, seed=seed, batch_size=batch_size)
    predictions: list[Prediction] = []
    skipped: list[UnreadableImage] = []
    named = list(zip(paths, _output_names(paths)))  # decided over all images: the same names in any process
    processes = _Processes(out_dir)
    mine = processes.part(list(_chunks(named, batch_size)))
    with (_csv_rows(processes.csv_path(out_dir / PREDICTIONS_CSV), PREDICTION_COLUMNS) as write_row,
          tqdm(total=len(mine), desc="predict", unit="image",
               disable=not progress or not processes.shows_progress) as bar):
        for chunk in _chunks(mine, batch_size):
            read = _readable(chunk, lambda item: read_image(item[0]), strict, skipped)
            results = pipeline([image for _, image in read], class_names=class_name or AUTO_CLASS,
                               return_reconstruction=reconstructions, **options) if read else []
            for ((path, name), image), result in zip(read, results):
                prediction = _save_prediction(path, image, result, out_dir, name, alpha, reconstructions,
                                              pipeline.scorer.describe(result.class_name))
                predictions.append(prediction)
                threshold = "" if prediction.threshold is None else repr(prediction.threshold)
                write_row((str(path), prediction.class_name, repr(prediction.score), threshold, prediction.verdict,
                           prediction.class_match, prediction.score_from))
            bar.update(len(chunk))
    if processes.count > 1:
        parts = processes.gather("predictions", (predictions, _unreadable_parts(skipped)))
        predictions = [prediction for part, _ in parts for prediction in part]
        skipped = [UnreadableImage(path, reason) for _, part in parts for path, reason in part]
        if processes.is_main:
            processes.merge_csv(out_dir / PREDICTIONS_CSV)
        processes.close()
    if processes.is_main:
        _warn_skipped(skipped, len(paths))
    if not predictions:
        raise ValueError(f"none of the {len(paths)} images could be read (the first: {skipped[0]})")
    return predictions


def _save_prediction(
    path: Path, image: Image.Image, result: DetectionResult, out_dir: Path, name: str, alpha: float,
    reconstruction: bool, score_from: str = "",
) -> Prediction:
    """Write <name>_overlay.png (and <name>_reconstruction.png) at the file's original size to out_dir;
    the image's prediction."""
    size = image_size(path)
    overlay_path = out_dir / f"{name}_overlay.png"
    value_range = threshold_range(result.threshold)
    if size == image.size:
        overlay_heatmap(image, result.anomaly_map, alpha, value_range).save(overlay_path)
    else:
        _full_size_overlay(path, result.anomaly_map, alpha, value_range).save(overlay_path)
    reconstruction_path = out_dir / f"{name}_reconstruction.png" if reconstruction else None
    if reconstruction_path:
        result.reconstruction.resize(size, Image.Resampling.BILINEAR).save(reconstruction_path)  # uint8
    return Prediction(
        path, result.class_name, result.score, result.threshold, _verdict(result), overlay_path, reconstruction_path,
        result.class_match.describe() if result.class_match is not None else "", score_from,
    )


def _full_size_overlay(
    path: Path, anomaly_map: np.ndarray, alpha: float, value_range: tuple[float, float] | None
) -> Image.Image:
    """`overlay_heatmap` of a working-size map over the image file at its original size, band by band: the
    map is upsampled (bilinear) one band of rows at a time, so no full-size float copy is ever made."""
    if value_range is None:  # the map's own range, as overlay_heatmap takes it
        value_range = (float(anomaly_map.min()), float(anomaly_map.max()))
    pixels = np.array(read_image(path, max_side=None))  # (H, W, 3) uint8, blended in place
    small = Image.fromarray(anomaly_map.astype(np.float32, copy=False))
    height, width = pixels.shape[:2]
    scale = small.height / height  # source rows per output row
    rows = max(1, BAND_PIXELS // width)
    for top in range(0, height, rows):
        bottom = min(top + rows, height)
        band = small.resize((width, bottom - top), Image.Resampling.BILINEAR,
                            box=(0, top * scale, small.width, bottom * scale))
        pixels[top:bottom] = np.asarray(overlay_heatmap(pixels[top:bottom], np.asarray(band), alpha, value_range))
    return Image.fromarray(pixels)


def _verdict(result: DetectionResult) -> str:
    if result.unknown_class:
        return UNKNOWN_VERDICT
    return NO_VERDICT if result.is_anomalous is None else VERDICTS[result.is_anomalous]
