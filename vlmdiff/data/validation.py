"""Checks shared by every dataset reader, so all layouts fail with the same clear messages."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from PIL import Image

from vlmdiff.data.records import ImageRecord
from vlmdiff.images import WORK_SIDE, ImageInput, ImageInputError, load_image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


def require_dir(path: Path, what: str = "folder") -> Path:
    """`path` if it is a folder, else FileNotFoundError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def require_file(path: Path, what: str = "file") -> Path:
    """`path` if it is a file, else FileNotFoundError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def list_images(folder: Path) -> list[Path]:
    """The image files directly inside `folder`, sorted by name (no recursion)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def find_mask(folder: Path, stem: str) -> Path:
    """The mask of image `stem` in `folder`: `<stem>_mask.*` or `<stem>.*`; FileNotFoundError if absent."""
    for name in (f"{stem}_mask", stem):
        for suffix in (".png", ".bmp", ".tif", ".tiff", ".jpg"):
            candidate = Path(folder) / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(f"mask not found for image '{stem}': expected {Path(folder) / stem}_mask.png")


class UnreadableImage(ImageInputError):
    """An image file that cannot be used; the message names the file and says why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = Path(path), reason


def read_image(source: ImageInput, max_side: int | None = WORK_SIDE) -> Image.Image:
    """`load_image` at the working size (long side at most `max_side`; None: the original size), with the
    file named in the error (UnreadableImage) when `source` is a path."""
    if not isinstance(source, (str, Path)):
        return load_image(source, max_side)
    path = Path(source)
    try:
        return load_image(path, max_side)
    except ImageInputError as error:
        reason = str(error).removeprefix(f"{path}: ").removeprefix(f"{path.name}: ")
        raise UnreadableImage(path, reason) from error


def check_records(records: list[ImageRecord], class_names: list[str]) -> list[ImageRecord]:
    """Raise on an empty class or a missing image or mask.

    Files that are not readable images, and masks of another size than their image, are left to
    the jobs that load them (they skip or name them).
    """
    counts = Counter(record.class_name for record in records)
    for name in class_names:
        if counts[name] == 0:
            raise ValueError(f"class '{name}' has no images")
    for record in records:
        require_file(record.image_path, "image")
        if record.mask_path is not None:
            require_file(record.mask_path, f"mask of {record.image_path}")
    return records
