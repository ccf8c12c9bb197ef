"""`DetectorService`: the one object the app talks to, the host of the loaded model.

It owns the loaded pipeline and the views visitors get of it, enforces the app's limits itself (not
only in the UI), and serialises pipeline use and model swaps with a lock. The work behind each tab
lives with the tab's concept and is reached through the host: `detector` (caption + detect,
`detection.py`), `thresholds` (calibration scores and saved thresholds, `calibration.py`) and
`finetuning` (the two-phase fine-tune and its worker, `finetuning.py`). Changes go to the user model
folder (`ModelStore`), never to the shipped model; on a gated app (`Access`) a visitor's changes go
to their `Session` instead. Every error meant for a user is a `ServiceError` whose message says what
to do.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from vlmdiff.allocator import limit_heaps, release_freed_memory
from vlmdiff.app import cards
from vlmdiff.app.access import Access
from vlmdiff.app.calibration import ThresholdEditor
from vlmdiff.app.detection import Detector
from vlmdiff.app.errors import ServiceError
from vlmdiff.app.finetune_jobs import finetuned_classes, generic_reconstruction
from vlmdiff.app.finetuning import FineTuning
from vlmdiff.app.limits import DECODE_MEGAPIXELS
from vlmdiff.app.model_store import ModelStore
from vlmdiff.app.session import Session, SessionFolders
from vlmdiff.app.uploads import DecodeBudget
from vlmdiff.model_folder import THRESHOLDS_FILE
from vlmdiff.pipeline import VLMDiffPipeline
from vlmdiff.thresholds import ClassThreshold, Thresholds

log = logging.getLogger(__name__)


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
        self.session_folders = SessionFolders() if self.access.gated else None
        self._session_model: tuple[Path, VLMDiffPipeline] | None = None  # the last visitor model used
        self.lock = threading.RLock()  # pipeline use, threshold edits and model swaps
        limit_heaps()  # Gradio's worker threads would each keep a heap of their own
        self.pending_edits: dict[str, ClassThreshold] | None = None  # threshold saves during a fine-tune
        self.decode = DecodeBudget(DECODE_MEGAPIXELS).load  # every upload is decoded through one budget
        self.detector = Detector(self, captioner)
        self.thresholds = ThresholdEditor(self)
        self.finetuning = FineTuning(self)
        self._start(model, fallback, user_models_dir)

    # ------------------------------------------------------------------ loading
    def _start(self, model, fallback, user_models_dir) -> None:
        candidates = [str(c) for c in (model, fallback) if c]
        errors = []
        for candidate in dict.fromkeys(candidates):  # the fallback only if it is another model
            try:
                store = ModelStore(candidate, user_models_dir)
                self.load(store.active_dir)
            except Exception as error:  # noqa: BLE001 - any failure becomes a message
                log.warning("could not load model %s: %s", candidate, error)
                errors.append(f"could not load model `{candidate}`: {error}")
                continue
            self.store, self.model_id = store, candidate
            if errors:
                self.notice = f"{errors[0]}. Using the default model `{candidate}` instead."
            return
        self.load_error = "; ".join(errors) if errors else "no model was given (use --model or VLMDIFF_MODEL)"

    def load(self, directory: Path) -> None:
        pipeline = VLMDiffPipeline.from_pretrained(directory)
        with self.lock:
            self.pipeline, self.model_dir = pipeline, Path(directory)
        release_freed_memory()  # the replaced model's weights and memory bank

    @property
    def ready(self) -> bool:
        return self.pipeline is not None

    def require_model(self) -> VLMDiffPipeline:
        if self.pipeline is None:
            raise ServiceError(f"No model is loaded ({self.load_error}). Start the app with --model DIR_OR_HUB_ID.")
        return self.pipeline

    def own(self, session: Session | None) -> Session | None:
        """The visitor's session where their changes count (a gated app), else None."""
        return session if self.access.gated else None

    def target_view(self, session: Session | None, password: str | None) -> ModelView:
        """The model a change request is checked against before its password is: the shared one when the
        request carries a password (or the app is not gated), else the visitor's own view."""
        return self.view(None if password or not self.access.gated else session)

    def changes_go_to(self, session: Session | None, password: str | None, client: str) -> Session | None:
        """Where a change goes: None for the shared model (a private app, or the admin password), else the session.
        Call it once the request is otherwise valid, so that its reply tells nothing more about the password."""
        if self.access.for_everyone(password, client):
            return None
        if session is None:
            raise ServiceError("This app keeps each visitor's changes in their session; none came with the request.")
        return session

    def _visitor_pipeline(self, folder: Path) -> VLMDiffPipeline:
        """A visitor's fine-tuned model; the last one used stays loaded, others are read from disk again."""
        with self.lock:
            if self._session_model is None or self._session_model[0] != folder:
                self._session_model = None  # the previous visitor's model goes before the next one loads
                release_freed_memory()
                self._session_model = (folder, VLMDiffPipeline.from_pretrained(folder))
            return self._session_model[1]

    def view(self, session: Session | None = None) -> ModelView:
        """What a request of this visitor sees."""
        pipeline, folder = self.require_model(), self.model_dir
        own = self.own(session)
        if own is None:
            return ModelView(pipeline, folder, pipeline.thresholds)
        own.touch()
        if own.model_dir is not None:
            pipeline, folder = self._visitor_pipeline(own.model_dir), own.model_dir
        thresholds = pipeline.thresholds
        if own.thresholds:
            thresholds = Thresholds({**thresholds.per_class(), **own.thresholds})
        return ModelView(pipeline, folder, thresholds)

    def classes(self, session: Session | None = None) -> list[str]:
        """Every class the model (as this visitor sees it) knows, from its config and its thresholds."""
        return self.view(session).classes if self.pipeline is not None else []

    @property
    def has_user_changes(self) -> bool:
        """Whether the shared model has saved changes (the user model folder is in use)."""
        return self.store is not None and self.store.has_user_changes

    def can_reset(self, session: Session | None = None) -> bool:
        """Whether 'Reset' has something to drop: the visitor's own changes on a gated app, else the shared ones."""
        own = self.own(session)
        return own.has_changes if own is not None else (not self.access.gated and self.has_user_changes)

    def changes_summary(self, session: Session | None = None) -> str:
        """What 'Reset' / 'Drop my changes' would drop, in words."""
        if not self.can_reset(session):
            return "There are no changes to drop."
        own = self.own(session)
        source = self.store.source_dir
        if own is not None:
            thresholds, model = sorted(own.thresholds), own.model_dir
        else:
            shipped = Thresholds.load(source / THRESHOLDS_FILE) if (source / THRESHOLDS_FILE).is_file() else None
            thresholds = sorted(name for name, item in self.pipeline.thresholds.per_class().items()
                                if shipped is None or name not in shipped.classes or shipped.get(name) != item)
            model = self.store.user_dir
        classes = sorted(finetuned_classes(model) - finetuned_classes(source)) if model is not None else []
        return cards.changes_summary(thresholds, classes)

    def _changes_text(self, session: Session | None) -> str:
        if not self.access.gated:
            return cards.shared_changes(self.store.user_dir) if self.has_user_changes else ""
        own = self.own(session)
        return cards.visitor_changes(own is not None and own.has_changes, own.notice if own is not None else None)

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
        self.require_model()
        if self.access.gated:
            if session is not None:
                with self.lock:  # not while a finished diffusion phase switches the session's model
                    session.clear()
            return
        if not self.finetuning.lock.acquire(blocking=False):
            raise ServiceError("A fine-tune is running; reset the model when it has finished.")
        try:
            job = self.finetuning.unfinished_job(None)
            if job is not None:
                raise ServiceError(f"The diffusion fine-tune of class {job.class_name!r} is running; reset the "
                                   "model when it has finished.")
            with self.lock:
                self.store.reset()
                self.load(self.store.active_dir)
        finally:
            self.finetuning.lock.release()
