"""The captioner whose description the app shows: a chosen VLM by hub id or local folder (the app's
`--captioner`, env `VLMDIFF_CAPTIONER`), or, when that cannot be loaded, the model's own captioner
with a note in plain words saying why."""
from __future__ import annotations

import logging
from typing import Any

from vlmdiff.captioning.base import DEFAULT_CAPTIONER, Captioner, create_captioner, error_reason

CAPTIONER_ENV = "VLMDIFF_CAPTIONER"

log = logging.getLogger(__name__)


def load_display_captioner(captioner_id: str | None, fallback_id: str = DEFAULT_CAPTIONER, prompt: str = "pd",
                           **options: Any) -> tuple[Captioner, str | None]:
    """`(captioner, note)`: `captioner_id` when given and it loads (note None), else the model's own
    captioner `fallback_id` with a note saying which VLM could not be loaded and why.

    `prompt` and `options` (device, dtype, max_new_tokens, trust_remote_code) go to `create_captioner`.
    Errors loading `fallback_id` itself are raised.
    """
    note = None
    if captioner_id and captioner_id != fallback_id:
        try:
            return create_captioner(captioner_id, prompt, **options), None
        except Exception as error:  # noqa: BLE001 - offline, unknown id, not a VLM, out of memory, ...
            log.warning("captioner %s unavailable, using %s: %s", captioner_id, fallback_id, error)
            reason = error_reason(error.__cause__ or error)  # the loader's own words, without its wrapping
            note = (f"The VLM {captioner_id!r} could not be loaded ({reason}); "
                    f"this caption is from the model's own captioner, {fallback_id!r}.")
    return create_captioner(fallback_id, prompt, **options), note
