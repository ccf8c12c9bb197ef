"""Per-class decision thresholds on anomaly scores, with a normalised [0, 1] score.

A class's threshold turns a raw image score into a verdict (anomalous iff
score >= threshold). Raw scores are not comparable across classes, so each
threshold also stores a score scale (lo, hi) used to map scores piecewise-
linearly onto [0, 1]: lo -> 0, threshold -> 0.5, hi -> 1, clipped. Thus
``normalized(score) >= 0.5`` exactly when ``verdict(score)`` is True.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from vlmdiff.metrics import image_f1max

DEFAULT_QUANTILE = 0.99  # threshold from normal images only: this quantile of their scores
_FORMAT_VERSION = 1
_JUST_BELOW_HALF = math.nextafter(0.5, 0.0)
METHODS = ("f1", "quantile", "manual")


@dataclass(frozen=True)
class ClassThreshold:
    """Threshold of one class, how it was obtained, and the score scale (lo, hi) for normalisation.

    method is "f1" (F1-optimal on labelled data), "quantile" (quantile of
    normal scores) or "manual". lo is the score mapped to 0, hi the one mapped to 1.
    """

    value: float
    method: str
    normal_scale: tuple[float, float]

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {self.method!r}")
        if len(self.normal_scale) != 2:
            raise ValueError(f"normal_scale must be a pair (lo, hi); got {self.normal_scale}")
        lo, hi = self.normal_scale
        if not all(math.isfinite(number) for number in (self.value, lo, hi)):
            raise ValueError(f"threshold and scale must be finite; got value={self.value}, scale={self.normal_scale}")
        if lo > hi:
            raise ValueError(f"normal_scale must satisfy lo <= hi; got {self.normal_scale}")

    def normalized(self, score: float) -> float:
        """Map a score monotonically into [0, 1] with the threshold exactly at 0.5."""
        lo, hi = self.normal_scale
        if score == self.value:
            return 0.5
        if score < self.value:
            if self.value <= lo:
                return 0.0
            return min(max(0.5 * (score - lo) / (self.value - lo), 0.0), _JUST_BELOW_HALF)
        if hi <= self.value:
            return 1.0
        return min(0.5 + 0.5 * (score - self.value) / (hi - self.value), 1.0)


def _finite_scores(scores: npt.ArrayLike, name: str) -> np.ndarray:
    """Return scores as a non-empty, finite float64 vector, or raise ValueError saying what is wrong."""
    array = np.asarray(scores, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def _finite_score(score: float) -> float:
    value = float(score)
    if not math.isfinite(value):
        raise ValueError(f"score must be finite; got {score}")
    return value


def f1_threshold(scores: npt.ArrayLike, labels: npt.ArrayLike) -> ClassThreshold:
    """The F1-optimal threshold of labelled validation scores (labels: 1 = anomalous)."""
    score_array = _finite_scores(scores, "scores")
    label_array = np.asarray(labels).ravel()
    if label_array.shape != score_array.shape:
        raise ValueError(f"scores and labels differ in length: {score_array.size} vs {label_array.size}")
    if not np.isin(label_array, (0, 1)).all():
        raise ValueError("labels must contain only 0 (normal) and 1 (anomalous)")
    label_array = label_array.astype(bool)
    if label_array.all() or not label_array.any():
        raise ValueError("the F1-optimal threshold needs both normal (0) and anomalous (1) labels; got a single class")
    best = image_f1max(score_array, label_array)
    return ClassThreshold(best.threshold, "f1", (float(score_array[~label_array].min()), float(score_array.max())))


def quantile_threshold(normal_scores: npt.ArrayLike, q: float = DEFAULT_QUANTILE) -> ClassThreshold:
    """The q-quantile (linear interpolation) of normal-only scores."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be strictly between 0 and 1; got {q}")
    score_array = _finite_scores(normal_scores, "normal_scores")
    scale = (float(score_array.min()), float(score_array.max()))
    return ClassThreshold(float(np.quantile(score_array, q)), "quantile", scale)


class Thresholds:
    """Per-class thresholds: fit, query (verdict / normalised score), and persist as JSON."""

    def __init__(self, per_class: dict[str, ClassThreshold] | None = None) -> None:
        self._per_class: dict[str, ClassThreshold] = dict(per_class or {})

    @property
    def classes(self) -> list[str]:
        """Names of the classes that have a threshold, sorted."""
        return sorted(self._per_class)

    def get(self, class_name: str) -> ClassThreshold:
        """The threshold of a class; ValueError if the class has none."""
        if class_name not in self._per_class:
            raise ValueError(f"unknown class {class_name!r}; classes with a threshold: {self.classes}")
        return self._per_class[class_name]

    def fit_f1(self, class_name: str, scores: npt.ArrayLike, labels: npt.ArrayLike) -> ClassThreshold:
        """Set the F1-optimal threshold from labelled validation scores (labels: 1 = anomalous)."""
        return self._set(class_name, f1_threshold(scores, labels))

    def fit_quantile(self, class_name: str, normal_scores: npt.ArrayLike, q: float = DEFAULT_QUANTILE) -> ClassThreshold:
        """Set the threshold to the q-quantile (linear interpolation) of normal-only scores."""
        return self._set(class_name, quantile_threshold(normal_scores, q))

    def set_manual(
        self, class_name: str, value: float, normal_scale: tuple[float, float] | None = None
    ) -> ClassThreshold:
        """Set a threshold by hand.

        Without normal_scale, an existing scale of the class is kept (widened to
        include the value); a new class gets the degenerate scale (value, value),
        so its normalised score is 0, 0.5 or 1.
        """
        value = _finite_score(value)
        if normal_scale is None:
            lo, hi = self._per_class[class_name].normal_scale if class_name in self._per_class else (value, value)
            normal_scale = (min(lo, value), max(hi, value))
        return self._set(class_name, ClassThreshold(value, "manual", (float(normal_scale[0]), float(normal_scale[1]))))

    def verdict(self, class_name: str, score: float) -> bool:
        """True if the score is anomalous for the class (score >= threshold)."""
        return _finite_score(score) >= self.get(class_name).value

    def normalized(self, class_name: str, score: float) -> float:
        """Score mapped into [0, 1] for the class, 0.5 at the threshold (see ClassThreshold.normalized)."""
        return self.get(class_name).normalized(_finite_score(score))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write all thresholds to a JSON file atomically (temp file in the same folder, then os.replace)."""
        target = Path(path)
        document = {
            "version": _FORMAT_VERSION,
            "classes": {
                name: {"value": item.value, "method": item.method, "normal_scale": list(item.normal_scale)}
                for name, item in sorted(self._per_class.items())
            },
        }
        handle, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as temp_file:
                json.dump(document, temp_file, indent=2)
                temp_file.flush()
                os.fsync(temp_file.fileno())
            os.replace(temp_name, target)
        except BaseException:
            os.unlink(temp_name)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Thresholds:
        """Read thresholds written by save; ValueError if the file is not such a document."""
        with open(path, encoding="utf-8") as file:
            document = json.load(file)
        if not isinstance(document, dict) or document.get("version") != _FORMAT_VERSION:
            raise ValueError(f"{path}: not a thresholds file of version {_FORMAT_VERSION}")
        try:
            per_class = {
                name: ClassThreshold(float(item["value"]), str(item["method"]), tuple(map(float, item["normal_scale"])))
                for name, item in document["classes"].items()
            }
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}: malformed class entry ({error!r})") from error
        return cls(per_class)

    def _set(self, class_name: str, threshold: ClassThreshold) -> ClassThreshold:
        self._per_class[class_name] = threshold
        return threshold
