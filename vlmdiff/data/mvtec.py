"""MVTec AD layout: <root>/<class>/{train,validation,test}/<defect>/*.png, ground_truth/<defect>/<name>_mask.png,
and optionally test_clean/<defect>/<name>.png, the defect-free source of a defective image (built-in benchmark)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from vlmdiff.data.records import CLEAN_FOLDER, NORMAL_DEFECT, ImageRecord
from vlmdiff.data.validation import check_records, find_mask, list_images, require_dir

MVTEC_SPLITS = ("train", "validation", "test")


def _is_class_dir(path: Path) -> bool:
    return (path / "train").is_dir() or (path / "test").is_dir()


def is_mvtec(root: Path) -> bool:
    """A single MVTec class folder, or a folder of them."""
    return _is_class_dir(root) or any(_is_class_dir(child) for child in root.iterdir() if child.is_dir())


def _class_dirs(root: Path, class_names: Sequence[str] | None) -> dict[str, Path]:
    if _is_class_dir(root):
        found = {root.name: root}
    else:
        found = {child.name: child for child in sorted(root.iterdir()) if child.is_dir() and _is_class_dir(child)}
    if not found:
        raise ValueError(f"no MVTec AD class folder (with train/ or test/) in {root}")
    if class_names is None:
        return found
    missing = [name for name in class_names if name not in found]
    if missing:
        raise FileNotFoundError(f"class folder not found: {root / missing[0]}")
    return {name: found[name] for name in class_names}


def _read_split(class_name: str, class_dir: Path, split: str) -> list[ImageRecord]:
    records = []
    for defect_dir in sorted(p for p in (class_dir / split).iterdir() if p.is_dir()):
        defect = defect_dir.name
        for image in list_images(defect_dir):
            if defect == NORMAL_DEFECT:
                records.append(ImageRecord(image, class_name, split))
            else:
                mask = find_mask(class_dir / "ground_truth" / defect, image.stem)
                clean = class_dir / CLEAN_FOLDER / defect / image.name
                records.append(ImageRecord(image, class_name, split, 1, defect, mask, clean if clean.is_file() else None))
    return records


def read_mvtec(
    root: str | Path, class_names: Sequence[str] | None = None, splits: Sequence[str] = MVTEC_SPLITS
) -> list[ImageRecord]:
    """Records of an MVTec AD folder (or one class folder); absent split folders are skipped."""
    root = require_dir(Path(root), "dataset folder")
    classes = _class_dirs(root, class_names)
    records = [
        record
        for name, class_dir in classes.items()
        for split in splits
        if (class_dir / split).is_dir()
        for record in _read_split(name, class_dir, split)
    ]
    return check_records(records, list(classes))
