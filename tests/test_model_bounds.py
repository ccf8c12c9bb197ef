"""A model folder's configs are bounded before anything is allocated; the error names the file and field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import build_pipeline, fit_memory, noisy_colour
from vlmdiff import cli
from vlmdiff.config import PipelineConfig
from vlmdiff.pipeline import VLMDiffPipeline
from vlmdiff.presets import PRESETS


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model with a normal-feature memory of one class."""
    pipeline = build_pipeline("tiny")
    pipeline.memory = fit_memory([noisy_colour(seed) for seed in range(2)], ["red"] * 2, vectors_per_class=50)
    directory = tmp_path_factory.mktemp("model")
    pipeline.save_pretrained(directory)
    return directory


def _edited(model_dir: Path, tmp_path: Path, file: str, key: str, value) -> Path:
    """A copy of the model's files whose `file` has `key` (a.b for nested) set to `value`."""
    copy = tmp_path / "model"
    for path in model_dir.rglob("*"):
        if path.is_file():
            (copy / path.relative_to(model_dir)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(model_dir)).write_bytes(path.read_bytes())
    document = json.loads((copy / file).read_text())
    *parents, last = key.split(".")
    target = document
    for parent in parents:
        target = target[parent]
    target[last] = value
    (copy / file).write_text(json.dumps(document))
    return copy


@pytest.mark.parametrize(("file", "key", "value", "message"), [
    ("pipeline_config.json", "resolution", 16384, r"resolution must be an integer in \[32, 1024\]; got 16384"),
    ("pipeline_config.json", "resolution", 100, "resolution must be a multiple of 8, got 100"),
    ("pipeline_config.json", "num_inference_steps", 10**9, r"num_inference_steps must be an integer in \[1, 1000\]"),
    ("pipeline_config.json", "anomaly.blur_sigma", 1e9, r"anomaly.blur_sigma must be a number in \[0.0, 32.0\]"),
    ("memory/config.json", "bank_size", 10**12, r"bank_size must be an integer in \[1, 268435456\]"),
    ("memory/config.json", "long_side", 20000, r"long_side must be an integer in \[32, 1024\]"),
    ("scheduler/scheduler_config.json", "num_train_timesteps", 10**10, r"num_train_timesteps must be an integer in"),
    ("autoencoder/config.json", "latent_channels", 10**6, r"latent_channels must be an integer in \[1, 4096\]"),
])
def test_out_of_bounds_configs_are_refused_naming_file_and_field(model_dir, tmp_path, file, key, value, message):
    folder = _edited(model_dir, tmp_path, file, key, value)
    with pytest.raises(ValueError, match=rf"^{folder / file}: {message}"):
        VLMDiffPipeline.from_pretrained(folder)


def test_a_bank_that_does_not_match_its_config_is_refused_from_the_header(model_dir, tmp_path):
    folder = _edited(model_dir, tmp_path, "memory/config.json", "bank_size", 7)
    weights = folder / "memory" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(ValueError, match=rf"^{weights}: bank is 50 x 152 but config.json gives .* = 7 x 152$"):
        VLMDiffPipeline.from_pretrained(folder)


def test_bank_values_are_bounded_together(model_dir, tmp_path):
    folder = _edited(model_dir, tmp_path, "memory/config.json", "bank_size", 2**27)  # x 152 channels
    with pytest.raises(ValueError, match=r"memory/config.json: bank_size x feature_channels must be at most 268435456"):
        VLMDiffPipeline.from_pretrained(folder)


def test_the_cli_refuses_a_huge_resolution_in_one_line(model_dir, tmp_path, capsys):
    folder = _edited(model_dir, tmp_path, "pipeline_config.json", "resolution", 16384)
    noisy_colour(0, (128, 128)).save(tmp_path / "image.png")
    assert cli.main(["predict", str(folder), str(tmp_path / "image.png"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "pipeline_config.json: resolution must be" in error and "16384" in error


def test_shipped_presets_and_model_fit_the_bounds(model_dir):
    for preset in PRESETS.values():
        PipelineConfig(**vars(preset.pipeline))
    assert VLMDiffPipeline.from_pretrained(model_dir).memory.bank.shape == (50, 152)
    shipped = VLMDiffPipeline.from_pretrained(Path(__file__).parents[1] / "assets" / "vlmdiff-default")
    assert shipped.config.resolution == 256 and shipped.memory.bank.shape == (78645, 152)
