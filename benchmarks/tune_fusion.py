"""Choose a model's denoising strength and fusion weights on a VALIDATION dataset (not the test data).

For each strength and memory-guidance threshold: the map scales are refitted on the validation
set's normal training images (what calibration does), then the test split of the validation set
is scored once per image (`vlmdiff.map_variants`) under every weighting: the memory alone, the
reconstruction alone, and memory + w x reconstruction. Prints one table (mean over classes:
I-AUROC, AUPRO, defect removal, normal PSNR / SSIM) and writes JSON. The chosen setting is then
written into the model by hand and reported on other data by bench_quality.py.

    vlmdiff make-demo-data runs/demo_val9 --seed 1 --n-train 8 --n-test-good 10 --n-defective 15
    python benchmarks/tune_fusion.py --model assets/vlmdiff-default --data runs/demo_val9 --strengths 0.7 \
        --memory-guidance 0,0.8,1,1.5
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from vlmdiff import VLMDiffPipeline
from vlmdiff.data import read_dataset
from vlmdiff.map_variants import evaluate_map_variants
from vlmdiff.metrics import mean_over_classes
from vlmdiff.scoring import MEMORY, RECONSTRUCTION, computable_maps, fit_scales
from vlmdiff.training.calibration import held_out_components
from vlmdiff.training.data import load_training_set


def variants(fusion_weights: list[float]) -> dict[str, dict[str, float]]:
    named = {"memory": {MEMORY: 1.0, RECONSTRUCTION: 0.0}, "reconstruction": {MEMORY: 0.0, RECONSTRUCTION: 1.0}}
    named.update({f"memory + {w:g} x reconstruction": {MEMORY: 1.0, RECONSTRUCTION: w} for w in fusion_weights})
    return named


def _floats(text: str) -> list[float]:
    return [float(value) for value in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="validation dataset (train/good and test)")
    parser.add_argument("--strengths", default="0.2,0.3,0.5")
    parser.add_argument("--memory-guidance", default="0",
                        help="memory-guidance thresholds (in memory scales) to try; 0: off")
    parser.add_argument("--weights", default="0.25,0.5,1", help="reconstruction weights fused with the memory")
    parser.add_argument("--max-images", type=int, help="test images per class")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--captions", action="store_true",
                        help="condition the reconstructions on the captioner's description of each test image")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/tune_fusion.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    pipe = VLMDiffPipeline.from_pretrained(args.model)
    records = read_dataset(args.data)
    train = [r for r in records if r.split == "train" and not r.is_anomalous]
    test = [r for r in records if r.split == "test"]
    if args.max_images:
        test = [r for name in sorted({r.class_name for r in test})
                for r in [t for t in test if t.class_name == name][: args.max_images]]
    normals = load_training_set([r.image_path for r in train], [r.class_name for r in train], [""] * len(train),
                                pipe.config.resolution)
    table = {}
    model_scales = dict(pipe.config.anomaly.scales)
    for strength, guidance in itertools.product(_floats(args.strengths), _floats(args.memory_guidance)):
        pipe.config.strength, pipe.config.memory_guidance = strength, guidance
        pipe.config.anomaly.scales = dict(model_scales)  # every setting starts from the model's (guidance uses them)
        rows = held_out_components(pipe, normals, list(range(len(normals))), seed=0, maps=computable_maps(pipe))
        pipe.config.anomaly.scales = fit_scales([parts for parts, _, _ in rows])
        report = evaluate_map_variants(pipe, test, variants(_floats(args.weights)), progress=True,
                                       caption_images=args.captions)
        reconstruction = {key: float(np.nanmean([c[key] for c in report.reconstruction.values()]))
                          for key in ("defect_removal", "normal_psnr", "normal_ssim")}
        for name, per_class in report.metrics.items():
            mean = mean_over_classes(per_class)
            table[(strength, guidance, name)] = {"image_auroc": mean.image_auroc, "aupro": mean.aupro, **reconstruction,
                                                 "scales": dict(pipe.config.anomaly.scales)}
    print("| strength | memory guidance | map | I-AUROC | AUPRO | defect removal | normal PSNR | normal SSIM |\n"
          "|---:|---:|---|---:|---:|---:|---:|---:|")
    for (strength, guidance, name), row in table.items():
        print(f"| {strength:g} | {guidance:g} | {name} | {100 * row['image_auroc']:.1f} | {100 * row['aupro']:.1f} | "
              f"{row['defect_removal']:.3f} | {row['normal_psnr']:.1f} | {row['normal_ssim']:.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({f"{s:g} / {g:g} / {n}": {k: (None if isinstance(v, float) and math.isnan(v) else v)
                                                               for k, v in row.items()} for (s, g, n), row in table.items()},
                                   indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
