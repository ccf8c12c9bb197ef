"""`DetectorService`: the one object the app talks to, the host of the loaded model.

It owns the loaded pipeline, enforces the app's limits itself (not only in the UI), serialises
pipeline use and model swaps with a lock, and does the work behind each tab: caption + detect,
calibration scores, thresholds and fine-tuning. Changes go to the user model folder
(`ModelStore`), never to the shipped model. Every error meant for a user is a `ServiceError`
(or the library's `ImageInputError`) whose message says what to do.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from vlmdiff.app import cards
from vlmdiff.app.calibration import Calibration, folder_images, stored_images
from vlmdiff.app.errors import ServiceError
from vlmdiff.app.model_store import ModelStore
from vlmdiff.images import ImageInputError, load_image
from vlmdiff.model_folder import THRESHOLDS_FILE
from vlmdiff.pipeline import AUTO_CLASS, DetectionResult, VLMDiffPipeline
from vlmdiff.thresholds import DEFAULT_QUANTILE, ClassThreshold, Thresholds
from vlmdiff.training.finetune import MIN_IMAGES, FinetuneConfig, finetune, validate_class_name
from vlmdiff.visualize import overlay_heatmap, threshold_range

log = logging.getLogger(__name__)

MAX_STEPS = 50  # DDIM steps a request may ask for
MAX_SEED = 2**31 - 1
DISPLAY_SIDE = 1024  # pictures sent back to the browser are at most this large
MAX_FINETUNE_IMAGES = 200
MAX_FINETUNE_STEPS = 2000
SCORE_BATCH = 4
Progress = Callable[[float, str], None]


@dataclass
class Detection:
    """One detection, ready to show: pictures at display size, the map, and the settings used."""

    caption: str
    image: Image.Image  # the input at display size
    reconstruction: Image.Image  # at display size
    anomaly_map: np.ndarray  # (h, w) at display size
    result: DetectionResult
    strength: float
    steps: int
    seed: int
    scoring: str = ""  # which maps make the score, e.g. "normal-feature memory"


def display_size(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """The image shrunk (never enlarged) so that its longer side is at most `side`."""
    if max(image.size) <= side:
        return image
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


def render_overlay(detection: Detection, opacity: float) -> Image.Image:
    """The heatmap over the input, on the colour scale of `vlmdiff predict` (threshold mid-scale)."""
    opacity = min(max(float(opacity), 0.0), 1.0)
    value_range = threshold_range(detection.result.threshold)
    return overlay_heatmap(detection.image, detection.anomaly_map, alpha=opacity, value_range=value_range)


class DetectorService:
    """Hosts one model: `model` is a folder or a Hugging Face hub id, `fallback` a folder tried when
    `model` cannot be loaded (the embedded default); changes go to a user folder under `user_models_dir`."""

    def __init__(self, model: str | Path | None, fallback: str | Path | None = None,
                 user_models_dir: str | Path | None = None):
        self.pipeline: VLMDiffPipeline | None = None
        self.store: ModelStore | None = None
        self.model_dir: Path | None = None  # the folder the loaded model came from
        self.model_id = str(model) if model else None
        self.load_error: str | None = None
        self.notice: str | None = None  # e.g. "fell back to the default model"
        self._lock = threading.RLock()  # pipeline use, threshold edits and model swaps
        self._finetune_lock = threading.Lock()  # one fine-tune at a time
        self._pending_edits: dict[str, ClassThreshold] | None = None  # threshold saves during a fine-tune
        self._captioner = None
        self._captioner_error: str | None = None
        self._start(model, fallback, user_models_dir)

    # ------------------------------------------------------------------ loading
    def _start(self, model, fallback, user_models_dir) -> None:
        candidates = [str(c) for c in (model, fallback) if c]
        errors = []
        for candidate in dict.fromkeys(candidates):  # the fallback only if it is another model
            try:
                store = ModelStore(candidate, user_models_dir)
                self._load(store.active_dir)
            except Exception as error:  # noqa: BLE001 - any failure becomes a message
                log.warning("could not load model %s: %s", candidate, error)
                errors.append(f"could not load model `{candidate}`: {error}")
                continue
            self.store, self.model_id = store, candidate
            if errors:
                self.notice = f"{errors[0]}. Using the default model `{candidate}` instead."
            return
        self.load_error = "; ".join(errors) if errors else "no model was given (use --model or VLMDIFF_MODEL)"

    def _load(self, directory: Path) -> None:
        pipeline = VLMDiffPipeline.from_pretrained(directory)
        with self._lock:
            self.pipeline, self.model_dir = pipeline, Path(directory)

    @property
    def ready(self) -> bool:
        return self.pipeline is not None

    def _require_model(self) -> VLMDiffPipeline:
        if self.pipeline is None:
            raise ServiceError(f"No model is loaded ({self.load_error}). Start the app with --model DIR_OR_HUB_ID.")
        return self.pipeline

    @property
    def classes(self) -> list[str]:
        """Every class the model knows (from its config and its thresholds)."""
        if self.pipeline is None:
            return []
        return sorted(set(self.pipeline.config.classes) | set(self.pipeline.thresholds.classes))

    @property
    def default_strength(self) -> float:
        return self.pipeline.config.strength if self.pipeline else 1.0

    @property
    def default_steps(self) -> int:
        return min(self.pipeline.config.num_inference_steps, MAX_STEPS) if self.pipeline else 10

    @property
    def has_user_changes(self) -> bool:
        return self.store is not None and self.store.has_user_changes

    def status_markdown(self) -> str:
        if self.pipeline is None:
            return (f"**No model loaded.** {self.load_error}. Detection is unavailable; "
                    "start the app with `--model DIR_OR_HUB_ID`.")
        user_dir = self.store.user_dir if self.has_user_changes else None
        return cards.status_markdown(self.model_id, self.pipeline, self.classes, user_dir, self.notice)

    def model_card(self) -> str:
        if self.pipeline is None:
            return self.status_markdown()
        return cards.model_card(self.model_dir, self.pipeline, self.classes)

    def reset_model(self) -> None:
        """Drop the user's saved thresholds and fine-tuned classes; the source model is used again."""
        self._require_model()
        if not self._finetune_lock.acquire(blocking=False):
            raise ServiceError("A fine-tune is running; reset the model when it has finished.")
        try:
            with self._lock:
                self.store.reset()
                self._load(self.store.active_dir)
        finally:
            self._finetune_lock.release()

    # ------------------------------------------------------------------ detection
    def _check_settings(self, class_name, strength, steps, seed) -> tuple[str, float, int, int]:
        class_name = (class_name or AUTO_CLASS).strip()
        if class_name != AUTO_CLASS and class_name not in self.classes:
            known = ", ".join(self.classes) or "none"
            raise ServiceError(f"Unknown class {class_name!r}. Choose 'auto' or one of: {known}.")
        try:
            strength = float(self.default_strength if strength is None else strength)
            steps_value = float(self.default_steps if steps is None else steps)
            seed_value = float(0 if seed is None else seed)
        except (TypeError, ValueError) as error:
            raise ServiceError(f"Strength, steps and seed must be numbers ({error}).") from error
        if not 0.0 <= strength <= 1.0:
            raise ServiceError(f"Denoising strength must be between 0 and 1; got {strength}.")
        if not steps_value.is_integer() or not 1 <= steps_value <= MAX_STEPS:
            raise ServiceError(f"DDIM steps must be a whole number from 1 to {MAX_STEPS}; got {steps}.")
        if not seed_value.is_integer() or not 0 <= seed_value <= MAX_SEED:
            raise ServiceError(f"The seed must be a whole number from 0 to {MAX_SEED}; got {seed}.")
        return class_name, strength, int(steps_value), int(seed_value)

    def caption(self, image: Image.Image) -> str:
        """The captioner's description of the image, or a note saying why there is none."""
        pipeline = self._require_model()
        if self._captioner is None and self._captioner_error is None:
            try:
                from vlmdiff.captioning import create_captioner

                self._captioner = create_captioner(pipeline.config.captioner)
            except Exception as error:  # noqa: BLE001 - e.g. a hub VLM while offline
                log.warning("captioner %s unavailable: %s", pipeline.config.captioner, error)
                self._captioner_error = (f"(no caption: captioner {pipeline.config.captioner!r} could not be "
                                         f"loaded: {error})")
        if self._captioner is None:
            return self._captioner_error
        return self._captioner.caption([image])[0]

    def detect(self, image_path: str | Path | None, class_name: str = AUTO_CLASS, strength: float | None = None,
               steps: int | None = None, seed: int | None = 0) -> Detection:
        """Caption, reconstruct and score one image file; raises ServiceError / ImageInputError."""
        pipeline = self._require_model()
        if image_path is None:
            raise ServiceError("Upload an image (or click an example) first.")
        class_name, strength, steps, seed = self._check_settings(class_name, strength, steps, seed)
        image = load_image(image_path)  # ImageInputError: not an image, too small/large, odd mode
        with self._lock:
            caption = self.caption(image)
            result = pipeline([image], strength=strength, num_inference_steps=steps, seed=seed,
                              class_names=class_name)[0]
        shown = display_size(image)
        anomaly_map = result.anomaly_map
        if anomaly_map.shape != (shown.height, shown.width):
            resized = Image.fromarray(anomaly_map.astype(np.float32)).resize(shown.size, Image.Resampling.BILINEAR)
            anomaly_map = np.asarray(resized)
        # keep only display-size pictures: the detection lives on in the session state for re-blending
        result = replace(result, reconstruction=display_size(result.reconstruction), anomaly_map=anomaly_map)
        return Detection(caption, shown, result.reconstruction, anomaly_map, result, strength, steps, seed,
                         pipeline.scorer.describe())

    # ------------------------------------------------------------------ thresholds
    def threshold(self, class_name: str) -> ClassThreshold | None:
        pipeline = self._require_model()
        return pipeline.thresholds.get(class_name) if class_name in pipeline.thresholds.classes else None

    def _score_images(self, images: list, class_name: str, progress: Progress | None) -> list[float]:
        scores = []
        for start in range(0, len(images), SCORE_BATCH):
            with self._lock:  # per batch, so detection requests get in between
                results = self._require_model()(images[start : start + SCORE_BATCH], class_names=class_name,
                                                return_reconstruction=False)
            scores += [r.score for r in results]
            if progress:
                progress(len(scores) / len(images), f"scored {len(scores)} of {len(images)} images")
        return scores

    def calibrate(self, class_name: str, folder: str | None = None, progress: Progress | None = None) -> Calibration:
        """Scores of normal (and anomalous) images of a class: from a labelled folder when given,
        else from the normal images stored in the model folder (its replay set)."""
        self._require_model()
        if class_name not in self.classes:
            raise ServiceError(f"Choose a class first (known classes: {', '.join(self.classes) or 'none'}).")
        if folder and folder.strip():
            path = Path(folder.strip()).expanduser()
            images, labels = folder_images(class_name, path)
            source = f"folder {path}"
        else:
            images, source = stored_images(self.model_dir, class_name), "normal images stored with the model"
            labels = [0] * len(images)
        scores = self._score_images(images, class_name, progress)
        return Calibration(class_name, np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64), source)

    def save_threshold(self, class_name: str, value: float, method: str = "manual",
                       calibration: Calibration | None = None, quantile: float = DEFAULT_QUANTILE) -> Path:
        """Set a class threshold (the Detect tab uses it at once) and write it to the user model folder."""
        pipeline = self._require_model()
        if class_name not in self.classes:
            raise ServiceError(f"Unknown class {class_name!r}; choose one of: {', '.join(self.classes) or 'none'}.")
        if calibration is not None and calibration.class_name != class_name:
            calibration = None  # scores of another class say nothing about this one
        try:
            value = float(value)
            with self._lock:
                thresholds = pipeline.thresholds
                if method == "f1" and calibration is not None and len(calibration.anomalous):
                    item = thresholds.fit_f1(class_name, calibration.scores, calibration.labels)
                elif method == "quantile" and calibration is not None:
                    item = thresholds.fit_quantile(class_name, calibration.normal, quantile)
                else:
                    scale = (float(calibration.normal.min()), float(calibration.scores.max())) if calibration else None
                    item = thresholds.set_manual(class_name, value, scale)
                if self._pending_edits is not None:
                    self._pending_edits[class_name] = item
                self.model_dir = self.store.writable_dir()
                thresholds.save(self.model_dir / THRESHOLDS_FILE)
        except (TypeError, ValueError) as error:
            raise ServiceError(f"Could not set the threshold: {error}") from error
        except OSError as error:
            raise ServiceError(f"The threshold is in use but could not be saved ({error}).") from error
        return self.model_dir / THRESHOLDS_FILE

    # ------------------------------------------------------------------ fine-tuning
    def _check_finetune(self, files: list, class_name: str, steps, update_existing: bool) -> tuple[list, str, int]:
        """(images, class name, steps) of a valid fine-tune request; ServiceError naming what is wrong."""
        if not files:
            raise ServiceError(f"Upload at least {MIN_IMAGES} normal images of the class first.")
        if len(files) < MIN_IMAGES:
            raise ServiceError(f"Fine-tuning needs at least {MIN_IMAGES} normal images; got {len(files)}.")
        if len(files) > MAX_FINETUNE_IMAGES:
            raise ServiceError(f"Upload at most {MAX_FINETUNE_IMAGES} images; got {len(files)}.")
        try:
            class_name = validate_class_name(class_name)
        except ValueError as error:
            raise ServiceError(f"Invalid class name: {error}.") from error
        if class_name in self.classes and not update_existing:
            raise ServiceError(
                f"The model already knows class {class_name!r}. Tick 'Update existing class' to re-tune it "
                "with these images, or choose a new name."
            )
        try:
            steps_value = float(steps)
        except (TypeError, ValueError) as error:
            raise ServiceError(f"Steps must be a number; got {steps!r}.") from error
        if not steps_value.is_integer() or not 1 <= steps_value <= MAX_FINETUNE_STEPS:
            raise ServiceError(f"Steps must be a whole number from 1 to {MAX_FINETUNE_STEPS}; got {steps}.")
        images = []
        for path, name in files:
            try:
                images.append(load_image(path))
            except ImageInputError as error:
                raise ServiceError(f"{name} cannot be used: {str(error).replace(Path(path).name, name)}") from error
        return images, class_name, int(steps_value)

    def finetune(self, files: list[tuple[str | Path, str]], class_name: str, steps: int = FinetuneConfig.steps,
                 update_existing: bool = False, progress: Progress | None = None):
        """Fine-tune on uploaded normal images [(path, shown name)] into the user model folder, then use it.

        A known class is re-tuned only with update_existing=True. Returns the library's FinetuneSummary.
        """
        self._require_model()
        images, class_name, steps = self._check_finetune(list(files or []), class_name, steps, update_existing)
        if not self._finetune_lock.acquire(blocking=False):
            raise ServiceError("Another fine-tune is running; try again when it has finished.")
        try:
            with self._lock:
                source, target = self.model_dir, self.store.user_dir
                self._pending_edits = {}
            config = FinetuneConfig(steps=steps, batch_size=min(FinetuneConfig.batch_size, len(images)))
            try:
                summary = finetune(source, images, class_name, output_dir=target, config=config, progress=progress)
            except Exception as error:  # noqa: BLE001 - the old model stays; the user gets the reason
                log.exception("fine-tuning failed")
                raise ServiceError(f"Fine-tuning failed; the current model is unchanged. Reason: {error}") from error
            with self._lock:
                self._load(target)
                edits = {name: item for name, item in self._pending_edits.items() if name != class_name}
                if edits:  # thresholds saved while it ran: keep them
                    fresh = self.pipeline.thresholds
                    self.pipeline.thresholds = Thresholds({**{c: fresh.get(c) for c in fresh.classes}, **edits})
                    self.pipeline.thresholds.save(target / THRESHOLDS_FILE)
            return summary
        finally:
            self._pending_edits = None
            self._finetune_lock.release()
