"""COCO-AD layout (and any ADer-style meta JSON): <root>/meta_<n>_<split>.json + generated masks.

The meta JSON is {"train": {class: [entry]}, "test": {class: [entry]}}, each entry with img_path,
mask_path (relative to root, "" for normal images), cls_name, specie_name and anomaly (0/1).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from vlmdiff.data.records import ImageRecord
from vlmdiff.data.validation import check_records, require_dir, require_file

DEFAULT_DEFECT = "anomaly"  # COCO-AD leaves specie_name empty


def is_coco_ad(root: Path) -> bool:
    return any(root.glob("meta*.json"))


def _default_meta(root: Path) -> Path:
    found = sorted(root.glob("meta*.json"))
    if not found:
        raise FileNotFoundError(f"COCO-AD meta JSON not found: {root / 'meta_20_0.json'}")
    return found[0]


def _record(root: Path, entry: dict[str, Any], class_name: str, split: str, source: Path) -> ImageRecord:
    image = root / entry["img_path"]
    if not int(entry.get("anomaly", 0)):
        return ImageRecord(image, class_name, split)
    if not entry.get("mask_path"):
        raise FileNotFoundError(f"mask missing for anomalous image {image} in {source}")
    defect = entry.get("specie_name") or DEFAULT_DEFECT
    return ImageRecord(image, class_name, split, 1, defect, root / entry["mask_path"])


def read_coco_ad(
    root: str | Path,
    meta: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    splits: Sequence[str] = ("train", "test"),
) -> list[ImageRecord]:
    """Records of a COCO-AD folder from one meta JSON (default: the first meta*.json in root)."""
    root = require_dir(Path(root), "dataset folder")
    source = require_file(root / meta if meta else _default_meta(root), "COCO-AD meta JSON")
    data = json.loads(source.read_text())
    found = sorted({name for split in splits for name in data.get(split, {})})
    names = list(class_names) if class_names is not None else found
    if not names:
        raise ValueError(f"no images for splits {list(splits)} in {source}")
    records = [
        _record(root, entry, name, split, source)
        for split in splits
        for name in names
        for entry in data.get(split, {}).get(name, [])
    ]
    return check_records(records, names)
