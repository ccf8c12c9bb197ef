"""How well `auto` finds an image's class, and how often it says "unknown class" for an image of none.

The memory (the default recipe, or --model's) is fitted on the train/good images of every class
of the built-in benchmark and the tire data; then
- every test image (normal and defective) of a known class is matched: the share given the right
  class, the share called unknown (should be 0), and the distance (in class radii) quantiles;
- leave one class out: the memory is fitted without class X and X's test images are matched: the
  share called unknown (should be 1);
- photos that belong to no class (scikit-image's sample photos and a grey ramp) are matched.

    python benchmarks/bench_class_match.py --data runs/bench_demo
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlmdiff.data import read_dataset
from vlmdiff.images import load_image
from vlmdiff.memory import UNKNOWN_CLASS_DISTANCE, NormalFeatureMemory

ROOT = Path(__file__).resolve().parents[1]
TIRE = Path("/work/shared/data/mvtec3d_tire")
FOREIGN_PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket", "hubble_deep_field", "moon", "page")
VECTORS = 50  # only the class means and radii matter here


def foreign_images() -> dict[str, Image.Image]:
    import skimage.data

    images = {name: Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in FOREIGN_PHOTOS}
    ramp = np.tile(np.linspace(0, 255, 512), (512, 1)).astype(np.uint8)
    images["grey_ramp"] = Image.fromarray(ramp).convert("RGB")
    return images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "runs" / "bench_demo"))
    parser.add_argument("--tire", default=str(TIRE))
    parser.add_argument("--max-train", type=int, default=30, help="train images per class")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    records = read_dataset(args.data) + (read_dataset(args.tire) if Path(args.tire).is_dir() else [])
    memory = NormalFeatureMemory()
    classes = sorted({r.class_name for r in records})
    train, test = {}, {}
    for name in classes:
        train[name] = [f for r in [r for r in records if r.class_name == name and r.split == "train"
                                   and not r.is_anomalous][: args.max_train]
                       for f in memory.training_features(load_image(r.image_path))]
        test[name] = [memory.embed(load_image(r.image_path)) for r in records if r.class_name == name and r.split == "test"]
        print(f"embedded {name}", file=sys.stderr)
    fitted = memory
    for name in classes:
        fitted = fitted.with_features(train[name], name, VECTORS)
    print(f"unknown beyond {UNKNOWN_CLASS_DISTANCE} class radii\n")
    print("| class | right class | called unknown | distance p50 / p95 / max | left out: called unknown | left out: distance min |")
    print("|---|---|---|---|---|---|")
    for name in classes:
        matches = [fitted.match_class(f) for f in test[name]]
        distances = np.array([m.distance for m in matches])
        right = np.mean([m.name == name for m in matches])
        unknown = np.mean([not m.known for m in matches])
        without = memory
        for other in classes:
            if other != name:
                without = without.with_features(train[other], other, VECTORS)
        left_out = [without.match_class(f) for f in test[name]]
        print(f"| {name} | {right:.0%} | {unknown:.0%} | {np.percentile(distances, 50):.2f} / "
              f"{np.percentile(distances, 95):.2f} / {distances.max():.2f} | "
              f"{np.mean([not m.known for m in left_out]):.0%} | {min(m.distance for m in left_out):.2f} |")
    print("\n| photo of no class | nearest | distance | called unknown |\n|---|---|---|---|")
    for name, image in foreign_images().items():
        match = fitted.match_class(memory.embed(image))
        print(f"| {name} | {match.name} | {match.distance:.2f} | {'yes' if not match.known else 'no'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
