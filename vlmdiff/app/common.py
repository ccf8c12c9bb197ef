"""Helpers shared by the tab handlers: turning errors into messages, reading Gradio file payloads,
and the views that change when the model does (class selectors, status, model card)."""
from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder

from vlmdiff.app.errors import ServiceError, shorten
from vlmdiff.app.service import DetectorService
from vlmdiff.app.session import Session
from vlmdiff.app.uploads import Upload
from vlmdiff.images import ImageInputError
from vlmdiff.pipeline import AUTO_CLASS

log = logging.getLogger(__name__)

NOT_RECEIVED = "A file in this request was not uploaded through the app; upload it again."


def user_message(error: Exception) -> str:
    """A message for the UI: the text of an expected error, a plain line (no traceback) for others."""
    if isinstance(error, (ServiceError, ImageInputError)):
        return str(error)
    log.error("unexpected error in a handler", exc_info=error)  # the traceback goes to the server log only
    return f"Something went wrong: {error or 'no details'}. The app is still running; try again."


def warn(message: str) -> None:
    """Show a toast in the browser (a plain warning when called outside a request, e.g. in tests)."""
    gr.Warning(message)


def file_path(value: Any) -> str | None:
    """The server-side path of a Gradio file payload (dict or FileData), a path string, or None."""
    if value is None or value == "":
        return None
    if isinstance(value, dict):
        return value.get("path")
    if isinstance(value, (str, Path)):
        return str(value)
    return getattr(value, "path", None)


def file_name(value: Any) -> str:
    """The name the user uploaded a file under (falls back to the stored file's name), cut to a readable length."""
    name = None
    if isinstance(value, dict):
        name = value.get("orig_name")
    elif getattr(value, "orig_name", None):
        name = value.orig_name
    if not isinstance(name, str) or not name:
        path = file_path(value)
        name = Path(path).name if isinstance(path, str) and path else "file"
    return shorten(name)


def received_path(path: Any) -> Path:
    """`path` resolved, if it is a file Gradio received as an upload (inside its upload folder).

    Handlers run with preprocess=False, so a request may name any path; nothing outside the upload
    folder is read, and every such path gets the same reply (whether it exists or not is not told)."""
    if isinstance(path, (str, Path)) and str(path):
        try:
            resolved = Path(path).resolve()
        except (OSError, ValueError):  # a NUL byte, a loop of links
            raise ServiceError(NOT_RECEIVED) from None
        if resolved.is_relative_to(Path(get_upload_folder()).resolve()):
            return resolved
    raise ServiceError(NOT_RECEIVED)


def upload(value: Any) -> Upload | None:
    """One Gradio file payload as an Upload (None when empty); ServiceError for a file it did not upload."""
    path = file_path(value)
    return Upload(received_path(path), file_name(value)) if path else None


def uploads(values: Any) -> list[Upload]:
    """A Gradio multiple-file payload (a list, one file or None) as Uploads."""
    values = values if isinstance(values, list) else [values]
    return [item for item in map(upload, values) if item is not None]


def client_address(request: gr.Request | None) -> str:
    """Who sent a request, for per-client limits: the peer's address (behind a proxy, the proxy's: the
    limit then holds for all clients together)."""
    client = getattr(request, "client", None)
    return getattr(client, "host", None) or "local"


def message_html(text: str, kind: str = "error") -> str:
    """A coloured message box (error, info or success) for an HTML or Markdown component."""
    colours = {"error": ("#b71c1c", "#fdecea"), "info": ("#0d47a1", "#e3f2fd"), "success": ("#1b5e20", "#e8f5e9")}
    fg, bg = colours[kind]
    return (f'<div class="vlmdiff-{kind}" style="border-left:6px solid {fg};background:{bg};color:{fg};'
            f'padding:10px 14px;border-radius:6px">{html.escape(text, quote=False)}</div>')


def class_choices(service: DetectorService, with_auto: bool, session: Session | None = None) -> list[str]:
    return ([AUTO_CLASS] if with_auto else []) + service.classes(session)


def refresh_views(service: DetectorService, session: Session | None = None):
    """(status, reset button, detect class selector, thresholds class selector, model card) as this
    visitor sees the model now: after a fine-tune, a save or a reset, and for each new page."""
    return (
        service.status_markdown(session),
        gr.update(visible=service.can_reset(session)),
        gr.update(choices=class_choices(service, with_auto=True, session=session)),
        gr.update(choices=class_choices(service, with_auto=False, session=session)),
        service.model_card(session),
    )


def confirm_reset(service: DetectorService, session: Session | None = None):
    """(the confirmation row shown, what a reset would drop)."""
    return gr.update(visible=True), service.changes_summary(session)


def reset_model(service: DetectorService, session: Session | None = None):
    """Drop the changes (the visitor's own on a gated app), then the refreshed views; an error becomes a toast."""
    try:
        service.reset_model(session)
    except Exception as error:  # noqa: BLE001 - every error becomes a message
        warn(user_message(error))
    return refresh_views(service, session)
