"""`vlmdiff export`: copy a trained model folder for shipping, with float16 weights."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

EXTRA_FILES = ("replay.safetensors", "training.json", "MODEL_CARD.md")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("export", help="write a compact (float16) copy of a model folder")
    parser.add_argument("model", help="trained model folder")
    parser.add_argument("out", help="new folder (replaced if it exists)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vlmdiff.pipeline import VLMDiffPipeline

    source, target = Path(args.model), Path(args.out)
    pipeline = VLMDiffPipeline.from_pretrained(source)
    if target.exists():
        shutil.rmtree(target)
    pipeline.save_pretrained(target, dtype=torch.float16)
    for name in EXTRA_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) / 2**20
    print(f"exported {source} to {target} ({size:.1f} MiB)")
    return 0
