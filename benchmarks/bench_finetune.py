"""A new class from its normal images: how long until it is usable, and how well it then detects.

Fine-tunes the model (default: the shipped one) on --images normal training images of one class
of the built-in benchmark under a new name, first the quick phase (memory + threshold), then,
with --steps N, the diffusion phase, and times each (`vlmdiff.training.finetune.finetune`, the
same call as `vlmdiff finetune`). Then it scores the class's test images under the new name and
under the class the model already has (trained on all its training images with the model):
I-AUROC / AUPRO of both, and the false-positive rate of the new class on its normal test images.

    python benchmarks/bench_finetune.py --data runs/bench_demo --class-name screw --images 50 [--steps 100]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vlmdiff import VLMDiffPipeline
from vlmdiff.data import read_dataset
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "vlmdiff-default"))
    parser.add_argument("--data", default=str(ROOT / "runs" / "bench_demo"))
    parser.add_argument("--class-name", default="screw", help="the benchmark class to add under a new name")
    parser.add_argument("--images", type=int, default=50, help="normal training images of the new class")
    parser.add_argument("--steps", type=int, default=0, help="diffusion fine-tune steps after the quick phase")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "finetune.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
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
