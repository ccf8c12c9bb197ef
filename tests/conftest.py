"""Shared fixtures: tiny randomly initialised pipelines (64 px) and test images.

Session-scoped pipelines are shared: tests must not change their weights or config.
A test that needs to change either builds its own with `build_pipeline`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from vlmdiff import NormalFeatureMemory, VLMDiffPipeline
from vlmdiff.scoring import MEMORY, RECONSTRUCTION, AnomalyScorer, ScoringBatch

RESOLUTION = 64
STEPS = 2  # DDIM steps in tests: enough to exercise the loop, cheap on 2 CPU cores
PRESET_NAMES = ("tiny", "tiny-kl")
MEMORY_LONG_SIDE = 64  # normal-feature memories in tests embed at a 64 px long side: an 8x8 grid for squares

# The test models are tiny: intra-op threads only spin against each other on shared CI cores
# (measured: ~10x slower pipeline calls with 2 threads on a busy 2-core machine).
torch.set_num_threads(1)


def build_pipeline(preset: str, seed: int = 0, **overrides) -> VLMDiffPipeline:
    """A deterministic random pipeline: the same seed gives the same weights."""
    torch.manual_seed(seed)
    return VLMDiffPipeline.from_preset(preset, resolution=RESOLUTION, **overrides)


def fused_maps(pipe: VLMDiffPipeline, images, reconstructions, latents=None, denoised=None) -> torch.Tensor:
    """The pipeline's fused, blurred reconstruction maps (B, R, R) for given inputs and reconstructions."""
    batch = ScoringBatch([None] * len(images), images, [None] * len(images), None, latents, denoised, reconstructions)
    components = pipe.component_maps(batch, (RECONSTRUCTION,))
    scorer = AnomalyScorer(pipe.config.anomaly, {RECONSTRUCTION: 1.0, MEMORY: 0.0})
    return torch.stack([scorer.fuse(parts, tuple(images.shape[-2:]))[0] for parts in components])


def noisy_colour(seed: int, size: tuple[int, int] = (64, 64), colour=(200, 40, 40), noise: float = 12.0) -> Image.Image:
    """A flat colour with Gaussian noise, `size` = (width, height): one synthetic class."""
    rng = np.random.default_rng(seed)
    pixels = np.asarray(colour, np.float64) + rng.normal(0.0, noise, (size[1], size[0], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def brick_texture(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """A random crop of skimage's brick texture, `size` = (width, height): a very different class."""
    from skimage import data

    texture = data.brick()  # (512, 512) uint8
    top, left = np.random.default_rng(seed).integers(0, 512 - 128, 2)
    crop = texture[top : top + 128, left : left + 128]
    return Image.fromarray(np.stack([crop] * 3, -1)).resize(size, Image.Resampling.BILINEAR)


def fit_memory(images, class_names, vectors_per_class: int = 1000, **config) -> NormalFeatureMemory:
    """A small normal-feature memory (long side MEMORY_LONG_SIDE unless given)."""
    config.setdefault("long_side", MEMORY_LONG_SIDE)
    return NormalFeatureMemory.fit(list(images), list(class_names), vectors_per_class, seed=0, **config)


def perturb_(module: torch.nn.Module, scale: float = 0.02, seed: int = 1) -> None:
    """Add fixed-seed Gaussian noise to every parameter (turns zero convs on)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


@pytest.fixture(scope="session")
def tiny_pipe() -> VLMDiffPipeline:
    return build_pipeline("tiny")


@pytest.fixture(scope="session")
def tiny_kl_pipe() -> VLMDiffPipeline:
    return build_pipeline("tiny-kl")


@pytest.fixture(scope="session")
def pipes(tiny_pipe, tiny_kl_pipe) -> dict[str, VLMDiffPipeline]:
    return {"tiny": tiny_pipe, "tiny-kl": tiny_kl_pipe}


@pytest.fixture(scope="session")
def random_images() -> list[np.ndarray]:
    """Three uint8 RGB arrays of different sizes (H, W): square, landscape, portrait."""
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((64, 64), (80, 100), (300, 200))]


@pytest.fixture(scope="session")
def astronaut() -> Image.Image:
    """A real photograph at the model resolution (skimage's astronaut)."""
    from skimage import data

    return Image.fromarray(data.astronaut()).resize((RESOLUTION, RESOLUTION), Image.Resampling.BILINEAR)


# ---------------------------------------------------------------- the app's tests
EXAMPLES = Path(__file__).resolve().parents[1] / "assets" / "examples"
NORMAL_EXAMPLE = EXAMPLES / "brick_good.png"
WASHER_EXAMPLE = EXAMPLES / "washer_good.png"
JOB_TIMEOUT_S = 180  # a tiny diffusion fine-tune on a busy 2-core machine


@pytest.fixture(scope="session", autouse=True)
def gradio_upload_folder(tmp_path_factory) -> Iterator[Path]:
    """Gradio's upload folder for this test run: the app reads only files in it (`payload` copies there)."""
    folder, before = tmp_path_factory.mktemp("gradio-uploads"), os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = before


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny model folder for the app's tests (one per test module; a module may define its own)."""
    from app_harness import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("app") / "model")
