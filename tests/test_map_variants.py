"""Reconstruction, memory and fused maps scored from one diffusion pass."""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from conftest import STEPS, brick_texture, build_pipeline, fit_memory, noisy_colour
from vlmdiff.captioning import create_captioner
from vlmdiff.data import ImageRecord
from vlmdiff.images import load_image
from vlmdiff.map_variants import MAP_VARIANTS, evaluate_map_variants
from vlmdiff.scoring import MEMORY, RECONSTRUCTION


def _write_class(tmp_path, name, make, count=3):
    """Normal and defective test images (a dark square) with masks of one synthetic class."""
    records = []
    for index in range(count):
        image = make(100 + index)
        path = tmp_path / f"{name}_good_{index}.png"
        image.save(path)
        records.append(ImageRecord(path, name, "test"))
        pixels = np.asarray(image).copy()
        pixels[20:36, 24:40] = 0
        mask = np.zeros(pixels.shape[:2], np.uint8)
        mask[20:36, 24:40] = 255
        bad, bad_mask = tmp_path / f"{name}_bad_{index}.png", tmp_path / f"{name}_bad_{index}_mask.png"
        Image.fromarray(pixels).save(bad)
        Image.fromarray(mask).save(bad_mask)
        records.append(ImageRecord(bad, name, "test", 1, "square", bad_mask))
    return records


@pytest.fixture(scope="module")
def pipe_and_records(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("variants")
    pipe = build_pipeline("tiny", num_inference_steps=STEPS, anomaly={"weights": {RECONSTRUCTION: 1.0, MEMORY: 1.0}})
    normals = [noisy_colour(i) for i in range(4)] + [brick_texture(i) for i in range(4)]
    pipe.memory = fit_memory(normals, ["flat"] * 4 + ["brick"] * 4)
    records = _write_class(tmp_path, "flat", noisy_colour) + _write_class(tmp_path, "brick", brick_texture)
    return pipe, records


def test_every_variant_has_metrics_per_class_and_settings_are_restored(pipe_and_records):
    pipe, records = pipe_and_records
    weights = dict(pipe.config.anomaly.weights)
    report = evaluate_map_variants(pipe, records, progress=False)
    assert set(report.metrics) == set(MAP_VARIANTS)
    for per_class in report.metrics.values():
        assert set(per_class) == {"flat", "brick"}
        assert all(math.isfinite(m.aupro) and math.isfinite(m.image_auroc) for m in per_class.values())
    assert report.auto_class_accuracy == 1.0  # the two classes are far apart
    assert pipe.config.anomaly.weights == weights


def test_memory_variant_equals_the_pipeline_with_memory_only(pipe_and_records):
    pipe, records = pipe_and_records
    report = evaluate_map_variants(pipe, records, {"memory": MAP_VARIANTS["memory"]}, progress=False)
    pipe.config.anomaly.weights[RECONSTRUCTION] = 0.0
    try:
        results = pipe([r.image_path for r in records if r.class_name == "flat"], num_inference_steps=STEPS, class_names="flat")
    finally:
        pipe.config.anomaly.weights[RECONSTRUCTION] = 1.0
    from vlmdiff.metrics import image_auroc

    labels = [r.label for r in records if r.class_name == "flat"]
    assert report.metrics["memory"]["flat"].image_auroc == pytest.approx(image_auroc([r.score for r in results], labels))
    # a dark square on a flat colour is obvious to the memory of normal patches
    assert report.metrics["memory"]["flat"].image_auroc == 1.0


def test_captioned_reconstructions_are_conditioned_on_each_images_caption(pipe_and_records, monkeypatch):
    pipe, records = pipe_and_records
    flat = [r for r in records if r.class_name == "flat"]
    variant = {"reconstruction": MAP_VARIANTS["reconstruction"]}
    given: list[list[str] | None] = []
    prepare_batch = pipe.prepare_batch

    def spy(images, class_names, settings, *args, **kwargs):
        given.append(settings.captions)
        return prepare_batch(images, class_names, settings, *args, **kwargs)

    monkeypatch.setattr(pipe, "prepare_batch", spy)
    empty = evaluate_map_variants(pipe, flat, variant, progress=False)
    assert given == [None]  # the empty caption (published test setting)
    given.clear()
    captioned = evaluate_map_variants(pipe, flat, variant, progress=False, caption_images=True)
    expected = create_captioner(pipe.config.captioner).caption([load_image(r.image_path) for r in flat])
    assert given == [expected] and len(set(expected)) > 1  # each image its own description, in order
    assert captioned.reconstruction["flat"]["normal_psnr"] != empty.reconstruction["flat"]["normal_psnr"]
