"""Does the whole-image reconstruction keep the input's colours? Per class, over its normal test images:
each channel's mean difference between the input and the reconstruction (0-255), and the per-pixel mean
absolute difference per channel (colour and texture together).

    python benchmarks/bench_reconstruction_colour.py --data runs/bench_demo --classes textile grass
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from vlmdiff import VLMDiffPipeline
from vlmdiff.data import read_dataset
from vlmdiff.images import load_image

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="assets/vlmdiff-default", help="run from the checkout root")
    parser.add_argument("--data", default="runs/bench_demo")
    parser.add_argument("--classes", nargs="+", default=["textile", "grass"])
    parser.add_argument("--strength", type=float, help="default: the model's")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reconstruction_colour.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    pipe = VLMDiffPipeline.from_pretrained(args.model)
    records = read_dataset(args.data)
    report = {"model": args.model, "strength": args.strength or pipe.config.strength, "classes": {}}
    for name in args.classes:
        images = [load_image(r.image_path) for r in records
                  if r.class_name == name and r.split == "test" and not r.is_anomalous]
        results = pipe(images, strength=args.strength, class_names=name, memory_guidance=0.0)
        mean_differences, pixel_differences = [], []
        for image, result in zip(images, results):
            source = np.asarray(image.convert("RGB"), np.float32)
            rebuilt = np.asarray(result.reconstruction.convert("RGB").resize(image.size), np.float32)
            mean_differences.append(np.abs(source.mean((0, 1)) - rebuilt.mean((0, 1))))
            pixel_differences.append(np.abs(source - rebuilt).mean((0, 1)))
        report["classes"][name] = {"images": len(images),
                                   "channel_mean_difference": [round(float(v), 2) for v in np.mean(mean_differences, 0)],
                                   "pixel_difference": [round(float(v), 1) for v in np.mean(pixel_differences, 0)]}
        print(f"{name}: {len(images)} normal images, channel means differ by {report['classes'][name]['channel_mean_difference']}, "
              f"per-pixel difference {report['classes'][name]['pixel_difference']} (RGB, 0-255)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
