"""Per-class decision thresholds on anomaly scores, with a normalised (0, 1) score.

A class's threshold turns a raw image score into a verdict (anomalous iff score >= threshold).
Raw scores are not comparable across classes, so each threshold also keeps the median score of
the class's normal images and measures scores in units of spread = threshold - median. Below the
threshold a logistic curve: the median normal score -> 0.05, the threshold -> 0.5. Above it a
logarithmic tail, 1 - 0.5 / (1 + ln(1 + excess / spread)): one spread above -> 0.70, ten -> 0.85,
a hundred -> 0.91, so clear defects stay apart instead of all showing 1.00. It is strictly
monotonic, continuous, never reaches 0 or 1, and ``normalized(score) >= 0.5`` exactly when
``verdict(score)`` is True. A threshold from normal scores also records the false-positive rate
to expect on new normal images (from the held-out scores it was set on).
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
_FORMAT_VERSION = 2
_JUST_BELOW_HALF = math.nextafter(0.5, 0.0)
_MEDIAN_LEVEL = 0.05  # the normalised score of the median normal image
_STEEPNESS = math.log((1 - _MEDIAN_LEVEL) / _MEDIAN_LEVEL)
METHODS = ("f1", "quantile", "manual")


@dataclass(frozen=True)
class ClassThreshold:
    """Threshold of one class, how it was obtained, the median normal score, and the expected FPR.

    method is "f1" (F1-optimal on labelled data), "quantile" (quantile of normal scores) or
    "manual". expected_fpr is None when no held-out normal scores were behind the threshold.
    """

    value: float
    method: str
    normal_median: float
    expected_fpr: float | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {self.method!r}")
        if not all(math.isfinite(number) for number in (self.value, self.normal_median)):
            raise ValueError(f"threshold and median must be finite; got value={self.value}, median={self.normal_median}")
        if self.expected_fpr is not None and not 0.0 <= self.expected_fpr <= 1.0:
            raise ValueError(f"expected_fpr must be in [0, 1]; got {self.expected_fpr}")

    @property
    def spread(self) -> float:
        """The score distance from the median normal image to the threshold (a small positive stand-in if none)."""
        gap = self.value - self.normal_median
        return gap if gap > 0 else max(abs(self.value), 1e-6) * 0.5

    def normalized(self, score: float) -> float:
        """Map a score monotonically into (0, 1): median normal -> 0.05, threshold -> exactly 0.5,
        a logarithmic tail above (see the module docstring)."""
        excess = (score - self.value) / self.spread
        if excess >= 0:
            return 1.0 - 0.5 / (1.0 + math.log1p(excess))
        return min(1.0 / (1.0 + math.exp(min(-_STEEPNESS * excess, 700.0))), _JUST_BELOW_HALF)


def expected_false_positive_rate(normal_scores: npt.ArrayLike, threshold: float) -> float:
    """The distribution-free estimate of P(new normal score > threshold) from n held-out normal
    scores: (count above + 1) / (n + 1)."""
    scores = np.asarray(normal_scores, dtype=np.float64)
    return float((np.sum(scores > threshold) + 1) / (scores.size + 1))


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
    normal = score_array[~label_array]
    return ClassThreshold(best.threshold, "f1", float(np.median(normal)),
                          expected_false_positive_rate(normal, best.threshold))


def quantile_threshold(normal_scores: npt.ArrayLike, q: float = DEFAULT_QUANTILE) -> ClassThreshold:
    """The q-quantile (linear interpolation) of held-out normal scores."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"q must be strictly between 0 and 1; got {q}")
    score_array = _finite_scores(normal_scores, "normal_scores")
    value = float(np.quantile(score_array, q))
    return ClassThreshold(value, "quantile", float(np.median(score_array)),
                          expected_false_positive_rate(score_array, value))


class Thresholds:
    """Per-class thresholds: fit, query (verdict / normalised score), and persist as JSON."""

    def __init__(self, per_class: dict[str, ClassThreshold] | None = None) -> None:
        self._per_class: dict[str, ClassThreshold] = dict(per_class or {})

    @property
    def classes(self) -> list[str]:
        """Names of the classes that have a threshold, sorted."""
        return sorted(self._per_class)

    def per_class(self) -> dict[str, ClassThreshold]:
        """A copy of every class's threshold, by class name."""
        return dict(self._per_class)

    def get(self, class_name: str) -> ClassThreshold:
        """The threshold of a class; ValueError if the class has none."""
        if class_name not in self._per_class:
            raise ValueError(f"unknown class {class_name!r}; classes with a threshold: {self.classes}")
        return self._per_class[class_name]

    def fit_f1(self, class_name: str, scores: npt.ArrayLike, labels: npt.ArrayLike) -> ClassThreshold:
        """Set the F1-optimal threshold from labelled validation scores (labels: 1 = anomalous)."""
        return self.set(class_name, f1_threshold(scores, labels))

    def fit_quantile(self, class_name: str, normal_scores: npt.ArrayLike, q: float = DEFAULT_QUANTILE) -> ClassThreshold:
        """Set the threshold to the q-quantile (linear interpolation) of normal-only scores."""
        return self.set(class_name, quantile_threshold(normal_scores, q))

    def set_manual(self, class_name: str, value: float, normal_scores: npt.ArrayLike | None = None) -> ClassThreshold:
        """Set a threshold by hand.

        With normal_scores (held-out normal images of the class), the median and the expected FPR
        come from them; otherwise an existing median of the class is kept, and a new class gets the
        value itself as its median.
        """
        value = _finite_score(value)
        if normal_scores is not None:
            normal = _finite_scores(normal_scores, "normal_scores")
            item = ClassThreshold(value, "manual", float(np.median(normal)), expected_false_positive_rate(normal, value))
        else:
            median = self._per_class[class_name].normal_median if class_name in self._per_class else value
            item = ClassThreshold(value, "manual", median)
        return self.set(class_name, item)

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
                name: {"value": item.value, "method": item.method, "normal_median": item.normal_median,
                       "expected_fpr": item.expected_fpr}
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
        version = document.get("version") if isinstance(document, dict) else None
        if version not in (1, _FORMAT_VERSION):
            raise ValueError(f"{path}: not a thresholds file (version 1 or {_FORMAT_VERSION})")
        try:
            per_class = {name: _read_entry(item) for name, item in document["classes"].items()}
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}: malformed class entry ({error!r})") from error
        return cls(per_class)

    def set(self, class_name: str, threshold: ClassThreshold) -> ClassThreshold:
        """Set a class's threshold to one already fitted."""
        self._per_class[class_name] = threshold
        return threshold


def _read_entry(item: dict) -> ClassThreshold:
    """One class of a thresholds file; version 1 files kept a (lo, hi) scale, whose lo stands in for the median."""
    median = item["normal_median"] if "normal_median" in item else item["normal_scale"][0]
    fpr = item.get("expected_fpr")
    return ClassThreshold(float(item["value"]), str(item["method"]), float(median), None if fpr is None else float(fpr))
