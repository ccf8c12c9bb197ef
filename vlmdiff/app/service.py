"""`DetectorService`: the one object the app talks to.

It owns the loaded pipeline, enforces the app's limits itself (not only in the UI), serialises
pipeline use and model swaps with a lock, and does the work behind each tab: caption + detect +
overlay, calibration scores for the thresholds, and fine-tuning with a reload on success.
Every error meant for a user is a `ServiceError` (or the library's `ImageInputError`) whose
message says what to do.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from vlmdiff.images import ImageInputError, load_image
from vlmdiff.pipeline import AUTO_CLASS, THRESHOLDS_FILE, DetectionResult, VLMDiffPipeline
from vlmdiff.thresholds import ClassThreshold, Thresholds
from vlmdiff.visualize import overlay_heatmap

log = logging.getLogger(__name__)

MAX_STEPS = 50  # DDIM steps a request may ask for
MAX_SEED = 2**31 - 1
DISPLAY_SIDE = 1024  # pictures sent back to the browser are at most this large
MAX_FINETUNE_IMAGES = 200
MAX_FINETUNE_STEPS = 2000
MAX_CALIBRATION_IMAGES = 48  # per label (normal / anomalous) and class
SCORE_BATCH = 4
CARD_FILES = ("MODEL_CARD.md", "README.md")
Progress = Callable[[float, str], None]


class ServiceError(ValueError):
    """A request the service cannot do; the message is meant for the user."""


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


def scoring_description(pipeline) -> str:
    """Which maps the score is made of, in words (the shipped default uses the memory only)."""
    anomaly = pipeline.config.anomaly
    parts = [name for name, weight in (("input vs reconstruction", anomaly.reconstruction_weight),
                                       ("normal-feature memory", anomaly.memory_weight)) if weight > 0]
    return " + ".join(parts)


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


def display_size(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """The image shrunk (never enlarged) so that its longer side is at most `side`."""
    if max(image.size) <= side:
        return image
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR)


def render_overlay(detection: Detection, opacity: float) -> Image.Image:
    """The heatmap over the input. Colour scale: 0 (blue) to the class threshold (red) when the
    class has one, else the map's own min-max."""
    opacity = min(max(float(opacity), 0.0), 1.0)
    threshold = detection.result.threshold
    value_range = (0.0, threshold) if threshold is not None and threshold > 0 else None
    return overlay_heatmap(detection.image, detection.anomaly_map, alpha=opacity, value_range=value_range)


def _is_hub_cache(directory: Path) -> bool:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).resolve() in directory.resolve().parents


def _is_writable(directory: Path) -> bool:
    """True if files can be written in the folder and the folder itself can be replaced."""
    if _is_hub_cache(directory):
        return False
    try:
        for place in (directory, directory.parent):
            with tempfile.TemporaryFile(dir=place):
                pass
    except OSError:
        return False
    return True


class DetectorService:
    """Owns the loaded model; `model` is a folder or a Hugging Face hub id, `fallback` a folder
    tried when `model` cannot be loaded (the embedded default)."""

    def __init__(self, model: str | Path | None, fallback: str | Path | None = None,
                 work_dir: str | Path | None = None):
        self.pipeline: VLMDiffPipeline | None = None
        self.model_dir: Path | None = None
        self.model_id = str(model) if model else None
        self.load_error: str | None = None
        self.notice: str | None = None  # e.g. "fell back to the default model"
        default_work = Path(tempfile.gettempdir()) / "vlmdiff-app"
        self.work_dir = Path(work_dir or os.environ.get("VLMDIFF_WORK_DIR") or default_work)
        self._lock = threading.RLock()  # pipeline use, threshold edits and model swaps
        self._finetune_lock = threading.Lock()  # one fine-tune at a time
        self._pending_edits: dict[str, ClassThreshold] | None = None  # threshold saves during a fine-tune
        self._captioner = None
        self._captioner_error: str | None = None
        self._start(model, fallback)

    # ------------------------------------------------------------------ loading
    def _start(self, model, fallback) -> None:
        candidates = [str(c) for c in (model, fallback) if c]
        errors = []
        for candidate in dict.fromkeys(candidates):  # the fallback only if it is another model
            try:
                self._load(self._resolve(candidate))
            except Exception as error:  # noqa: BLE001 - any failure becomes a message
                log.warning("could not load model %s: %s", candidate, error)
                errors.append(f"could not load model `{candidate}`: {error}")
                continue
            self.model_id = candidate
            if errors:
                self.notice = f"{errors[0]}. Using the default model `{candidate}` instead."
            return
        self.load_error = "; ".join(errors) if errors else "no model was given (use --model or VLMDIFF_MODEL)"

    @staticmethod
    def _resolve(model: str) -> Path:
        """A local model folder for a folder path or a hub id (downloaded into the hub cache)."""
        path = Path(model).expanduser()
        if path.is_dir():
            return path
        if path.is_absolute() or model.startswith(".") or model.count("/") != 1:
            raise FileNotFoundError(f"no model folder at {path}")
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(model))
        except Exception as error:  # noqa: BLE001 - offline, unknown repo, ...
            raise FileNotFoundError(
                f"no model folder at {path}, and no hub model {model!r} could be fetched ({type(error).__name__})"
            ) from error

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

    def status_markdown(self) -> str:
        if self.pipeline is None:
            return (f"**No model loaded.** {self.load_error}. Detection is unavailable; "
                    "start the app with `--model DIR_OR_HUB_ID`.")
        classes = ", ".join(self.classes) or "none yet"
        config = self.pipeline.config
        text = f"Model `{self.model_id}` ({config.preset}, {config.resolution} px) - classes: {classes}"
        return f"**Note:** {self.notice}\n\n{text}" if self.notice else text

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
                         scoring_description(pipeline))

    # ------------------------------------------------------------------ thresholds
    def threshold(self, class_name: str) -> ClassThreshold | None:
        pipeline = self._require_model()
        return pipeline.thresholds.get(class_name) if class_name in pipeline.thresholds.classes else None

    def _score_images(self, images: list, class_name: str, progress: Progress | None) -> list[float]:
        scores = []
        for start in range(0, len(images), SCORE_BATCH):
            with self._lock:  # per batch, so detection requests get in between
                results = self._require_model()(images[start : start + SCORE_BATCH], class_names=class_name)
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
            paths, labels, source = self._folder_images(class_name, Path(folder.strip()).expanduser())
            images = paths
        else:
            images, source = self._stored_images(class_name), "normal images stored with the model"
            labels = [0] * len(images)
        scores = self._score_images(images, class_name, progress)
        return Calibration(class_name, np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64), source)

    def _stored_images(self, class_name: str) -> list[Image.Image]:
        from vlmdiff.images import tensor_to_images
        from vlmdiff.training.replay import load_replay

        replay = load_replay(self.model_dir)
        chosen = [i for i, name in enumerate(replay.class_names) if name == class_name] if replay else []
        if not chosen:
            raise ServiceError(
                f"This model stores no normal images of {class_name!r}. Enter a labelled calibration folder instead."
            )
        return tensor_to_images(replay.float_images(chosen))

    @staticmethod
    def _folder_images(class_name: str, folder: Path) -> tuple[list[Path], list[int], str]:
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
        return [r.image_path for r in chosen], [r.label for r in chosen], f"folder {folder}"

    @staticmethod
    def suggest(calibration: Calibration, method: str, quantile: float = 0.99) -> float:
        """The F1-optimal ("f1") or normal-quantile ("quantile") threshold for calibration scores."""
        try:
            if method == "f1":
                if not len(calibration.anomalous):
                    raise ServiceError("The F1-optimal threshold needs anomalous images too: use a labelled folder.")
                return Thresholds().fit_f1("c", calibration.scores, calibration.labels).value
            return Thresholds().fit_quantile("c", calibration.normal, quantile).value
        except ServiceError:
            raise
        except ValueError as error:
            raise ServiceError(f"No suggestion: {error}") from error

    def save_threshold(self, class_name: str, value: float, method: str = "manual",
                       calibration: Calibration | None = None, quantile: float = 0.99) -> Path:
        """Set a class threshold (the Detect tab uses it at once) and write thresholds.json."""
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
                target = self._writable_model_dir()
                thresholds.save(target / THRESHOLDS_FILE)
        except (TypeError, ValueError) as error:
            raise ServiceError(f"Could not set the threshold: {error}") from error
        except OSError as error:
            raise ServiceError(f"The threshold is in use but could not be saved ({error}).") from error
        return target / THRESHOLDS_FILE

    # ------------------------------------------------------------------ writable model folder
    def _work_copy_path(self) -> Path:
        return self.work_dir / (self.model_dir.name if self.model_dir.name not in ("", ".") else "model")

    def _writable_model_dir(self) -> Path:
        """The model folder, or (read-only folder, hub cache) a writable copy that the service switches to."""
        if _is_writable(self.model_dir):
            return self.model_dir
        copy = self._work_copy_path()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(dir=self.work_dir, prefix=f".{copy.name}."))
        shutil.copytree(self.model_dir, staged, dirs_exist_ok=True)  # follows the hub cache's symlinks
        if copy.exists():
            shutil.rmtree(copy)
        staged.rename(copy)
        log.info("model folder %s is read-only; using a writable copy at %s", self.model_dir, copy)
        self.model_dir = copy
        return copy

    # ------------------------------------------------------------------ fine-tuning
    def finetune(self, files: list[tuple[str | Path, str]], class_name: str, steps: int = 100,
                 update_existing: bool = False, progress: Progress | None = None):
        """Fine-tune on uploaded normal images [(path, shown name)]; on success the service uses the new model.

        A known class is re-tuned only with update_existing=True. Returns the library's FinetuneSummary.
        """
        from vlmdiff.training.finetune import MIN_IMAGES, FinetuneConfig, finetune, validate_class_name

        self._require_model()
        files = list(files or [])
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
        if not self._finetune_lock.acquire(blocking=False):
            raise ServiceError("Another fine-tune is running; try again when it has finished.")
        try:
            with self._lock:
                source = self.model_dir
                target = source if _is_writable(source) else self._work_copy_path()
                self._pending_edits = {}
            if target != source:
                self.work_dir.mkdir(parents=True, exist_ok=True)
            config = FinetuneConfig(steps=int(steps_value), batch_size=min(8, len(images)))
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

    # ------------------------------------------------------------------ about
    def model_card(self) -> str:
        """The model folder's MODEL_CARD.md (or README.md) plus the classes and thresholds in use."""
        if self.pipeline is None:
            return self.status_markdown()
        card = ""
        for name in CARD_FILES:
            path = self.model_dir / name
            if path.is_file():
                card = _strip_front_matter(path.read_text(encoding="utf-8", errors="replace"))
                break
        config = self.pipeline.config
        if not card:
            card = (
                f"# vlmdiff model `{self.model_dir.name}`\n\n"
                "A vision-language-guided latent diffusion anomaly detector "
                f"(preset `{config.preset}`, {config.resolution} px, captioner `{config.captioner}`, "
                f"text encoder `{config.text_encoder}`, {config.num_inference_steps} DDIM steps at strength "
                f"{config.strength}). This folder has no MODEL_CARD.md."
            )
        rows = []
        for name in self.classes:
            item = self.threshold(name)
            rows.append(f"| {name} | {item.value:.4g} | {item.method} |" if item else f"| {name} | - | - |")
        table = "\n".join(["| class | threshold | method |", "|---|---|---|", *rows]) if rows else "No classes yet."
        return f"{card}\n\n## Loaded now\n\nModel folder: `{self.model_dir}`\n\n{table}\n"


def _strip_front_matter(text: str) -> str:
    if text.startswith("---\n"):
        end = text.find("\n---", 4)
        if end != -1:
            return text[end + 4 :].lstrip("\n")
    return text
