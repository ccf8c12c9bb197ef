"""`vlmdiff calibrate`: rebuild a model's normal-feature memory, map scales and thresholds on datasets.

The diffusion is left as it is. The memory is built with the current recipe (`NormalFeatureMemory`
defaults) from the normal train images of every class in the datasets, and each class's threshold
comes from its images' out-of-fold scores (see `vlmdiff.training.calibration`). The map scales are
shared by all classes, so the datasets must hold every class of the model.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from vlmdiff.commands.options import add_config_options, config_from_args
from vlmdiff.training.calibration import CalibrationConfig


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("calibrate", help="rebuild a model's memory, map scales and thresholds on datasets")
    parser.add_argument("model", help="model folder (or hub id)")
    parser.add_argument("data", nargs="+", help="dataset roots (any layout vlmdiff reads); their train/good images are used")
    parser.add_argument("--out", help="new or empty folder, or a model folder with --overwrite (its other files are "
                        "kept) (default: MODEL's folder in the user model store)")
    parser.add_argument("--overwrite", action="store_true", help="replace the model already in --out (--out MODEL: "
                        "in place)")
    parser.add_argument("--no-memory", action="store_true", help="keep the model without a normal-feature memory")
    parser.add_argument("--fusion", action="store_true",
                        help="then choose each class's reconstruction weight from synthetic anomalies of its images "
                        "(about 40 s per class on 2 cores; default: the weights are kept)")
    add_config_options(parser, CalibrationConfig, {
        "vectors_per_class": ("--memory-vectors", "coreset size per class (0: the memory's coreset ratio)"),
        "folds": ("--folds", "folds of the out-of-fold scoring"),
        "threshold_quantile": ("--threshold-quantile", "quantile of the held-out normal scores"),
    })
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlmdiff.model_folder import (
        check_output_folder, read_training_record, replace_model, resolve_model_folder, save_derived_model,
        staging_folder, store_output_folder,
    )
    from vlmdiff.pipeline import VLMDiffPipeline
    from vlmdiff.progress import ConsoleProgress, within
    from vlmdiff.training.calibration import calibrate
    from vlmdiff.training.fusion import choose_fusion
    from vlmdiff.training.data import training_set_from_datasets

    if args.fusion and args.no_memory:
        raise ValueError("--fusion adds each class's reconstruction map to its memory's: it cannot go with --no-memory")
    started = time.time()
    source = resolve_model_folder(args.model)
    output = check_output_folder(args.model, source, args.out or store_output_folder(args.model), args.overwrite)
    record = read_training_record(source)
    pipeline = VLMDiffPipeline.from_pretrained(source)
    data = training_set_from_datasets(args.data, None, pipeline.config.resolution)
    missing = sorted(set(pipeline.config.classes) - set(data.class_names))
    if missing:
        raise ValueError(f"the datasets hold no images of {len(missing)} of the model's classes "
                         f"({', '.join(missing)}); calibration refits the map scales all classes share, so give "
                         "data of every class (one class only: vlmdiff finetune MODEL --images DIR --class NAME "
                         "--memory-only)")
    config = config_from_args(CalibrationConfig, args, memory=not args.no_memory)
    progress = ConsoleProgress()
    share = 0.7 if args.fusion else 1.0  # of the progress bar: the memory and thresholds, then the fusion
    try:
        calibration = calibrate(pipeline, data, config, within(progress, 0.0, share))
        classes = pipeline.config.classes  # those of the data now
        if args.fusion:
            choices = [choose_fusion(pipeline, data, name, config.folds, config.seed, config.threshold_quantile,
                                     within(progress, share + (1 - share) * k / len(classes),
                                            share + (1 - share) * (k + 1) / len(classes)))
                       for k, name in enumerate(classes)]
            calibration["reconstruction_weights"] = {choice.class_name: choice.weight for choice in choices}
    finally:
        progress.close()
    record["calibration"] = {
        "data": [str(Path(root)) for root in args.data], "images": len(data), "seconds": round(time.time() - started, 1),
        "memory": pipeline.memory.recipe if pipeline.memory is not None else None, **calibration,
    }
    with staging_folder(output) as scratch:
        save_derived_model(pipeline, source, scratch / "model", record)
        replace_model(scratch / "model", output)
    where = "" if args.out else " (the user model store; --out DIR writes elsewhere)"
    print(f"calibrated {len(pipeline.config.classes)} classes on {len(data)} images in "
          f"{time.time() - started:.0f} s; model written to {output}{where}")
    for name in pipeline.thresholds.classes:
        item = pipeline.thresholds.get(name)
        print(f"  {name}: threshold {item.value:.4f}, expected false-positive rate {item.expected_fpr:.1%}; score from "
              f"{pipeline.scorer.describe(name)}")
    return 0
