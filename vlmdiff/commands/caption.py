"""`vlmdiff caption DATA --out captions.json`: describe a dataset's images with a captioner, resumably."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from vlmdiff.config import DEFAULT_BATCH_SIZE

SPLITS = ("train", "validation", "test", "all")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "caption", help="caption a dataset's images into a JSON file (resumable)",
        description="Caption the images of a dataset (any supported layout) into a resumable JSON file. "
                    "Under `accelerate launch` the images are split across processes.",
    )
    parser.add_argument("data", help="dataset folder (MVTec AD, VisA, Real-IAD, COCO-AD or a plain image folder)")
    parser.add_argument("--out", required=True, help="caption JSON file to write or resume")
    parser.add_argument("--captioner", default="offline-efficientnet",
                        help="registered captioner id, or a transformers VLM hub id / local model folder "
                             "(default: offline-efficientnet)")
    parser.add_argument("--prompt", default="pd", choices=("pd", "pa", "coco"),
                        help="published prompt: pd (describe, default), pa (defect inspector), coco")
    parser.add_argument("--split", default="train", choices=SPLITS, help="which images to caption (default: train)")
    parser.add_argument("--layout", help="dataset layout, if detection should be skipped (mvtec, visa, ...)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="images per captioner call")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest VLM answer, in tokens")
    parser.add_argument("--save-every", type=int, default=32, help="save the file after this many new captions")
    parser.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: the accelerate process's device)")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), help="VLM weights dtype")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow a VLM's own code from its repo")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing file instead of resuming")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from vlmdiff.captioning import create_captioner
    from vlmdiff.captioning.store import CaptionJob, run_captioning
    from vlmdiff.data import read_dataset

    if args.batch_size < 1 or args.save_every < 1 or args.max_new_tokens < 1:
        raise ValueError("--batch-size, --save-every and --max-new-tokens must be positive")
    root = Path(args.data)
    records = read_dataset(root, layout=args.layout)
    chosen = [r for r in records if args.split in ("all", r.split)]
    if not chosen:
        raise ValueError(f"no {args.split} images in {root}")
    jobs = [CaptionJob(Path(os.path.relpath(r.image_path, root)).as_posix(), r.image_path) for r in chosen]
    state = PartialState(cpu=args.device == "cpu")  # --device cpu also spreads over CPU processes
    captioner = create_captioner(args.captioner, args.prompt, device=args.device or str(state.device),
                                 dtype=args.dtype, max_new_tokens=args.max_new_tokens,
                                 trust_remote_code=args.trust_remote_code)
    store = run_captioning(captioner, jobs, args.out, args.batch_size, args.save_every, args.overwrite)
    if state.is_main_process:
        print(f"{len(store)} captions in {args.out} ({captioner.name}: {captioner.model_id})")
    return 0
