"""The `vlmdiff` command: one sub-command per batch job, each defined in `vlmdiff.commands`."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines `add_parser(subparsers)` and sets `func` on its parser.
COMMAND_MODULES = (
    "vlmdiff.commands.make_demo_data",
    "vlmdiff.commands.caption",
    "vlmdiff.commands.evaluate",
    "vlmdiff.commands.predict",
    "vlmdiff.commands.train_ae",
    "vlmdiff.commands.train",
    "vlmdiff.commands.calibrate",
    "vlmdiff.commands.finetune",
    "vlmdiff.commands.export",
    "vlmdiff.commands.push_to_hub",
    "vlmdiff.commands.deploy_space",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmdiff", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except (ValueError, FileNotFoundError) as error:  # user errors: one clear line, no traceback
        print(f"vlmdiff {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
