"""Out-of-fold thresholds with each fold's coreset continued from the class's own (the shipped way) against
one selected afresh per fold: quick-phase time, threshold, expected and measured false-positive rate.

Each class's normal training images are added to the model (default: the shipped one) under a new name
as the quick phase does (`memorise_and_score_out_of_fold` + `fit_thresholds`), then its normal test
images are judged with the new threshold.

    python benchmarks/bench_fold_coresets.py --classes screw gravel circuit spring [--tire ../shared/data/mvtec3d_tire]
"""
from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from vlmdiff import VLMDiffPipeline
from vlmdiff.data import read_dataset
from vlmdiff.images import load_image
from vlmdiff.memory import Coreset
from vlmdiff.thresholds import DEFAULT_QUANTILE
from vlmdiff.training.calibration import fit_thresholds, memorise_and_score_out_of_fold
from vlmdiff.training.data import TrainingSet

ROOT = Path(__file__).resolve().parents[1]
NEW = "new"


def quick_phase(model: str, root: str, class_name: str, continued: bool) -> dict:
    records = [r for r in read_dataset(root) if r.class_name == class_name]
    train = [r.image_path for r in records if r.split == "train" and not r.is_anomalous]
    normals = [r for r in records if r.split == "test" and not r.is_anomalous]
    pipe = VLMDiffPipeline.from_pretrained(model)
    afresh = mock.patch.object(Coreset, "restricted", lambda self, places: None)  # no start: each fold anew
    with nullcontext() if continued else afresh:
        started = time.perf_counter()
        rows = memorise_and_score_out_of_fold(pipe, TrainingSet.of_sources(train, NEW), {NEW}, 5, 0)
        fit_thresholds(pipe, rows, DEFAULT_QUANTILE)
        seconds = time.perf_counter() - started
    threshold = pipe.thresholds.get(NEW)
    with torch.inference_mode():
        flags = [pipe(load_image(r.image_path), class_names=NEW, return_reconstruction=False)[0].is_anomalous
                 for r in normals]
    return {"class": class_name, "folds": "continued" if continued else "afresh", "images": len(train),
            "seconds": seconds, "threshold": threshold.value, "expected_fpr": threshold.expected_fpr,
            "test_fpr": float(np.mean(flags)), "normal_test_images": len(normals)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "vlmdiff-default"))
    parser.add_argument("--data", default=str(ROOT / "runs" / "bench_demo"))
    parser.add_argument("--classes", nargs="+", default=["screw", "gravel", "circuit", "spring"])
    parser.add_argument("--tire", help="an MVTec 3D-AD tire folder, measured too")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fold_coresets.json"))
    args = parser.parse_args(argv)
    jobs = [(args.data, name) for name in args.classes] + ([(args.tire, "mvtec3d_tire")] if args.tire else [])
    rows = []
    for root, name in jobs:
        for continued in (False, True):
            rows.append(quick_phase(args.model, root, name, continued))
            print(json.dumps(rows[-1]), flush=True)
    print("\n| class | images | folds | seconds | threshold | test FPR |\n|---|---:|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['class']} | {row['images']} | {row['folds']} | {row['seconds']:.1f} | {row['threshold']:.4f} | "
              f"{row['test_fpr']:.2f} ({row['normal_test_images']}) |")
    Path(args.out).write_text(json.dumps({"threads": torch.get_num_threads(), "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
