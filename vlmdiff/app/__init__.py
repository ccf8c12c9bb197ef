"""The Gradio app's pieces: `DetectorService` (model, limits, work) and one builder per tab.
`app.py` at the repository root assembles them."""
from vlmdiff.app.about_tab import build_about_tab
from vlmdiff.app.common import confirm_reset, refresh_views, reset_model
from vlmdiff.app.detect_tab import build_detect_tab
from vlmdiff.app.finetune_tab import build_finetune_tab
from vlmdiff.app.errors import ServiceError
from vlmdiff.app.service import DetectorService
from vlmdiff.app.thresholds_tab import build_thresholds_tab

__all__ = [
    "DetectorService", "ServiceError", "build_about_tab", "build_detect_tab", "build_finetune_tab",
    "build_thresholds_tab", "confirm_reset", "refresh_views", "reset_model",
]
