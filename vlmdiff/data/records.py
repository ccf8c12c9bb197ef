"""The one record type every dataset reader returns."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NORMAL_DEFECT = "good"


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset: where it is, its mask (if any) and what it shows."""

    image_path: Path
    class_name: str
    split: str  # "train", "validation" or "test"
    label: int = 0  # 0 normal, 1 anomalous
    defect_type: str = NORMAL_DEFECT
    mask_path: Path | None = None

    @property
    def is_anomalous(self) -> bool:
        return self.label == 1
