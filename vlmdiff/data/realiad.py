"""Real-IAD layout: <root>/realiad_<size>/<class>/{OK,NG/<defect>}/S####/*.jpg and realiad_jsons/<class>.json.

Each JSON has {"meta": {"prefix", "normal_class"}, "train": [...], "test": [...]}, entries with
category, anomaly_class, image_path and mask_path; an entry is anomalous when its anomaly_class
differs from normal_class (NG views where the defect is not visible are listed as OK).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from vlmdiff.data.records import ImageRecord
from vlmdiff.data.validation import check_records, require_dir, require_file

IMAGE_FOLDERS = ("realiad_256", "realiad_512", "realiad_1024", "realiad_raw")
JSON_FOLDERS = ("realiad_jsons/realiad_jsons", "realiad_jsons")


def is_realiad(root: Path) -> bool:
    return (root / "realiad_jsons").is_dir()


def _json_dir(root: Path) -> Path:
    for name in JSON_FOLDERS:
        if any((root / name).glob("*.json")):
            return root / name
    raise FileNotFoundError(f"Real-IAD JSON folder not found: {root / JSON_FOLDERS[-1]}")


def _image_root(root: Path) -> Path:
    return next((root / name for name in IMAGE_FOLDERS if (root / name).is_dir()), root)


def _resolve(image_root: Path, prefix: str, category: str, relative: str) -> Path:
    candidates = [image_root / prefix / relative, image_root / category / relative, image_root / relative]
    return next((path for path in candidates if path.is_file()), candidates[0])


def _records(data: dict[str, Any], class_name: str, image_root: Path, splits: Sequence[str], source: Path):
    meta = data.get("meta", {})
    prefix, normal_class = meta.get("prefix", ""), meta.get("normal_class", "OK")
    for split in splits:
        for entry in data.get(split, []):
            image = _resolve(image_root, prefix, class_name, entry["image_path"])
            if entry["anomaly_class"] == normal_class:
                yield ImageRecord(image, class_name, split)
                continue
            if not entry.get("mask_path"):
                raise FileNotFoundError(f"mask missing for anomalous image {image} in {source}")
            mask = _resolve(image_root, prefix, class_name, entry["mask_path"])
            yield ImageRecord(image, class_name, split, 1, entry["anomaly_class"], mask)


def read_realiad(
    root: str | Path,
    json_dir: str | Path | None = None,
    image_root: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    splits: Sequence[str] = ("train", "test"),
) -> list[ImageRecord]:
    """Records of a Real-IAD folder from its per-class JSON indexes (one JSON per class)."""
    root = require_dir(Path(root), "dataset folder")
    json_dir = require_dir(Path(json_dir), "Real-IAD JSON folder") if json_dir else _json_dir(root)
    image_root = require_dir(Path(image_root), "Real-IAD image folder") if image_root else _image_root(root)
    if class_names is None:
        class_names = [path.stem for path in sorted(json_dir.glob("*.json"))]
    records = []
    for name in class_names:
        source = require_file(json_dir / f"{name}.json", "Real-IAD class JSON")
        data = json.loads(source.read_text())
        records.extend(_records(data, name, image_root, splits, source))
    return check_records(records, list(class_names))
