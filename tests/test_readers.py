"""Dataset readers on small trees written by the tests, and on the shared tire data when present."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlmdiff.data import (
    NORMAL_DEFECT, detect_layout, read_coco_ad, read_dataset, read_folder, read_mvtec, read_realiad, read_visa,
)

TIRE = Path(__file__).resolve().parents[2] / "shared" / "data" / "mvtec3d_tire"


def _png(path: Path, size: tuple[int, int] = (8, 6), mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)
    return path


def _mvtec_class(root: Path, name: str) -> Path:
    base = root / name
    for i in range(3):
        _png(base / "train" / "good" / f"{i:03d}.png")
    _png(base / "test" / "good" / "000.png")
    for i in range(2):
        _png(base / "test" / "crack" / f"{i:03d}.png")
        _png(base / "ground_truth" / "crack" / f"{i:03d}_mask.png", mode="L")
    return base


def test_mvtec_root_and_single_class(tmp_path: Path) -> None:
    _mvtec_class(tmp_path, "bottle")
    _mvtec_class(tmp_path, "wood")
    records = read_mvtec(tmp_path)
    assert Counter(r.class_name for r in records) == {"bottle": 6, "wood": 6}
    defective = [r for r in records if r.is_anomalous]
    assert len(defective) == 4 and all(r.defect_type == "crack" and r.mask_path.is_file() for r in defective)
    assert all(r.mask_path is None and r.defect_type == NORMAL_DEFECT for r in records if not r.is_anomalous)
    assert len(read_mvtec(tmp_path, class_names=["wood"], splits=["train"])) == 3
    single = read_dataset(tmp_path / "bottle")
    assert {r.class_name for r in single} == {"bottle"} and len(single) == 6
    assert detect_layout(tmp_path) == "mvtec"


def test_mvtec_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        read_mvtec(tmp_path / "missing_dir")
    base = _mvtec_class(tmp_path, "bottle")
    with pytest.raises(FileNotFoundError, match="nope"):
        read_mvtec(tmp_path, class_names=["nope"])
    (base / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"ground_truth/crack/001_mask\.png"):
        read_mvtec(tmp_path)
    _png(base / "ground_truth" / "crack" / "001_mask.png", size=(9, 6), mode="L")
    masks = [r.mask_path for r in read_mvtec(tmp_path)]  # another size than its image: left to the jobs (skipped)
    assert base / "ground_truth" / "crack" / "001_mask.png" in masks
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match="class 'empty' has no images"):
        read_mvtec(tmp_path, class_names=["empty"])


def _visa(root: Path, mask: str = "candle/Data/Masks/Anomaly/000.png") -> Path:
    _png(root / "candle" / "Data" / "Images" / "Normal" / "0000.JPG")
    _png(root / "candle" / "Data" / "Images" / "Normal" / "0001.JPG")
    _png(root / "candle" / "Data" / "Images" / "Anomaly" / "000.JPG")
    _png(root / "candle" / "Data" / "Masks" / "Anomaly" / "000.png", mode="L")
    rows = [
        "object,split,label,image,mask",
        "candle,train,normal,candle/Data/Images/Normal/0000.JPG,",
        "candle,test,normal,candle/Data/Images/Normal/0001.JPG,",
        f"candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,{mask}",
    ]
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def test_visa(tmp_path: Path) -> None:
    records = read_dataset(_visa(tmp_path))
    assert detect_layout(tmp_path) == "visa"
    assert [(r.split, r.label) for r in records] == [("train", 0), ("test", 0), ("test", 1)]
    assert records[2].mask_path == tmp_path / "candle/Data/Masks/Anomaly/000.png"
    assert len(read_visa(tmp_path, splits=["train"])) == 1


def test_visa_anomaly_without_mask(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Anomaly/000.JPG"):
        read_visa(_visa(tmp_path, mask=""))


def test_realiad(tmp_path: Path) -> None:
    images = tmp_path / "realiad_256" / "toy"
    _png(images / "OK" / "S0001" / "toy_0001_OK_C1.jpg")
    _png(images / "NG" / "HS" / "S0002" / "toy_0002_NG_HS_C1.jpg")
    _png(images / "NG" / "HS" / "S0002" / "toy_0002_NG_HS_C1.png", mode="L")
    _png(images / "NG" / "HS" / "S0002" / "toy_0002_NG_HS_C2.jpg")
    index = {
        "meta": {"prefix": "", "normal_class": "OK"},
        "train": [{"category": "toy", "anomaly_class": "OK", "image_path": "OK/S0001/toy_0001_OK_C1.jpg",
                   "mask_path": None}],
        "test": [
            {"category": "toy", "anomaly_class": "HS", "image_path": "NG/HS/S0002/toy_0002_NG_HS_C1.jpg",
             "mask_path": "NG/HS/S0002/toy_0002_NG_HS_C1.png"},
            {"category": "toy", "anomaly_class": "OK", "image_path": "NG/HS/S0002/toy_0002_NG_HS_C2.jpg",
             "mask_path": None},
        ],
    }
    (tmp_path / "realiad_jsons").mkdir()
    (tmp_path / "realiad_jsons" / "toy.json").write_text(json.dumps(index))
    records = read_dataset(tmp_path)
    assert detect_layout(tmp_path) == "realiad"
    assert [(r.split, r.label, r.defect_type) for r in records] == [
        ("train", 0, "good"), ("test", 1, "HS"), ("test", 0, "good")]
    assert records[1].mask_path.name == "toy_0002_NG_HS_C1.png"
    index["test"][0]["mask_path"] = None
    (tmp_path / "realiad_jsons" / "toy.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match="toy_0002_NG_HS_C1.jpg"):
        read_realiad(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_realiad(tmp_path, class_names=["nope"])


def test_coco_ad(tmp_path: Path) -> None:
    _png(tmp_path / "train2017" / "000000000009.jpg")
    _png(tmp_path / "val2017" / "000000000139.jpg")
    _png(tmp_path / "val2017" / "000000000724.jpg")
    _png(tmp_path / "val2017_mask_ad_20_0" / "000000000724.png")
    entry = {"mask_path": "", "cls_name": "coco", "specie_name": "", "anomaly": 0}
    meta = {
        "train": {"coco": [dict(entry, img_path="train2017/000000000009.jpg")]},
        "test": {"coco": [
            dict(entry, img_path="val2017/000000000139.jpg"),
            dict(entry, img_path="val2017/000000000724.jpg", anomaly=1,
                 mask_path="val2017_mask_ad_20_0/000000000724.png"),
        ]},
    }
    (tmp_path / "meta_20_0.json").write_text(json.dumps(meta))
    records = read_dataset(tmp_path)
    assert detect_layout(tmp_path) == "coco-ad"
    assert [(r.split, r.label, r.defect_type) for r in records] == [
        ("train", 0, "good"), ("test", 0, "good"), ("test", 1, "anomaly")]
    (tmp_path / "val2017_mask_ad_20_0" / "000000000724.png").unlink()
    with pytest.raises(FileNotFoundError, match="000000000724.png"):
        read_coco_ad(tmp_path, meta="meta_20_0.json")


def test_only_the_requested_classes_are_read_and_checked(tmp_path: Path) -> None:
    _mvtec_class(tmp_path, "brick")
    (tmp_path / "empty" / "train" / "good").mkdir(parents=True)  # an unrelated class without images
    with pytest.raises(ValueError, match="class 'empty' has no images"):
        read_dataset(tmp_path)
    assert {r.class_name for r in read_dataset(tmp_path, classes=["brick"])} == {"brick"}
    with pytest.raises(FileNotFoundError, match="class folder not found: .*nope"):
        read_dataset(tmp_path, classes=["nope"])
    assert len(read_dataset(tmp_path / "brick" / "train" / "good", classes=["other"])) == 3  # one-class layout


def test_unreadable_images_are_left_to_the_jobs_that_load_them(tmp_path: Path) -> None:
    """A garbage or truncated file with a mask is not a reading error (evaluate skips it, naming it)."""
    base = _mvtec_class(tmp_path, "bottle")
    (base / "test" / "crack" / "000.png").write_bytes(b"not an image at all")
    (base / "ground_truth" / "crack" / "001_mask.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    assert len(read_mvtec(tmp_path)) == 6


def test_plain_folder(tmp_path: Path) -> None:
    for i in range(3):
        _png(tmp_path / "normal" / f"n{i}.png")
    _png(tmp_path / "bad" / "b0.png")
    _png(tmp_path / "masks" / "b0_mask.png", mode="L")
    assert detect_layout(tmp_path / "normal") == "folder"
    normal_only = read_dataset(tmp_path / "normal")
    assert len(normal_only) == 3 and {r.split for r in normal_only} == {"train"}
    records = read_folder(tmp_path / "normal", tmp_path / "bad", tmp_path / "masks", class_name="part")
    assert records[-1].is_anomalous and records[-1].mask_path.name == "b0_mask.png"
    assert {r.class_name for r in records} == {"part"}
    _png(tmp_path / "bad" / "b1.png")
    with pytest.raises(FileNotFoundError, match="b1"):
        read_folder(tmp_path / "normal", tmp_path / "bad", tmp_path / "masks")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no images"):
        read_folder(tmp_path / "empty")
    with pytest.raises(ValueError, match="not a known dataset layout"):
        read_dataset(tmp_path / "empty")


@pytest.mark.skipif(not TIRE.is_dir(), reason="shared tire data not present")
def test_shared_tire_data() -> None:
    records = read_dataset(TIRE)
    counts = Counter((r.split, r.label) for r in records)
    assert counts[("train", 0)] == 210 and counts[("test", 0)] == 25 and counts[("test", 1)] == 87
    assert all(r.mask_path is not None for r in records if r.is_anomalous)
