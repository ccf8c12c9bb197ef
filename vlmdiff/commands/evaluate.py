"""`vlmdiff evaluate MODEL DATA --out DIR`: metrics, plots and a qualitative grid on a dataset's test split."""
from __future__ import annotations

import argparse
from pathlib import Path

from vlmdiff.commands.options import add_detection_options


def _class_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated class names, e.g. bottle,wood")
    return names


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="evaluate a model on a dataset's test split",
        description="Run a model over a dataset's test split and write metrics.json, metrics.md, "
        "scores.csv, per-class ROC/PRO/score-histogram plots and qualitative.png; print the metrics table. "
        "Images are decoded at the app's working size (long side at most vlmdiff.images.WORK_SIDE; pixel metrics "
        "at that size). Images that cannot be read, or whose mask has another size, are skipped with a warning "
        "and listed in metrics.json. Under `accelerate launch -m vlmdiff evaluate ...` the images are shared out "
        "over the processes and the report is the one a single process writes (docs/evaluation.md).",
    )
    parser.add_argument("model", help="model folder (written by save_pretrained) or Hugging Face hub id")
    parser.add_argument("data", type=Path, help="dataset folder in a layout the readers know (MVTec AD, VisA, ...)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the report (created if missing)")
    add_detection_options(parser)
    parser.add_argument("--classes", type=_class_list,
                        help="comma-separated classes to evaluate; only these are read and checked (default: all)")
    parser.add_argument("--max-images", type=int, help="at most N test images per class, evenly spread (quick runs)")
    parser.add_argument("--reconstruction-metrics", action="store_true",
                        help="reconstruct every image and report PSNR / SSIM / feature cosine on normal images and "
                        "defect removal where the dataset has defect-free sources (built-in benchmark)")
    parser.add_argument("--strict", action="store_true", help="stop at the first image that cannot be read")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from vlmdiff.data import read_dataset
    from vlmdiff.evaluation import evaluate, launched_processes, load_model, select_test_records
    from vlmdiff.metrics import to_markdown_table

    records = select_test_records(read_dataset(args.data, classes=args.classes), args.classes, args.max_images)
    pipeline = load_model(args.model)
    per_class = evaluate(
        pipeline, records, args.out, strength=args.strength, steps=args.steps, seed=args.seed,
        batch_size=args.batch_size, reconstruction_metrics=args.reconstruction_metrics, strict=args.strict,
    )
    state = launched_processes()
    if state is not None and not state.is_main_process:  # one of several processes: the main one reports
        return 0
    by = f" by {state.num_processes} processes" if state is not None else ""
    print(to_markdown_table(per_class), end="")
    if args.reconstruction_metrics:
        import json

        for name, values in json.loads((args.out / "metrics.json").read_text())["reconstruction"].items():
            print(f"{name} reconstructions: " + ", ".join(
                f"{key} {'n/a' if value is None else f'{value:.3g}'}" for key, value in values.items()))
    print(f"\nreport written to {args.out}{by}")
    return 0
