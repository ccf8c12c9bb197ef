"""Choose the normal-feature memory's recipe on TUNE classes and report it on VALIDATION classes.

A recipe is the memory's backbone blocks, working resolution (long side, aspect kept), coreset
ratio (exactly that fraction of a class's patches, or with `--sizing memory` the memory's own
rule: that fraction between MIN_CORESET and MAX_CORESET rows) and the image score (the plain max of the blurred map, or the max after repeated average
pooling). For every recipe, each class gets its own memory from its train/good images and its
test images are scored; the table gives I-AUROC and AUPRO per class and the means over the tune
classes (`vlmdiff.data.demo.TUNE_CLASSES`, plus the real tire data when present) and over the
validation classes (`VALIDATION_CLASSES`), which no choice may look at. The first recipe row is
the same-backbone PatchCore reference (blocks 4 + 10, 256 px, 1% coreset, max of the blurred map).

    vlmdiff make-demo-data runs/bench_demo --seed 0
    python benchmarks/tune_memory.py --data runs/bench_demo --layers 4,10 2,4,10 --long-sides 256 320
    python benchmarks/tune_memory.py --layers 4,10 --long-sides 384 --ratios 0.03 --scores pool8x2 --sizing memory
"""
from __future__ import annotations

import argparse
import itertools
import math
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlmdiff.anomaly import gaussian_blur, image_scores, scaled_sigma
from vlmdiff.data import read_dataset
from vlmdiff.data.demo import TUNE_CLASSES, VALIDATION_CLASSES
from vlmdiff.evaluation import load_mask
from vlmdiff.features import EFFICIENTNET_LITE0_BLOCKS
from vlmdiff.images import load_image
from vlmdiff.memory import NormalFeatureMemory
from vlmdiff.metrics import evaluate_class

ROOT = Path(__file__).resolve().parents[1]
TIRE = Path("/work/shared/data/mvtec3d_tire")
MAP_SIDE = 256  # maps and masks are compared at this long side
BLUR_SIGMA = 4.0  # at 256 px
SCORES = {"max": (1, 0), "pool4": (4, 1), "pool8x2": (8, 2)}  # image score -> (pool size, repeats)


@dataclass(frozen=True)
class Recipe:
    layers: tuple[int, ...]
    long_side: int
    coreset_ratio: float
    score: str
    rotations: int = 1  # the memory also holds the train images turned by multiples of 360 / rotations degrees

    @property
    def name(self) -> str:
        turns = f", x{self.rotations} turns" if self.rotations > 1 else ""
        return f"blocks {'+'.join(map(str, self.layers))}, {self.long_side} px, {self.coreset_ratio:.0%}, {self.score}{turns}"


def memory_for(layers: tuple[int, ...], long_side: int, rotations: int) -> NormalFeatureMemory:
    channels = sum(EFFICIENTNET_LITE0_BLOCKS[layer][0] for layer in layers)
    return NormalFeatureMemory(layers=layers, feature_channels=channels, long_side=long_side, rotations=rotations)


def load_class(records, name: str, max_train: int | None):
    train = [r for r in records if r.class_name == name and r.split == "train" and not r.is_anomalous][:max_train]
    test = [r for r in records if r.class_name == name and r.split == "test"]
    return [load_image(r.image_path) for r in train], test


def map_size(width: int, height: int) -> tuple[int, int]:
    scale = MAP_SIDE / max(width, height)
    return round(height * scale), round(width * scale)


def evaluate_recipes(memory: NormalFeatureMemory, train_features, test_images, test, ratios, scores, sizing="ratio"):
    """{(ratio, score): ClassMetrics} for one class and one feature setting."""
    test_features = [memory.embed(image) for image in test_images]
    size = map_size(*test_images[0].size)
    masks = np.stack([load_mask(r.mask_path, test_images[0].size[::-1]) for r in test])
    masks = np.asarray(F.interpolate(torch.from_numpy(masks[:, None]).float(), size=size, mode="nearest")[:, 0] > 0.5)
    labels = [int(r.is_anomalous) for r in test]
    results, sizes = {}, []
    for ratio in ratios:
        patches = sum(f[0].numel() for f in train_features)
        if sizing == "memory":  # the memory's own rule: the ratio between MIN_CORESET and MAX_CORESET
            fitted = NormalFeatureMemory(**{**memory.config, "coreset_ratio": ratio}).with_features(train_features, "c")
        else:
            fitted = memory.with_features(train_features, "c", vectors=max(1, math.ceil(ratio * patches)))
        sizes.append(len(fitted.bank))
        raw = torch.stack([fitted.distance_map(f, "c") for f in test_features])
        maps = gaussian_blur(F.interpolate(raw[:, None], size=size, mode="bilinear", align_corners=False)[:, 0],
                             scaled_sigma(BLUR_SIGMA, max(size)))
        for score in scores:
            values = image_scores(maps, *SCORES[score]).numpy()
            results[(ratio, score)] = evaluate_class(values, labels, maps.numpy(), masks)
    print(f"  coreset rows {sizes}", file=sys.stderr)
    return results


def print_table(rows: dict, tune: list[str]) -> None:
    """One Markdown row per recipe (I-AUROC / AUPRO per class and the two means), best tune mean first."""
    present = next(iter(rows.values()))
    tune = [c for c in tune if c in present]
    validation = [c for c in VALIDATION_CLASSES if c in present]
    names = tune + validation
    mean = lambda row, group, key: float(np.mean([row[c][key] for c in group])) if group else float("nan")  # noqa: E731
    print("| recipe | " + " | ".join(names) + " | tune mean | validation mean |")
    print("|---" * (len(names) + 3) + "|")
    for recipe, row in sorted(rows.items(), key=lambda item: -mean(item[1], tune, "image_auroc")):
        cells = [f"{100 * row[c]['image_auroc']:.1f} / {100 * row[c]['aupro']:.1f}" for c in names]
        cells += [f"{100 * mean(row, group, 'image_auroc'):.1f} / {100 * mean(row, group, 'aupro'):.1f}"
                  for group in (tune, validation)]
        print(f"| {recipe.name} | " + " | ".join(cells) + " |")
    print(flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "runs" / "bench_demo"), help="built-in benchmark folder")
    parser.add_argument("--tire", default=str(TIRE), help="MVTec 3D-AD tire folder (skipped if absent)")
    parser.add_argument("--layers", nargs="+", default=["4,10", "2,4,10"], help="block sets, e.g. 4,10 3,4,10")
    parser.add_argument("--long-sides", nargs="+", type=int, default=[256, 384])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.01, 0.03])
    parser.add_argument("--scores", nargs="+", default=list(SCORES), choices=list(SCORES))
    parser.add_argument("--rotations", nargs="+", type=int, default=[1], choices=[1, 2, 4],
                        help="memory of the train images turned by multiples of 360 / N degrees")
    parser.add_argument("--classes", nargs="+", help="only these classes (default: all)")
    parser.add_argument("--max-train", type=int, default=60, help="train images per class (tire has 210)")
    parser.add_argument("--sizing", choices=["ratio", "memory"], default="ratio",
                        help="coreset rows: exactly the ratio of the patches, or the memory's rule (ratio within bounds)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tune_memory.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    records = read_dataset(args.data)
    present = {r.class_name for r in records}  # the logical classes are generated apart (make-demo-data --logical)
    classes = {name: (records, name) for name in TUNE_CLASSES + VALIDATION_CLASSES if name in present}
    if Path(args.tire).is_dir() and (not args.classes or "tire" in args.classes):
        tire = read_dataset(args.tire)
        classes["tire"] = (tire, tire[0].class_name)
    classes = {name: value for name, value in classes.items() if not args.classes or name in args.classes}
    loaded = {name: load_class(recs, cls, args.max_train) for name, (recs, cls) in classes.items()}
    test_images = {name: [load_image(r.image_path) for r in test] for name, (_, test) in loaded.items()}

    rows: dict[Recipe, dict[str, dict]] = {}
    load_average = list(os.getloadavg())
    for layers_text, long_side, rotations in itertools.product(args.layers, args.long_sides, args.rotations):
        layers = tuple(int(v) for v in layers_text.split(","))
        memory = memory_for(layers, long_side, rotations)
        started = time.perf_counter()
        for name, (train_images, test) in loaded.items():
            train_features = [f for image in train_images for f in memory.training_features(image)]
            results = evaluate_recipes(memory, train_features, test_images[name], test, args.ratios, args.scores,
                                       args.sizing)
            for (ratio, score), metrics in results.items():
                rows.setdefault(Recipe(layers, long_side, ratio, score, rotations), {})[name] = {
                    "image_auroc": metrics.image_auroc, "aupro": metrics.aupro}
        print(f"blocks {layers_text} at {long_side} px, x{rotations}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
        print_table(rows, list(TUNE_CLASSES) + (["tire"] if "tire" in loaded else []))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        run = {"sizing": args.sizing, "max_train": args.max_train, "load_average": load_average}
        Path(args.out).write_text(json.dumps([{**asdict(r), **run, "classes": row} for r, row in rows.items()], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
