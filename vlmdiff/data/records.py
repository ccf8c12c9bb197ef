"""The one record type every dataset reader returns."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NORMAL_DEFECT = "good"
CLEAN_FOLDER = "test_clean"  # <class>/test_clean/<defect>/<name>: the defect-free source of a test image


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset: where it is, its mask (if any) and what it shows."""

    image_path: Path
    class_name: str
    split: str  # "train", "validation" or "test"
    label: int = 0  # 0 normal, 1 anomalous
    defect_type: str = NORMAL_DEFECT
    mask_path: Path | None = None
    clean_path: Path | None = None  # the same image without its defect, when the dataset has it (built-in benchmark)

    @property
    def is_anomalous(self) -> bool:
        return self.label == 1
