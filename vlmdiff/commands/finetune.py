"""`vlmdiff finetune`: adapt a model to new normal images of one class, writing a new model folder."""
from __future__ import annotations

import argparse
from pathlib import Path

from vlmdiff.commands.options import add_config_options, config_from_args
from vlmdiff.training.finetune import FinetuneConfig


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("finetune", help="fine-tune a model on normal images of one class")
    parser.add_argument("model", help="model folder to start from (left untouched unless --out is the same)")
    parser.add_argument("--images", required=True, help="folder of normal images of the class")
    parser.add_argument("--class", dest="class_name", required=True, help="class name (new or known)")
    parser.add_argument("--out", help="new model folder (default: replace MODEL atomically)")
    add_config_options(parser, FinetuneConfig, {
        "steps": ("--steps", "diffusion training steps"),
        "batch_size": ("--batch-size", "images per step"),
        "seed": ("--seed", "random seed"),
    })
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlmdiff.data.validation import list_images
    from vlmdiff.training.finetune import finetune

    folder = Path(args.images)
    if not folder.is_dir():
        raise FileNotFoundError(f"no image folder at {folder}")
    summary = finetune(args.model, list_images(folder), args.class_name, args.out, config_from_args(FinetuneConfig, args))
    print(
        f"fine-tuned class {summary.class_name!r} on {summary.images_used} images, {summary.steps} steps in "
        f"{summary.seconds:.0f} s; threshold {summary.threshold:.4f}; model written to {summary.output_dir}"
    )
    return 0
