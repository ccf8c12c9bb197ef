"""`vlmdiff make-demo-data OUT`: write the built-in multi-class benchmark (MVTec layout)."""
from __future__ import annotations

import argparse
from collections import Counter


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-demo-data", help="write the built-in multi-class benchmark with defect masks",
        description="Generate the built-in benchmark offline and deterministically (MVTec AD layout).",
    )
    parser.add_argument("out", help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files")
    parser.add_argument("--classes", nargs="+",
                        help="classes to write (default: the 9 of the default benchmark; any of them and of --logical)")
    parser.add_argument("--logical", action="store_true",
                        help="write the logical and global anomaly classes (bottle, box, connector, pins) instead")
    parser.add_argument("--n-train", type=int, default=60, help="train/good images per class")
    parser.add_argument("--n-test-good", type=int, default=15, help="test/good images per class")
    parser.add_argument("--n-defective", type=int, default=25, help="defective test images per class")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--overwrite", action="store_true", help="replace the classes already in OUT")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from vlmdiff.data.demo import DEFAULT_CLASSES, LOGICAL_CLASSES, DemoConfig, make_demo_dataset

    classes = args.classes or (LOGICAL_CLASSES if args.logical else DEFAULT_CLASSES)
    config = DemoConfig(args.n_train, args.n_test_good, args.n_defective, args.size, tuple(classes))
    records = make_demo_dataset(args.out, args.seed, config, overwrite=args.overwrite,
                                progress=lambda items: tqdm(items, desc="make-demo-data", unit="img"))
    counts = Counter((r.class_name, r.label) for r in records)
    for name in config.classes:
        print(f"{name}: {counts[(name, 0)]} normal, {counts[(name, 1)]} defective")
    print(f"wrote {len(records)} images to {args.out} (see README.txt there)")
    return 0
