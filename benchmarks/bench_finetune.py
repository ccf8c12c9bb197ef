"""A new class from its normal images: how long until it is usable, and how well it then detects.

Fine-tunes the model (default: the shipped one) on --images normal training images of one class
of the built-in benchmark under a new name, first the quick phase (memory + threshold), then,
with --steps N, the diffusion phase, and times each (`vlmdiff.training.finetune.finetune`, the
same call as `vlmdiff finetune`). Then it scores the class's test images under the new name and
under the class the model already has (trained on all its training images with the model):
I-AUROC / AUPRO of both, and the false-positive rate of the new class on its normal test images.

    python benchmarks/bench_finetune.py --data runs/bench_demo --class-name screw --images 50 [--steps 100]

With --scaling N [N ...] it instead times the quick phase alone as the command line runs it
(`vlmdiff finetune MODEL --images DIR --class NAME --memory-only --out DIR`, each in a subprocess
whose process tree's peak RSS is sampled every 50 ms) on N normal images of the class rendered
anew (`vlmdiff.data.demo.render_sample`, seeds unseen by the benchmark) and upscaled to --side px
PNGs, or with --mixed resized to random sizes of 105-632 px and made grey,
then scores each model on the class's test split, transformed the same way (I-AUROC, AUPRO,
false-positive rate), so speed never silently costs detection. --plot draws the log-log figure:

    python benchmarks/bench_finetune.py --scaling 50 100 200 400 800 --out benchmarks/results/finetune_scaling.json
    python benchmarks/bench_finetune.py --scaling 50 100 200 400 800 --mixed --class-name gravel --out benchmarks/results/finetune_mixed.json
    python benchmarks/bench_finetune.py --plot benchmarks/results/finetune_scaling.json benchmarks/results/finetune_mixed.json benchmarks/results/finetune_scaling_512.json benchmarks/results/finetune_mixed_512.json --out docs/finetune_scaling.png
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from vlmdiff import VLMDiffPipeline
from vlmdiff.data import read_dataset
from vlmdiff.data.demo import render_sample
from vlmdiff.evaluation import load_mask
from vlmdiff.images import load_image
from vlmdiff.metrics import evaluate_class
from vlmdiff.training.finetune import FinetuneConfig, finetune

ROOT = Path(__file__).resolve().parents[1]


@torch.inference_mode()
def scores_under(pipe: VLMDiffPipeline, test: list, class_name: str) -> dict:
    results = [pipe(load_image(r.image_path), class_names=class_name, return_reconstruction=False)[0] for r in test]
    labels = [r.label for r in test]
    masks = [load_mask(r.mask_path, res.anomaly_map.shape) for r, res in zip(test, results)]
    maps = [res.anomaly_map for res in results]
    if len({m.shape for m in maps}) > 1:  # images of several sizes: maps and masks compared at 256 x 256
        maps = [cv2.resize(m, (256, 256), interpolation=cv2.INTER_LINEAR) for m in maps]
        masks = [cv2.resize(m.astype(np.uint8), (256, 256), interpolation=cv2.INTER_NEAREST) for m in masks]
    metrics = evaluate_class([res.score for res in results], labels, np.stack(maps), np.stack(masks))
    normal = [res.is_anomalous for res, label in zip(results, labels) if not label]
    return {"image_auroc": metrics.image_auroc, "aupro": metrics.aupro, "false_positive_rate": float(np.mean(normal))}


def transformed(image: Image.Image, side: int, mixed: bool, size: tuple[int, int]) -> Image.Image:
    """A 256 px benchmark image as the scaling runs see their class: `side` x `side` (bicubic), or grey at `size`."""
    if mixed:
        return image.convert("L").convert("RGB").resize(size, Image.Resampling.BICUBIC)
    return image.resize((side, side), Image.Resampling.BICUBIC)


def random_sizes(count: int, seed: int) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in size) for size in np.random.default_rng(seed).integers(105, 633, size=(count, 2))]


def render_images(folder: Path, class_name: str, count: int, side: int, mixed: bool) -> list[Path]:
    """`count` new normal images of a built-in class as PNGs (`transformed`; rendered with seeds the benchmark's
    own images never use)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, size in enumerate(random_sizes(count, 0)):
        image = Image.fromarray(render_sample(class_name, 1000, "train", index).image)
        paths.append(folder / f"{index:04d}.png")
        transformed(image, side, mixed, size).save(paths[-1])
    return paths


def test_split(folder: Path, data: str, class_name: str, side: int, mixed: bool) -> list:
    """The class's test records of the benchmark, their images `transformed` like the training images and their
    masks resized to match (nearest)."""
    folder.mkdir(parents=True, exist_ok=True)
    records = [r for r in read_dataset(data) if r.class_name == class_name and r.split == "test"]
    moved = []
    for record, size in zip(records, random_sizes(len(records), 1)):
        path = folder / f"{len(moved):04d}.png"
        image = transformed(load_image(record.image_path), side, mixed, size)
        image.save(path)
        mask = None
        if record.mask_path is not None:
            mask = folder / f"{len(moved):04d}_mask.png"
            Image.open(record.mask_path).convert("L").resize(image.size, Image.Resampling.NEAREST).save(mask)
        moved.append(dataclasses.replace(record, image_path=path, mask_path=mask))
    return moved


def quick_phase_scaling(args) -> dict:
    """Time and peak RSS of `vlmdiff finetune --memory-only` for each of args.scaling image counts, and the
    detection of each resulting model on the class's test split."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_cli_memory import measure

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        every = render_images(Path(scratch) / "all", args.class_name, max(args.scaling), args.side, args.mixed)
        test = test_split(Path(scratch) / "test", args.data, args.class_name, args.side, args.mixed)
        for count in args.scaling:
            folder = Path(scratch) / f"images_{count}"
            folder.mkdir()
            for path in every[:count]:
                os.link(path, folder / path.name)
            out = Path(scratch) / f"model_{count}"
            load = list(os.getloadavg())
            result = measure([sys.executable, "-m", "vlmdiff", "finetune", args.model, "--images", str(folder),
                              "--class", f"{args.class_name}_new", "--memory-only", "--out", str(out)])
            record = json.loads((out / "training.json").read_text())["finetunes"][-1] if not result["exit_code"] else {}
            detection = {} if result["exit_code"] else scores_under(VLMDiffPipeline.from_pretrained(out), test,
                                                                    f"{args.class_name}_new")
            rows.append({"images": count, "load_average": load, "command_seconds": result["seconds"],
                         "quick_phase_seconds": record.get("seconds"), "peak_rss_mb": result["peak_rss_mb"],
                         "expected_fpr": record.get("expected_fpr"), "exit_code": result["exit_code"], **detection})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    images = f"{args.class_name}, grey, 105-632 px" if args.mixed else f"{args.class_name}, {args.side} x {args.side}"
    print(f"\n| images ({images}) | quick phase (s) | peak RSS (MB) | I-AUROC | AUPRO | test FPR | load average |")
    print("|---:|---:|---:|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['images']} | {row['quick_phase_seconds'] or float('nan'):.1f} | {row['peak_rss_mb']:.0f} | "
              f"{100 * row.get('image_auroc', float('nan')):.1f} | {100 * row.get('aupro', float('nan')):.1f} | "
              f"{100 * row.get('false_positive_rate', float('nan')):.1f} | "
              f"{', '.join(f'{v:.1f}' for v in row['load_average'])} |")
    return {"class": args.class_name, "side": None if args.mixed else args.side, "mixed": args.mixed,
            "threads": os.environ.get("OMP_NUM_THREADS"), "test_images": len(test), "runs": rows}


def plot_scaling(results: list[Path], out: Path) -> None:
    """Quick-phase time and peak RSS against the image count, log-log, one line per results file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axis, rss_axis) = plt.subplots(1, 2, figsize=(9, 3.6))
    for path in results:
        report = json.loads(Path(path).read_text())
        runs = [r for r in report["runs"] if not r["exit_code"]]
        label = f"{report['class']}, " + ("grey, 105-632 px" if report["mixed"] else f"{report['side']} px")
        label += f" ({Path(path).stem})"  # the file says which model (memory recipe) ran
        counts = [r["images"] for r in runs]
        time_axis.plot(counts, [r["quick_phase_seconds"] for r in runs], "o-", label=label)
        rss_axis.plot(counts, [r["peak_rss_mb"] / 1024 for r in runs], "o-", label=label)
    first = min(r["images"] for path in results for r in json.loads(Path(path).read_text())["runs"])
    last = max(r["images"] for path in results for r in json.loads(Path(path).read_text())["runs"])
    start = json.loads(Path(results[0]).read_text())["runs"][0]["quick_phase_seconds"]
    time_axis.plot([first, last], [start, start * last / first], "k:", label="linear in the images")
    ticks = sorted({r["images"] for path in results for r in json.loads(Path(path).read_text())["runs"]})
    for axis, title in ((time_axis, "quick phase (s), log-log"), (rss_axis, "peak RSS (GB)")):
        axis.set_xscale("log")
        axis.set_xticks(ticks, [str(t) for t in ticks])
        axis.minorticks_off()
        axis.set_xlabel("normal images")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    time_axis.set_yscale("log")
    rss_axis.set_ylim(0, 1.6)
    rss_axis.axhline(1.5, color="k", linestyle=":", label="target 1.5 GB")
    rss_axis.legend(fontsize=8)
    time_axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "vlmdiff-default"))
    parser.add_argument("--data", default=str(ROOT / "runs" / "bench_demo"))
    parser.add_argument("--class-name", default="screw", help="the benchmark class to add under a new name")
    parser.add_argument("--images", type=int, default=50, help="normal training images of the new class")
    parser.add_argument("--steps", type=int, default=0, help="diffusion fine-tune steps after the quick phase")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--scaling", type=int, nargs="+", help="time the quick phase (CLI) on these image counts")
    parser.add_argument("--side", type=int, default=1024, help="with --scaling: side of the rendered images")
    parser.add_argument("--mixed", action="store_true", help="with --scaling: grey images of random sizes 105-632 px")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "finetune.json"))
    parser.add_argument("--plot", nargs="+", metavar="RESULTS", help="draw --out (a .png) from --scaling results files")
    args = parser.parse_args(argv)
    if args.plot:
        plot_scaling(args.plot, Path(args.out))
        return 0
    torch.set_num_threads(args.threads)
    if args.scaling:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        report = quick_phase_scaling(args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        return 0
    records = [r for r in read_dataset(args.data) if r.class_name == args.class_name]
    train = [r.image_path for r in records if r.split == "train" and not r.is_anomalous][: args.images]
    test = [r for r in records if r.split == "test"]
    new_name = f"{args.class_name}_new"
    report = {"class": args.class_name, "images": len(train), "load_average": list(__import__("os").getloadavg())}
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "model"
        started = time.perf_counter()
        finetune(args.model, train, new_name, out, FinetuneConfig(steps=0))
        report["quick_phase_seconds"] = time.perf_counter() - started
        if args.steps:
            started = time.perf_counter()
            finetune(out, train, new_name, None, FinetuneConfig(steps=args.steps))
            report["diffusion_phase_seconds"] = time.perf_counter() - started
        pipe = VLMDiffPipeline.from_pretrained(out)
        report["fine-tuned"] = scores_under(pipe, test, new_name)
        report["trained with the model"] = scores_under(pipe, test, args.class_name)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
