"""`vlmdiff finetune`: adapt a model to new normal images of one class, writing a new model folder."""
from __future__ import annotations

import argparse
from pathlib import Path

from vlmdiff.commands.options import add_config_options, config_from_args
from vlmdiff.training.finetune import FinetuneConfig


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("finetune", help="fine-tune a model on normal images of one class")
    parser.add_argument("model", help="model folder (or hub id) to start from; left untouched unless --out names it")
    parser.add_argument("--images", required=True, help="folder of normal images of the class")
    parser.add_argument("--class", dest="class_name", required=True, help="class name (new or known)")
    parser.add_argument("--out", help="new or empty folder, or a model folder with --overwrite (its other files are "
                        "kept); neither holding MODEL nor inside it (default: MODEL's folder in the user model store)")
    parser.add_argument("--overwrite", action="store_true", help="replace the model already in --out (--out MODEL: "
                        "in place)")
    add_config_options(parser, FinetuneConfig, {
        "steps": ("--steps", "diffusion training steps (0: the quick phase only)"),
        "batch_size": ("--batch-size", "images per step"),
        "seed": ("--seed", "random seed"),
    })
    parser.add_argument("--no-fusion", dest="fusion", action="store_false",
                        help="keep the class's score the memory's alone (default: after the diffusion phase, its "
                        "reconstruction weight is chosen from synthetic anomalies of its images)")
    parser.add_argument("--memory-only", action="store_true",
                        help="the quick phase only (same as --steps 0): memory and threshold in seconds, "
                        "the model's generic reconstruction")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlmdiff.data.validation import list_images
    from vlmdiff.model_folder import store_output_folder
    from vlmdiff.progress import ConsoleProgress
    from vlmdiff.training.finetune import finetune

    folder = Path(args.images)
    if not folder.is_dir():
        raise FileNotFoundError(f"no image folder at {folder}")
    config = config_from_args(FinetuneConfig, args, **({"steps": 0} if args.memory_only else {}))
    out = args.out or store_output_folder(args.model)
    progress = ConsoleProgress()
    try:
        summary = finetune(args.model, list_images(folder), args.class_name, out, config, progress, args.overwrite)
    finally:
        progress.close()
    diffusion = f"{summary.steps} diffusion steps" if summary.steps else "memory only (generic reconstruction)"
    if summary.steps and config.fusion:
        diffusion += (f", score = memory + {summary.reconstruction_weight:g} x reconstruction"
                      if summary.reconstruction_weight else ", score = the memory's (its reconstruction adds nothing)")
    where = "" if args.out else " (the user model store; --out DIR writes elsewhere)"
    print(
        f"fine-tuned class {summary.class_name!r} on {summary.images_used} images, {diffusion}, in "
        f"{summary.seconds:.0f} s; threshold {summary.threshold:.4f} (expected false-positive rate "
        f"{summary.expected_fpr:.1%}); model written to {summary.output_dir}{where}"
    )
    return 0
