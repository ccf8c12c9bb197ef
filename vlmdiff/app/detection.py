"""The Detect tab's work: the settings of one detection checked, the caption, the reconstruction and the verdict."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from PIL import Image

from vlmdiff.allocator import release_freed_memory
from vlmdiff.app.class_names import require_known
from vlmdiff.app.errors import ServiceError
from vlmdiff.app.limits import MAX_SEED, MAX_STEPS
from vlmdiff.app.session import Session
from vlmdiff.app.uploads import Upload
from vlmdiff.captioning import Captioner, load_display_captioner
from vlmdiff.captioning.base import error_reason
from vlmdiff.pipeline import AUTO_CLASS, DetectionResult, DetectionSettings, VLMDiffPipeline, judge
from vlmdiff.scoring import AnomalyScorer

if TYPE_CHECKING:
    from vlmdiff.app.service import DetectorService

log = logging.getLogger(__name__)


@dataclass
class Detection:
    """One detection, ready to show, and the settings used."""

    caption: str
    captioner: str  # what wrote the caption, in words (a VLM only when one is loaded)
    image: Image.Image  # the input at the working size; the result's map and reconstruction have its size
    result: DetectionResult
    strength: float
    steps: int
    seed: int
    scoring: str = ""  # which maps make the score, e.g. "normal-feature memory"
    generic_reconstruction: bool = False  # the diffusion was never fine-tuned on the result's class
    memory_guided: bool = False  # only what the memory flagged was regenerated (never for a class fused whole)


def scoring(scorer: AnomalyScorer, class_name: str) -> str:
    """Which maps make the class's score, in words, and whether the strength changes it."""
    text = scorer.describe(class_name)
    return f"{text} (changes with the strength)" if scorer.uses_reconstruction(class_name) else text


def memory_guidance(pipeline: VLMDiffPipeline, guided: bool | None) -> float:
    """The memory-guidance threshold of a detection: the model's (None), off (False), or on (True: the
    model's, or the library default when the model has none); always off without a memory."""
    if pipeline.memory is None:
        return 0.0
    return DetectionSettings(memory_guidance=guided).resolved(pipeline.config).memory_guidance


def trained_strength(pipeline: VLMDiffPipeline) -> float:
    """The highest denoising strength the model's denoiser was trained for (its noise levels up to
    max_train_timestep of the scheduler's steps): above it the reconstruction is made up."""
    trained = pipeline.config.max_train_timestep / pipeline.scheduler.config.num_train_timesteps
    return round(min(trained, 1.0), 2)


class Detector:
    """Caption + reconstruct + judge one upload for the host's model (as the visitor sees it)."""

    def __init__(self, host: DetectorService, captioner_id: str | None = None) -> None:
        self.host, self.captioner_id = host, captioner_id

    @property
    def can_guide(self) -> bool:
        """Whether the model has a memory to guide its reconstruction with."""
        return self.host.pipeline is not None and self.host.pipeline.memory is not None

    @property
    def memory_guided_default(self) -> bool:
        return self.host.pipeline is not None and memory_guidance(self.host.pipeline, None) > 0

    @property
    def max_strength(self) -> float:
        return trained_strength(self.host.pipeline) if self.host.pipeline else 1.0

    @property
    def default_strength(self) -> float:
        return min(self.host.pipeline.config.strength, self.max_strength) if self.host.pipeline else 1.0

    @property
    def default_steps(self) -> int:
        return min(self.host.pipeline.config.num_inference_steps, MAX_STEPS) if self.host.pipeline else 10

    def check_settings(self, classes: list[str], class_name, strength, steps, seed) -> tuple[str, float, int, int]:
        """(class, strength, steps, seed) of a request, defaults filled in; ServiceError naming what is wrong."""
        if (class_name or AUTO_CLASS).strip().casefold() != AUTO_CLASS:
            class_name = require_known(class_name, classes)
        else:
            class_name = AUTO_CLASS
        try:
            strength = float(self.default_strength if strength is None else strength)
            steps_value = float(self.default_steps if steps is None else steps)
            seed_value = float(0 if seed is None else seed)
        except (TypeError, ValueError) as error:
            raise ServiceError(f"Strength, steps and seed must be numbers ({error}).") from error
        if not 0.0 <= strength <= self.max_strength:
            raise ServiceError(f"Denoising strength must be between 0 and {self.max_strength} (the noise levels this "
                               f"model's denoiser was trained on); got {strength}.")
        if not steps_value.is_integer() or not 1 <= steps_value <= MAX_STEPS:
            raise ServiceError(f"DDIM steps must be a whole number from 1 to {MAX_STEPS}; got {steps}.")
        if not seed_value.is_integer() or not 0 <= seed_value <= MAX_SEED:
            raise ServiceError(f"The seed must be a whole number from 0 to {MAX_SEED}; got {seed}.")
        return class_name, strength, int(steps_value), int(seed_value)

    @cached_property
    def display_captioner(self) -> tuple[Captioner | None, str | None]:
        """(captioner, note), loaded once: `captioner_id` when it loads, else the model's own captioner with a
        note saying why; (None, why) when the model's own cannot be loaded either."""
        own = self.host.require_model().config.captioner
        try:
            return load_display_captioner(self.captioner_id, own)
        except Exception as error:  # noqa: BLE001 - e.g. a hub VLM while offline
            log.warning("captioner %s unavailable: %s", own, error)
            return None, f"no caption: captioner {own!r} could not be loaded ({error_reason(error)})"

    @property
    def captioner_title(self) -> str:
        """The caption box's title, named for what writes the caption."""
        if self.host.pipeline is None:
            return "Caption"
        captioner, _ = self.display_captioner
        return "Caption" if captioner is None else getattr(captioner, "title", f"Caption ({captioner.name})")

    def caption(self, image: Image.Image) -> str:
        """The display captioner's description of the image (with a note in parentheses when it fell back
        to the model's own), or a note saying why there is none."""
        captioner, note = self.display_captioner
        if captioner is None:
            return f"({note})"
        text = captioner.caption([image])[0]
        return f"{text} ({note})" if note else text

    def detect(self, image: Upload | None, class_name: str = AUTO_CLASS, strength: float | None = None,
               steps: int | None = None, seed: int | None = 0, session: Session | None = None,
               memory_guided: bool | None = None) -> Detection:
        """Caption, reconstruct and score one uploaded image at the working size; raises ServiceError.
        `memory_guided`: regenerate only what the memory flags (None: the model's default)."""
        view = self.host.view(session)
        if image is None:
            raise ServiceError("Upload an image (or click an example) first.")
        class_name, strength, steps, seed = self.check_settings(view.classes, class_name, strength, steps, seed)
        picture = self.host.decode(image)  # not an image, too small/large, odd mode: a message naming it
        with self.host.lock:
            caption = self.caption(picture)
            guidance = memory_guidance(view.pipeline, memory_guided)
            result = view.pipeline([picture], strength=strength, num_inference_steps=steps, seed=seed,
                                   class_names=class_name, memory_guidance=guidance)[0]
        release_freed_memory()  # the features and latents of this image, before the next request pins them
        scorer, name = view.pipeline.scorer, result.class_name
        return Detection(caption, self.captioner_title, picture, judge(result, view.thresholds), strength, steps,
                         seed, scoring(scorer, name), view.generic_reconstruction(name),
                         guidance > 0 and name not in scorer.reconstruction_classes)
