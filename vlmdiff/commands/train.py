"""`vlmdiff train`: stage 2, the UNet + SG network on normal images of all classes, then calibration.

Re-running the same command resumes from the latest checkpoint in OUT/checkpoints.
Works under `accelerate launch` for several GPUs or nodes.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

from vlmdiff.commands.options import add_config_options, config_from_args
from vlmdiff.commands.train_ae import STAGE1
from vlmdiff.model_folder import TRAINING_FILE
from vlmdiff.scoring import COMPONENT_MAPS, MEMORY
from vlmdiff.training.calibration import CalibrationConfig
from vlmdiff.training.diffusion import TRAINABLE, DiffusionTrainConfig


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train the diffusion model (stage 2) and calibrate it")
    parser.add_argument("data", nargs="+", help="dataset roots (any layout vlmdiff reads)")
    parser.add_argument("--out", required=True, help="run folder: checkpoints/ and the final model/")
    parser.add_argument("--captions", nargs="+", help="one caption file per dataset (from `vlmdiff caption`)")
    parser.add_argument("--empty-captions", action="store_true", help="train without VLM captions (ablation)")
    parser.add_argument("--init", help="model folder to start from (default: OUT/stage1 from train-ae)")
    parser.add_argument("--denoiser", help="start a fresh UNet / SG network / scheduler of this preset (keeps the init model's autoencoder)")
    add_config_options(parser, DiffusionTrainConfig, {
        "max_steps": ("--steps", "optimizer steps"),
        "max_timestep": ("--max-timestep", "train on t below this; 0: the model's max_train_timestep (600 in tiny-x0)"),
        "batch_size": ("--batch-size", "images per step"),
        "gradient_accumulation_steps": ("--grad-accum", "batches per optimizer step"),
        "learning_rate": ("--lr", "AdamW learning rate"),
        "caption_dropout": ("--caption-dropout", "probability of the empty caption"),
        "hint_dropout": ("--hint-dropout", "probability of a blank SG hint"),
        "trainable": ("--trainable", "trained parts", sorted(TRAINABLE)),
        "mixed_precision": ("--mixed-precision", "accelerate mixed precision", ["no", "fp16", "bf16"]),
        "checkpoint_every": ("--checkpoint-every", "steps between checkpoints"),
        "seed": ("--seed", "random seed"),
    })
    parser.add_argument("--strength", type=float,
                        help="the model's default denoising strength, used by calibration (default: its preset's)")
    parser.add_argument("--memory-guidance", type=float,
                        help="the model's default memory-guidance threshold, in memory scales (0: off; default: the init's)")
    parser.add_argument("--no-memory", action="store_true", help="do not build the normal-feature memory")
    parser.add_argument("--keep-calibration", action="store_true",
                        help="train the denoiser further and keep the init model's memory, map scales and thresholds")
    parser.add_argument("--weight", action="append", default=[], metavar="MAP=WEIGHT", type=_map_weight,
                        help=f"weight of a component map in the fused map ({', '.join(COMPONENT_MAPS)}); repeatable")
    add_config_options(parser, CalibrationConfig, {"vectors_per_class": ("--memory-vectors", "coreset size per class in the memory")})
    parser.add_argument("--replay-per-class", type=int, default=4)
    parser.set_defaults(func=run)


def _map_weight(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    if name not in COMPONENT_MAPS or not value:
        raise argparse.ArgumentTypeError(f"expected MAP=WEIGHT with MAP one of {', '.join(COMPONENT_MAPS)}; got {text!r}")
    return name, float(value)


def run(args: argparse.Namespace) -> int:
    import torch

    from vlmdiff.pipeline import DetectionSettings, VLMDiffPipeline
    from vlmdiff.training.calibration import calibrate
    from vlmdiff.training.data import training_set_from_datasets
    from vlmdiff.training.diffusion import train_diffusion
    from vlmdiff.training.replay import save_replay, select_replay

    if args.keep_calibration and (args.no_memory or args.weight or args.strength is not None):
        raise ValueError("--keep-calibration keeps the init model's scoring: it excludes --no-memory, --weight and --strength")
    if args.empty_captions and args.captions:
        raise ValueError("--empty-captions and --captions exclude each other")
    if not args.empty_captions and not args.captions:
        raise ValueError("give --captions (one file per dataset) or --empty-captions")
    out = Path(args.out)
    init = Path(args.init) if args.init else out / STAGE1
    if not init.is_dir():
        raise FileNotFoundError(f"no model to start from at {init}: run `vlmdiff train-ae --out {out}` or pass --init")
    started = time.time()
    torch.manual_seed(args.seed)
    pipeline = VLMDiffPipeline.from_pretrained(init)
    if args.denoiser:
        pipeline.replace_denoiser(args.denoiser)
    data = training_set_from_datasets(args.data, args.captions, pipeline.config.resolution)
    config = config_from_args(DiffusionTrainConfig, args, **({"caption_dropout": 0.0} if args.empty_captions else {}))
    stats = train_diffusion(pipeline, data, out / "checkpoints", config)
    weights = {**pipeline.config.anomaly.weights, **dict(args.weight), **({MEMORY: 0.0} if args.no_memory else {})}
    pipeline.config.anomaly = replace(pipeline.config.anomaly, weights=weights)  # checks the weights
    if args.strength is not None or args.memory_guidance is not None:
        settings = DetectionSettings(strength=args.strength, memory_guidance=args.memory_guidance).resolved(pipeline.config)
        pipeline.config.strength, pipeline.config.memory_guidance = settings.strength, settings.memory_guidance
    if args.keep_calibration:
        calibration = {"calibration": f"kept from {init}"}
    else:
        calibration = calibrate(pipeline, data, config_from_args(CalibrationConfig, args, memory=not args.no_memory))
    pipeline.save_pretrained(out / "model")
    save_replay(select_replay(data, args.replay_per_class, args.seed), out / "model")
    record = {
        "command": "vlmdiff train " + " ".join(f"{k}={v}" for k, v in vars(args).items() if k != "func"),
        "images": len(data), "classes": sorted(set(data.class_names)), "seconds": round(time.time() - started, 1),
        "train": asdict(config), **stats, **calibration,
    }
    (out / "model" / TRAINING_FILE).write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps({k: record[k] for k in ("images", "classes", "seconds", "steps", "final_loss")}))
    return 0
