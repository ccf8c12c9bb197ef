"""Detection quality side by side (issue 7, item 4): the seven metrics and the latency per image.

On the built-in benchmark (`vlmdiff make-demo-data DIR --seed 0`) and on the MVTec 3D-AD
tire data (skipped if absent), in one run, for:

- the default VLMDiff model (--model), scored three ways from ONE diffusion pass per image:
  its own fused map (the saved reconstruction and memory weights), the reconstruction map
  alone (memory_weight 0: the published DiAD/VLMDiff setting) and the memory map alone
  (reconstruction_weight 0);
- the same recipe trained with empty captions (--ablation), scored the same three ways;
- a PatchCore-style nearest-neighbour baseline on the same EfficientNet-Lite0 features as the
  model's memory (benchmarks/patchcore_baseline.py), fitted on the training images.

Metrics (vlmdiff.metrics.evaluate_class, per class, then the mean over classes): image
AUROC / AP / F1-max, pixel AUROC / AP / F1-max and AUPRO (FPR <= 0.3), pixel metrics on the
maps at the ground-truth masks' resolution. The models' metrics come from one batched pass
(`vlmdiff.map_variants.evaluate_map_variants`, --batch-size). Latency: median seconds per
image at batch 1 (on --latency-images test images per dataset) of the stages a setting needs
(reconstruction: preprocess + encode + denoise + decode + reconstruction map; memory: feature
embedding + kNN; + fusion and blur); the baseline's over all test images. Note: the pipeline
itself still runs the diffusion when reconstruction_weight is 0, so "memory only" is what
that setting needs, not what the pipeline spends.

Prints one Markdown table per dataset and writes benchmarks/results/quality.json.
Runs with torch.set_num_threads(--threads), 2 by default.

    python benchmarks/bench_quality.py                                   # defaults below
    python benchmarks/bench_quality.py --model assets/vlmdiff-default --ablation runs/ablation/model
    python benchmarks/bench_quality.py --quick --model /tmp/model        # 4 images per class
"""
from __future__ import annotations

import argparse
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
from vlmdiff.evaluation import load_mask, select_test_records  # noqa: E402
from vlmdiff.images import images_to_tensor, load_image  # noqa: E402
from vlmdiff.map_variants import evaluate_map_variants  # noqa: E402
from vlmdiff.metrics import ClassMetrics, evaluate_class, mean_over_classes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "assets" / "vlmdiff-default"
DEFAULT_ABLATION = ROOT / "runs" / "ablation" / "model"
DEFAULT_DEMO = ROOT / "runs" / "demo"
DEFAULT_TIRE = Path("/work/shared/data/mvtec3d_tire")
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "quality.json"
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


def model_settings(pipe) -> dict[str, tuple[float, float]]:
    """name -> (reconstruction_weight, memory_weight): the model's saved fusion, reconstruction only, memory only."""
    anomaly = pipe.config.anomaly
    saved = (anomaly.reconstruction_weight, anomaly.memory_weight if pipe.memory is not None else 0.0)
    settings = {"fused": saved} if min(saved) > 0 else {}
    settings["reconstruction only"] = (1.0, 0.0)
    if pipe.memory is not None:
        settings["memory only"] = (0.0, 1.0)
    return settings


@torch.inference_mode()
def timed_components(pipe, image: Image.Image, class_name: str, seed: int) -> tuple[dict, dict]:
    """What `pipe.component_maps([image], class_names=[class_name])` computes, with the time of each part.

    Both raw maps are always computed, so every weighting can be scored from one pass.
    """
    seconds = {}
    started = time.perf_counter()
    images = images_to_tensor([image], pipe.config.resolution)
    latents, denoised, reconstructions = pipe.reconstruct(images, pipe.config.strength, pipe.config.num_inference_steps, seed)
    parts = {"reconstruction": pipe.reconstruction_maps(images, reconstructions, latents, denoised)[0]}
    seconds["reconstruction"] = time.perf_counter() - started
    if pipe.memory is not None:
        started = time.perf_counter()
        features = pipe.memory.embed(image)
        parts["memory"] = pipe.memory.distance_map(features, class_name)
        seconds["memory"] = time.perf_counter() - started
    return parts, seconds


@torch.inference_mode()
def fused(pipe, parts: dict, image: Image.Image, weights: tuple[float, float]) -> tuple[torch.Tensor, float]:
    """The fused map and score under other weights."""
    return pipe.fuse(parts, pipe.working_size(*image.size), dict(zip(("reconstruction", "memory"), weights)))


def check_against_pipeline(pipe, image: Image.Image, class_name: str, seed: int) -> float:
    """Largest difference between our timed components and the pipeline's own component_maps."""
    ours, _ = timed_components(pipe, image, class_name, seed)
    with torch.inference_mode():
        theirs, _, _ = pipe.component_maps(
            [image], pipe.config.strength, pipe.config.num_inference_steps, seed, class_names=[class_name]
        )
    return max(float((ours[name] - theirs[0][name]).abs().max()) for name in theirs[0])


def latency_probe(pipe, records: list, settings: dict, seed: int) -> dict:
    """Seconds per image at batch 1 of each setting, from `records` (median), and the pipeline check."""
    times = {"reconstruction": [], "memory": [], "fuse": {name: [] for name in settings}}
    difference = check_against_pipeline(pipe, load_image(records[0].image_path), records[0].class_name, seed)
    for record in records:
        image = load_image(record.image_path)
        parts, seconds = timed_components(pipe, image, record.class_name, seed)
        for part, value in seconds.items():
            times[part].append(value)
        for name, weights in settings.items():
            started = time.perf_counter()
            fused(pipe, parts, image, weights)
            times["fuse"][name].append(time.perf_counter() - started)
    result = {}
    for name, weights in settings.items():
        parts = {"fuse": float(np.median(times["fuse"][name]))}
        if weights[0] > 0:
            parts["reconstruction"] = float(np.median(times["reconstruction"]))
        if weights[1] > 0:
            parts["memory"] = float(np.median(times["memory"]))
        result[name] = {"seconds_per_image": sum(parts.values()), "seconds_parts": parts, "latency_images": len(records),
                        "pipeline_check_max_difference": difference}
    return result


def evaluate_model(pipe, test: list, probe: list, seed: int, batch_size: int) -> dict:
    """{setting: {"classes": {name: ClassMetrics}, latency...}}: metrics from one diffusion pass per test image
    (vlmdiff.map_variants), latency at batch 1 on the `probe` images."""
    settings = model_settings(pipe)
    # evaluate_map_variants restores the weights after each image from the last variant: keep memory last
    order = sorted(settings, key=lambda name: settings[name][1] > 0)
    report = evaluate_map_variants(pipe, test, {name: settings[name] for name in order}, seed, batch_size)
    latency = latency_probe(pipe, probe, settings, seed)
    return {
        name: {
            "weights": {"reconstruction": settings[name][0], "memory": settings[name][1]},
            "classes": report.metrics[name],
            **latency[name],
            "auto_class_accuracy": None if math.isnan(report.auto_class_accuracy) else report.auto_class_accuracy,
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


# --------------------------------------------------------------------------- report
def jsonable(metrics: ClassMetrics) -> dict:
    return {k: (None if math.isnan(v) else v) for k, v in asdict(metrics).items()}


def percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"


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
        for note in entry.get("notes", []):
            lines.append(f"\n{note}")
        lines.append("")
    return "\n".join(lines)


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
    parser.add_argument("--coreset", default="auto",
                        help="baseline coreset per class: 'auto' (the model memory's size per class, else ratio 0.1), "
                             "a ratio in (0, 1] or a count")
    parser.add_argument("--baseline-layers", help="EfficientNet-Lite0 blocks for the baseline, e.g. 4,10 (default: the model memory's)")
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
        if (path / "model_index.json").is_file():
            models[label] = (path, VLMDiffPipeline.from_pretrained(path))
        else:
            notes.append(f"{label}: no model at {path}, skipped")
            print(notes[-1], flush=True)
    reference = next(iter(models.values()))[1] if models else None
    layers = [int(x) for x in args.baseline_layers.split(",")] if args.baseline_layers else None

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
            for setting, result in evaluate_model(pipe, test, probe, args.seed, args.batch_size).items():
                entry["methods"][f"{label} ({setting})"] = method_row(result)

        train = [r for r in records if r.split == "train" and r.class_name in by_class]
        if args.train_images:
            train = [r for name in by_class for r in [t for t in train if t.class_name == name][: args.train_images]]
        memory = reference.memory if reference is not None else None
        resolution = reference.config.resolution if reference is not None else 256
        blur = reference.config.anomaly.blur_sigma if reference is not None else 5.0
        baseline = PatchCoreBaseline.like(memory, args.coreset, layers, resolution=resolution, blur_sigma=blur, seed=args.seed)
        print(f"{dataset}: fitting the PatchCore-style baseline on {len(train)} training images...", flush=True)
        baseline.fit([load_image(r.image_path) for r in train], [r.class_name for r in train])
        if memory is not None and layers is None:  # same features as the model's memory, checked on one image
            image = load_image(test[0].image_path)
            same = torch.equal(baseline.memory.embed(image), memory.embed(image))
            entry["notes"].append(f"baseline features identical to the model memory's: {same}")
        result = evaluate_baseline(baseline, by_class, f"{dataset} / PatchCore-style")
        entry["methods"]["PatchCore-style kNN (same features)"] = method_row(result)
        report["datasets"][dataset] = entry

    report["markdown"] = markdown(report["datasets"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(report["markdown"])
    for note in notes:
        print(note)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
