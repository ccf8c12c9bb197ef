"""The Fine-tune tab's work: a fine-tune request's quick phase in the request, its diffusion phase queued on
the background worker (`finetune_jobs`), and the switch to each new model.

Changes go to the user model folder, or on a gated app without the admin password to the visitor's
session; a failed phase leaves the model in use as it was.
"""
from __future__ import annotations

import logging
import threading
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from vlmdiff.allocator import release_freed_memory
from vlmdiff.app.class_names import new_class_name, same_name_note
from vlmdiff.app.errors import ServiceError, shorten
from vlmdiff.app.finetune_jobs import (
    DONE, DROPPED, FAILED, QUEUE_FULL, DiffusionJob, DiffusionWorker, JobCancelled,
)
from vlmdiff.app.limits import FinetuneLimits
from vlmdiff.app.session import Session, discard_model_folder
from vlmdiff.app.uploads import Upload, check_pixels
from vlmdiff.captioning.base import error_reason
from vlmdiff.model_folder import THRESHOLDS_FILE
from vlmdiff.progress import Progress
from vlmdiff.thresholds import Thresholds
from vlmdiff.training.finetune import MIN_IMAGES, FinetuneConfig, FinetuneSummary, finetune

if TYPE_CHECKING:
    from vlmdiff.app.service import DetectorService

log = logging.getLogger(__name__)

DROPPED_MESSAGE = "Its model was not used: the changes it was made for were dropped meanwhile."


class FineTuning:
    """Fine-tunes of the host's model: one quick phase at a time, diffusion phases one at a time on a worker."""

    def __init__(self, host: DetectorService) -> None:
        self.host = host
        self.lock = threading.Lock()  # one quick phase at a time
        self.worker = DiffusionWorker(self._run_diffusion)  # diffusion phases, one at a time
        self.shared_job: DiffusionJob | None = None  # the diffusion phase of the shared model's last fine-tune

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

    def job(self, session: Session | None = None) -> DiffusionJob | None:
        """The diffusion phase this visitor follows: their own last one on a gated app, else the shared model's."""
        if self.host.access.gated:
            return session.finetune_job if session is not None else None
        return self.shared_job

    def unfinished_job(self, own: Session | None) -> DiffusionJob | None:
        """The queued or running diffusion phase that will replace the model `own` changes (None: the shared one)."""
        job = self.shared_job if own is None else own.finetune_job
        mine = job is not None and (job.shared if own is None else job.session is own)
        return job if mine and not job.finished else None

    def start(self, files: list[Upload], class_name: str, steps: int = FinetuneConfig.steps,
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
        steps = self._check_finetune(files, steps, self.host.access.finetune_limits(for_everyone=True))
        view = self.host.target_view(session, password)
        class_name = self._finetune_class(class_name, update_existing, view.classes)  # before the password
        own = self.host.changes_go_to(session, password, client)
        if own is not None:
            self._check_finetune(files, steps, self.host.access.finetune_limits())
        if steps and self.worker.full:
            raise ServiceError(QUEUE_FULL)
        if not self.lock.acquire(blocking=False):
            raise ServiceError("Another fine-tune is running; try again when it has finished.")
        try:
            running = self.unfinished_job(own)
            if running is not None:
                raise ServiceError(
                    f"The diffusion fine-tune of class {running.class_name!r} is still {running.progress()}. Start "
                    "the next fine-tune of this model when it has finished (the progress is in the Fine-tune tab).")
            images = [self.host.decode(upload) for upload in files]
            summary = self._quick_phase(view.folder, own, images, class_name, progress)
            job = None
            if steps:
                job = DiffusionJob(class_name, steps, images, own.model_dir if own is not None else self.host.model_dir, own)
                self._queue_diffusion(job, session)
            return summary, job
        finally:
            self.lock.release()
            release_freed_memory()  # the quick phase's features and coreset

    def _quick_phase(self, source: Path, own: Session | None, images: list[Image.Image], class_name: str,
                     progress: Progress | None) -> FinetuneSummary:
        """Memory + threshold of the class into a new model (the user folder, or a session folder), used at once."""
        with self.host.lock:
            target = self.host.session_folders.new(own) if own is not None else self.host.store.user_dir
            if own is None:
                self.host.pending_edits = {}
        try:
            summary = finetune(source, images, class_name, output_dir=None if target == source else target,
                               config=FinetuneConfig(steps=0), progress=progress)
        except Exception as error:  # noqa: BLE001 - the old model stays; the user gets the reason
            log.exception("fine-tuning failed")
            if own is not None:
                discard_model_folder(target)
            else:
                self.host.pending_edits = None
            raise ServiceError(f"Fine-tuning failed; the current model is unchanged. Reason: {error}") from error
        with self.host.lock:
            if own is not None:
                own.use_model(target)
                own.thresholds.pop(class_name, None)  # the new model's threshold for it replaces the visitor's
            else:
                self._install(target, fine_tuned=class_name)
                self.host.pending_edits = None
        return summary

    def _install(self, target: Path, fine_tuned: str | None = None) -> None:
        """Load a newly written shared model, keeping the thresholds saved while it was made (but for the
        class `fine_tuned`, whose new threshold replaces them). Call with the lock held."""
        self.host.load(target)
        edits = {name: item for name, item in (self.host.pending_edits or {}).items() if name != fine_tuned}
        if edits:
            self.host.pipeline.thresholds = Thresholds({**self.host.pipeline.thresholds.per_class(), **edits})
            self.host.pipeline.thresholds.save(target / THRESHOLDS_FILE)

    def _queue_diffusion(self, job: DiffusionJob, session: Session | None) -> None:
        """Queue the diffusion phase; the visitor who asked follows it (on a gated app, through their session)."""
        with self.host.lock:
            if job.shared:
                self.shared_job, self.host.pending_edits = job, {}  # saves from now on outlive its model swap
            if self.host.access.gated and session is not None:
                session.finetune_job = job
        self.worker.submit(job)

    def _run_diffusion(self, job: DiffusionJob) -> None:
        """The worker's part: the diffusion phase of one fine-tune, whose model then replaces the quick phase's
        (when that is still in use: a visitor may have dropped their changes meanwhile)."""
        state, message = self._diffusion_outcome(job)
        with self.host.lock:
            if job.shared:
                self.host.pending_edits = None
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
        score = (f"its score is now memory + {summary.reconstruction_weight:g} x reconstruction, so the strength "
                 "changes it" if summary.reconstruction_weight else "its score stays the memory's (on synthetic "
                 "anomalies of its images the reconstruction added nothing)")
        return DONE, (f"{summary.steps} steps in {summary.seconds:.0f} s{loss}. Class {job.class_name!r} now has "
                      f"its own reconstructions; {score}.")

    def _train_diffusion(self, job: DiffusionJob) -> tuple[FinetuneSummary, Path]:
        """(summary, model folder) of the job's diffusion phase: the shared model's folder is replaced in
        place, a visitor's model is written to a new session folder."""
        config = FinetuneConfig(steps=job.steps, batch_size=min(FinetuneConfig.batch_size, len(job.images)))
        train = partial(finetune, job.source, job.images, job.class_name, config=config, progress=job.report)
        if job.shared:
            return train(), job.source
        if job.session is None:  # the visitor has left
            raise JobCancelled(job.class_name)
        target = self.host.session_folders.new(job.session)  # held weakly there too: leaving cancels the job
        try:
            return train(output_dir=target), target
        except BaseException:
            discard_model_folder(target)
            raise

    def _use_diffusion_model(self, job: DiffusionJob, target: Path) -> bool:
        """Switch to the job's new model atomically; False (the folder discarded) when it is no longer wanted."""
        with self.host.lock:
            wanted, owner = job.wanted, job.session
            if wanted and job.shared:
                self._install(target)
            elif wanted:
                owner.use_model(target)
        if not wanted:
            discard_model_folder(target)
        return wanted
