"""`vlmdiff train-ae`: stage 1, the autoencoder on normal training images."""
from __future__ import annotations

import argparse
from pathlib import Path

from vlmdiff.config import DEFAULT_BATCH_SIZE

STAGE1 = "stage1"


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("train-ae", help="train the autoencoder (stage 1) on normal images")
    parser.add_argument("data", nargs="+", help="dataset roots (any layout vlmdiff reads)")
    parser.add_argument("--out", required=True, help="run folder; the stage-1 model goes to OUT/stage1")
    parser.add_argument("--preset", default="tiny", help="model sizes: tiny, tiny-kl, sd15")
    parser.add_argument("--pretrained", help="hub id or folder of SD weights to fine-tune from (sd15)")
    parser.add_argument("--init", help="a trained model folder: train its decoder further, keeping its latent space "
                        "(so its UNet and memory stay valid); OUT/stage1 is then the whole model")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from vlmdiff.pipeline import VLMDiffPipeline
    from vlmdiff.training.autoencoder import AutoencoderTrainConfig, train_autoencoder
    from vlmdiff.training.data import training_set_from_datasets

    torch.manual_seed(args.seed)
    if args.init:
        pipeline = VLMDiffPipeline.from_pretrained(args.init)
    else:
        pipeline = VLMDiffPipeline.from_preset(args.preset, pretrained=args.pretrained)
    data = training_set_from_datasets(args.data, None, pipeline.config.resolution)
    config = AutoencoderTrainConfig(max_steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed,
                                    fit_latent_space=not args.init)
    stats = train_autoencoder(pipeline.autoencoder, data, config)
    pipeline.save_pretrained(Path(args.out) / STAGE1)
    print(f"autoencoder trained on {len(data)} images: final loss {stats['final_loss']:.4f}; saved {Path(args.out) / STAGE1}")
    return 0
