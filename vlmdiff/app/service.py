"""`DetectorService`: the one object the app talks to, the host of the loaded model.

It owns the loaded pipeline, enforces the app's limits itself (not only in the UI), serialises
pipeline use and model swaps with a lock, and does the work behind each tab: caption + detect,
calibration scores, thresholds and fine-tuning. Changes go to the user model folder
(`ModelStore`), never to the shipped model; on a gated app (`Access`) a visitor's changes go to
their `Session` instead. A fine-tune runs its quick phase in the request and queues its diffusion
phase on a background worker (`finetune_jobs`). Every error meant for a user is a `ServiceError`
whose message says what to do.
"""
from __future__ import annotations

import logging
import tempfile
import threading
from dataclasses import dataclass, replace
from functools import cached_property, partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from vlmdiff.app import cards
from vlmdiff.app.access import Access
from vlmdiff.allocator import release_freed_memory
from vlmdiff.app.calibration import Calibration, data_root_folder, folder_images, stored_images, uploaded_images
from vlmdiff.app.class_names import new_class_name, require_known, same_name_note
from vlmdiff.app.errors import ServiceError, shorten
from vlmdiff.app.finetune_jobs import (
    DONE, DROPPED, FAILED, QUEUE_FULL, DiffusionJob, DiffusionWorker, JobCancelled, finetuned_classes,
    generic_reconstruction,
)
from vlmdiff.app.limits import DECODE_MEGAPIXELS, MAX_CALIBRATION_MEGAPIXELS, MAX_SEED, MAX_STEPS, FinetuneLimits
from vlmdiff.app.model_store import ModelStore
from vlmdiff.app.session import Session, SessionFolders, discard_model_folder
from vlmdiff.app.uploads import DecodeBudget, Upload, check_pixels
from vlmdiff.captioning import Captioner, load_display_captioner
from vlmdiff.captioning.base import error_reason
from vlmdiff.memory_guidance import DEFAULT_MEMORY_GUIDANCE
from vlmdiff.model_folder import THRESHOLDS_FILE
from vlmdiff.pipeline import AUTO_CLASS, DetectionResult, VLMDiffPipeline
from vlmdiff.thresholds import DEFAULT_QUANTILE, ClassThreshold, Thresholds
from vlmdiff.training.finetune import MIN_IMAGES, FinetuneConfig, FinetuneSummary, finetune
from vlmdiff.visualize import overlay_heatmap, threshold_range

log = logging.getLogger(__name__)

SCORE_BATCH = 4
DROPPED_MESSAGE = "Its model was not used: the changes it was made for were dropped meanwhile."
Progress = Callable[[float, str], None]


@dataclass
class Detection:
    """One detection, ready to show, and the settings used."""

    caption: str
    image: Image.Image  # the input at the working size; the result's map and reconstruction have its size
    result: DetectionResult
    strength: float
    steps: int
    seed: int
    scoring: str = ""  # which maps make the score, e.g. "normal-feature memory"
    generic_reconstruction: bool = False  # the diffusion was never fine-tuned on the result's class
    memory_guided: bool = False  # only what the memory flagged was regenerated


def render_overlay(detection: Detection, opacity: float) -> Image.Image:
    """The heatmap over the input, on the colour scale of `vlmdiff predict` (threshold mid-scale)."""
    opacity = min(max(float(opacity), 0.0), 1.0)
    value_range = threshold_range(detection.result.threshold)
    return overlay_heatmap(detection.image, detection.result.anomaly_map, alpha=opacity, value_range=value_range)


def memory_guidance(pipeline: VLMDiffPipeline, guided: bool | None) -> float:
    """The memory-guidance threshold of a detection: the model's (None), off (False), or on (True: the
    model's, or the library default when the model has none); always off without a memory."""
    if pipeline.memory is None or guided is False:
        return 0.0
    configured = pipeline.config.memory_guidance
    return configured if guided is None or configured > 0 else DEFAULT_MEMORY_GUIDANCE


def per_class(thresholds: Thresholds) -> dict[str, ClassThreshold]:
    return {name: thresholds.get(name) for name in thresholds.classes}


@dataclass
class ModelView:
    """The model one request sees: the shared model or a visitor's own fine-tuned copy, and the
    thresholds in use (a visitor's own where they saved some)."""

    pipeline: VLMDiffPipeline
    folder: Path
    thresholds: Thresholds

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.pipeline.config.classes) | set(self.thresholds.classes))

    def generic_reconstruction(self, class_name: str) -> bool:
        """Whether this model reconstructs the class with its generic diffusion (a quick fine-tune only)."""
        return generic_reconstruction(self.folder, class_name)

    def judged(self, result: DetectionResult) -> DetectionResult:
        """The result with this view's threshold for its class (as `VLMDiffPipeline.result` gives it: no
        verdict for an image of no known class)."""
        if self.thresholds is self.pipeline.thresholds:
            return result
        name, score = result.class_name, result.score
        if name not in self.thresholds.classes or result.unknown_class:
            return replace(result, threshold=None, is_anomalous=None, normalized_score=None)
        return replace(result, threshold=self.thresholds.get(name).value,
                       is_anomalous=self.thresholds.verdict(name, score),
                       normalized_score=self.thresholds.normalized(name, score))


def fit_threshold(thresholds: Thresholds, class_name: str, value: float, method: str,
                  calibration: Calibration | None, quantile: float) -> ClassThreshold:
    """Set the class's threshold in `thresholds`: F1-optimal or quantile from the scores, else `value` by hand."""
    if method == "f1" and calibration is not None and len(calibration.anomalous):
        return thresholds.fit_f1(class_name, calibration.scores, calibration.labels)
    if method == "quantile" and calibration is not None:
        return thresholds.fit_quantile(class_name, calibration.normal, quantile)
    normal = calibration.normal if calibration is not None and len(calibration.normal) else None
    return thresholds.set_manual(class_name, value, normal)


class DetectorService:
    """Hosts one model: `model` is a folder or a Hugging Face hub id, `fallback` a folder tried when
    `model` cannot be loaded (the embedded default); changes go to a user folder under `user_models_dir`,
    or, on a gated app, to the visitor's session. `data_root` is the only server folder calibration
    may read from. `captioner` names the VLM whose caption the Detect tab shows (hub id or folder;
    default: the model's own captioner)."""

    def __init__(self, model: str | Path | None, fallback: str | Path | None = None,
                 user_models_dir: str | Path | None = None, access: Access | None = None,
                 data_root: str | Path | None = None, captioner: str | None = None):
        self.pipeline: VLMDiffPipeline | None = None
        self.store: ModelStore | None = None
        self.model_dir: Path | None = None  # the folder the loaded model came from
        self.model_id = str(model) if model else None
        self.load_error: str | None = None
        self.notice: str | None = None  # e.g. "fell back to the default model"
        self.access = access or Access()
        self.data_root = Path(data_root).expanduser().resolve() if data_root else None
        self._session_folders = SessionFolders() if self.access.gated else None
        self._session_model: tuple[Path, VLMDiffPipeline] | None = None  # the last visitor model used
        self._lock = threading.RLock()  # pipeline use, threshold edits and model swaps
        self._finetune_lock = threading.Lock()  # one quick phase at a time
        self._pending_edits: dict[str, ClassThreshold] | None = None  # threshold saves during a fine-tune
        self._worker = DiffusionWorker(self._run_diffusion)  # diffusion phases, one at a time
        self._decode = DecodeBudget(DECODE_MEGAPIXELS).load  # every upload is decoded through one budget
        self._shared_job: DiffusionJob | None = None  # the diffusion phase of the shared model's last fine-tune
        self.captioner_id = captioner
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

    def _own(self, session: Session | None) -> Session | None:
        """The visitor's session where their changes count (a gated app), else None."""
        return session if self.access.gated else None

    def _target_view(self, session: Session | None, password: str | None) -> ModelView:
        """The model a change request is checked against before its password is: the shared one when the
        request carries a password (or the app is not gated), else the visitor's own view."""
        return self.view(None if password or not self.access.gated else session)

    def _changes_go_to(self, session: Session | None, password: str | None, client: str) -> Session | None:
        """Where a change goes: None for the shared model (a private app, or the admin password), else the session.
        Call it once the request is otherwise valid, so that its reply tells nothing more about the password."""
        if self.access.for_everyone(password, client):
            return None
        if session is None:
            raise ServiceError("This app keeps each visitor's changes in their session; none came with the request.")
        return session

    def _visitor_pipeline(self, folder: Path) -> VLMDiffPipeline:
        """A visitor's fine-tuned model; the last one used stays loaded, others are read from disk again."""
        with self._lock:
            if self._session_model is None or self._session_model[0] != folder:
                self._session_model = None  # the previous visitor's model goes before the next one loads
                release_freed_memory()
                self._session_model = (folder, VLMDiffPipeline.from_pretrained(folder))
            return self._session_model[1]

    def view(self, session: Session | None = None) -> ModelView:
        """What a request of this visitor sees."""
        pipeline, folder = self._require_model(), self.model_dir
        own = self._own(session)
        if own is None:
            return ModelView(pipeline, folder, pipeline.thresholds)
        own.touch()
        if own.model_dir is not None:
            pipeline, folder = self._visitor_pipeline(own.model_dir), own.model_dir
        thresholds = pipeline.thresholds
        if own.thresholds:
            thresholds = Thresholds({**per_class(thresholds), **own.thresholds})
        return ModelView(pipeline, folder, thresholds)

    def classes(self, session: Session | None = None) -> list[str]:
        """Every class the model (as this visitor sees it) knows, from its config and its thresholds."""
        return self.view(session).classes if self.pipeline is not None else []

    @property
    def can_guide(self) -> bool:
        """Whether the model has a memory to guide its reconstruction with."""
        return self.pipeline is not None and self.pipeline.memory is not None

    @property
    def memory_guided_default(self) -> bool:
        return self.pipeline is not None and memory_guidance(self.pipeline, None) > 0

    @property
    def default_strength(self) -> float:
        return self.pipeline.config.strength if self.pipeline else 1.0

    @property
    def default_steps(self) -> int:
        return min(self.pipeline.config.num_inference_steps, MAX_STEPS) if self.pipeline else 10

    @property
    def has_user_changes(self) -> bool:
        """Whether the shared model has saved changes (the user model folder is in use)."""
        return self.store is not None and self.store.has_user_changes

    def can_reset(self, session: Session | None = None) -> bool:
        """Whether 'Reset' has something to drop: the visitor's own changes on a gated app, else the shared ones."""
        own = self._own(session)
        return own.has_changes if own is not None else (not self.access.gated and self.has_user_changes)

    def changes_summary(self, session: Session | None = None) -> str:
        """What 'Reset' / 'Drop my changes' would drop, in words."""
        if not self.can_reset(session):
            return "There are no changes to drop."
        own = self._own(session)
        source = self.store.source_dir
        if own is not None:
            thresholds, model = sorted(own.thresholds), own.model_dir
        else:
            shipped = Thresholds.load(source / THRESHOLDS_FILE) if (source / THRESHOLDS_FILE).is_file() else None
            thresholds = sorted(name for name, item in per_class(self.pipeline.thresholds).items()
                                if shipped is None or name not in shipped.classes or shipped.get(name) != item)
            model = self.store.user_dir
        classes = sorted(finetuned_classes(model) - finetuned_classes(source)) if model is not None else []
        parts = ([f"the thresholds you saved for {', '.join(thresholds)}"] if thresholds else []) + (
            [f"the classes you fine-tuned ({', '.join(classes)})"] if classes else [])
        what = " and ".join(parts) or "your copy of the model"
        return f"This drops {what}, for good; the shipped model is used again."

    def _changes_text(self, session: Session | None) -> str:
        if not self.access.gated:
            if not self.has_user_changes:
                return ""
            return (f"In use with your changes (saved thresholds, fine-tuned classes) from `{self.store.user_dir}`; "
                    "'Reset to the shipped model' drops them.")
        own = self._own(session)
        mine = " You have some; 'Drop my changes' removes them." if own is not None and own.has_changes else ""
        notice = f" **{own.notice}**" if own is not None and own.notice else ""
        return ("**Your saved thresholds and fine-tuned classes stay in this browser session**; other visitors do "
                f"not see them.{mine}{notice}")

    def status_markdown(self, session: Session | None = None) -> str:
        if self.pipeline is None:
            return (f"**No model loaded.** {self.load_error}. Detection is unavailable; "
                    "start the app with `--model DIR_OR_HUB_ID`.")
        view = self.view(session)
        name = Path(self.model_id).name if self.access.gated and Path(self.model_id).is_dir() else self.model_id
        return cards.status_markdown(name, view.pipeline.config, view.classes, self._changes_text(session),
                                     self.notice)

    def model_card(self, session: Session | None = None) -> str:
        if self.pipeline is None:
            return self.status_markdown()
        view = self.view(session)
        return cards.model_card(view.folder, view.pipeline.config, view.thresholds, view.classes,
                                show_folder=not self.access.gated)

    def reset_model(self, session: Session | None = None) -> None:
        """Drop the changes: the visitor's own on a gated app, else the user model folder (the source is used again)."""
        self._require_model()
        if self.access.gated:
            if session is not None:
                with self._lock:  # not while a finished diffusion phase switches the session's model
                    session.clear()
            return
        if not self._finetune_lock.acquire(blocking=False):
            raise ServiceError("A fine-tune is running; reset the model when it has finished.")
        try:
            job = self._unfinished_job(None)
            if job is not None:
                raise ServiceError(f"The diffusion fine-tune of class {job.class_name!r} is running; reset the "
                                   "model when it has finished.")
            with self._lock:
                self.store.reset()
                self._load(self.store.active_dir)
        finally:
            self._finetune_lock.release()

    # ------------------------------------------------------------------ detection
    def _check_settings(self, view: ModelView, class_name, strength, steps, seed) -> tuple[str, float, int, int]:
        if (class_name or AUTO_CLASS).strip().casefold() != AUTO_CLASS:
            class_name = require_known(class_name, view.classes)
        else:
            class_name = AUTO_CLASS
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

    @cached_property
    def _display_captioner(self) -> tuple[Captioner | None, str | None]:
        """(captioner, note), loaded once: `captioner_id` when it loads, else the model's own captioner with a
        note saying why; (None, why) when the model's own cannot be loaded either."""
        own = self._require_model().config.captioner
        try:
            return load_display_captioner(self.captioner_id, own)
        except Exception as error:  # noqa: BLE001 - e.g. a hub VLM while offline
            log.warning("captioner %s unavailable: %s", own, error)
            return None, f"no caption: captioner {own!r} could not be loaded ({error_reason(error)})"

    def caption(self, image: Image.Image) -> str:
        """The display captioner's description of the image (with a note in parentheses when it fell back
        to the model's own), or a note saying why there is none."""
        captioner, note = self._display_captioner
        if captioner is None:
            return f"({note})"
        text = captioner.caption([image])[0]
        return f"{text} ({note})" if note else text

    def detect(self, image: Upload | None, class_name: str = AUTO_CLASS, strength: float | None = None,
               steps: int | None = None, seed: int | None = 0, session: Session | None = None,
               memory_guided: bool | None = None) -> Detection:
        """Caption, reconstruct and score one uploaded image at the working size; raises ServiceError.
        `memory_guided`: regenerate only what the memory flags (None: the model's default)."""
        view = self.view(session)
        if image is None:
            raise ServiceError("Upload an image (or click an example) first.")
        class_name, strength, steps, seed = self._check_settings(view, class_name, strength, steps, seed)
        picture = self._decode(image)  # not an image, too small/large, odd mode: a message naming it
        with self._lock:
            caption = self.caption(picture)
            guidance = memory_guidance(view.pipeline, memory_guided)
            result = view.pipeline([picture], strength=strength, num_inference_steps=steps, seed=seed,
                                   class_names=class_name, memory_guidance=guidance)[0]
        return Detection(caption, picture, view.judged(result), strength, steps, seed, view.pipeline.scorer.describe(),
                         view.generic_reconstruction(result.class_name), guidance > 0)

    # ------------------------------------------------------------------ thresholds
    def threshold(self, class_name: str, session: Session | None = None) -> ClassThreshold | None:
        thresholds = self.view(session).thresholds
        return thresholds.get(class_name) if class_name in thresholds.classes else None

    def _score_images(self, view: ModelView, images: list[Image.Image | Upload], class_name: str,
                      progress: Progress | None) -> list[float]:
        scores = []
        for start in range(0, len(images), SCORE_BATCH):
            batch = [self._decode(i) if isinstance(i, Upload) else i for i in images[start : start + SCORE_BATCH]]
            with self._lock:  # per batch, so detection requests get in between
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
        view = self.view(session)
        if not class_name:
            raise ServiceError(f"Choose a class first (known classes: {', '.join(view.classes) or 'none'}).")
        class_name = require_known(class_name, view.classes)
        with tempfile.TemporaryDirectory(prefix="vlmdiff-calibration-") as scratch:
            if normal or defective:
                images, labels = uploaded_images(list(normal), list(defective), Path(scratch))
                check_pixels(images, MAX_CALIBRATION_MEGAPIXELS)
                source = "uploaded images"
            elif folder and folder.strip():
                images, labels = folder_images(class_name, data_root_folder(self.data_root, folder), folder.strip())
                source = f"folder {folder.strip()}"
            else:
                images, source = stored_images(view.folder, class_name), "normal images stored with the model"
                labels = [0] * len(images)
            scores = self._score_images(view, images, class_name, progress)
        return Calibration(class_name, np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.int64), source)

    def save_threshold(self, class_name: str, value: float, method: str = "manual",
                       calibration: Calibration | None = None, quantile: float = DEFAULT_QUANTILE,
                       session: Session | None = None, password: str | None = None, client: str = "local") -> str:
        """Set a class threshold (detection uses it at once); returns where it went: the user model
        folder's thresholds.json, or, on a gated app without the admin password, the visitor's session."""
        try:
            value = float(value)
        except (TypeError, ValueError) as error:
            raise ServiceError(f"The threshold must be a number; got {shorten(value)!r}.") from error
        view = self._target_view(session, password)
        class_name = require_known(class_name, view.classes)
        if calibration is not None and calibration.class_name != class_name:
            calibration = None  # scores of another class say nothing about this one
        try:  # fitted on a copy: the whole request is checked before the password is
            item = fit_threshold(Thresholds(per_class(view.thresholds)), class_name, value, method, calibration,
                                 quantile)
        except (TypeError, ValueError) as error:
            raise ServiceError(f"Could not set the threshold: {error}") from error
        own = self._changes_go_to(session, password, client)
        if own is not None:
            own.thresholds[class_name] = item
            return "your session only (other visitors do not see it)"
        try:
            with self._lock:
                view.thresholds.set(class_name, item)
                if self._pending_edits is not None:
                    self._pending_edits[class_name] = item
                self.model_dir = self.store.writable_dir()
                view.thresholds.save(self.model_dir / THRESHOLDS_FILE)
        except OSError as error:
            raise ServiceError(f"The threshold is in use but could not be saved ({error}).") from error
        return "the model, for everyone" if self.access.gated else str(self.model_dir / THRESHOLDS_FILE)

    # ------------------------------------------------------------------ fine-tuning
    @staticmethod
    def _check_finetune(files: list[Upload], steps, limits: FinetuneLimits) -> int:
        """The steps of a fine-tune request within `limits`; ServiceError naming what is wrong."""
        if not files:
            raise ServiceError(f"Upload at least {MIN_IMAGES} normal images of the class first.")
        if len(files) < MIN_IMAGES:
            raise ServiceError(f"Fine-tuning needs at least {MIN_IMAGES} normal images; got {len(files)}.")
        if len(files) > limits.images:
            raise ServiceError(f"Upload at most {limits.images} images per fine-tune; got {len(files)}.")
        try:
            steps_value = float(steps)
        except (TypeError, ValueError) as error:
            raise ServiceError(f"Steps must be a number; got {shorten(steps)!r}.") from error
        if not steps_value.is_integer() or not 0 <= steps_value <= limits.steps:
            raise ServiceError(f"Steps must be a whole number from 0 (memory and threshold only) to {limits.steps}; "
                               f"got {shorten(steps)}.")
        check_pixels(files, limits.megapixels)
        return int(steps_value)

    @staticmethod
    def _finetune_class(class_name: str, update_existing: bool, known: list[str]) -> str:
        """The class a fine-tune trains: a new valid name, or a known one with `update_existing`."""
        typed, class_name = class_name, new_class_name(class_name, known)
        if class_name in known and not update_existing:
            note = same_name_note(typed, class_name)
            raise ServiceError(
                f"{note + ' ' if note else ''}The model already knows class {class_name!r}. Tick 'Update existing "
                "class' to re-tune it with these images, or choose a new name."
            )
        return class_name

    def finetune_job(self, session: Session | None = None) -> DiffusionJob | None:
        """The diffusion phase this visitor follows: their own last one on a gated app, else the shared model's."""
        if self.access.gated:
            return session.finetune_job if session is not None else None
        return self._shared_job

    def _unfinished_job(self, own: Session | None) -> DiffusionJob | None:
        """The queued or running diffusion phase that will replace the model `own` changes (None: the shared one)."""
        job = self._shared_job if own is None else own.finetune_job
        mine = job is not None and (job.shared if own is None else job.session is own)
        return job if mine and not job.finished else None

    def finetune(self, files: list[Upload], class_name: str, steps: int = FinetuneConfig.steps,
                 update_existing: bool = False, progress: Progress | None = None,
                 session: Session | None = None, password: str | None = None,
                 client: str = "local") -> tuple[FinetuneSummary, DiffusionJob | None]:
        """Fine-tune on uploaded normal images into the user model folder (or, on a gated app without the
        admin password, into a private folder of the visitor's session), in two phases.

        The quick phase (memory + threshold) runs now and its model is used at once; with `steps` > 0 the
        diffusion phase is queued on the background worker and replaces that model when it finishes.
        A known class is re-tuned only with update_existing=True. Returns the quick phase's summary and
        the queued diffusion job (None for steps 0).
        """
        files = list(files or [])
        steps = self._check_finetune(files, steps, self.access.finetune_limits(for_everyone=True))
        view = self._target_view(session, password)
        class_name = self._finetune_class(class_name, update_existing, view.classes)  # before the password
        own = self._changes_go_to(session, password, client)
        if own is not None:
            self._check_finetune(files, steps, self.access.finetune_limits())
        if steps and self._worker.full:
            raise ServiceError(QUEUE_FULL)
        if not self._finetune_lock.acquire(blocking=False):
            raise ServiceError("Another fine-tune is running; try again when it has finished.")
        try:
            running = self._unfinished_job(own)
            if running is not None:
                raise ServiceError(
                    f"The diffusion fine-tune of class {running.class_name!r} is still {running.progress()}. Start "
                    "the next fine-tune of this model when it has finished (the progress is in the Fine-tune tab).")
            images = [self._decode(upload) for upload in files]
            summary = self._quick_phase(view.folder, own, images, class_name, progress)
            job = None
            if steps:
                job = DiffusionJob(class_name, steps, images, own.model_dir if own is not None else self.model_dir, own)
                self._queue_diffusion(job, session)
            return summary, job
        finally:
            self._finetune_lock.release()
            release_freed_memory()  # the quick phase's features and coreset

    def _quick_phase(self, source: Path, own: Session | None, images: list[Image.Image], class_name: str,
                     progress: Progress | None) -> FinetuneSummary:
        """Memory + threshold of the class into a new model (the user folder, or a session folder), used at once."""
        with self._lock:
            target = self._session_folders.new(own) if own is not None else self.store.user_dir
            if own is None:
                self._pending_edits = {}
        try:
            summary = finetune(source, images, class_name, output_dir=None if target == source else target,
                               config=FinetuneConfig(steps=0), progress=progress)
        except Exception as error:  # noqa: BLE001 - the old model stays; the user gets the reason
            log.exception("fine-tuning failed")
            if own is not None:
                discard_model_folder(target)
            else:
                self._pending_edits = None
            raise ServiceError(f"Fine-tuning failed; the current model is unchanged. Reason: {error}") from error
        with self._lock:
            if own is not None:
                own.use_model(target)
                own.thresholds.pop(class_name, None)  # the new model's threshold for it replaces the visitor's
            else:
                self._install(target, fine_tuned=class_name)
                self._pending_edits = None
        return summary

    def _install(self, target: Path, fine_tuned: str | None = None) -> None:
        """Load a newly written shared model, keeping the thresholds saved while it was made (but for the
        class `fine_tuned`, whose new threshold replaces them). Call with the lock held."""
        self._load(target)
        edits = {name: item for name, item in (self._pending_edits or {}).items() if name != fine_tuned}
        if edits:
            self.pipeline.thresholds = Thresholds({**per_class(self.pipeline.thresholds), **edits})
            self.pipeline.thresholds.save(target / THRESHOLDS_FILE)

    def _queue_diffusion(self, job: DiffusionJob, session: Session | None) -> None:
        """Queue the diffusion phase; the visitor who asked follows it (on a gated app, through their session)."""
        with self._lock:
            if job.shared:
                self._shared_job, self._pending_edits = job, {}  # saves from now on outlive its model swap
            if self.access.gated and session is not None:
                session.finetune_job = job
        self._worker.submit(job)

    def _run_diffusion(self, job: DiffusionJob) -> None:
        """The worker's part: the diffusion phase of one fine-tune, whose model then replaces the quick phase's
        (when that is still in use: a visitor may have dropped their changes meanwhile)."""
        state, message = self._diffusion_outcome(job)
        with self._lock:
            if job.shared:
                self._pending_edits = None
        job.finish(state, message)

    def _diffusion_outcome(self, job: DiffusionJob) -> tuple[str, str]:
        """Train the job and switch to its model: (state, message in plain words)."""
        if not job.wanted:
            return DROPPED, DROPPED_MESSAGE
        try:
            summary, target = self._train_diffusion(job)
        except Exception as error:  # noqa: BLE001 - the quick phase's model stays; the visitor gets the reason
            if not job.wanted:  # its source went with the visitor's dropped changes
                return DROPPED, DROPPED_MESSAGE
            log.exception("the diffusion phase of a fine-tune failed")
            return FAILED, (f"Reason: {error_reason(error)}. The quick phase's model stays in use: class "
                            f"{job.class_name!r} works with its memory and threshold and the model's generic "
                            "reconstruction.")
        if not self._use_diffusion_model(job, target):
            return DROPPED, DROPPED_MESSAGE
        loss = "" if summary.final_loss is None else f", final loss {summary.final_loss:.4f}"
        return DONE, (f"{summary.steps} steps in {summary.seconds:.0f} s{loss}. Class {job.class_name!r} now has "
                      "its own reconstructions.")

    def _train_diffusion(self, job: DiffusionJob) -> tuple[FinetuneSummary, Path]:
        """(summary, model folder) of the job's diffusion phase: the shared model's folder is replaced in
        place, a visitor's model is written to a new session folder."""
        config = FinetuneConfig(steps=job.steps, batch_size=min(FinetuneConfig.batch_size, len(job.images)))
        train = partial(finetune, job.source, job.images, job.class_name, config=config, progress=job.report)
        if job.shared:
            return train(), job.source
        if job.session is None:  # the visitor has left
            raise JobCancelled(job.class_name)
        target = self._session_folders.new(job.session)  # held weakly there too: leaving cancels the job
        try:
            return train(output_dir=target), target
        except BaseException:
            discard_model_folder(target)
            raise

    def _use_diffusion_model(self, job: DiffusionJob, target: Path) -> bool:
        """Switch to the job's new model atomically; False (the folder discarded) when it is no longer wanted."""
        with self._lock:
            wanted, owner = job.wanted, job.session
            if wanted and job.shared:
                self._install(target)
            elif wanted:
                owner.use_model(target)
        if not wanted:
            discard_model_folder(target)
        return wanted
