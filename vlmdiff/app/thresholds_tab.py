"""Thresholds tab: per class, score calibration images, see the normal and anomalous score
histograms with the threshold, move it or take the F1-optimal / normal-quantile suggestion,
and Save (thresholds.json in the user model folder; the Detect tab uses it at once)."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from vlmdiff.app.common import class_choices, message_html, user_message, warn
from vlmdiff.app.calibration import Calibration, suggest_threshold
from vlmdiff.app.errors import ServiceError
from vlmdiff.app.service import DetectorService
from vlmdiff.thresholds import DEFAULT_QUANTILE
from vlmdiff.visualize import plot_score_histogram

STORED, FOLDER = "Normal images stored with the model", "A labelled folder (MVTec AD layout) on this server"


def histogram(calibration: Calibration, threshold: float | None) -> Image.Image:
    """The score histograms (normal blue, anomalous red) with the threshold line, as a picture."""
    with tempfile.TemporaryDirectory() as scratch:
        path = plot_score_histogram(Path(scratch) / "scores.png", calibration.scores, calibration.labels, threshold,
                                    title=f"{calibration.class_name}: image scores")
        with Image.open(path) as picture:
            return picture.convert("RGB")


def summary(service: DetectorService, calibration: Calibration, threshold: float | None) -> str:
    """Counts, the saved threshold, and what the chosen one does on these images."""
    saved = service.threshold(calibration.class_name)
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


def score_calibration(service: DetectorService, class_name, source, folder, progress=gr.Progress()):
    """(plot, threshold slider, info, calibration state, method state)."""
    try:
        calibration = service.calibrate(class_name, folder if source == FOLDER else None,
                                        progress=lambda fraction, text: progress(fraction, desc=text))
        saved = service.threshold(class_name)
        value = saved.value if saved else suggest_threshold(calibration, "quantile", DEFAULT_QUANTILE)
        lo, hi, step = slider_range(calibration, value)
    except Exception as error:  # noqa: BLE001 - every error becomes a message
        message = user_message(error)
        warn(message)
        return None, gr.update(), message_html(message), None, "manual"
    slider = gr.update(minimum=lo, maximum=hi, step=step, value=value, interactive=True)
    return histogram(calibration, value), slider, summary(service, calibration, value), calibration, "manual"


def move_threshold(service: DetectorService, calibration: Calibration | None, value):
    """(plot, info, method state) for a threshold set by hand."""
    if calibration is None:
        return gr.update(), "Score calibration images first.", "manual"
    return histogram(calibration, float(value)), summary(service, calibration, float(value)), "manual"


def suggest(service: DetectorService, method: str, calibration: Calibration | None, quantile=DEFAULT_QUANTILE):
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
    return slider, histogram(calibration, value), summary(service, calibration, value), method


def save(service: DetectorService, class_name, value, method, calibration: Calibration | None,
         quantile=DEFAULT_QUANTILE):
    """A status message: where the threshold was written, or why not."""
    try:
        if calibration is None or value is None:
            raise ServiceError("Score calibration images first, then set the threshold and save.")
        if calibration.class_name != class_name:
            raise ServiceError(f"The scores shown are for {calibration.class_name!r}: score images of {class_name!r} "
                               "first, or switch back.")
        path = service.save_threshold(class_name, value, method, calibration, float(quantile))
        item = service.threshold(class_name)
    except Exception as error:  # noqa: BLE001
        message = user_message(error)
        warn(message)
        return message_html(message)
    return message_html(f"Saved threshold {item.value:.4g} ({item.method}) for {class_name} to {path}. "
                        "The Detect tab uses it now.", "success")


@dataclass
class ThresholdsTab:
    class_select: gr.Dropdown
    saved: object  # the Save event; chain `.then(...)` to refresh other views


def build_thresholds_tab(service: DetectorService) -> ThresholdsTab:
    classes = class_choices(service, with_auto=False)
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            class_select = gr.Dropdown(classes, value=classes[0] if classes else None, label="Class",
                                       elem_id="threshold-class")
            source = gr.Radio([STORED, FOLDER], value=STORED, label="Calibration images")
            folder = gr.Textbox(label="Calibration folder", placeholder="/data/mvtec/bottle (test/good, test/<defect>)",
                                info="normal and defective images of the class; up to 48 of each are scored")
            score_button = gr.Button("Score calibration images", variant="primary", elem_id="score-button")
            threshold = gr.Slider(0, 1, value=0, label="Threshold", interactive=False, elem_id="threshold",
                                  info="score at or above = anomalous")
            quantile = gr.Number(DEFAULT_QUANTILE, label="Quantile of normal scores", minimum=0.5, maximum=0.9999)
            with gr.Row():
                f1_button = gr.Button("Suggest: F1-optimal", elem_id="suggest-f1")
                quantile_button = gr.Button("Suggest: normal quantile", elem_id="suggest-quantile")
            save_button = gr.Button("Save threshold", variant="primary", elem_id="save-threshold")
            status = gr.HTML(label="Save status", elem_id="threshold-status")
        with gr.Column(scale=2):
            plot = gr.Image(label="Score distributions", format="png", interactive=False, elem_id="histogram")
            info = gr.Markdown(label="Calibration summary")
    calibration, method = gr.State(None), gr.State("manual")
    score_button.click(partial(score_calibration, service), [class_select, source, folder],
                       [plot, threshold, info, calibration, method], api_name="score_calibration")
    threshold.release(partial(move_threshold, service), [calibration, threshold], [plot, info, method],
                      api_visibility="private")
    f1_button.click(partial(suggest, service, "f1"), [calibration], [threshold, plot, info, method],
                    api_visibility="private")
    quantile_button.click(partial(suggest, service, "quantile"), [calibration, quantile],
                          [threshold, plot, info, method], api_visibility="private")
    saved = save_button.click(partial(save, service), [class_select, threshold, method, calibration, quantile],
                              [status], api_name="save_threshold")
    return ThresholdsTab(class_select, saved)
