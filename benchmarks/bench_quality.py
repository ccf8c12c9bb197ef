"""Detection quality side by side: the seven metrics and the latency per image.

On the built-in benchmark (`vlmdiff make-demo-data DIR --seed 0`) and on the MVTec 3D-AD
tire data (skipped if absent), in one run, for:

- the default VLMDiff model (--model), scored from ONE diffusion pass per image: its own fused
  map (the saved weights, when it fuses several maps) and each component map alone (the
  reconstruction map alone is the published DiAD/VLMDiff setting);
- the same recipe trained with empty captions (--ablation), scored the same three ways;
- for a memory-guided model (`memory_guidance` > 0: only what the memory flags is regenerated),
  also its diffusion alone ("unguided": the whole image regenerated), reconstruction rows only;
- the PatchCore reference the memory recipe must beat (benchmarks/patchcore_baseline.py): the same
  EfficientNet-Lite0 backbone, blocks 4 + 10 at 256 px, a 1% greedy coreset per class, the map
  blurred (sigma 4) and its maximum as the image score, fitted on the training images.

Per class I-AUROC / AUPRO of every method, with each built-in class's split (`TUNE_CLASSES`, on
which the memory recipe was chosen, and `VALIDATION_CLASSES`, kept apart) and the split means; and
the model's false-positive rate on the normal test images at its thresholds vs the rate they expect.

Metrics (vlmdiff.metrics.evaluate_class, per class, then the mean over classes): image
AUROC / AP / F1-max, pixel AUROC / AP / F1-max and AUPRO (FPR <= 0.3), pixel metrics on the
maps at the ground-truth masks' resolution. The models' metrics come from one batched pass
(`vlmdiff.map_variants.evaluate_map_variants`, --batch-size). Latency: median seconds per
image at batch 1 (on --latency-images test images per dataset) of the pipeline stages a
setting needs, timed through the pipeline's stage hook (preprocess + memory embedding always;
encode + denoise + decode when a weighted map needs the reconstruction; each weighted map;
fusion and blur): what the pipeline spends, since it skips the diffusion when no weighted
map needs it; the baseline's over all test images.

Prints one Markdown table per dataset and writes benchmarks/results/quality.json.
Runs with torch.set_num_threads(--threads), 2 by default.

    python benchmarks/bench_quality.py                                   # defaults below
    python benchmarks/bench_quality.py --model assets/vlmdiff-default --ablation runs/ablation/model
    python benchmarks/bench_quality.py --quick --model /tmp/model        # 4 images per class
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from patchcore_baseline import PatchCoreBaseline  # noqa: E402

from vlmdiff.data import read_dataset  # noqa: E402
from vlmdiff.data.demo import TUNE_CLASSES, VALIDATION_CLASSES  # noqa: E402
from vlmdiff.evaluation import load_mask, select_test_records  # noqa: E402
from vlmdiff.images import load_image  # noqa: E402
from vlmdiff.map_variants import evaluate_map_variants  # noqa: E402
from vlmdiff.metrics import ClassMetrics, evaluate_class, mean_over_classes  # noqa: E402
from vlmdiff.model_folder import MODEL_INDEX  # noqa: E402
from vlmdiff.pipeline import DetectionSettings  # noqa: E402
from vlmdiff.scoring import AnomalyScorer, computable_maps, needs_reconstruction  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "assets" / "vlmdiff-default"
DEFAULT_ABLATION = ROOT / "runs" / "ablation" / "model"
DEFAULT_DEMO = ROOT / "runs" / "demo"
DEFAULT_TIRE = Path("/work/shared/data/mvtec3d_tire")
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality.json"
PATCHCORE_SIGMA = 4.0  # PatchCore's blur of the map, at 256 px
TITLES = {
    "image_auroc": "I-AUROC", "image_ap": "I-AP", "image_f1max": "I-F1max",
    "pixel_auroc": "P-AUROC", "pixel_ap": "P-AP", "pixel_f1max": "P-F1max", "aupro": "AUPRO",
}


# --------------------------------------------------------------------------- scoring
class ClassRun:
    """Scores, labels, maps and masks of one method on one class."""

    def __init__(self) -> None:
        self.scores: list[float] = []
        self.labels: list[int] = []
        self.maps: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []

    def add(self, score: float, label: int, anomaly_map: np.ndarray, mask: np.ndarray | None) -> None:
        self.scores.append(score)
        self.labels.append(label)
        if mask is not None:
            self.maps.append(anomaly_map)
            self.masks.append(mask)

    def metrics(self) -> ClassMetrics:
        if not self.masks:
            return evaluate_class(self.scores, self.labels)
        shape = Counter(m.shape for m in self.masks).most_common(1)[0][0]  # other sizes are resized to it
        size = shape[::-1]
        maps = [m if m.shape == shape else np.asarray(Image.fromarray(m).resize(size, Image.Resampling.BILINEAR)) for m in self.maps]
        masks = [m if m.shape == shape else np.asarray(Image.fromarray(m).resize(size, Image.Resampling.NEAREST)) for m in self.masks]
        return evaluate_class(self.scores, self.labels, np.stack(maps), np.stack(masks))


def model_settings(pipe, reconstruction_only: bool = False) -> dict[str, dict[str, float]]:
    """name -> map weights: the model's saved fusion (when it uses several maps), then each map alone;
    with `reconstruction_only` only the settings that need the reconstruction."""
    available = computable_maps(pipe)
    saved = {name: weight for name, weight in pipe.config.anomaly.weights.items() if name in available}
    settings = {"fused": saved} if sum(weight > 0 for weight in saved.values()) > 1 else {}
    for name in available:
        settings[f"{name} only"] = {other: float(other == name) for other in available}
    if reconstruction_only:
        settings = {name: weights for name, weights in settings.items()
                    if needs_reconstruction(tuple(m for m, w in weights.items() if w > 0))}
    return settings


@torch.inference_mode()
def timed_components(pipe, image: Image.Image, class_name: str, seed: int) -> tuple[dict, dict]:
    """Every map the model can compute for one image, and the pipeline's stage times (its `stage_hook`),
    with each component map timed apart as "<map>_map"."""
    stages: dict[str, float] = {}

    @contextlib.contextmanager
    def clock(name: str):
        started = time.perf_counter()
        yield
        stages[name] = stages.get(name, 0.0) + time.perf_counter() - started

    pipe.stage_hook = clock
    try:
        batch = pipe.prepare_batch([image], [class_name], DetectionSettings(seed=seed).resolved(pipe.config))
        parts = {}
        for name in computable_maps(pipe):
            parts.update(pipe.component_maps(batch, (name,))[0])
            stages[f"{name}_map"] = stages.pop("component_maps")
    finally:
        pipe.stage_hook = None
    return parts, stages


def setting_seconds(stages: dict, weights: dict[str, float]) -> dict[str, float]:
    """The stages a setting needs: preprocess and the memory embedding (class guess) always, the
    diffusion only if a weighted map needs the reconstruction, and each weighted map."""
    used = [name for name, weight in weights.items() if weight > 0]
    needed = ["preprocess", "embed", *(f"{name}_map" for name in used)]
    if needs_reconstruction(tuple(used)):
        needed += ["encode", "denoise", "decode"]
    return {stage: stages[stage] for stage in needed}


def latency_probe(pipe, records: list, settings: dict, seed: int) -> dict:
    """Seconds per image at batch 1 of each setting, from `records` (median)."""
    runs = {name: [] for name in settings}
    for record in records:
        image = load_image(record.image_path)
        parts, stages = timed_components(pipe, image, record.class_name, seed)
        for name, weights in settings.items():
            started = time.perf_counter()
            AnomalyScorer(pipe.config.anomaly, weights).fuse(parts, pipe.working_size(*image.size))
            runs[name].append({**setting_seconds(stages, weights), "fuse": time.perf_counter() - started})
    result = {}
    for name, rows in runs.items():
        parts = {stage: float(np.median([row[stage] for row in rows])) for stage in rows[0]}
        result[name] = {"seconds_per_image": sum(parts.values()), "seconds_parts": parts, "latency_images": len(records)}
    return result


def evaluate_model(pipe, test: list, probe: list, seed: int, batch_size: int, reconstruction_only: bool = False) -> dict:
    """{setting: {"classes": {name: ClassMetrics}, latency...}}: metrics from one diffusion pass per test image
    (vlmdiff.map_variants), latency at batch 1 on the `probe` images."""
    settings = model_settings(pipe, reconstruction_only)
    report = evaluate_map_variants(pipe, test, settings, seed, batch_size)
    latency = latency_probe(pipe, probe, settings, seed)
    return {
        name: {
            "weights": settings[name],
            "classes": report.metrics[name],
            **latency[name],
            "auto_class_accuracy": None if math.isnan(report.auto_class_accuracy) else report.auto_class_accuracy,
            "reconstruction": {key: none_if_nan(float(np.nanmean([c[key] for c in report.reconstruction.values()])))
                               for key in next(iter(report.reconstruction.values()))},
            "seconds_per_image_batched": report.seconds_per_image,
        }
        for name in settings
    }


def evaluate_baseline(baseline: PatchCoreBaseline, by_class: dict, progress: str) -> dict:
    runs, times = {}, []
    done, total = 0, sum(len(records) for records in by_class.values())
    for class_name, records in by_class.items():
        runs[class_name] = ClassRun()
        has_masks = any(r.mask_path is not None for r in records)
        for record in records:
            image = load_image(record.image_path)
            started = time.perf_counter()
            anomaly_map, score = baseline.predict(image, record.class_name)
            times.append(time.perf_counter() - started)
            mask = load_mask(record.mask_path, image.size[::-1]) if has_masks else None
            runs[class_name].add(score, record.label, anomaly_map, mask)
            done += 1
            print(f"\r{progress}: {done}/{total} images", end="", flush=True)
    print(flush=True)
    return {
        "classes": {c: run.metrics() for c, run in runs.items()},
        "seconds_per_image": float(np.median(times)),
        "fit_seconds": baseline.fit_seconds,
        "coreset_per_class": baseline.class_counts,
        "features": {k: list(v) if isinstance(v, tuple) else v for k, v in baseline.config.items()},
    }


def baseline_label(args: argparse.Namespace) -> str:
    blocks = "the memory's blocks" if args.baseline_layers == "memory" else f"blocks {args.baseline_layers.replace(',', '+')}"
    coreset = f"{float(args.coreset):.0%} coreset" if args.coreset != "auto" else "the memory's coreset"
    return f"PatchCore ({blocks}, {args.baseline_long_side} px, {coreset}, max)"


@torch.inference_mode()
def false_positive_rate(pipe, test: list) -> dict:
    """Share of the normal test images the model calls anomalous at its thresholds (its class given),
    against the rate its thresholds expect."""
    normal = [r for r in test if not r.label and r.class_name in pipe.thresholds.classes]
    flagged = [bool(pipe(load_image(r.image_path), class_names=r.class_name, return_reconstruction=False)[0].is_anomalous)
               for r in normal]
    expected = [pipe.thresholds.get(r.class_name).expected_fpr for r in normal]
    return {"normal_images": len(normal), "observed": float(np.mean(flagged)) if normal else None,
            "expected": float(np.mean([e for e in expected if e is not None])) if normal and None not in expected else None}


# --------------------------------------------------------------------------- report
def jsonable(metrics: ClassMetrics) -> dict:
    return {k: (None if math.isnan(v) else v) for k, v in asdict(metrics).items()}


def percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


RECONSTRUCTION_TITLES = {
    "normal_psnr": "normal PSNR (dB)", "normal_ssim": "normal SSIM", "normal_feature_cosine": "normal feature cos",
    "defect_removal": "defect removal (0 best)", "psnr_outside_defect": "PSNR outside defect (dB)",
}


def none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value


def markdown(datasets: dict) -> str:
    names = [f.name for f in fields(ClassMetrics)]
    lines = []
    for dataset, entry in datasets.items():
        lines += [
            f"### {dataset} ({entry['test_images']} test images, {len(entry['classes'])} classes; mean over classes, %)",
            "",
            "| method | " + " | ".join(TITLES[n] for n in names) + " | s/image |",
            "|---|" + "---:|" * (len(names) + 1),
        ]
        for method, row in entry["methods"].items():
            cells = [percent(row["mean"][n]) for n in names]
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {row['seconds_per_image']:.3f} |")
        models = {method.split(" (")[0]: row["reconstruction"] for method, row in entry["methods"].items()
                  if row.get("reconstruction")}
        if models:
            lines += ["", "Reconstructions at the model's strength (mean over classes; vs the input on normal images, "
                      "vs the clean source inside the defect):", "",
                      "| model | " + " | ".join(RECONSTRUCTION_TITLES.values()) + " |",
                      "|---|" + "---:|" * len(RECONSTRUCTION_TITLES)]
            for model, values in models.items():
                cells = ["n/a" if values[key] is None else f"{values[key]:.3g}" for key in RECONSTRUCTION_TITLES]
                lines.append(f"| {model} | " + " | ".join(cells) + " |")
        lines += per_class_markdown(entry)
        fpr = entry.get("false_positive_rate")
        if fpr and fpr["observed"] is not None:
            lines.append(f"\nFalse-positive rate on the {fpr['normal_images']} normal test images at the model's "
                         f"thresholds: {fpr['observed']:.1%} (its thresholds expect {fpr['expected']:.1%}).")
        for note in entry.get("notes", []):
            lines.append(f"\n{note}")
        lines.append("")
    return "\n".join(lines)


def per_class_markdown(entry: dict) -> list[str]:
    """I-AUROC / AUPRO of every method per class, the class's split (tune / validation), and the split means."""
    methods = entry["methods"]
    split = {name: "tune" if name in TUNE_CLASSES else "validation" if name in VALIDATION_CLASSES else "real"
             for name in entry["classes"]}
    cell = lambda m: f"{percent(m['image_auroc'])} / {percent(m['aupro'])}"  # noqa: E731
    lines = ["", "Per class, I-AUROC / AUPRO (%):", "",
             "| class | split | " + " | ".join(methods) + " |", "|---|---|" + "---:|" * len(methods)]
    lines += [f"| {name} | {split[name]} | " + " | ".join(cell(row["classes"][name]) for row in methods.values()) + " |"
              for name in entry["classes"]]
    for group in ("tune", "validation"):
        members = [name for name in entry["classes"] if split[name] == group]
        if len(members) > 1:
            means = [{key: float(np.mean([row["classes"][c][key] for c in members])) for key in ("image_auroc", "aupro")}
                     for row in methods.values()]
            lines.append(f"| **{group} mean** | {len(members)} classes | " + " | ".join(cell(m) for m in means) + " |")
    return lines


def method_row(result: dict, extra: dict | None = None) -> dict:
    row = {
        "mean": jsonable(mean_over_classes(result["classes"])),
        "classes": {c: jsonable(m) for c, m in result["classes"].items()},
        **{k: v for k, v in result.items() if k != "classes"},
    }
    return {**row, **(extra or {})}


# --------------------------------------------------------------------------- driver
def ensure_demo(path: Path) -> Path:
    if not path.is_dir():
        print(f"generating the built-in benchmark in {path} (vlmdiff make-demo-data --seed 0)", flush=True)
        subprocess.run([sys.executable, "-m", "vlmdiff.cli", "make-demo-data", str(path), "--seed", "0"], check=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="default VLMDiff model folder")
    parser.add_argument("--ablation", type=Path, default=DEFAULT_ABLATION, help="the model trained with empty captions")
    parser.add_argument("--demo", type=Path, default=DEFAULT_DEMO, help="built-in benchmark (generated if absent)")
    parser.add_argument("--tire", type=Path, default=DEFAULT_TIRE, help="MVTec 3D-AD tire folder (skipped if absent)")
    parser.add_argument("--max-images", type=int, help="test images per class (evenly spread over the class)")
    parser.add_argument("--train-images", type=int, help="training images per class for the baseline (default all)")
    parser.add_argument("--coreset", default="0.01",
                        help="baseline coreset per class: a ratio in (0, 1], a count, or 'auto' (the model memory's size)")
    parser.add_argument("--baseline-layers", default="4,10",
                        help="EfficientNet-Lite0 blocks of the baseline ('memory': the model memory's features)")
    parser.add_argument("--baseline-long-side", type=int, default=256, help="the baseline's working long side")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size of the models' metric pass")
    parser.add_argument("--latency-images", type=int, default=12, help="test images per dataset timed at batch 1")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke test: 4 test and 8 training images per class")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.max_images = args.max_images or 4
        args.train_images = args.train_images or 8
        args.latency_images = min(args.latency_images, 3)

    from vlmdiff import VLMDiffPipeline

    models = {}
    notes = []
    for label, path in (("VLMDiff", args.model), ("VLMDiff, empty captions", args.ablation)):
        if (path / MODEL_INDEX).is_file():
            models[label] = (path, VLMDiffPipeline.from_pretrained(path))
            if models[label][1].config.memory_guidance > 0:  # also the diffusion alone, regenerating everything
                models[f"{label}, unguided"] = (path, VLMDiffPipeline.from_pretrained(path))
                models[f"{label}, unguided"][1].config.memory_guidance = 0.0
        else:
            notes.append(f"{label}: no model at {path}, skipped")
            print(notes[-1], flush=True)
    reference = next(iter(models.values()))[1] if models else None
    layers = None if args.baseline_layers == "memory" else [int(x) for x in args.baseline_layers.split(",")]

    datasets = {"built-in benchmark": ensure_demo(args.demo)}
    if args.tire.is_dir():
        datasets["MVTec 3D-AD tire"] = args.tire
    else:
        notes.append(f"tire data not found at {args.tire}, skipped")
        print(notes[-1], flush=True)

    report = {"settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                           "load_average": os.getloadavg()},
              "models": {label: str(path) for label, (path, _) in models.items()}, "notes": notes, "datasets": {}}
    for dataset, root in datasets.items():
        records = read_dataset(root)
        test = select_test_records(records, max_images=args.max_images)
        by_class: dict[str, list] = {}
        for record in test:
            by_class.setdefault(record.class_name, []).append(record)
        by_class = dict(sorted(by_class.items()))
        entry = {"root": str(root), "classes": list(by_class), "test_images": len(test), "methods": {}, "notes": []}
        probe = select_test_records(test, max_images=max(1, args.latency_images // len(by_class)))[: args.latency_images]
        for label, (_, pipe) in models.items():
            print(f"{dataset} / {label}...", flush=True)
            unguided = label.endswith(", unguided")  # its memory rows are the guided model's
            for setting, result in evaluate_model(pipe, test, probe, args.seed, args.batch_size, unguided).items():
                entry["methods"][f"{label} ({setting})"] = method_row(result)

        train = [r for r in records if r.split == "train" and r.class_name in by_class]
        if args.train_images:
            train = [r for name in by_class for r in [t for t in train if t.class_name == name][: args.train_images]]
        memory = reference.memory if reference is not None else None
        resolution = reference.config.resolution if reference is not None else 256
        baseline = PatchCoreBaseline.like(memory, args.coreset, layers, resolution=resolution, blur_sigma=PATCHCORE_SIGMA,
                                          seed=args.seed, long_side=args.baseline_long_side)
        print(f"{dataset}: fitting the PatchCore baseline on {len(train)} training images...", flush=True)
        baseline.fit([load_image(r.image_path) for r in train], [r.class_name for r in train])
        result = evaluate_baseline(baseline, by_class, f"{dataset} / PatchCore")
        entry["methods"][baseline_label(args)] = method_row(result)
        if reference is not None:
            entry["false_positive_rate"] = false_positive_rate(reference, test)
        report["datasets"][dataset] = entry

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")  # the numbers first, whatever the rendering does
    report["markdown"] = markdown(report["datasets"])
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(report["markdown"])
    for note in notes:
        print(note)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
