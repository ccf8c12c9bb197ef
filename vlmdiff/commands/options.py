"""Command-line options built from config dataclasses, so each default is defined once (in the dataclass)."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, fields
from typing import Any

from vlmdiff.config import DEFAULT_BATCH_SIZE


def add_config_options(parser: argparse.ArgumentParser, config_class: type, options: dict[str, tuple]) -> None:
    """One option per entry `field: (flag, help[, choices])`; default and type come from the dataclass field."""
    defaults = {f.name: f.default for f in fields(config_class) if f.default is not MISSING}
    for name, (flag, help_text, *choices) in options.items():
        default = defaults[name]
        parser.add_argument(
            flag, dest=name, type=type(default), default=default, choices=choices[0] if choices else None,
            help=f"{help_text} (default: {default})",
        )


def config_from_args(config_class: type, args: argparse.Namespace, **overrides: Any):
    """The dataclass from the parsed options that name its fields, plus `overrides`."""
    names = {f.name for f in fields(config_class)}
    return config_class(**{**{k: v for k, v in vars(args).items() if k in names}, **overrides})


def add_detection_options(parser: argparse.ArgumentParser) -> None:
    """--strength, --steps, --seed and --batch-size of the commands that run a model over images."""
    parser.add_argument("--strength", type=float, help="denoising strength in [0, 1] (default: the model's)")
    parser.add_argument("--steps", type=int, help="DDIM steps (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help=f"images per forward pass (default {DEFAULT_BATCH_SIZE})")
