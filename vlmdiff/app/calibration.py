"""Calibration images for the Thresholds tab and threshold suggestions from their scores.

The images come from the model folder (its stored normal images), from uploads (image files,
or a zip with normal/ and defective/ folders), or, only when the app runs with `--data-root`,
from a labelled folder inside that root. No other server path is ever read.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from vlmdiff.app.errors import ServiceError
from vlmdiff.app.limits import MAX_CALIBRATION_IMAGES
from vlmdiff.app.uploads import Upload, unpack_zip
from vlmdiff.thresholds import DEFAULT_QUANTILE, f1_threshold, quantile_threshold

METHODS = ("f1", "quantile")
NO_FOLDER = ("There is no calibration folder by that name in the app's data folder. Give a folder relative to it, "
             "e.g. bottle.")  # the same answer for a missing path and one outside the root: nothing is revealed
T = TypeVar("T")


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
        raise ServiceError(f"This model stores no normal images of {class_name!r}. Upload calibration images instead.")
    return tensor_to_images(replay.float_images(chosen))


def evenly_chosen(items: list[T], labels: list[int]) -> tuple[list[T], list[int]]:
    """Up to MAX_CALIBRATION_IMAGES items of each label, spread evenly over the list."""
    chosen, chosen_labels = [], []
    for label in (0, 1):
        group = [item for item, item_label in zip(items, labels) if item_label == label]
        step = max(1, len(group) // MAX_CALIBRATION_IMAGES)
        picked = group[::step][:MAX_CALIBRATION_IMAGES]
        chosen += picked
        chosen_labels += [label] * len(picked)
    return chosen, chosen_labels


def uploaded_images(normal: list[Upload], defective: list[Upload], scratch: Path) -> tuple[list[Upload], list[int]]:
    """(images, labels) of uploaded calibration files; a zip is unpacked into `scratch` and labelled by folder."""
    images, labels = [], []
    for uploads, label in ((normal, 0), (defective, 1)):
        for upload in uploads:
            if upload.name.lower().endswith(".zip"):
                for image, zip_label in unpack_zip(upload, scratch):
                    images.append(image)
                    labels.append(zip_label)
            else:
                images.append(upload)
                labels.append(label)
    if 0 not in labels:
        raise ServiceError("Upload normal images of the class too: the threshold is set against their scores.")
    return evenly_chosen(images, labels)


def data_root_folder(root: Path | None, name: str) -> Path:
    """The folder `name` inside the data root, resolved (links too); the same message whether it is
    missing or outside. Without a data root no server folder is read at all."""
    if root is None:
        raise ServiceError("This app reads no folders on its server: upload the calibration images instead.")
    try:
        folder = (root / name.strip()).resolve()  # an absolute name or '..' may point anywhere: checked below
        if folder.is_relative_to(root) and folder.is_dir():
            return folder
    except (OSError, ValueError):  # a name too long, a NUL byte, a loop of links: the same answer
        pass
    raise ServiceError(NO_FOLDER)


def folder_images(class_name: str, folder: Path, shown: str) -> tuple[list[Upload], list[int]]:
    """(images, labels) of a class in a dataset folder (named `shown` in messages): held-out images,
    up to MAX_CALIBRATION_IMAGES per label."""
    from vlmdiff.data import read_dataset

    try:
        records = read_dataset(folder)
    except (ValueError, OSError) as error:
        reason = str(error).replace(str(folder), shown)
        raise ServiceError(f"Cannot read the calibration folder {shown}: {reason}") from error
    names = {r.class_name for r in records}
    if class_name in names:
        records = [r for r in records if r.class_name == class_name]
    elif len(names) != 1:
        raise ServiceError(f"{shown} has no images of class {class_name!r} (it has: {', '.join(sorted(names))}).")
    records = [r for r in records if r.split != "train"] or records  # normal training images only as a last resort
    if not any(r.label == 0 for r in records):
        raise ServiceError(f"{shown} has no normal images of class {class_name!r} to calibrate on.")
    images = [Upload(r.image_path, str(Path(shown) / os.path.relpath(r.image_path, folder))) for r in records]
    return evenly_chosen(images, [r.label for r in records])


def suggest_threshold(calibration: Calibration, method: str, quantile: float = DEFAULT_QUANTILE) -> float:
    """The F1-optimal ("f1") or normal-quantile ("quantile") threshold for calibration scores."""
    if method not in METHODS:
        raise ServiceError(f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if method == "f1" and not len(calibration.anomalous):
        raise ServiceError("The F1-optimal threshold needs defective images too: upload some.")
    try:
        if method == "f1":
            return f1_threshold(calibration.scores, calibration.labels).value
        return quantile_threshold(calibration.normal, quantile).value
    except ValueError as error:
        raise ServiceError(f"No suggestion: {error}") from error
