"""The app's limits on what one request may ask for, in one place; `DetectorService` enforces them."""
from __future__ import annotations

from dataclasses import dataclass

from vlmdiff.images import WORK_SIDE  # noqa: F401  every image is decoded to at most this long side (shown at it)
MAX_STEPS = 50  # DDIM steps a detection may ask for
MAX_SEED = 2**31 - 1
MAX_UPLOAD_MB = 64  # one uploaded file
MAX_CALIBRATION_IMAGES = 48  # scored per label (normal / defective) and class
MAX_CALIBRATION_MEGAPIXELS = 400  # the calibration images of one request together, counted from their headers
MAX_ZIP_MB = 256  # images unpacked from one calibration zip
MAX_ZIP_MEMBERS = 5000  # entries in one calibration zip
MAX_DIFFUSION_JOBS = 3  # diffusion fine-tunes queued or running at once (each holds its images until it runs)
DECODE_MEGAPIXELS = 50  # images decoded at full size at once, all requests together (one accepted image fits)
SESSION_CAPACITY = 2000  # visitors' sessions Gradio keeps in memory (~0.15 MB each); the oldest go first
RECENT_DETECTIONS = 16  # detections kept for re-blending the overlay, all visitors together
SESSION_TTL_S = 3 * 3600  # a visitor's session state (their detection, scores and own changes)
TEMP_FILES = (600, 3600)  # Gradio's delete_cache: every 10 minutes, delete temporary files older than 1 hour


@dataclass(frozen=True)
class FinetuneLimits:
    """What one fine-tune request may ask for."""

    images: int
    steps: int
    megapixels: int  # all uploaded images together, counted from their headers


FINETUNE_LIMITS = FinetuneLimits(images=100, steps=2000, megapixels=400)
PUBLIC_FINETUNE_LIMITS = FinetuneLimits(images=24, steps=200, megapixels=100)  # per request on a public app
