"""Per-class fusion: does the weight chosen from synthetic anomalies agree with the one real defects would pick?

For each class the model knows: `vlmdiff.training.fusion.choose_fusion` picks the reconstruction weight
from the class's normal training images and synthetic anomalies made from them (no real defect seen);
then the class's test split is scored under every weight of FUSION_WEIGHTS (the reconstruction whole
at the model's strength, as a fused class is reconstructed) and the weight real defects favour is
picked by the same rule. Prints both, with the I-AUROC / AUPRO of every weight, and writes JSON.

    python benchmarks/bench_fusion_choice.py --data runs/bench_demo [--tire ../shared/data/mvtec3d_tire]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vlmdiff import VLMDiffPipeline
from vlmdiff.data import read_dataset
from vlmdiff.data.synthetic import AREA
from vlmdiff.map_variants import evaluate_map_variants
from vlmdiff.scoring import MEMORY, RECONSTRUCTION
from vlmdiff.training.data import TrainingSet
from vlmdiff.training.fusion import FUSION_WEIGHTS, MIN_GAIN, choose_fusion, pick_weight

ROOT = Path(__file__).resolve().parents[1]


def measure(model: str, root: str, class_name: str, area: tuple[float, float]) -> dict:
    records = [r for r in read_dataset(root) if r.class_name == class_name]
    train = [r.image_path for r in records if r.split == "train" and not r.is_anomalous]
    pipe = VLMDiffPipeline.from_pretrained(model)
    started = time.perf_counter()
    choice = choose_fusion(pipe, TrainingSet.of_sources(train, class_name), class_name, area=area)
    seconds = time.perf_counter() - started
    pipe.config.memory_guidance = 0.0  # a fused class is reconstructed whole
    variants = {str(w): {MEMORY: 1.0, RECONSTRUCTION: w} for w in FUSION_WEIGHTS}
    report = evaluate_map_variants(pipe, records, variants, progress=False)
    test = {float(w): report.metrics[w][class_name] for w in variants}
    real_auroc = {w: m.image_auroc for w, m in test.items()}
    return {
        "class": class_name, "train_images": len(train), "synthetic_auroc": choice.auroc,
        "synthetic_aupro": choice.aupro, "chosen": choice.weight,
        "real_auroc": real_auroc, "real_aupro": {w: m.aupro for w, m in test.items()},
        "real_choice": pick_weight(real_auroc, {w: m.aupro for w, m in test.items()}), "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "vlmdiff-default"))
    parser.add_argument("--data", default=str(ROOT / "runs" / "bench_demo"))
    parser.add_argument("--classes", nargs="*", help="default: every class of --data")
    parser.add_argument("--tire", help="an MVTec 3D-AD tire folder, measured too")
    parser.add_argument("--area", type=lambda text: tuple(float(v) for v in text.split(",")), default=AREA,
                        help="share of the image a synthetic anomaly's region covers: LOW,HIGH")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fusion_choice.json"))
    args = parser.parse_args(argv)
    classes = args.classes or sorted({r.class_name for r in read_dataset(args.data)})
    jobs = [(args.data, name) for name in classes] + ([(args.tire, "mvtec3d_tire")] if args.tire else [])
    rows = []
    for root, name in jobs:
        rows.append(measure(args.model, root, name, args.area))
        print(json.dumps(rows[-1]), flush=True)
    weights = " / ".join(f"{w:g}" for w in FUSION_WEIGHTS)
    print(f"\n| class | synthetic I-AUROC / AUPRO at w = {weights} | chosen | real (test) I-AUROC / AUPRO at w = "
          f"{weights} | real choice | s |\n|---|---|---:|---|---:|---:|")
    for row in rows:
        synthetic, real = (" ; ".join(f"{100 * row[kind + '_auroc'][w]:.1f} / {100 * row[kind + '_aupro'][w]:.1f}"
                                      for w in FUSION_WEIGHTS) for kind in ("synthetic", "real"))
        print(f"| {row['class']} | {synthetic} | {row['chosen']:g} | {real} | {row['real_choice']:g} | "
              f"{row['seconds']:.0f} |")
    agree = sum(row["chosen"] == row["real_choice"] for row in rows)
    print(f"\nThe synthetic choice agrees with the real one on {agree} of {len(rows)} classes.")
    Path(args.out).write_text(json.dumps({"min_gain": MIN_GAIN, "area": args.area, "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
