"""VisA layout: <root>/<class>/Data/{Images,Masks}/... indexed by a split CSV (object,split,label,image,mask)."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

from vlmdiff.data.records import ImageRecord
from vlmdiff.data.validation import check_records, require_dir, require_file

VISA_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_DEFECT = "anomaly"  # the split CSV says only normal/anomaly


def _default_csv(root: Path) -> Path:
    folder = root / "split_csv"
    preferred = folder / "1cls.csv"
    if preferred.is_file():
        return preferred
    found = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    if not found:
        raise FileNotFoundError(f"VisA split CSV not found: {preferred}")
    return found[0]


def is_visa(root: Path) -> bool:
    return (root / "split_csv").is_dir() and any((root / "split_csv").glob("*.csv"))


def _record(root: Path, row: dict[str, str], csv_path: Path) -> ImageRecord:
    image = root / row["image"]
    if row["label"].strip().lower() == "normal":
        return ImageRecord(image, row["object"], row["split"])
    if not row["mask"].strip():
        raise FileNotFoundError(f"mask missing for anomalous image {image} in {csv_path}")
    return ImageRecord(image, row["object"], row["split"], 1, VISA_DEFECT, root / row["mask"])


def read_visa(
    root: str | Path,
    split_csv: str | Path | None = None,
    class_names: Sequence[str] | None = None,
    splits: Sequence[str] = ("train", "test"),
) -> list[ImageRecord]:
    """Records of a VisA folder from its split CSV (default split_csv/1cls.csv); paths are relative to root."""
    root = require_dir(Path(root), "dataset folder")
    csv_path = require_file(Path(split_csv), "VisA split CSV") if split_csv else _default_csv(root)
    with csv_path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path} lacks columns {missing}; expected {list(VISA_COLUMNS)}")
        rows = [row for row in reader if row["split"] in splits]
    if class_names is not None:
        rows = [row for row in rows if row["object"] in class_names]
    records = [_record(root, row, csv_path) for row in rows]
    names = list(class_names) if class_names is not None else sorted({r.class_name for r in records})
    if not names:
        raise ValueError(f"no images for splits {list(splits)} in {csv_path}")
    return check_records(records, names)
