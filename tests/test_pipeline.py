"""VLMDiffPipeline end to end on tiny random models: shapes, batching, save/load, hint path, strength, captions."""
from __future__ import annotations

import json
import math
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import (
    PRESET_NAMES, RESOLUTION, STEPS, brick_texture, build_pipeline, fit_memory, noisy_colour, perturb_,
)
from vlmdiff import DetectionSettings, ImageInputError, VLMDiffPipeline
from vlmdiff.colour import match_colours
from vlmdiff.images import images_to_tensor, load_image, tensor_to_images
from vlmdiff.models import decode_latents, encode_latents
from vlmdiff import pipeline as pipeline_module
from vlmdiff.pipeline import AUTO_CLASS, STAGES
from vlmdiff.presets import PRESETS
from vlmdiff.scoring import MEMORY, RECONSTRUCTION
from vlmdiff.thresholds import Thresholds

@pytest.fixture(scope="module")
def batch_results(pipes, random_images):
    """One batched call per preset on three images of different sizes."""
    return {name: pipe(random_images, num_inference_steps=STEPS, seed=0) for name, pipe in pipes.items()}


def as_array(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def model_tensor(pipe: VLMDiffPipeline, image) -> torch.Tensor:
    return images_to_tensor([load_image(image)], pipe.config.resolution)


# ---------------------------------------------------------------- shapes and batching
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_results_have_the_original_image_size(preset, batch_results, random_images):
    results = batch_results[preset]
    assert len(results) == len(random_images)
    for result, image in zip(results, random_images):
        height, width = image.shape[:2]
        assert result.anomaly_map.shape == (height, width)
        assert result.anomaly_map.dtype == np.float32
        assert np.isfinite(result.anomaly_map).all()
        assert result.reconstruction.size == (width, height)
        assert result.reconstruction.mode == "RGB"
        assert isinstance(result.score, float) and math.isfinite(result.score)
        assert result.class_name == "unknown"  # no memory to guess the class from
        assert result.threshold is None and result.is_anomalous is None and result.normalized_score is None


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_batch_result_equals_per_image_result(preset, pipes, batch_results, random_images):
    pipe = pipes[preset]
    batched = batch_results[preset]
    singles = [pipe(image, num_inference_steps=STEPS, seed=0)[0] for image in random_images]  # a bare image, not a list
    chunked = pipe(random_images, num_inference_steps=STEPS, seed=0, batch_size=2)
    for other in (singles, chunked):
        for a, b in zip(batched, other):
            np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-4, rtol=1e-4)
            assert a.score == pytest.approx(b.score, abs=1e-4, rel=1e-4)
            assert np.abs(as_array(a.reconstruction) - as_array(b.reconstruction)).max() <= 1  # uint8 rounding


def test_seed_changes_the_noise(tiny_kl_pipe, random_images):
    first, second = (tiny_kl_pipe(random_images[0], num_inference_steps=STEPS, seed=s)[0] for s in (0, 1))
    assert not np.array_equal(first.anomaly_map, second.anomaly_map)


# ---------------------------------------------------------------- save / load
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_save_and_load_give_bit_identical_outputs(preset, tmp_path, random_images):
    base = build_pipeline(preset)
    perturb_(base.guidance)  # non-trivial SG weights must survive the round trip too
    if preset == "tiny":
        base.autoencoder.fit_latent_space(torch.rand(4, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0)))
    memory = fit_memory(
        [noisy_colour(0), noisy_colour(1), brick_texture(0), brick_texture(1, size=(80, 60))],
        ["bottle", "bottle", "cable", "cable"], vectors_per_class=30,
    )
    thresholds = Thresholds()
    thresholds.set_manual("bottle", 1.0, [0.0, 0.5, 2.0])
    thresholds.fit_quantile("cable", [0.5, 1.0, 1.5, 2.0], q=0.5)
    base.config.anomaly.weights[MEMORY] = 0.5
    pipe = VLMDiffPipeline(**{k: v for k, v in base.components().items()}, config=base.config, memory=memory, thresholds=thresholds)

    folder = tmp_path / "model"
    pipe.save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "VLMDiffPipeline"
    for name in ("autoencoder", "unet", "guidance", "memory"):
        assert name in index
        assert (folder / name / "config.json").is_file()
        assert list((folder / name).glob("*.safetensors")), f"no weights in {name}/"
    assert (folder / "scheduler" / "scheduler_config.json").is_file()
    assert (folder / "pipeline_config.json").is_file()
    assert (folder / "thresholds.json").is_file()

    loaded = VLMDiffPipeline.from_pretrained(folder)
    assert loaded.config == pipe.config
    assert loaded.thresholds.classes == ["bottle", "cable"]
    assert loaded.memory is not None and torch.equal(loaded.memory.bank, memory.bank)
    assert torch.equal(loaded.memory.bank_class, memory.bank_class)
    assert torch.equal(loaded.memory.class_means, memory.class_means)
    assert torch.equal(loaded.memory.class_radii, memory.class_radii) and bool((memory.class_radii > 0).all())
    loaded_config = {k: tuple(v) if isinstance(v, list) else v for k, v in loaded.memory.config.items() if not k.startswith("_")}
    assert loaded_config == {k: v for k, v in memory.config.items() if not k.startswith("_")}
    images = random_images[:2]
    before = pipe(images, num_inference_steps=STEPS, seed=3)
    after = loaded(images, num_inference_steps=STEPS, seed=3)
    for a, b in zip(before, after):
        assert np.array_equal(a.anomaly_map, b.anomaly_map)
        assert np.array_equal(np.asarray(a.reconstruction), np.asarray(b.reconstruction))
        assert a.score == b.score
        assert a.class_name == b.class_name and a.class_name in ("bottle", "cable")  # guessed by the memory
        assert (a.threshold, a.is_anomalous, a.normalized_score) == (b.threshold, b.is_anomalous, b.normalized_score)
        assert a.class_match == b.class_match
        assert (a.is_anomalous is not None) == a.class_match.known  # random noise may match no class: no verdict


# ---------------------------------------------------------------- the normal-feature memory in the pipeline
def with_blob(image, box: tuple[int, int, int, int]):
    """A copy of a PIL image with a dark square (left, top, right, bottom)."""
    pixels = np.array(image)
    left, top, right, bottom = box
    pixels[top:bottom, left:right] = 20
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def memory_pipe() -> VLMDiffPipeline:
    """tiny-kl with a 'flat' / 'brick' memory fused into the map, and thresholds for both classes."""
    pipe = build_pipeline("tiny-kl")
    pipe.memory = fit_memory(
        [noisy_colour(0, (300, 200)), noisy_colour(1, (300, 200)), brick_texture(0, (300, 200)), brick_texture(1)],
        ["flat", "flat", "brick", "brick"], vectors_per_class=60,
    )
    pipe.config.anomaly.weights[MEMORY] = 1.0
    pipe.thresholds.set_manual("flat", 1.0, [0.0, 1.0, 2.0])
    pipe.thresholds.set_manual("brick", 3.0, [0.0, 3.0, 6.0])
    return pipe


@pytest.mark.parametrize(("width", "height"), [(300, 200), (120, 240)])
def test_fused_map_keeps_the_original_aspect(width, height, memory_pipe):
    image = noisy_colour(5, (width, height))
    with torch.no_grad():  # as calibration calls it (cached caption contexts are inference tensors)
        batch = memory_pipe.prepare_batch([image], [AUTO_CLASS], DetectionSettings(1.0, STEPS).resolved(memory_pipe.config))
        components = memory_pipe.component_maps(batch)
    assert batch.class_names == ["flat"] and batch.reconstructions.shape == (1, 3, RESOLUTION, RESOLUTION)
    parts = components[0]
    assert parts[RECONSTRUCTION].shape == (RESOLUTION, RESOLUTION)
    assert parts[MEMORY].shape == memory_pipe.memory.embed(image).shape[1:]  # the memory's own grid
    size = memory_pipe.working_size(width, height)
    assert max(size) == RESOLUTION and abs(size[1] / size[0] - width / height) < 0.05
    fused, score = memory_pipe.scorer.fuse(parts, size)
    assert fused.shape == size and np.isfinite(score)
    result = memory_pipe(image, num_inference_steps=STEPS)[0]
    assert result.anomaly_map.shape == (height, width)
    assert result.score == pytest.approx(score, rel=1e-5)


def test_memory_map_finds_a_defect_where_it_is_in_a_wide_image():
    """Memory only: a dark square on the right of a 300x200 image makes the full-size map peak there."""
    pipe = build_pipeline("tiny-kl")
    # a 128 px memory: the default blocks (stride 8 and 16) see a 50 px square in a 300 px image as one cell at 64 px
    pipe.memory = fit_memory([noisy_colour(0, (300, 200)), noisy_colour(1, (300, 200))], ["flat", "flat"], 200,
                             long_side=128)
    pipe.config.anomaly.weights = {MEMORY: 1.0, RECONSTRUCTION: 0.0}
    box = (210, 40, 260, 90)
    image = noisy_colour(6, (300, 200))
    normal, defective = pipe([image, with_blob(image, box)], num_inference_steps=STEPS)
    anomaly_map = defective.anomaly_map
    assert anomaly_map.shape == (200, 300)
    row, col = np.unravel_index(int(anomaly_map.argmax()), anomaly_map.shape)
    left, top, right, bottom = box
    assert top - 30 <= row < bottom + 30 and left - 30 <= col < right + 30
    assert anomaly_map[top:bottom, left:right].mean() > 2 * anomaly_map[:, :120].mean()
    assert defective.score > normal.score


def test_auto_class_is_the_memory_nearest_class(memory_pipe):
    images = [noisy_colour(11, (200, 200)), brick_texture(12, (160, 120))]
    memory = memory_pipe.memory
    expected = [memory.match_class(memory.embed(image)).name for image in images]
    assert expected == ["flat", "brick"]
    for class_names in ("auto", None):
        results = memory_pipe(images, num_inference_steps=STEPS, class_names=class_names)
        assert [r.class_name for r in results] == expected
        for result in results:
            assert result.class_match is not None and result.class_match.name == result.class_name
            # a verdict only when the image lies within reach of its class
            assert (result.is_anomalous is not None) == result.class_match.known == (not result.unknown_class)
    given = memory_pipe(images, num_inference_steps=STEPS, class_names=["brick", "brick"])
    assert [r.class_name for r in given] == ["brick", "brick"]
    assert all(r.class_match is None and r.is_anomalous is not None for r in given)  # a given class: always a verdict
    assert given[0].score > results[0].score  # the flat image is searched among 'brick' patches only
    assert given[1].score == pytest.approx(results[1].score, rel=1e-6)


def test_memory_weight_without_a_memory_is_rejected(random_images):
    pipe = build_pipeline("tiny-kl")
    pipe.config.anomaly.weights[MEMORY] = 0.5
    with pytest.raises(ValueError, match="memory"):
        pipe(random_images[0], num_inference_steps=STEPS)


def test_loading_in_threads_leaves_other_threads_models_real(tmp_path):
    """A public app loads visitors' models while other requests build modules: no thread may get meta tensors."""
    folder = tmp_path / "model"
    build_pipeline("tiny").save_pretrained(folder)
    built_on = []

    def load():
        for _ in range(3):
            VLMDiffPipeline.from_pretrained(folder)

    def build():
        for _ in range(40):
            built_on.append(torch.nn.Linear(4, 4).weight.device.type)

    threads = [threading.Thread(target=load), threading.Thread(target=load), threading.Thread(target=build)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(built_on) == {"cpu"}
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"  # and nothing stays patched


def test_from_pretrained_reports_missing_folders(tmp_path):
    with pytest.raises(FileNotFoundError):
        VLMDiffPipeline.from_pretrained(tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        VLMDiffPipeline.from_pretrained(tmp_path)


def test_pipelines_from_a_preset_do_not_share_config():
    pipe = build_pipeline("tiny-kl")
    pipe.config.anomaly.weights[MEMORY] = 0.7
    pipe.config.anomaly.scales[RECONSTRUCTION] = 3.0
    assert PRESETS["tiny-kl"].pipeline.anomaly.weights[MEMORY] == 0.0
    assert RECONSTRUCTION not in PRESETS["tiny-kl"].pipeline.anomaly.scales
    assert VLMDiffPipeline.from_preset("tiny-kl", resolution=RESOLUTION).config.anomaly.weights[MEMORY] == 0.0


# ---------------------------------------------------------------- the SG hint path
def _denoise_with_hints(pipe: VLMDiffPipeline, images: torch.Tensor) -> torch.Tensor:
    """Denoise the SAME latent twice (batch of 2), each with the hint of a different image."""
    latents = encode_latents(pipe.autoencoder, images[:1]).repeat(2, 1, 1, 1)
    context = pipe.caption_context(None, 2)
    timesteps = pipe.timesteps(DetectionSettings(strength=1.0, num_inference_steps=STEPS))
    return pipe.denoise(pipe.prepare_latents(latents, timesteps, seed=0), timesteps, images * 2 - 1, context)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_untrained_sg_network_leaves_the_unet_unchanged(preset, pipes, random_images):
    pipe = pipes[preset]
    images = torch.cat([model_tensor(pipe, image) for image in random_images[:2]])
    with torch.no_grad():
        latents = encode_latents(pipe.autoencoder, images)
        context = pipe.caption_context(None, 2)
        guided = pipe.predict(latents, 999, context, images * 2 - 1)
        plain = pipe.unet(latents, torch.full((2,), 999), encoder_hidden_states=context).sample
        assert torch.equal(guided, plain)
        denoised = _denoise_with_hints(pipe, images)
    assert torch.equal(denoised[0], denoised[1])  # the hint has no effect yet


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_hint_changes_the_reconstruction(preset, random_images):
    pipe = build_pipeline(preset)
    perturb_(pipe.guidance)  # as after training: zero convs are no longer zero
    images = torch.cat([model_tensor(pipe, image) for image in random_images[:2]])
    with torch.no_grad():
        denoised = _denoise_with_hints(pipe, images)
        assert torch.isfinite(denoised).all()
        assert (denoised[0] - denoised[1]).abs().max() > 1e-5  # same latent and noise, different hint
        decoded = decode_latents(pipe.autoencoder, denoised)
    assert not torch.equal(decoded[0], decoded[1])
    first, second = pipe(random_images[:2], strength=1.0, num_inference_steps=STEPS)
    assert not np.array_equal(np.asarray(first.reconstruction.resize((64, 64))), np.asarray(second.reconstruction.resize((64, 64))))


# ---------------------------------------------------------------- strength
@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_strength_zero_returns_the_autoencoder_reconstruction(preset, pipes, random_images):
    """At strength 0 the reconstruction is the autoencoder's, in the input's colours."""
    pipe = pipes[preset]
    image = random_images[0]  # 64x64: no resize on the way back
    result = pipe(image, strength=0.0)[0]
    with torch.no_grad():
        ae, tensor = pipe.autoencoder, model_tensor(pipe, image)
        expected = tensor_to_images(match_colours(tensor, decode_latents(ae, encode_latents(ae, tensor))))[0]
    difference = np.abs(np.asarray(result.reconstruction, np.int16) - np.asarray(expected, np.int16))
    assert difference.max() <= 1  # one 8-bit level: float kernels may round differently across runs
    assert np.isfinite(result.anomaly_map).all()


@pytest.mark.parametrize("strength", [-0.1, 1.01, float("nan")])
def test_strength_outside_unit_interval_is_rejected(strength, tiny_kl_pipe, random_images):
    with pytest.raises(ValueError, match="strength"):
        tiny_kl_pipe(random_images[0], strength=strength)


def test_argument_counts_and_bad_images_are_rejected(tiny_kl_pipe, random_images):
    with pytest.raises(ValueError, match="captions"):
        tiny_kl_pipe(random_images[:2], captions=["a bottle"])
    with pytest.raises(ValueError, match="class names"):
        tiny_kl_pipe(random_images[:2], class_names=["bottle"])
    with pytest.raises(ValueError, match="num_inference_steps"):
        tiny_kl_pipe(random_images[0], num_inference_steps=0)
    with pytest.raises(ImageInputError, match="at least 32"):
        tiny_kl_pipe([random_images[0], np.zeros((16, 16, 3), np.uint8)])


# ---------------------------------------------------------------- captions
def test_captions_with_classifier_free_guidance(tiny_kl_pipe, random_images):
    images = random_images[:2]
    captions = ["a photo of a bottle", "a scratched metal nut"]
    context = tiny_kl_pipe.caption_context(captions, 2)
    assert context.shape == (2, 77, tiny_kl_pipe.unet.config.cross_attention_dim)
    guided = tiny_kl_pipe(images, captions=captions, guidance_scale=3.0, num_inference_steps=STEPS)
    plain = tiny_kl_pipe(images, num_inference_steps=STEPS)
    for result, reference, image in zip(guided, plain, images):
        assert result.anomaly_map.shape == image.shape[:2]
        assert np.isfinite(result.anomaly_map).all() and math.isfinite(result.score)
        assert not np.array_equal(result.anomaly_map, reference.anomaly_map)  # the caption reached the UNet


def _in_order(text: str, names: tuple[str, ...]) -> bool:
    """Whether each name stands in `text` as a word after the one before it."""
    position = 0
    for name in names:
        found = re.search(rf"\b{name}\b", text[position:])
        if found is None:
            return False
        position += found.end()
    return True


def test_readme_and_docstring_name_the_stages_in_order():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    how_it_works = readme.split("## How it works", 1)[1].split("```")[1]
    assert _in_order(how_it_works, ("check_inputs", *STAGES))
    assert _in_order(pipeline_module.__doc__, ("check_inputs", *STAGES))
