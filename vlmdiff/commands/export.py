"""`vlmdiff export`: copy a trained model folder for shipping, with float16 weights."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write a compact (float16) copy of a model folder")
    parser.add_argument("model", help="trained model folder")
    parser.add_argument("out", help="new folder (replaced if it exists)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vlmdiff.model_folder import copy_extra_files, replace_atomically, resolve_model_folder, staging_folder
    from vlmdiff.pipeline import VLMDiffPipeline

    source, target = resolve_model_folder(args.model), Path(args.out)
    pipeline = VLMDiffPipeline.from_pretrained(source)
    with staging_folder(target) as scratch:
        pipeline.save_pretrained(scratch / "model", dtype=torch.float16)
        copy_extra_files(source, scratch / "model")
        replace_atomically(scratch / "model", target)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) / 2**20
    print(f"exported {source} to {target} ({size:.1f} MiB)")
    return 0
