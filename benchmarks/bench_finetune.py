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
PNGs, or with --mixed resized to random sizes of 105-632 px and made grey (issue 19's textures):

    python benchmarks/bench_finetune.py --scaling 50 200 800 --side 1024 --out benchmarks/results/finetune_scaling.json
    python benchmarks/bench_finetune.py --scaling 150 --mixed --class-name gravel --out benchmarks/results/finetune_mixed.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

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
    masks = np.stack([load_mask(r.mask_path, res.anomaly_map.shape) for r, res in zip(test, results)])
    metrics = evaluate_class([res.score for res in results], labels, np.stack([res.anomaly_map for res in results]), masks)
    normal = [res.is_anomalous for res, label in zip(results, labels) if not label]
    return {"image_auroc": metrics.image_auroc, "aupro": metrics.aupro, "false_positive_rate": float(np.mean(normal))}


def render_images(folder: Path, class_name: str, count: int, side: int, mixed: bool) -> list[Path]:
    """`count` new normal images of a built-in class as PNGs: side x side (bicubic from 256 px), or with
    `mixed` grey at random sizes of 105-632 px per side."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = np.random.default_rng(0).integers(105, 633, size=(count, 2))
    paths = []
    for index in range(count):
        image = Image.fromarray(render_sample(class_name, 1000, "train", index).image)
        if mixed:
            image = image.convert("L").convert("RGB").resize(tuple(int(v) for v in sizes[index]), Image.Resampling.BICUBIC)
        else:
            image = image.resize((side, side), Image.Resampling.BICUBIC)
        paths.append(folder / f"{index:04d}.png")
        image.save(paths[-1])
    return paths


def quick_phase_scaling(args) -> dict:
    """Time and peak RSS of `vlmdiff finetune --memory-only` for each of args.scaling image counts."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_cli_memory import measure

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        every = render_images(Path(scratch) / "all", args.class_name, max(args.scaling), args.side, args.mixed)
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
            rows.append({"images": count, "load_average": load, "command_seconds": result["seconds"],
                         "quick_phase_seconds": record.get("seconds"), "peak_rss_mb": result["peak_rss_mb"],
                         "expected_fpr": record.get("expected_fpr"), "exit_code": result["exit_code"]})
            print(json.dumps(rows[-1]), flush=True)
    images = f"{args.class_name}, grey, 105-632 px" if args.mixed else f"{args.class_name}, {args.side} x {args.side}"
    print(f"\n| images ({images}) | quick phase (s) | command (s) | peak RSS (MB) | load average |")
    print("|---:|---:|---:|---:|---|")
    for row in rows:
        print(f"| {row['images']} | {row['quick_phase_seconds'] or float('nan'):.1f} | {row['command_seconds']:.1f} | "
              f"{row['peak_rss_mb']:.0f} | {', '.join(f'{v:.1f}' for v in row['load_average'])} |")
    return {"class": args.class_name, "side": None if args.mixed else args.side, "mixed": args.mixed,
            "threads": os.environ.get("OMP_NUM_THREADS"), "runs": rows}


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
    args = parser.parse_args(argv)
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
