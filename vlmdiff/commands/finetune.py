"""`vlmdiff finetune`: adapt a model to new normal images of one class, writing a new model folder."""
from __future__ import annotations

import argparse
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("finetune", help="fine-tune a model on normal images of one class")
    parser.add_argument("model", help="model folder to start from (left untouched unless --out is the same)")
    parser.add_argument("--images", required=True, help="folder of normal images of the class")
    parser.add_argument("--class", dest="class_name", required=True, help="class name (new or known)")
    parser.add_argument("--out", help="new model folder (default: replace MODEL atomically)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlmdiff.training.finetune import FinetuneConfig, finetune

    folder = Path(args.images)
    if not folder.is_dir():
        raise FileNotFoundError(f"no image folder at {folder}")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    config = FinetuneConfig(steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    summary = finetune(args.model, images, args.class_name, args.out, config)
    print(
        f"fine-tuned class {summary.class_name!r} on {summary.images_used} images, {summary.steps} steps in "
        f"{summary.seconds:.0f} s; threshold {summary.threshold:.4f}; model written to {summary.output_dir}"
    )
    return 0
