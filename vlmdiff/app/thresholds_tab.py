"""Thresholds tab: per class, score calibration images, see the normal and anomalous score
histograms with the threshold, move it or take the F1-optimal / normal-quantile suggestion,
and Save (thresholds.json in the user model folder, or the visitor's session on a gated app;
the Detect tab uses it at once).

Calibration images are uploaded (files, or a zip with normal/ and defective/ folders); without
uploads the normal images stored with the model are scored. A folder on the server can be named
only when the app runs with `--data-root`, and only inside it.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from vlmdiff.app.calibration import Calibration, suggest_threshold
from vlmdiff.app.common import class_choices, client_address, message_html, uploads, user_message, warn
from vlmdiff.app.errors import ServiceError
from vlmdiff.app.limits import MAX_CALIBRATION_IMAGES, SESSION_TTL_S
from vlmdiff.app.service import DetectorService
from vlmdiff.app.session import Session
from vlmdiff.thresholds import DEFAULT_QUANTILE
from vlmdiff.visualize import plot_score_histogram


def histogram(calibration: Calibration, threshold: float | None) -> Image.Image:
    """The score histograms (normal blue, anomalous red) with the threshold line, as a picture."""
    with tempfile.TemporaryDirectory() as scratch:
        path = plot_score_histogram(Path(scratch) / "scores.png", calibration.scores, calibration.labels, threshold,
                                    title=f"{calibration.class_name}: image scores")
        with Image.open(path) as picture:
            return picture.convert("RGB")


def summary(service: DetectorService, calibration: Calibration, threshold: float | None,
            session: Session | None = None) -> str:
    """Counts, the saved threshold, and what the chosen one does on these images."""
    saved = service.thresholds.get(calibration.class_name, session)
    lines = [f"**{calibration.class_name}**: {len(calibration.normal)} normal and {len(calibration.anomalous)} "
             f"anomalous images ({calibration.source}).",
             f"Saved threshold: {saved.value:.4g} ({saved.method})." if saved else "No saved threshold yet."]
    if threshold is not None:
        flagged_normal = int((calibration.normal >= threshold).sum())
        text = f"At {threshold:.4g}: {flagged_normal} of {len(calibration.normal)} normal images flagged"
        if len(calibration.anomalous):
            found = int((calibration.anomalous >= threshold).sum())
            text += f", {found} of {len(calibration.anomalous)} anomalous found"
        lines.append(text + ".")
    return "\n\n".join(lines)


def slider_range(calibration: Calibration, threshold: float | None) -> tuple[float, float, float]:
    values = np.append(calibration.scores, [] if threshold is None else [threshold])
    lo, hi = float(values.min()), float(values.max())
    pad = max((hi - lo) * 0.1, abs(hi) * 0.01, 1e-6)
    return float(f"{lo - pad:.4g}"), float(f"{hi + pad:.4g}"), float(f"{(hi - lo + 2 * pad) / 500:.2g}")


def score_calibration(service: DetectorService, class_name, normal_files=None, defective_files=None, folder="",
                      session: Session | None = None, progress=gr.Progress()):
    """(plot, threshold slider, info, calibration state, method state)."""
    try:
        calibration = service.thresholds.calibrate(class_name, uploads(normal_files), uploads(defective_files), folder,
                                        progress=lambda fraction, text: progress(fraction, desc=text), session=session)
        saved = service.thresholds.get(calibration.class_name, session)
        value = saved.value if saved else suggest_threshold(calibration, "quantile", DEFAULT_QUANTILE)
        lo, hi, step = slider_range(calibration, value)
    except Exception as error:  # noqa: BLE001 - every error becomes a message
        message = user_message(error)
        warn(message)
        return None, gr.update(), message_html(message), None, "manual"
    slider = gr.update(minimum=lo, maximum=hi, step=step, value=value, interactive=True)
    return histogram(calibration, value), slider, summary(service, calibration, value, session), calibration, "manual"


def move_threshold(service: DetectorService, calibration: Calibration | None, value, session: Session | None = None):
    """(plot, info, method state) for a threshold set by hand."""
    if calibration is None:
        return gr.update(), "Score calibration images first.", "manual"
    return histogram(calibration, float(value)), summary(service, calibration, float(value), session), "manual"


def suggest(service: DetectorService, method: str, calibration: Calibration | None, quantile=DEFAULT_QUANTILE,
            session: Session | None = None):
    """(slider, plot, info, method state) for the F1-optimal or normal-quantile suggestion."""
    try:
        if calibration is None:
            raise ServiceError("Score calibration images first.")
        if not 0 < float(quantile) < 1:
            raise ServiceError(f"The quantile must be between 0 and 1 (e.g. 0.99); got {quantile}.")
        value = suggest_threshold(calibration, method, float(quantile))
    except Exception as error:  # noqa: BLE001
        message = user_message(error)
        warn(message)
        return gr.update(), gr.update(), message_html(message), "manual"
    lo, hi, step = slider_range(calibration, value)
    slider = gr.update(minimum=lo, maximum=hi, step=step, value=value)
    return slider, histogram(calibration, value), summary(service, calibration, value, session), method


def save(service: DetectorService, class_name, value, method, calibration: Calibration | None,
         quantile=DEFAULT_QUANTILE, password: str | None = None, session: Session | None = None,
         client: str = "local"):
    """(status message, calibration summary with the saved threshold, session)."""
    try:
        if calibration is None or value is None:
            raise ServiceError("Score calibration images first, then set the threshold and save.")
        if calibration.class_name.casefold() != (class_name or "").strip().casefold():
            raise ServiceError(f"The scores shown are for {calibration.class_name!r}: score images of {class_name!r} "
                               "first, or switch back.")
        where = service.thresholds.save(calibration.class_name, value, method, calibration, float(quantile), session,
                                       password, client)
        item = service.thresholds.get(calibration.class_name, session)
    except Exception as error:  # noqa: BLE001
        message = user_message(error)
        warn(message)
        return message_html(message), gr.update(), session
    status = message_html(f"Saved threshold {item.value:.4g} ({item.method}) for {calibration.class_name} to {where}. "
                          "The Detect tab uses it now.", "success")
    return status, summary(service, calibration, item.value, session), session


@dataclass
class ThresholdsTab:
    class_select: gr.Dropdown
    saved: object  # the Save event; chain `.then(...)` to refresh other views


def build_thresholds_tab(service: DetectorService, session: gr.State) -> ThresholdsTab:
    classes = class_choices(service, with_auto=False)
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            class_select = gr.Dropdown(classes, value=classes[0] if classes else None, label="Class",
                                       elem_id="threshold-class")
            normal_files = gr.File(label="Normal images, or a .zip with normal/ and defective/ folders",
                                   file_count="multiple", file_types=["image", ".zip"], elem_id="calibration-normal")
            defective_files = gr.File(label="Defective images", file_count="multiple", file_types=["image"],
                                      elem_id="calibration-defective")
            folder = gr.Textbox(label="Or a labelled folder in the app's data folder", placeholder="bottle",
                                info="MVTec AD layout (test/good, test/<defect>), relative to --data-root",
                                visible=service.data_root is not None, elem_id="calibration-folder")
            gr.Markdown(f"Up to {MAX_CALIBRATION_IMAGES} normal and {MAX_CALIBRATION_IMAGES} defective images are "
                        "scored. With no images, the normal images stored with the model are used.")
            score_button = gr.Button("Score calibration images", variant="primary", elem_id="score-button")
            threshold = gr.Slider(0, 1, value=0, label="Threshold", interactive=False, elem_id="threshold",
                                  info="score at or above = anomalous")
            quantile = gr.Number(DEFAULT_QUANTILE, label="Quantile of normal scores", minimum=0.5, maximum=0.9999)
            with gr.Row():
                f1_button = gr.Button("Suggest: F1-optimal", elem_id="suggest-f1")
                quantile_button = gr.Button("Suggest: normal quantile", elem_id="suggest-quantile")
            password = gr.Textbox(label="Admin password (saves for everyone; empty: for your session only)",
                                  type="password", visible=bool(service.access.admin_password),
                                  elem_id="threshold-password")
            save_button = gr.Button("Save threshold", variant="primary", elem_id="save-threshold")
            status = gr.HTML(label="Save status", elem_id="threshold-status")
        with gr.Column(scale=2):
            plot = gr.Image(label="Score distributions", format="png", interactive=False, elem_id="histogram")
            info = gr.Markdown(label="Calibration summary", elem_id="calibration-summary")
    calibration = gr.State(None, time_to_live=SESSION_TTL_S)
    method = gr.State("manual", time_to_live=SESSION_TTL_S)
    # preprocess=False: the service checks the class (one a fine-tune just added is not yet among the
    # dropdown's choices for an API client) and reads the uploads itself
    score_button.click(partial(score_calibration, service),
                       [class_select, normal_files, defective_files, folder, session],
                       [plot, threshold, info, calibration, method], api_name="score_calibration", preprocess=False)
    threshold.release(partial(move_threshold, service), [calibration, threshold, session], [plot, info, method],
                      api_visibility="private")
    for button, name in ((f1_button, "f1"), (quantile_button, "quantile")):
        button.click(partial(suggest, service, name), [calibration, quantile, session], [threshold, plot, info, method],
                     api_visibility="private")

    def save_for_client(class_name, value, method, calibration, quantile, password, session, request: gr.Request):
        return save(service, class_name, value, method, calibration, quantile, password, session,
                    client_address(request))

    saved = save_button.click(save_for_client,
                              [class_select, threshold, method, calibration, quantile, password, session],
                              [status, info, session], api_name="save_threshold", preprocess=False)
    return ThresholdsTab(class_select, saved)
