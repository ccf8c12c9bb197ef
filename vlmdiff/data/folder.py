"""A plain folder of normal images (normal-only training), optionally with anomalous images and masks."""
from __future__ import annotations

from pathlib import Path

from vlmdiff.data.records import ImageRecord
from vlmdiff.data.validation import check_records, find_mask, list_images, require_dir

FOLDER_DEFECT = "anomaly"


def is_folder(root: Path) -> bool:
    return bool(list_images(root))


def read_folder(
    normal_dir: str | Path,
    anomalous_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
    class_name: str | None = None,
) -> list[ImageRecord]:
    """Normal images as the train split; anomalous ones (masks `<stem>[_mask].png` in mask_dir) as test."""
    normal_dir = require_dir(Path(normal_dir), "image folder")
    name = class_name or normal_dir.name
    records = [ImageRecord(path, name, "train") for path in list_images(normal_dir)]
    if anomalous_dir is not None:
        anomalous_dir = require_dir(Path(anomalous_dir), "anomalous image folder")
        masks = require_dir(Path(mask_dir), "mask folder") if mask_dir is not None else None
        records += [
            ImageRecord(path, name, "test", 1, FOLDER_DEFECT, find_mask(masks, path.stem) if masks else None)
            for path in list_images(anomalous_dir)
        ]
    return check_records(records, [name])
