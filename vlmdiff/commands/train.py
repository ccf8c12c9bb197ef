"""`vlmdiff train`: stage 2, the UNet + SG network on normal images of all classes, then calibration.

Re-running the same command resumes from the latest checkpoint in OUT/checkpoints.
Works under `accelerate launch` for several GPUs or nodes.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from vlmdiff.commands.train_ae import STAGE1


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="train the diffusion model (stage 2) and calibrate it")
    parser.add_argument("data", nargs="+", help="dataset roots (any layout vlmdiff reads)")
    parser.add_argument("--out", required=True, help="run folder: checkpoints/ and the final model/")
    parser.add_argument("--captions", nargs="+", help="one caption file per dataset (from `vlmdiff caption`)")
    parser.add_argument("--empty-captions", action="store_true", help="train without VLM captions (ablation)")
    parser.add_argument("--init", help="model folder to start from (default: OUT/stage1 from train-ae)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--hint-dropout", type=float, default=0.0)
    parser.add_argument("--trainable", default="all", choices=["all", "sg+decoder"])
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--checkpoint-every", type=int, default=200)
    parser.add_argument("--no-memory", action="store_true", help="do not build the normal-feature memory")
    parser.add_argument("--memory-weight", type=float, help="weight of the memory map in the fused map")
    parser.add_argument("--reconstruction-weight", type=float, help="weight of the input-vs-reconstruction map")
    parser.add_argument("--memory-vectors", type=int, default=8000, help="coreset size per class in the memory")
    parser.add_argument("--replay-per-class", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vlmdiff.pipeline import VLMDiffPipeline
    from vlmdiff.training.calibration import CalibrationConfig, calibrate
    from vlmdiff.training.data import training_set_from_datasets
    from vlmdiff.training.diffusion import DiffusionTrainConfig, train_diffusion
    from vlmdiff.training.replay import save_replay, select_replay

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
    data = training_set_from_datasets(args.data, args.captions, pipeline.config.resolution)
    config = DiffusionTrainConfig(
        max_steps=args.steps, batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr, caption_dropout=0.0 if args.empty_captions else args.caption_dropout,
        hint_dropout=args.hint_dropout, trainable=args.trainable, mixed_precision=args.mixed_precision,
        checkpoint_every=args.checkpoint_every, seed=args.seed,
    )
    stats = train_diffusion(pipeline, data, out / "checkpoints", config)
    if args.memory_weight is not None:
        pipeline.config.anomaly.memory_weight = args.memory_weight
    if args.reconstruction_weight is not None:
        pipeline.config.anomaly.reconstruction_weight = args.reconstruction_weight
    if args.no_memory:
        pipeline.config.anomaly.memory_weight = 0.0
    calibration = calibrate(pipeline, data, CalibrationConfig(memory=not args.no_memory, vectors_per_class=args.memory_vectors, seed=args.seed))
    pipeline.save_pretrained(out / "model")
    save_replay(select_replay(data, args.replay_per_class, args.seed), out / "model")
    record = {
        "command": "vlmdiff train " + " ".join(f"{k}={v}" for k, v in vars(args).items() if k != "func"),
        "images": len(data), "classes": sorted(set(data.class_names)), "seconds": round(time.time() - started, 1),
        "train": asdict(config), **stats, **calibration,
    }
    (out / "model" / "training.json").write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps({k: record[k] for k in ("images", "classes", "seconds", "steps", "final_loss")}))
    return 0
