"""Training: the diffusion stage lowers the loss and resumes exactly; fine-tuning writes a
new model folder atomically; the shipped default detects a synthetic defect. Tiny models, seconds each."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from PIL import Image

from conftest import MEMORY_LONG_SIDE, RESOLUTION, STEPS, brick_texture, build_pipeline, fit_memory, noisy_colour, perturb_
from vlmdiff import VLMDiffPipeline
from vlmdiff.cli import main
from vlmdiff.memory import NormalFeatureMemory
from vlmdiff.images import images_to_tensor
from vlmdiff.model_folder import read_training_record
from vlmdiff.models import encode_latents
from vlmdiff.scoring import MEMORY, RECONSTRUCTION
from vlmdiff.text import load_text_encoder
from vlmdiff.training import calibration
from vlmdiff.training import finetune as finetune_module
from vlmdiff.training.data import TrainingSet
from vlmdiff.training.diffusion import DiffusionTrainConfig, train_diffusion
from vlmdiff.training.finetune import FinetuneConfig, finetune, validate_class_name
from vlmdiff.training.fusion import FUSION_WEIGHTS
from vlmdiff.training.replay import load_replay, save_replay

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "vlmdiff-default"
NEW_CLASS = "green"


def training_set(images: list[Image.Image], captions: list[str], classes: list[str]) -> TrainingSet:
    tensor = (images_to_tensor(images, RESOLUTION) * 255).round().byte()
    return TrainingSet(tensor, captions, classes, images)


@pytest.fixture(scope="module")
def two_class_data() -> TrainingSet:
    images = [noisy_colour(0), noisy_colour(1), brick_texture(0), brick_texture(1)]
    return training_set(images, ["a red surface"] * 2 + ["a brick wall"] * 2, ["flat", "flat", "brick", "brick"])


def new_class_images(count: int = 5) -> list[Image.Image]:
    """Normal images of a class the model has never seen, at a non-square size."""
    return [noisy_colour(100 + i, size=(80, 60), colour=(40, 170, 60)) for i in range(count)]


def add_user_files(folder: Path) -> dict[str, str]:
    """Files beside a model that are not part of it (a git repository, notes); their hashes."""
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "notes.txt").write_text("keep me")
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in (".git/HEAD", "notes.txt")}


def folder_hashes(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*")) if path.is_file()
    }


def train_config(**overrides) -> DiffusionTrainConfig:
    settings = dict(batch_size=4, learning_rate=1e-3, caption_dropout=0.0, horizontal_flip=False, seed=0)
    return DiffusionTrainConfig(**{**settings, **overrides})


@torch.no_grad()
def epsilon_mse(pipe: VLMDiffPipeline, data: TrainingSet) -> float:
    """The training objective on one FIXED batch: every image, fixed noise and timesteps."""
    images = data.float_images()
    latents = encode_latents(pipe.autoencoder, images)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(123))
    timesteps = torch.linspace(50, 900, len(images)).long()
    noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents, noise, timesteps)
    context = load_text_encoder(pipe.config.text_encoder)(data.captions)
    residuals, middle = pipe.guidance(noisy, timesteps, context, pipe.prepare_hint(images))
    prediction = pipe.unet(
        noisy, timesteps, encoder_hidden_states=context,
        down_block_additional_residuals=residuals, mid_block_additional_residual=middle,
    ).sample
    return float(F.mse_loss(prediction, noise))


def parameters_of(pipe: VLMDiffPipeline) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{key}": value.detach().clone()
        for name in ("unet", "guidance") for key, value in getattr(pipe, name).state_dict().items()
    }


# ---------------------------------------------------------------- the diffusion stage
def test_a_few_training_steps_lower_the_loss_on_a_fixed_batch(two_class_data, tmp_path):
    pipe = build_pipeline("tiny-kl")
    before = epsilon_mse(pipe, two_class_data)
    stats = train_diffusion(pipe, two_class_data, tmp_path / "run", train_config(max_steps=8, checkpoint_every=100))
    after = epsilon_mse(pipe, two_class_data)
    assert stats["steps"] == 8 and np.isfinite(stats["final_loss"])
    assert after < 0.9 * before, (before, after)
    assert not pipe.unet.training and not pipe.guidance.training  # handed back ready for inference
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["checkpoint-8"]  # the final checkpoint


def test_a_finished_run_resumes_with_its_weights_and_last_loss(two_class_data, tmp_path):
    run = tmp_path / "run"
    first = train_diffusion(build_pipeline("tiny-kl"), two_class_data, run, train_config(max_steps=2, checkpoint_every=2))
    again = build_pipeline("tiny-kl", seed=5)  # other weights: the checkpoint must replace them
    stats = train_diffusion(again, two_class_data, run, train_config(max_steps=2, checkpoint_every=2))
    assert stats == first  # no new step; the loss of the last checkpoint is reported
    untouched = parameters_of(build_pipeline("tiny-kl", seed=5))["unet.conv_in.weight"]
    assert not torch.equal(parameters_of(again)["unet.conv_in.weight"], untouched)  # checkpoint weights loaded


def test_resume_continues_from_the_saved_step_with_the_same_optimizer_state(two_class_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    first = build_pipeline("tiny-kl")
    assert train_diffusion(first, two_class_data, run, train_config(max_steps=2, checkpoint_every=2))["steps"] == 2
    checkpoint = run / "checkpoint-2"
    assert (checkpoint / "optimizer.bin").is_file()
    saved_optimizer = torch.load(checkpoint / "optimizer.bin", weights_only=False)
    assert all(int(state["step"]) == 2 for state in saved_optimizer["state"].values())

    # the resumed run starts from other UNet / SG weights (the frozen autoencoder is not in a checkpoint):
    # only the checkpoint can make it equal the uninterrupted run
    loaded_states, losses = [], []
    original_load_state = Accelerator.load_state

    def load_state(accelerator, *args, **kwargs):
        result = original_load_state(accelerator, *args, **kwargs)
        loaded_states.append(copy.deepcopy(accelerator._optimizers[0].optimizer.state_dict()))  # before step 3
        return result

    original_mse = F.mse_loss
    monkeypatch.setattr(Accelerator, "load_state", load_state)
    monkeypatch.setattr(F, "mse_loss", lambda *a, **k: losses.append(1) or original_mse(*a, **k))
    resumed = build_pipeline("tiny-kl")
    perturb_(resumed.unet, scale=0.05, seed=7)
    perturb_(resumed.guidance, scale=0.05, seed=8)
    stats = train_diffusion(resumed, two_class_data, run, train_config(max_steps=3, checkpoint_every=2))
    monkeypatch.undo()
    assert stats["steps"] == 3 and len(losses) == 1  # one step: 2 -> 3
    assert len(loaded_states) == 1
    loaded = loaded_states[0]
    assert loaded["param_groups"] == saved_optimizer["param_groups"]
    assert loaded["state"].keys() == saved_optimizer["state"].keys()
    for key, state in saved_optimizer["state"].items():
        for name, value in state.items():
            assert torch.equal(loaded["state"][key][name], value), (key, name)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-2", "checkpoint-3"]

    uninterrupted = build_pipeline("tiny-kl")
    train_diffusion(uninterrupted, two_class_data, tmp_path / "straight", train_config(max_steps=3, checkpoint_every=100))
    expected, got = parameters_of(uninterrupted), parameters_of(resumed)
    assert expected.keys() == got.keys()
    mismatched = [k for k in expected if not torch.allclose(expected[k], got[k], atol=1e-6, rtol=1e-5)]
    assert not mismatched, mismatched[:5]
    assert any(not torch.equal(a, b) for a, b in zip(parameters_of(first).values(), got.values()))  # step 3 happened


# ---------------------------------------------------------------- fine-tuning
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, two_class_data) -> Path:
    """A tiny trained-looking model folder: memory, map scales, thresholds, classes and a replay set."""
    pipe = build_pipeline("tiny-kl", num_inference_steps=STEPS)
    pipe.memory = fit_memory([two_class_data.original(i) for i in range(4)], two_class_data.class_names, 40)
    pipe.config.anomaly.weights[MEMORY] = 0.5
    pipe.config.classes = ("brick", "flat")
    pipe.thresholds.fit_quantile("flat", [0.5, 0.6, 0.7], q=0.99)
    pipe.thresholds.fit_quantile("brick", [1.5, 1.6, 1.7], q=0.99)
    folder = tmp_path_factory.mktemp("models") / "model"
    pipe.save_pretrained(folder)
    save_replay(two_class_data, folder)
    (folder / "MODEL_CARD.md").write_text("# tiny test model\n")
    return folder


@pytest.fixture
def model_copy(saved_model, tmp_path) -> Path:
    target = tmp_path / "models" / "model"
    shutil.copytree(saved_model, target)
    return target


def small_finetune() -> FinetuneConfig:
    return FinetuneConfig(steps=2, batch_size=2, memory_vectors=50, folds=2)


def test_finetune_writes_a_new_folder_and_leaves_the_old_one_byte_identical(model_copy, tmp_path):
    before = folder_hashes(model_copy)
    output = tmp_path / "models" / "model-green"
    progress, messages = [], []
    summary = finetune(model_copy, new_class_images(), NEW_CLASS, output, small_finetune(),
                       lambda f, m: (progress.append(f), messages.append(m)))
    assert folder_hashes(model_copy) == before
    assert sorted(p.name for p in model_copy.parent.iterdir()) == ["model", "model-green"]  # no temporary folders
    assert summary.output_dir == output and summary.class_name == NEW_CLASS
    assert summary.steps == 2 and summary.images_used == 5 and np.isfinite(summary.final_loss)
    assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(progress)
    # every phase reports its units as they finish: images read and captioned, optimizer steps, images embedded
    for phase in ("reading and captioning: 5 of 5 images", "training the diffusion: 2 of 2 steps",
                  "embedding: 5 of 5 images", "out-of-fold scoring: 5 of 5 images", "choosing the fusion: 5 of 5 images"):
        assert any(m.startswith(phase) for m in messages), phase
    assert any(m.startswith("training the diffusion: 1 of 2 steps") for m in messages)

    tuned = VLMDiffPipeline.from_pretrained(output)
    assert tuned.config.classes == ("brick", "flat", NEW_CLASS)
    assert sorted(tuned.thresholds.classes) == ["brick", "flat", NEW_CLASS]
    assert tuned.thresholds.get(NEW_CLASS).value == pytest.approx(summary.threshold)
    # the class's reconstruction weight was chosen (synthetic anomalies) and saved with the model
    fused = tuned.config.anomaly.class_weights.get(NEW_CLASS)
    assert summary.reconstruction_weight == (fused["reconstruction"] if fused else 0.0)
    assert read_training_record(output)["finetunes"][-1]["reconstruction_weight"] == summary.reconstruction_weight
    original = VLMDiffPipeline.from_pretrained(model_copy)
    for name in ("brick", "flat"):  # the known classes keep their thresholds
        assert tuned.thresholds.get(name).value == original.thresholds.get(name).value
    assert list(tuned.memory.config.class_names) == ["brick", "flat", NEW_CLASS]
    new_rows = tuned.memory.bank_class == tuned.memory.config.class_names.index(NEW_CLASS)
    assert int(new_rows.sum()) == 50
    assert torch.equal(tuned.memory.bank[~new_rows], original.memory.bank)  # the old classes' memory is kept
    assert tuned.memory.match_class(tuned.memory.embed(new_class_images(7)[-1])).name == NEW_CLASS
    replay = load_replay(output)
    assert set(replay.class_names) == {"brick", "flat", NEW_CLASS}
    assert (output / "MODEL_CARD.md").read_text() == "# tiny test model\n"
    changed = [k for k, v in folder_hashes(output).items() if k.startswith("unet/") and before.get(k) != v]
    assert changed, "the UNet was not trained"
    result = tuned(new_class_images(7)[-1], num_inference_steps=STEPS)[0]
    assert result.class_name == NEW_CLASS and result.is_anomalous is not None


def test_finetune_in_place_replaces_the_model_and_keeps_the_other_files(model_copy):
    user_files = add_user_files(model_copy)
    finetune(model_copy, new_class_images(4), NEW_CLASS, None, small_finetune())
    assert sorted(p.name for p in model_copy.parent.iterdir()) == ["model"]  # no backup or scratch left
    assert NEW_CLASS in VLMDiffPipeline.from_pretrained(model_copy).config.classes
    assert folder_hashes(model_copy).items() >= user_files.items()


def test_finetune_of_a_known_class_replaces_that_class_only(model_copy, tmp_path):
    output = tmp_path / "models" / "retuned"
    finetune(model_copy, new_class_images(5), "flat", output, small_finetune())
    original, tuned = VLMDiffPipeline.from_pretrained(model_copy), VLMDiffPipeline.from_pretrained(output)
    assert tuned.config.classes == ("brick", "flat") and list(tuned.memory.config.class_names) == ["brick", "flat"]
    brick, flat = (tuned.memory.bank_class == i for i in range(2))
    assert torch.equal(tuned.memory.bank[brick], original.memory.bank[original.memory.bank_class == 0])
    assert int(flat.sum()) == 50
    assert tuned.thresholds.get("brick").value == original.thresholds.get("brick").value
    assert tuned.thresholds.get("flat").value != original.thresholds.get("flat").value
    old_replay, replay = load_replay(model_copy), load_replay(output)
    old_flat = {bytes(img.numpy()) for img, n in zip(old_replay.images, old_replay.class_names) if n == "flat"}
    new_flat = [bytes(img.numpy()) for img, n in zip(replay.images, replay.class_names) if n == "flat"]
    assert len(new_flat) == 4 and not old_flat & set(new_flat)  # the class's replay images are the new ones
    assert replay.class_names.count("brick") == 2


def _fail_after_saving(pipeline, directory) -> None:
    raise RuntimeError("injected failure after the model was staged")


@pytest.mark.parametrize(("target", "value"), [
    ("add_class", None),  # after training, before anything is saved
    ("save_replay", _fail_after_saving),  # the staged folder is half written
])
@pytest.mark.parametrize("in_place", [False, True])
def test_a_failed_finetune_leaves_no_half_written_model(target, value, in_place, model_copy, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(finetune_module, target, value or fail)
    before = folder_hashes(model_copy)
    output = None if in_place else model_copy.parent / "model-green"
    with pytest.raises(RuntimeError, match="injected failure"):
        finetune(model_copy, new_class_images(4), NEW_CLASS, output, small_finetune())
    assert folder_hashes(model_copy) == before
    assert sorted(p.name for p in model_copy.parent.iterdir()) == ["model"]  # no new folder, no temporary ones


def test_a_failed_final_swap_restores_the_previous_model(model_copy, monkeypatch):
    """Replacing a model in place: if moving the new model's entries in fails, the old ones are put back."""
    from vlmdiff import model_folder

    before = folder_hashes(model_copy)
    original_move, failed = model_folder._move, []

    def move(source, destination):
        if Path(destination) == model_copy / "unet" and not failed:  # the new denoiser moving in
            failed.append(destination)
            raise OSError("injected failure while moving the new model in")
        original_move(source, destination)

    monkeypatch.setattr(model_folder, "_move", move)
    with pytest.raises(OSError, match="injected failure"):
        finetune(model_copy, new_class_images(4), NEW_CLASS, None, small_finetune())
    monkeypatch.undo()
    assert folder_hashes(model_copy) == before
    assert sorted(p.name for p in model_copy.parent.iterdir()) == ["model"]


@pytest.mark.parametrize("name", ["", "  ", "auto", "bad name", "a/b", "../up", "-leading", "x" * 49, "ünïcode"])
def test_invalid_class_names_are_rejected(name, saved_model, tmp_path):
    with pytest.raises(ValueError, match="invalid class name"):
        validate_class_name(name)
    with pytest.raises(ValueError, match="invalid class name"):
        finetune(saved_model, new_class_images(4), name, tmp_path / "out", small_finetune())
    assert not (tmp_path / "out").exists()


def test_valid_class_names_are_accepted():
    for name in ("bottle", "metal_nut", "Tire-3", "x" * 48, " padded "):
        assert validate_class_name(name) == name.strip()


def test_too_few_images_are_rejected(saved_model, tmp_path):
    before = folder_hashes(saved_model)
    with pytest.raises(ValueError, match="at least 4 normal images; got 3"):
        finetune(saved_model, new_class_images(3), NEW_CLASS, tmp_path / "out", small_finetune())
    assert not (tmp_path / "out").exists()
    assert folder_hashes(saved_model) == before


def _unet_dtypes(folder: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(folder / "unet" / "diffusion_pytorch_model.safetensors", framework="pt") as weights:
        return {weights.get_slice(name).get_dtype() for name in weights.keys()}


def test_finetune_keeps_the_dtype_file_modes_and_training_record(saved_model, tmp_path):
    """A float16 model (as `vlmdiff export` writes) stays float16, readable by all, with its record."""
    source = tmp_path / "models" / "half"
    VLMDiffPipeline.from_pretrained(saved_model).save_pretrained(source, dtype=torch.float16)
    for name in ("replay.safetensors", "MODEL_CARD.md"):
        shutil.copyfile(saved_model / name, source / name)
    (source / "training.json").write_text(json.dumps({"steps": 3500, "classes": ["brick", "flat"]}))
    output = tmp_path / "models" / "half-green"
    summary = finetune(source, new_class_images(4), NEW_CLASS, output, small_finetune())

    assert _unet_dtypes(source) == _unet_dtypes(output) == {"F16"}
    size = (output / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert size == (source / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size  # not re-saved as float32
    record = json.loads((output / "training.json").read_text())
    assert record["steps"] == 3500 and record["classes"] == ["brick", "flat"]  # the source's record is kept
    [entry] = record["finetunes"]
    assert entry["class_name"] == NEW_CLASS and entry["images_used"] == 4 and entry["steps"] == 2
    assert entry["threshold"] == pytest.approx(summary.threshold) and entry["config"]["memory_vectors"] == 50
    umask = os.umask(0)
    os.umask(umask)
    for path in (output, *output.rglob("*")):
        expected = (0o755 if path.is_dir() else 0o644) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    assert sorted(p.name for p in output.parent.iterdir()) == ["half", "half-green"]

    finetune(output, new_class_images(4), "green2", None, small_finetune())  # in place: the record grows
    assert [e["class_name"] for e in json.loads((output / "training.json").read_text())["finetunes"]] == [
        NEW_CLASS, "green2"]


def test_the_quick_phase_adds_the_class_without_touching_the_diffusion(model_copy, image_folder, tmp_path, capsys):
    output = tmp_path / "quick"
    assert main(_finetune_cli(model_copy, image_folder, "--memory-only", "--out", str(output))) == 0
    assert "memory only (generic reconstruction)" in capsys.readouterr().out
    before, after = folder_hashes(model_copy), folder_hashes(output)
    weights = [k for k in before if k.startswith(("unet/", "autoencoder/", "guidance/")) and k.endswith(".safetensors")]
    assert weights and all(after[name] == before[name] for name in weights), "the quick phase changed the diffusion"
    assert after["replay.safetensors"] == before["replay.safetensors"]  # no uncaptioned images in the replay set
    tuned = VLMDiffPipeline.from_pretrained(output)
    assert NEW_CLASS in tuned.memory.config.class_names and NEW_CLASS in tuned.config.classes
    threshold = tuned.thresholds.get(NEW_CLASS)
    assert threshold.method == "quantile" and 0 < threshold.expected_fpr <= 1
    assert json.loads((output / "training.json").read_text())["finetunes"][-1]["steps"] == 0


def _calibration_dataset(root: Path) -> Path:
    for name, images in (("flat", [noisy_colour(s) for s in range(6)]), ("brick", [brick_texture(s) for s in range(6)])):
        folder = root / name / "train" / "good"
        folder.mkdir(parents=True)
        for i, image in enumerate(images):
            image.save(folder / f"{i:03d}.png")
    return root


def test_calibrate_rebuilds_memory_and_thresholds_out_of_fold_into_a_new_folder(model_copy, tmp_path, capsys):
    data = _calibration_dataset(tmp_path / "data")
    before = folder_hashes(model_copy)
    output = tmp_path / "calibrated"
    assert main(["calibrate", str(model_copy), str(data), "--out", str(output), "--folds", "3",
                 "--memory-vectors", "30"]) == 0
    printed = capsys.readouterr()
    assert "expected false-positive rate" in printed.out
    assert "embedding" in printed.err and "out-of-fold scoring" in printed.err  # each phase's progress
    assert folder_hashes(model_copy) == before
    tuned = VLMDiffPipeline.from_pretrained(output)
    assert list(tuned.memory.config.class_names) == ["brick", "flat"]
    assert {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in tuned.memory.recipe.items()} == {
        k: list(v) if isinstance(v, (list, tuple)) else v for k, v in NormalFeatureMemory().recipe.items()}
    for name in ("brick", "flat"):
        item = tuned.thresholds.get(name)
        # the 0.99 quantile of 6 scores lies just below the largest: (1 + 1) / (6 + 1) expected above it
        assert item.method == "quantile" and item.expected_fpr == pytest.approx(2 / 7)
        assert item.value > item.normal_median
    after = folder_hashes(output)
    assert all(after[k] == v for k, v in before.items() if k.startswith("unet/") and k.endswith(".safetensors"))
    assert json.loads((output / "training.json").read_text())["calibration"]["images"] == 12
    assert main(["calibrate", str(model_copy), str(data), "--out", str(output)]) == 2  # no silent overwrite


def test_calibrate_with_fusion_chooses_every_class_weight(model_copy, tmp_path, capsys):
    data = _calibration_dataset(tmp_path / "data")
    output = tmp_path / "fused"
    assert main(["calibrate", str(model_copy), str(data), "--out", str(output), "--folds", "3",
                 "--memory-vectors", "30", "--fusion"]) == 0
    printed = capsys.readouterr().out
    weights = json.loads((output / "training.json").read_text())["calibration"]["reconstruction_weights"]
    assert set(weights) == {"brick", "flat"} and all(w in FUSION_WEIGHTS for w in weights.values())
    tuned = VLMDiffPipeline.from_pretrained(output)
    assert {name: w[RECONSTRUCTION] for name, w in tuned.config.anomaly.class_weights.items()} == {
        name: w for name, w in weights.items() if w > 0}
    for name in ("brick", "flat"):
        assert f"{name}: threshold" in printed and tuned.scorer.describe(name) in printed
    assert main(["calibrate", str(model_copy), str(data), "--out", str(tmp_path / "x"), "--fusion", "--no-memory"]) == 2
    assert "cannot go with --no-memory" in capsys.readouterr().err


@pytest.fixture
def image_folder(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(new_class_images(4)):
        image.save(folder / f"{i}.png")
    return folder


def _finetune_cli(model: Path, images: Path, *options: str) -> list[str]:
    return ["finetune", str(model), "--images", str(images), "--class", NEW_CLASS, "--steps", "2",
            "--batch-size", "2", *options]


@pytest.mark.parametrize(("out", "overwrite", "message"), [
    ("models", True, "contains the source model"),  # --out models used to delete models/model
    ("models/model", False, "is the source model; pass --overwrite to replace it in place"),
    ("models/model/unet", True, "is inside the source model"),
    ("models/other", False, "already holds a model; pass --overwrite"),
    ("notes", True, "is not empty and holds no model; it is never replaced"),
    ("notes/a.txt", True, "is a file"),
    ("link", True, "is a symbolic link"),
    ("dangling", True, "is a symbolic link"),
])
def test_finetune_refuses_an_output_that_could_lose_data(
    out, overwrite, message, model_copy, image_folder, tmp_path, capsys
):
    from vlmdiff import cli

    shutil.copytree(model_copy, tmp_path / "models" / "other")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("keep me")
    (tmp_path / "link").symlink_to(tmp_path / "models" / "other")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    before = {name: folder_hashes(tmp_path / name) for name in ("models", "notes")}
    options = ["--out", str(tmp_path / out), *(["--overwrite"] if overwrite else [])]
    assert cli.main(_finetune_cli(model_copy, image_folder, *options)) == 2
    error = capsys.readouterr().err
    assert f"vlmdiff finetune: error: the output folder {tmp_path / out} {message}" in error, error
    assert "Traceback" not in error
    assert {name: folder_hashes(tmp_path / name) for name in ("models", "notes")} == before
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["model", "other"]  # no scratch left


def test_finetune_overwrite_replaces_only_the_model_in_out(model_copy, image_folder, tmp_path, capsys):
    from vlmdiff import cli

    other = tmp_path / "models" / "other"
    shutil.copytree(model_copy, other)
    user_files = add_user_files(other)
    before = folder_hashes(model_copy)
    assert cli.main(_finetune_cli(model_copy, image_folder, "--out", str(other), "--overwrite")) == 0
    assert f"model written to {other}" in capsys.readouterr().out
    assert NEW_CLASS in VLMDiffPipeline.from_pretrained(other).config.classes
    assert folder_hashes(model_copy) == before
    assert folder_hashes(other).items() >= user_files.items()  # the .git/ and notes beside the model
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["model", "other"]


def test_finetune_of_a_hub_model_needs_an_output_folder(saved_model, monkeypatch):
    monkeypatch.setattr(finetune_module, "resolve_model_folder", lambda model: saved_model)
    before = folder_hashes(saved_model)
    with pytest.raises(ValueError, match="org/model is a hub model, not a local folder: give an output folder"):
        finetune("org/model", new_class_images(4), NEW_CLASS, None, small_finetune())
    assert folder_hashes(saved_model) == before


# ---------------------------------------------------------------- where export, finetune and calibrate write
@pytest.fixture
def user_store(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("VLMDIFF_USER_MODELS", str(tmp_path / "store"))
    return tmp_path / "store"


def test_finetune_without_out_writes_to_the_user_store(model_copy, image_folder, user_store, capsys):
    before = folder_hashes(model_copy)
    assert main(_finetune_cli(model_copy, image_folder, "--memory-only")) == 0
    [folder] = user_store.iterdir()
    assert f"model written to {folder} (the user model store" in capsys.readouterr().out
    assert folder_hashes(model_copy) == before  # the source is never replaced
    assert main(_finetune_cli(model_copy, image_folder, "--memory-only")) == 2  # the first one is not lost
    assert f"the output folder {folder} already holds a model; pass --overwrite" in capsys.readouterr().err
    assert main(["finetune", str(folder), "--images", str(image_folder), "--class", "green2", "--memory-only"]) == 0
    assert {NEW_CLASS, "green2"} <= set(VLMDiffPipeline.from_pretrained(folder).config.classes)  # in place
    assert [p.name for p in user_store.iterdir()] == [folder.name]


def test_export_writes_only_into_a_new_empty_or_model_folder_keeping_the_other_files(saved_model, tmp_path, capsys):
    keep = tmp_path / "d" / "x" / "keep"
    keep.parent.mkdir(parents=True)
    keep.write_text("mine")
    for out, message in ((tmp_path / "d", "is not empty and holds no model"),
                         (saved_model.parent, "contains the source model")):
        assert main(["export", str(saved_model), str(out), "--overwrite"]) == 2
        assert f"vlmdiff export: error: the output folder {out} {message}" in capsys.readouterr().err
    assert keep.read_text() == "mine" and (saved_model / "model_index.json").is_file()
    out = tmp_path / "half"
    assert main(["export", str(saved_model), str(out)]) == 0
    user_files = add_user_files(out)
    assert main(["export", str(saved_model), str(out)]) == 2
    assert "already holds a model; pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(saved_model), str(out), "--overwrite"]) == 0
    assert folder_hashes(out).items() >= user_files.items() and _unet_dtypes(out) == {"F16"}


def test_calibrate_refuses_data_without_a_class_of_the_model(model_copy, tmp_path, capsys):
    data = _calibration_dataset(tmp_path / "data")
    shutil.rmtree(data / "brick")
    before = folder_hashes(model_copy)
    assert main(["calibrate", str(model_copy), str(data), "--out", str(model_copy), "--overwrite"]) == 2
    assert "the datasets hold no images of 1 of the model's classes (brick)" in capsys.readouterr().err
    assert folder_hashes(model_copy) == before


def test_calibrate_keeps_the_other_files_and_its_thresholds_are_the_memorys_classes(
    model_copy, tmp_path, user_store, capsys
):
    data = _calibration_dataset(tmp_path / "data")
    (data / NEW_CLASS / "train" / "good").mkdir(parents=True)
    for i, image in enumerate(new_class_images(6)):  # a class the model does not know yet
        image.save(data / NEW_CLASS / "train" / "good" / f"{i}.png")
    stale = VLMDiffPipeline.from_pretrained(model_copy).thresholds
    stale.fit_quantile("gone", [1.0, 2.0, 3.0])  # a threshold of no class of the model
    stale.save(model_copy / "thresholds.json")
    user_files = add_user_files(model_copy)
    calibrate = ["calibrate", str(model_copy), str(data), "--folds", "2", "--memory-vectors", "30"]
    assert main(calibrate) == 0
    [folder] = user_store.iterdir()
    assert f"model written to {folder} (the user model store" in capsys.readouterr().out
    assert main(calibrate + ["--out", str(model_copy)]) == 2  # the source only with --overwrite
    assert main(calibrate + ["--out", str(model_copy), "--overwrite"]) == 0
    for folder in (folder, model_copy):
        tuned = VLMDiffPipeline.from_pretrained(folder)
        classes = ["brick", "flat", NEW_CLASS]
        assert list(tuned.config.classes) == sorted(tuned.thresholds.classes) == classes
        assert list(tuned.memory.config.class_names) == classes
    assert folder_hashes(model_copy).items() >= user_files.items()


@pytest.mark.skipif(not (DEFAULT_MODEL / "model_index.json").is_file(), reason="assets/vlmdiff-default is not shipped yet")
def test_the_shipped_model_is_never_written_unless_named_with_overwrite(saved_model, image_folder, user_store, capsys):
    before = folder_hashes(DEFAULT_MODEL)
    data = _calibration_dataset(user_store.parent / "data")
    shipped = str(DEFAULT_MODEL)
    for command in (_finetune_cli(DEFAULT_MODEL, image_folder, "--memory-only", "--out", shipped),
                    ["calibrate", shipped, str(data), "--out", shipped], ["export", shipped, shipped],
                    ["export", str(saved_model), shipped]):
        assert main(command) == 2
        assert f"error: the model folder {shipped} is read-only" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is read-only"):  # the library's in-place replace
        finetune(DEFAULT_MODEL, new_class_images(4), NEW_CLASS, None, small_finetune())
    assert main(_finetune_cli(DEFAULT_MODEL, image_folder, "--memory-only")) == 0  # no --out: the user store
    [folder] = user_store.iterdir()
    assert NEW_CLASS in VLMDiffPipeline.from_pretrained(folder).config.classes
    assert folder_hashes(DEFAULT_MODEL) == before


# ---------------------------------------------------------------- the shipped default
@pytest.mark.skipif(not (DEFAULT_MODEL / "model_index.json").is_file(), reason="assets/vlmdiff-default is not shipped yet")
def test_the_shipped_default_loads_offline_and_scores_a_defect_above_a_normal_image(monkeypatch):
    from vlmdiff.data.demo import render_sample

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    pipe = VLMDiffPipeline.from_pretrained(DEFAULT_MODEL)
    class_name = "brick"
    if class_name not in pipe.config.classes:
        pytest.skip(f"the default model has no '{class_name}' class")
    normal = render_sample(class_name, seed=0, split="test", index=0).image  # (H, W, 3) uint8
    defective = normal.copy()
    height, width = normal.shape[:2]
    rows, cols = np.ogrid[:height, :width]
    blob = (rows - height * 0.4) ** 2 + (cols - width * 0.6) ** 2 <= (min(height, width) * 0.08) ** 2
    defective[blob] = 15  # a dark blob
    defective[int(height * 0.7) : int(height * 0.7) + 3, int(width * 0.15) : int(width * 0.55)] = 10  # a scratch
    normal_result, defect_result = pipe([normal, defective], class_names=class_name)
    assert defect_result.score > normal_result.score
    assert defect_result.anomaly_map.shape == (height, width)
    assert defect_result.anomaly_map[blob].mean() > normal_result.anomaly_map[blob].mean()
    auto = pipe(normal)[0]
    assert auto.class_name == class_name  # the memory recognises the class


# ---------------------------------------------------------------- the clean-latent denoiser (tiny-x0)
@torch.no_grad()
def x0_mse(pipe: VLMDiffPipeline, data: TrainingSet, max_timestep: int) -> float:
    """How far the UNet's clean-latent prediction is from the clean latent on one fixed batch."""
    latents = encode_latents(pipe.autoencoder, data.float_images())
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(123))
    timesteps = torch.linspace(20, max_timestep - 1, len(latents)).long()
    noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents, noise, timesteps)
    context = load_text_encoder(pipe.config.text_encoder)(data.captions)
    return float(F.mse_loss(pipe.unet(noisy, timesteps, encoder_hidden_states=context).sample, latents))


def test_replace_denoiser_keeps_the_autoencoder_and_trains_the_clean_latent(two_class_data, tmp_path):
    pipe = build_pipeline("tiny")
    autoencoder = pipe.autoencoder
    autoencoder.fit_latent_space(two_class_data.float_images())  # unit-variance latents, as after stage 1
    pipe.replace_denoiser("tiny-x0")
    assert pipe.autoencoder is autoencoder and pipe.guidance is None
    assert pipe.config.sg_residuals == "none" and pipe.config.preset == "tiny-x0" and pipe.config.strength == 0.3
    assert pipe.config.max_train_timestep == 600
    assert pipe.scheduler.config.prediction_type == "sample"
    before = x0_mse(pipe, two_class_data, 300)
    train_diffusion(pipe, two_class_data, tmp_path / "run", train_config(max_steps=10, max_timestep=300, checkpoint_every=100))
    after = x0_mse(pipe, two_class_data, 300)
    assert after < 0.8 * before, (before, after)
    assert pipe.config.max_train_timestep == 300  # what it was trained on, for later fine-tunes
    pipe.save_pretrained(tmp_path / "model")
    assert not (tmp_path / "model" / "guidance").exists()
    loaded = VLMDiffPipeline.from_pretrained(tmp_path / "model")
    assert loaded.guidance is None and loaded.config.sg_residuals == "none"
    with pytest.raises(ValueError, match="32-channel latents"):
        build_pipeline("tiny-kl").replace_denoiser("tiny-x0")


def test_train_keep_calibration_trains_only_the_denoiser(model_copy, tmp_path):
    data = _calibration_dataset(tmp_path / "data")
    out = tmp_path / "run"
    options = ["train", str(data), "--out", str(out), "--init", str(model_copy), "--empty-captions", "--steps", "2",
               "--batch-size", "2", "--keep-calibration", "--memory-guidance", "1.5"]
    assert main(options + ["--no-memory"]) == 2 and not out.exists()  # it would change the scoring it keeps
    assert main(options) == 0
    before, after = (VLMDiffPipeline.from_pretrained(folder) for folder in (model_copy, out / "model"))
    assert torch.equal(before.memory.bank, after.memory.bank)
    assert after.config.anomaly == before.config.anomaly and after.config.classes == before.config.classes
    assert after.config.memory_guidance == 1.5 and before.config.memory_guidance == 0
    assert {c: after.thresholds.get(c).value for c in ("brick", "flat")} == {
        c: before.thresholds.get(c).value for c in ("brick", "flat")}
    changed = [name for name, p in after.unet.state_dict().items() if not torch.equal(p, before.unet.state_dict()[name])]
    assert changed  # the denoiser was trained
    record = json.loads((out / "model" / "training.json").read_text())
    assert record["calibration"] == f"kept from {model_copy}" and record["steps"] == 2


# ---------------------------------------------------------------- calibration that reuses work
def test_out_of_fold_scores_never_use_an_images_own_patches_and_embed_each_image_once(monkeypatch):
    """Five flat images and one brick in one class: out of fold the brick lies far from the memory (against
    its own patches it would be at 0), each image is embedded once, and the kept features are float16."""
    images = [noisy_colour(seed) for seed in range(5)] + [brick_texture(0)]
    data = TrainingSet((images_to_tensor(images, RESOLUTION) * 255).byte(), [""] * 6, ["a"] * 6, images)
    pipe = build_pipeline("tiny-kl")
    pipe.memory = NormalFeatureMemory(long_side=MEMORY_LONG_SIDE)
    embedded = []
    embed = NormalFeatureMemory.embed
    monkeypatch.setattr(NormalFeatureMemory, "embed", lambda self, image: embedded.append(image) or embed(self, image))
    kept = []
    embed_once = calibration.embed_once
    monkeypatch.setattr(calibration, "embed_once", lambda *a, **k: kept.append(embed_once(*a, **k)) or kept[-1])
    rows = calibration.memorise_and_score_out_of_fold(pipe, data, {"a"}, 3, 0, (MEMORY,))
    assert len(embedded) == 6 and len(rows) == 6  # embedded once, all scored
    assert all(f.dtype == torch.float16 for f, _ in kept[0].kept.values())
    assert all(c.rows.dtype == torch.float16 for turns in kept[0].candidates.values() for c in turns)
    held_out = [float(parts[MEMORY].mean()) for parts, _, _ in rows]
    in_memory = float(pipe.memory.distance_map(pipe.memory.embed(images[5]), "a").mean())
    assert in_memory < 0.05 * held_out[5]  # the model's memory holds the brick's patches ...
    assert held_out[5] > 3 * max(held_out[:5])  # ... but its out-of-fold score comes from the flat images only
    # the kept float16 features score as the image re-embedded does (the brick's fold, 2 of 3, holds image 2)
    fold_memory = pipe.memory.with_features([pipe.memory.embed(images[i]) for i in (0, 1, 3, 4)], "a")
    again = fold_memory.distance_map(pipe.memory.embed(images[5]), "a")
    assert torch.allclose(rows[5][0][MEMORY], again, rtol=1e-2, atol=0.05 * float(again.mean()))


def test_at_most_max_scored_images_of_a_class_are_scored_evenly_spread():
    names = ["a"] * 10 + ["b"] * 3
    data = TrainingSet(torch.zeros(13, 3, 4, 4, dtype=torch.uint8), [""] * 13, names)
    assert calibration.scored_images(data, {"a", "b"}, limit=4) == [0, 2, 5, 7, 10, 11, 12]
    assert calibration.scored_images(data, {"b"}) == [10, 11, 12]
