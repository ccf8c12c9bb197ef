"""`vlmdiff export`: copy a trained model folder for shipping, with float16 weights."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write a compact (float16) copy of a model folder")
    parser.add_argument("model", help="trained model folder (or hub id)")
    parser.add_argument("out", help="new or empty folder, or a model folder with --overwrite (its other files "
                        "are kept)")
    parser.add_argument("--overwrite", action="store_true", help="replace the model already in OUT")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vlmdiff.model_folder import (
        check_output_folder, copy_extra_files, model_entries, replace_model, resolve_model_folder, staging_folder,
    )
    from vlmdiff.pipeline import VLMDiffPipeline

    source = resolve_model_folder(args.model)
    target = check_output_folder(args.model, source, args.out, args.overwrite)
    pipeline = VLMDiffPipeline.from_pretrained(source)
    with staging_folder(target) as scratch:
        pipeline.save_pretrained(scratch / "model", dtype=torch.float16)
        copy_extra_files(source, scratch / "model")
        replace_model(scratch / "model", target)
    entries = [target / name for name in model_entries(target)]
    size = sum(f.stat().st_size for entry in entries for f in (entry, *entry.rglob("*")) if f.is_file()) / 2**20
    print(f"exported {source} to {target} ({size:.1f} MiB)")
    return 0
