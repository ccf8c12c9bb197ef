"""`vlmdiff predict MODEL IMAGES... --out DIR`: heatmap overlays, reconstructions and a CSV of verdicts."""
from __future__ import annotations

import argparse
from pathlib import Path

from vlmdiff.commands.options import add_detection_options


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "predict",
        help="score images and write heatmap overlays",
        description="Run a model on images (files or folders of images), each decoded at the app's working size "
        "(long side at most vlmdiff.images.WORK_SIDE), and write <name>_overlay.png and <name>_reconstruction.png "
        "at the image's original size (names made unique) and predictions.csv (image, class, score, threshold, "
        "verdict, class_match), one row per image as it is scored. A guessed class comes with how well the image fits it (class_match); an "
        "image far from every known class gets 'unknown class' instead of a verdict. Images that cannot be read "
        "are skipped with a warning. Under `accelerate launch -m vlmdiff predict ...` the images are shared out over "
        "the processes and the outputs are those of a single process (docs/evaluation.md).",
    )
    parser.add_argument("model", help="model folder (written by save_pretrained) or Hugging Face hub id")
    parser.add_argument("images", nargs="+", type=Path, help="image files and/or folders of images")
    parser.add_argument("--out", type=Path, required=True, help="folder for the outputs (created if missing)")
    parser.add_argument("--class", dest="class_name", help="class of all images (default: guessed by the model)")
    add_detection_options(parser)
    parser.add_argument("--no-reconstruction", action="store_true",
                        help="write no reconstructions (the diffusion then runs only if the score needs it)")
    parser.add_argument("--strict", action="store_true", help="stop at the first image that cannot be read")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from vlmdiff.evaluation import PREDICTIONS_CSV, collect_images, launched_processes, load_model, predict

    images = collect_images(args.images)
    pipeline = load_model(args.model)
    predictions = predict(
        pipeline, images, args.out, class_name=args.class_name, strength=args.strength, steps=args.steps,
        seed=args.seed, batch_size=args.batch_size, reconstructions=not args.no_reconstruction, strict=args.strict,
    )
    state = launched_processes()
    if state is not None and not state.is_main_process:  # one of several processes: the main one reports
        return 0
    by = f" by {state.num_processes} processes" if state is not None else ""
    width = max(len(str(p.image)) for p in predictions)
    for p in predictions:
        threshold = "n/a" if p.threshold is None else f"{p.threshold:.4g}"
        match = f"  ({p.class_match})" if p.class_match else ""
        print(f"{str(p.image):<{width}}  {p.class_name}  score {p.score:.4g}  threshold {threshold}  "
              f"{p.verdict}{match}")
    written = "overlays" if args.no_reconstruction else "overlays, reconstructions"
    skipped = len(images) - len(predictions)
    counted = f"{len(predictions)} images" + (f" ({skipped} skipped: not readable, listed above)" if skipped else "")
    print(f"\n{counted}; {written} and {PREDICTIONS_CSV} written to {args.out}{by}")
    return 0
