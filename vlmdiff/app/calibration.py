"""Calibration images for the Thresholds tab and threshold suggestions from their scores.

The images come from the model folder (its stored normal images), from uploads (image files,
or a zip with normal/ and defective/ folders), or, only when the app runs with `--data-root`,
from a labelled folder inside that root. No other server path is ever read.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from PIL import Image

from vlmdiff.app.class_names import require_known
from vlmdiff.app.errors import ServiceError, shorten
from vlmdiff.app.limits import MAX_CALIBRATION_IMAGES, MAX_CALIBRATION_MEGAPIXELS
from vlmdiff.app.session import Session
from vlmdiff.app.uploads import Upload, check_pixels, unpack_zip
from vlmdiff.model_folder import THRESHOLDS_FILE
from vlmdiff.progress import Progress
from vlmdiff.thresholds import DEFAULT_QUANTILE, ClassThreshold, Thresholds, f1_threshold, quantile_threshold

if TYPE_CHECKING:
    from vlmdiff.app.service import DetectorService, ModelView

METHODS = ("f1", "quantile")
NO_FOLDER = ("There is no calibration folder by that name in the app's data folder. Give a folder relative to it, "
             "e.g. bottle.")  # the same answer for a missing path and one outside the root: nothing is revealed
SCORE_BATCH = 4  # calibration images scored per pipeline call (detection requests get in between)
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


def fit_threshold(thresholds: Thresholds, class_name: str, value: float, method: str,
                  calibration: Calibration | None, quantile: float) -> ClassThreshold:
    """Set the class's threshold in `thresholds`: F1-optimal or quantile from the scores, else `value` by hand."""
    if method == "f1" and calibration is not None and len(calibration.anomalous):
        return thresholds.fit_f1(class_name, calibration.scores, calibration.labels)
    if method == "quantile" and calibration is not None:
        return thresholds.fit_quantile(class_name, calibration.normal, quantile)
    normal = calibration.normal if calibration is not None and len(calibration.normal) else None
    return thresholds.set_manual(class_name, value, normal)


class ThresholdEditor:
    """The Thresholds tab's work on the host's model: a class's threshold, calibration scores, and saving."""

    def __init__(self, host: DetectorService) -> None:
        self.host = host

    def get(self, class_name: str, session: Session | None = None) -> ClassThreshold | None:
        thresholds = self.host.view(session).thresholds
        return thresholds.get(class_name) if class_name in thresholds.classes else None

    def _score_images(self, view: ModelView, images: list[Image.Image | Upload], class_name: str,
                      progress: Progress | None) -> list[float]:
        scores = []
        for start in range(0, len(images), SCORE_BATCH):
            batch = [self.host.decode(i) if isinstance(i, Upload) else i for i in images[start : start + SCORE_BATCH]]
            with self.host.lock:  # per batch, so detection requests get in between
                results = view.pipeline(batch, class_names=class_name, return_reconstruction=False)
            scores += [r.score for r in results]
            if progress:
                progress(len(scores) / len(images), f"scored {len(scores)} of {len(images)} images")
        return scores

    def calibrate(self, class_name: str | None, normal: list[Upload] = (), defective: list[Upload] = (),
                  folder: str | None = None, progress: Progress | None = None,
                  session: Session | None = None) -> Calibration:
        """Scores of normal (and defective) images of a class: uploaded ones when given, else a labelled
        folder inside the data root when given, else the normal images stored in the model folder."""
        view = self.host.view(session)
        if not class_name:
            raise ServiceError(f"Choose a class first (known classes: {', '.join(view.classes) or 'none'}).")
        class_name = require_known(class_name, view.classes)
        with tempfile.TemporaryDirectory(prefix="vlmdiff-calibration-") as scratch:
            if normal or defective:
                images, labels = uploaded_images(list(normal), list(defective), Path(scratch))
                check_pixels(images, MAX_CALIBRATION_MEGAPIXELS)
                source = "uploaded images"
            elif folder and folder.strip():
                images, labels = folder_images(class_name, data_root_folder(self.host.data_root, folder), folder.strip())
                source = f"folder {folder.strip()}"
            else:
                images, source = stored_images(view.folder, class_name), "normal images stored with the model"
                labels = [0] * len(images)
            scores = self._score_images(view, images, class_name, progress)
        return Calibration(class_name, np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64), source)

    def save(self, class_name: str, value: float, method: str = "manual",
                       calibration: Calibration | None = None, quantile: float = DEFAULT_QUANTILE,
                       session: Session | None = None, password: str | None = None, client: str = "local") -> str:
        """Set a class threshold (detection uses it at once); returns where it went: the user model
        folder's thresholds.json, or, on a gated app without the admin password, the visitor's session."""
        try:
            value = float(value)
        except (TypeError, ValueError) as error:
            raise ServiceError(f"The threshold must be a number; got {shorten(value)!r}.") from error
        view = self.host.target_view(session, password)
        class_name = require_known(class_name, view.classes)
        if calibration is not None and calibration.class_name != class_name:
            calibration = None  # scores of another class say nothing about this one
        try:  # fitted on a copy: the whole request is checked before the password is
            item = fit_threshold(Thresholds(view.thresholds.per_class()), class_name, value, method, calibration,
                                 quantile)
        except (TypeError, ValueError) as error:
            raise ServiceError(f"Could not set the threshold: {error}") from error
        own = self.host.changes_go_to(session, password, client)
        if own is not None:
            own.thresholds[class_name] = item
            return "your session only (other visitors do not see it)"
        try:
            with self.host.lock:
                view.thresholds.set(class_name, item)
                if self.host.pending_edits is not None:
                    self.host.pending_edits[class_name] = item
                self.host.model_dir = self.host.store.writable_dir()
                view.thresholds.save(self.host.model_dir / THRESHOLDS_FILE)
        except OSError as error:
            raise ServiceError(f"The threshold is in use but could not be saved ({error}).") from error
        return "the model, for everyone" if self.host.access.gated else str(self.host.model_dir / THRESHOLDS_FILE)
