"""Calibration scores for the Thresholds tab: which images of a class to score, and threshold suggestions."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vlmdiff.app.errors import ServiceError
from vlmdiff.thresholds import DEFAULT_QUANTILE, f1_threshold, quantile_threshold

MAX_CALIBRATION_IMAGES = 48  # per label (normal / anomalous) and class
METHODS = ("f1", "quantile")


@dataclass
class Calibration:
    """Scores of calibration images of one class; labels 1 = anomalous."""

    class_name: str
    scores: np.ndarray
    labels: np.ndarray
    source: str

    @property
    def normal(self) -> np.ndarray:
        return self.scores[self.labels == 0]

    @property
    def anomalous(self) -> np.ndarray:
        return self.scores[self.labels == 1]


def stored_images(model_dir: Path, class_name: str) -> list[Image.Image]:
    """The normal images of a class kept in the model folder (its replay set)."""
    from vlmdiff.images import tensor_to_images
    from vlmdiff.training.replay import load_replay

    replay = load_replay(model_dir)
    chosen = [i for i, name in enumerate(replay.class_names) if name == class_name] if replay else []
    if not chosen:
        raise ServiceError(
            f"This model stores no normal images of {class_name!r}. Enter a labelled calibration folder instead."
        )
    return tensor_to_images(replay.float_images(chosen))


def folder_images(class_name: str, folder: Path) -> tuple[list[Path], list[int]]:
    """(image paths, labels) of a class in a dataset folder: held-out images, up to MAX_CALIBRATION_IMAGES per label."""
    from vlmdiff.data import read_dataset

    if not folder.is_dir():
        raise ServiceError(f"No calibration folder at {folder}.")
    try:
        records = read_dataset(folder)
    except (ValueError, OSError) as error:
        raise ServiceError(f"Cannot read the calibration folder {folder}: {error}") from error
    names = {r.class_name for r in records}
    if class_name in names:
        records = [r for r in records if r.class_name == class_name]
    elif len(names) != 1:
        raise ServiceError(f"{folder} has no images of class {class_name!r} (it has: {', '.join(sorted(names))}).")
    held_out = [r for r in records if r.split != "train"]
    records = held_out or records  # normal training images only as a last resort
    chosen = []
    for label in (0, 1):
        group = [r for r in records if r.label == label]
        step = max(1, len(group) // MAX_CALIBRATION_IMAGES)
        chosen += group[::step][:MAX_CALIBRATION_IMAGES]
    if not any(r.label == 0 for r in chosen):
        raise ServiceError(f"{folder} has no normal images of class {class_name!r} to calibrate on.")
    return [r.image_path for r in chosen], [r.label for r in chosen]


def suggest_threshold(calibration: Calibration, method: str, quantile: float = DEFAULT_QUANTILE) -> float:
    """The F1-optimal ("f1") or normal-quantile ("quantile") threshold for calibration scores."""
    if method not in METHODS:
        raise ServiceError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if method == "f1" and not len(calibration.anomalous):
        raise ServiceError("The F1-optimal threshold needs anomalous images too: use a labelled folder.")
    try:
        if method == "f1":
            return f1_threshold(calibration.scores, calibration.labels).value
        return quantile_threshold(calibration.normal, quantile).value
    except ValueError as error:
        raise ServiceError(f"No suggestion: {error}") from error
