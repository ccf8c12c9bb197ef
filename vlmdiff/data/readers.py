"""One entry point for every dataset layout: a registry of readers and `read_dataset(path)`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from vlmdiff.data.coco_ad import is_coco_ad, read_coco_ad
from vlmdiff.data.folder import is_folder, read_folder
from vlmdiff.data.mvtec import is_mvtec, read_mvtec
from vlmdiff.data.realiad import is_realiad, read_realiad
from vlmdiff.data.records import ImageRecord
from vlmdiff.data.validation import require_dir
from vlmdiff.data.visa import is_visa, read_visa


@dataclass(frozen=True)
class DatasetLayout:
    """A dataset layout: how to recognise its root folder and how to read it.

    A layout with `several_classes` reads only the classes named by its reader's `class_names` option.
    """

    name: str
    detect: Callable[[Path], bool]
    read: Callable[..., list[ImageRecord]]
    several_classes: bool = True


# Checked in this order: the specific index files first, a bare folder of images last.
LAYOUTS: dict[str, DatasetLayout] = {
    layout.name: layout
    for layout in (
        DatasetLayout("visa", is_visa, read_visa),
        DatasetLayout("realiad", is_realiad, read_realiad),
        DatasetLayout("coco-ad", is_coco_ad, read_coco_ad),
        DatasetLayout("mvtec", is_mvtec, read_mvtec),
        DatasetLayout("folder", is_folder, read_folder, several_classes=False),
    )
}


def register_layout(layout: DatasetLayout) -> DatasetLayout:
    """Add a layout (checked after the built-in ones)."""
    LAYOUTS[layout.name] = layout
    return layout


def detect_layout(path: str | Path) -> str:
    """The name of the registered layout that `path` is in; ValueError if none matches."""
    root = require_dir(Path(path), "dataset folder")
    for layout in LAYOUTS.values():
        if layout.detect(root):
            return layout.name
    raise ValueError(f"{root}: not a known dataset layout (expected one of {', '.join(LAYOUTS)})")


def read_dataset(
    path: str | Path, layout: str | None = None, classes: Sequence[str] | None = None, **options: Any
) -> list[ImageRecord]:
    """Records of the dataset at `path`; the layout is detected unless given; options go to its reader.

    With `classes`, a layout of several classes reads (and checks) only those: an empty or broken
    class elsewhere in the dataset does not matter.
    """
    name = layout or detect_layout(path)
    if name not in LAYOUTS:
        raise ValueError(f"unknown dataset layout '{name}' (known: {', '.join(LAYOUTS)})")
    if classes is not None and LAYOUTS[name].several_classes:
        options["class_names"] = list(classes)
    return LAYOUTS[name].read(path, **options)
