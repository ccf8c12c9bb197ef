"""The shipped default model gives every shipped example its class and the right verdict ("auto" class),
and its reconstruction removes built-in defects while keeping the rest of the image."""
from __future__ import annotations

from pathlib import Path

import pytest

from vlmdiff import VLMDiffPipeline
from vlmdiff.images import load_image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "assets" / "examples").glob("*.png"))
CLASS_OF_PREFIX = {"tire": "mvtec3d_tire"}  # example names use the short class name


@pytest.fixture(scope="module")
def shipped() -> VLMDiffPipeline:
    return VLMDiffPipeline.from_pretrained(ROOT / "assets" / "vlmdiff-default")


def test_there_are_normal_and_defective_examples():
    stems = [path.stem for path in EXAMPLES]
    assert any(s.endswith("_good") for s in stems) and any(not s.endswith("_good") for s in stems)


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_every_shipped_example_gets_its_class_and_the_right_verdict(shipped, path):
    prefix = path.stem.split("_")[0]
    anomalous = not path.stem.endswith("_good")
    result = shipped(load_image(path), return_reconstruction=False)[0]
    assert result.class_name == CLASS_OF_PREFIX.get(prefix, prefix) and not result.unknown_class
    assert result.is_anomalous == anomalous, f"{path.stem}: score {result.score:.4f}, threshold {result.threshold:.4f}"
    assert (result.normalized_score > 0.5) == anomalous


@pytest.mark.parametrize("class_name,defect", [("brick", "crack"), ("washer", "broken"), ("textile", "thread"),
                                               ("circuit", "scratch")])
def test_the_default_reconstruction_removes_defects_and_keeps_the_rest(shipped, class_name, defect):
    """At the model's own settings (memory-guided) the reconstruction is near the defect-free source inside
    a built-in defect and keeps the image outside it."""
    from PIL import Image

    from vlmdiff.data.demo import render_sample
    from vlmdiff.reconstruction_quality import ReconstructionJudge

    sample = render_sample(class_name, 123, "test", 0, defect)
    image = Image.fromarray(sample.image)
    assert shipped.config.memory_guidance > 0
    reconstruction = shipped(image, class_names=class_name)[0].reconstruction
    quality = ReconstructionJudge().measure(image, reconstruction, Image.fromarray(sample.clean), sample.mask)
    assert quality.defect_removal < 0.6  # 1: the defect copied, 0: the clean source
    assert quality.psnr_outside_defect > 30  # dB against the input
