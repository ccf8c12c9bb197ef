"""Stage 2: train the UNet + SG network on normal images of all classes, with accelerate.

The published schedule with an L2 loss on the scheduler's prediction type (epsilon as
published, or the clean latent x0, or v), t ~ U{0..T-1} (T = 1000 as published, less for a
denoiser that starts from partial noise: the model's `max_train_timestep`),
caption context from the frozen text encoder, the clean (optionally weakened) image as SG
hint when the pipeline uses the SG network.
Checkpoints are `accelerator.save_state` folders; a run resumes from the latest one.
"""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from vlmdiff.models import guided_unet
from vlmdiff.pipeline import VLMDiffPipeline
from vlmdiff.text import load_text_encoder
from vlmdiff.training.data import TrainingSet, encode_training_set

CHECKPOINT_PREFIX = "checkpoint-"
TRAINABLE = {
    "all": lambda p: [p.unet, p.guidance] if p.guidance is not None else [p.unet],
    # the paper's choice: SG network + UNet decoder (encoder, middle block and time embedding frozen)
    "sg+decoder": lambda p: [p.guidance, p.unet.up_blocks, p.unet.conv_norm_out, p.unet.conv_out],
}


@dataclass
class DiffusionTrainConfig:
    """Hyper-parameters of the diffusion stage (defaults sized for a 2-core CPU)."""

    max_steps: int = 1000
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_timestep: int = 0  # t ~ U{0..max_timestep-1}; 0: the model's own (PipelineConfig.max_train_timestep)
    learning_rate: float = 2e-4  # the paper uses 1e-5 when starting from pretrained SD weights
    weight_decay: float = 1e-2
    caption_dropout: float = 0.1  # probability of the empty caption (0 in the paper)
    hint_dropout: float = 0.0  # probability of a blank hint, so the SG branch passes semantics
    horizontal_flip: bool = True
    trainable: str = "all"  # key of TRAINABLE
    mixed_precision: str = "no"  # "no", "fp16", "bf16"
    checkpoint_every: int = 200
    checkpoints_to_keep: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE:
            raise ValueError(f"trainable must be one of {sorted(TRAINABLE)}, got {self.trainable!r}")


def latest_checkpoint(directory: Path) -> Path | None:
    found = sorted(directory.glob(f"{CHECKPOINT_PREFIX}*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def _caption_contexts(pipeline: VLMDiffPipeline, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Unique captions encoded once: (U, 77, D) contexts, each image's index into them, the empty one's."""
    unique = sorted(set(captions) | {""})
    encoder = load_text_encoder(pipeline.config.text_encoder)
    contexts = torch.cat([encoder(unique[i : i + 32]) for i in range(0, len(unique), 32)])
    lookup = {caption: i for i, caption in enumerate(unique)}
    return contexts, torch.tensor([lookup[c] for c in captions]), lookup[""]


def train_diffusion(
    pipeline: VLMDiffPipeline, data: TrainingSet, output_dir: str | Path, config: DiffusionTrainConfig,
    on_step: Callable[[int, int], None] | None = None,
) -> dict:
    """Train in place, checkpointing under output_dir; resumes from the latest checkpoint there.
    `on_step(step, max_steps)` is called after every optimizer step."""
    output_dir = Path(output_dir)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps
    )
    torch.manual_seed(config.seed)
    modules = TRAINABLE[config.trainable](pipeline)
    pipeline.unet.requires_grad_(config.trainable == "all")
    pipeline.autoencoder.requires_grad_(False)
    parameters = [p for module in modules for p in module.parameters()]
    for p in parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    uses_guidance = pipeline.config.sg_residuals != "none"
    unet, optimizer = accelerator.prepare(pipeline.unet, optimizer)
    guidance = accelerator.prepare(pipeline.guidance) if uses_guidance else None
    trained = [unet, guidance] if uses_guidance else [unet]
    for module in trained:
        module.train()
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    step, saved_loss = 0, math.nan
    checkpoint = latest_checkpoint(output_dir)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        progress_record = json.loads((checkpoint / "progress.json").read_text())
        step, saved_loss = progress_record["step"], progress_record.get("loss", math.nan)
    max_timestep = config.max_timestep or pipeline.config.max_train_timestep
    pipeline.config.max_train_timestep = max_timestep  # a fine-tune later trains on the same range
    if step < config.max_steps:  # a finished run only needs its weights
        latents = encode_training_set(pipeline.autoencoder, data, config.horizontal_flip)  # (N, V, C, h, w)
        contexts, context_index, empty_index = _caption_contexts(pipeline, data.captions)
    losses: list[float] = []
    progress = tqdm(total=config.max_steps, initial=step, desc="training diffusion", disable=not accelerator.is_main_process)
    while step < config.max_steps:
        generator = torch.Generator().manual_seed(config.seed * 100_003 + step)  # resumable sampling
        index = torch.randint(len(data), (config.batch_size,), generator=generator)
        view = torch.randint(latents.shape[1], (config.batch_size,), generator=generator)
        clean = latents[index, view].to(accelerator.device)  # (B, C, h, w)
        images = data.float_images(index)
        images = torch.where((view == 1)[:, None, None, None], images.flip(-1), images)
        hint = pipeline.prepare_hint(images).to(accelerator.device)  # (B, 3, R, R)
        keep_hint = (torch.rand(config.batch_size, generator=generator) >= config.hint_dropout).float()
        hint = hint * keep_hint[:, None, None, None].to(hint)
        drop = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
        context = contexts[torch.where(drop, empty_index, context_index[index])].to(accelerator.device)
        timesteps = torch.randint(max_timestep, (config.batch_size,), generator=generator)
        noise = torch.randn(clean.shape, generator=generator).to(clean)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        target = _target(noise_scheduler, clean, noise, timesteps)
        timesteps = timesteps.to(accelerator.device)
        with accelerator.accumulate(*trained):
            prediction = guided_unet(unet, guidance, noisy, timesteps, context, hint, pipeline.config.sg_residuals)
            loss = F.mse_loss(prediction.float(), target.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            optimizer.zero_grad()
        if accelerator.sync_gradients:
            step += 1
            losses.append(loss.item())
            progress.update(1)
            progress.set_postfix(loss=f"{_recent_mean(losses):.4f}")
            if on_step is not None:
                on_step(step, config.max_steps)
            if step % config.checkpoint_every == 0 or step == config.max_steps:
                _save_checkpoint(accelerator, output_dir, step, config, _recent_mean(losses))
    progress.close()
    pipeline.unet = accelerator.unwrap_model(unet).eval()
    if uses_guidance:
        pipeline.guidance = accelerator.unwrap_model(guidance).eval()
    return {"steps": step, "final_loss": _recent_mean(losses) if losses else saved_loss}


def _target(scheduler: DDPMScheduler, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise, the clean latent or the velocity."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "sample":
        return clean
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    raise ValueError(f"unknown prediction type {kind!r}")


def _recent_mean(losses: list[float], window: int = 50) -> float:
    """Mean of the last `window` losses (what the progress bar shows)."""
    return sum(losses[-window:]) / len(losses[-window:]) if losses else math.nan


def _save_checkpoint(
    accelerator: Accelerator, output_dir: Path, step: int, config: DiffusionTrainConfig, loss: float
) -> None:
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    target = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    accelerator.save_state(str(target))
    (target / "progress.json").write_text(json.dumps({"step": step, "loss": loss, "config": asdict(config)}))
    for old in sorted(output_dir.glob(f"{CHECKPOINT_PREFIX}*"), key=lambda p: int(p.name.split("-")[1]))[
        : -config.checkpoints_to_keep
    ]:
        shutil.rmtree(old)
