"""The built-in benchmark: deterministic, MVTec layout, masks exactly where pixels changed."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from vlmdiff.cli import main
from vlmdiff.data import read_dataset
from vlmdiff.data import demo_bottle, demo_box, demo_connector, demo_pins
from vlmdiff.data.demo import (DEFAULT_CLASSES, DEMO_CLASSES, LOGICAL_CLASSES, TUNE_CLASSES, VALIDATION_CLASSES,
                               DemoConfig, make_demo_dataset, render_sample)

TINY = DemoConfig(n_train=2, n_test_good=1, n_defective=3, size=96)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_readable_layout(tmp_path: Path) -> None:
    records = make_demo_dataset(tmp_path / "a", seed=3, config=TINY)
    make_demo_dataset(tmp_path / "b", seed=3, config=TINY)
    make_demo_dataset(tmp_path / "c", seed=4, config=TINY)
    a, b, c = (_tree_bytes(tmp_path / name) for name in "abc")
    assert a == b and a != c
    assert "README.txt" in a and b"CC0" in a["README.txt"]
    assert len(records) == len(DEFAULT_CLASSES) * 6
    read = read_dataset(tmp_path / "a")
    assert sorted(map(str, (r.image_path for r in read))) == sorted(map(str, (r.image_path for r in records)))
    assert {r.class_name for r in read} == set(DEFAULT_CLASSES)
    assert all(r.mask_path is not None for r in read if r.is_anomalous)
    # each defective image comes with its defect-free source, which differs from it only inside the mask
    for record in (r for r in read if r.is_anomalous):
        image, clean = (np.asarray(Image.open(p)) for p in (record.image_path, record.clean_path))
        changed = (image != clean).any(axis=2)
        mask = np.asarray(Image.open(record.mask_path)) > 0
        assert changed.any() and not (changed & ~mask).any()
    assert all(r.clean_path is None for r in read if not r.is_anomalous)


@pytest.mark.parametrize("class_name", sorted(DEMO_CLASSES))
def test_masks_cover_exactly_the_changed_pixels(class_name: str) -> None:
    normal = render_sample(class_name, 0, "test", 0, size=96)
    assert normal.mask is None and np.array_equal(normal.image, normal.clean)
    for defect in DEMO_CLASSES[class_name].defects:
        for index in range(2):
            sample = render_sample(class_name, 0, "test", index, defect, size=96)
            changed = (sample.image != sample.clean).any(axis=2)
            assert changed.any() and sample.mask.any()
            assert not (changed & ~sample.mask).any(), f"{class_name}/{defect}: change outside the mask"
            assert changed.sum() >= 0.3 * sample.mask.sum(), f"{class_name}/{defect}: mask much larger than change"


def test_normal_images_vary() -> None:
    first, second = (render_sample("washer", 0, "train", i, size=96).image for i in range(2))
    assert np.abs(first.astype(int) - second.astype(int)).mean() > 3


def test_cli_refuses_non_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "keep.txt").write_text("x")
    assert main(["make-demo-data", str(tmp_path), "--classes", "brick"]) == 2
    assert "not empty" in capsys.readouterr().err
    args = ["make-demo-data", str(tmp_path), "--classes", "brick", "--n-train", "1", "--n-test-good", "1",
            "--n-defective", "1", "--size", "64", "--overwrite"]
    assert main(args) == 0
    assert (tmp_path / "keep.txt").is_file() and len(read_dataset(tmp_path / "brick")) == 3


def test_logical_classes_are_apart_from_the_default_benchmark_and_split() -> None:
    assert DemoConfig().classes == ("brick", "gravel", "grass", "textile", "washer", "circuit", "screw", "spring",
                                    "fabric")  # the shipped model's benchmark, unchanged
    assert set(LOGICAL_CLASSES) == set(DEMO_CLASSES) - set(DEFAULT_CLASSES)
    logical = set(LOGICAL_CLASSES)
    assert len(logical & set(TUNE_CLASSES)) == 2 and len(logical & set(VALIDATION_CLASSES)) == 2
    assert set(TUNE_CLASSES) | set(VALIDATION_CLASSES) == set(DEMO_CLASSES)


def _scenes(class_name: str, n: int = 6, size: int = 128):
    return [DEMO_CLASSES[class_name].scene(np.random.default_rng(i), size) for i in range(n)]


def test_normal_logical_images_obey_their_rule() -> None:
    for scene in _scenes("bottle"):
        p = scene.params
        assert abs(p.level - demo_bottle.FILL_LEVEL) < 5 and p.label == demo_bottle.OWN_LABEL
        assert np.abs(np.subtract(p.liquid, demo_bottle.JUICE)).max() < 20
    for scene in _scenes("box"):
        kinds = [[item.kind for item in items] for items in scene.params.items]
        assert kinds == [[kind] for kind in range(len(demo_box.ITEMS))]  # one item, the compartment's own
    for scene in _scenes("connector"):
        assert np.abs(np.subtract(scene.params.colours, demo_connector.WIRE_COLOURS)).max() < 20
    for scene in _scenes("pins"):
        assert np.abs(np.subtract(scene.params.pins, demo_pins.HOLES)).max() < 2


@pytest.mark.parametrize("class_name", LOGICAL_CLASSES)
def test_logical_normal_images_vary(class_name: str) -> None:
    images = [scene.image.astype(int) for scene in _scenes(class_name, 3)]
    assert all(np.abs(a - b).mean() > 3 for a, b in zip(images, images[1:]))


@pytest.mark.parametrize(("class_name", "defect", "regions"), [
    ("box", "swapped_items", 2), ("connector", "wrong_wire", 1), ("bottle", "swapped_label", 1),
    ("bottle", "missing_label", 1), ("box", "missing_item", 1), ("pins", "missing_pin", 1), ("pins", "extra_pin", 1),
])
def test_logical_masks_mark_every_wrong_region(class_name: str, defect: str, regions: int) -> None:
    """A swap marks both swapped places, each as a whole; a missing part marks where it should be."""
    for index in range(3):
        sample = render_sample(class_name, 0, "test", index, defect, size=128)
        count, _ = cv2.connectedComponents(sample.mask.astype(np.uint8))
        assert count - 1 == regions, f"{class_name}/{defect} {index}: {count - 1} regions"


def test_cli_logical_writes_only_the_logical_classes(tmp_path: Path) -> None:
    args = ["make-demo-data", str(tmp_path), "--logical", "--n-train", "1", "--n-test-good", "1",
            "--n-defective", "1", "--size", "64"]
    assert main(args) == 0
    assert {r.class_name for r in read_dataset(tmp_path)} == set(LOGICAL_CLASSES)
