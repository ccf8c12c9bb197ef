"""Detect tab: upload an image (or click an example), see the caption, the reconstruction, the
heatmap overlay and the verdict. Strength and steps recompute on slider release, memory guidance
when ticked; the overlay
opacity re-blends the last map without running the model. Each user action runs one detection:
the image's `input` event (fired once per upload, replacement or removal, unlike `change`, which
fires twice when an image is replaced) and the example click."""
from __future__ import annotations

import html
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from PIL import Image

from vlmdiff.app.common import class_choices, file_path, message_html, upload, user_message, warn
from vlmdiff.app.limits import MAX_SEED, MAX_STEPS, RECENT_DETECTIONS, SESSION_TTL_S
from vlmdiff.app.detection import Detection
from vlmdiff.app.service import DetectorService
from vlmdiff.app.session import Session
from vlmdiff.pipeline import AUTO_CLASS
from vlmdiff.visualize import overlay_heatmap, threshold_range

DEFAULT_OPACITY = 0.5
EXAMPLE_SUFFIXES = (".png", ".jpg", ".jpeg")


def render_overlay(detection: Detection, opacity: float) -> Image.Image:
    """The heatmap over the input, on the colour scale of `vlmdiff predict` (threshold mid-scale)."""
    opacity = min(max(float(opacity), 0.0), 1.0)
    value_range = threshold_range(detection.result.threshold)
    return overlay_heatmap(detection.image, detection.result.anomaly_map, alpha=opacity, value_range=value_range)


def verdict_html(detection: Detection) -> str:
    """The score, class, threshold and a coloured verdict."""
    result = detection.result
    if result.unknown_class:
        word, fg, bg = "UNKNOWN CLASS", "#37474f", "#eceff1"
        note = "the image is far from every known class: no verdict; pick the class to get one"
    elif result.is_anomalous is None:
        word, fg, bg = "NO THRESHOLD", "#37474f", "#eceff1"
        note = f"class {result.class_name!r} has no threshold yet: pick a class or set one in the Thresholds tab"
    elif result.is_anomalous:
        word, fg, bg, note = "ANOMALOUS", "#b71c1c", "#fdecea", "score at or above the class threshold"
    else:
        word, fg, bg, note = "NORMAL", "#1b5e20", "#e8f5e9", "score below the class threshold"
    threshold = "-" if result.threshold is None else f"{result.threshold:.4g}"
    normalized = "-" if result.normalized_score is None else f"{result.normalized_score:.2f}"
    rows = [("score", f"{result.score:.4g}"), ("class", result.class_name), ("threshold", threshold),
            ("normalised score (0.5 = threshold)", normalized),
            ("settings", f"strength {detection.strength:.2f} · {detection.steps} steps · seed {detection.seed}"
                         + (" · memory-guided" if detection.memory_guided else "")),
            ("score from", detection.scoring or "-")]
    if result.class_match is not None:  # the class was guessed ('auto')
        rows.insert(2, ("class match", result.class_match.describe()))
    if detection.generic_reconstruction:
        rows.append(("reconstruction", f"the model's generic one: the diffusion is not fine-tuned on "
                                       f"{result.class_name!r} (yet)"))
    table = "".join(f"<tr><td>{html.escape(k, quote=False)}</td><td><b>{html.escape(v, quote=False)}</b></td></tr>"
                    for k, v in rows)
    return (f'<div class="vlmdiff-verdict" style="border-left:8px solid {fg};background:{bg};color:{fg};'
            f'padding:12px 16px;border-radius:6px"><div style="font-size:1.6em;font-weight:700" '
            f'data-verdict="{word.lower()}">{word}</div>'
            f'<div style="margin-bottom:6px">{html.escape(note, quote=False)}</div>'
            f'<table style="color:{fg}">{table}</table></div>')


def detect(service: DetectorService, image, class_name=AUTO_CLASS, strength=None, steps=None, seed=0,
           opacity=DEFAULT_OPACITY, session: Session | None = None, memory_guided=None):
    """(caption, reconstruction, overlay, verdict HTML, score, state); errors become a message.
    `memory_guided` None: the model's default."""
    if file_path(image) is None:  # the image was cleared: empty outputs, no warning
        return "", None, None, message_html("Upload an image or click an example.", "info"), None, None
    try:
        detection = service.detector.detect(upload(image), class_name, strength, steps, seed, session, memory_guided)
        overlay = render_overlay(detection, opacity)
    except Exception as error:  # noqa: BLE001 - every error becomes a message
        message = user_message(error)
        warn(message)
        return "", None, None, message_html(message), None, None
    score = round(detection.result.score, 6)
    return detection.caption, detection.result.reconstruction, overlay, verdict_html(detection), score, detection


def reblend(detection: Detection | None, opacity):
    """The overlay of the last detection at another opacity (no model run)."""
    if detection is None:
        return gr.update()
    return render_overlay(detection, opacity)


class RecentDetections:
    """The last detections of all visitors together, for re-blending their overlays: a visitor's state
    holds only a key, so a flood of sessions cannot pile up pictures (the oldest are forgotten first)."""

    def __init__(self, capacity: int = RECENT_DETECTIONS) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Detection] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, detection: Detection | None) -> str | None:
        if detection is None:
            return None
        key = secrets.token_hex(16)
        with self._lock:
            self._items[key] = detection
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return key

    def get(self, key: str | None) -> Detection | None:
        with self._lock:
            return self._items.get(key) if isinstance(key, str) else None


def example_files(examples_dir: Path | None) -> list[Path]:
    if examples_dir is None or not Path(examples_dir).is_dir():
        return []
    return sorted(p for p in Path(examples_dir).iterdir() if p.suffix.lower() in EXAMPLE_SUFFIXES)


@dataclass
class DetectTab:
    image: gr.Image
    class_select: gr.Dropdown
    strength: gr.Slider
    caption: gr.Textbox
    reconstruction: gr.Image
    overlay: gr.Image
    verdict: gr.HTML
    score: gr.Number


def build_detect_tab(service: DetectorService, session: gr.State, examples_dir: Path | None = None) -> DetectTab:
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            image = gr.Image(label="Image", type="filepath", image_mode=None, sources=["upload", "clipboard"],
                             elem_id="input-image", height=300)
            class_select = gr.Dropdown(class_choices(service, with_auto=True), value=AUTO_CLASS, label="Class",
                                       info="'auto' guesses the class from the model's memory", elem_id="class-select")
            detector = service.detector
            strength = gr.Slider(0.0, detector.max_strength, value=detector.default_strength, step=0.01,
                                 label="Denoising strength", elem_id="strength",
                                 info="recomputes when you release the slider; up to the noise levels the denoiser "
                                      "was trained on")
            steps = gr.Slider(1, MAX_STEPS, value=detector.default_steps, step=1, label="DDIM steps", elem_id="steps")
            seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed")
            memory_guided = gr.Checkbox(detector.memory_guided_default, label="Memory-guided reconstruction",
                                        info="regenerate only what the normal-feature memory flags; off: the whole image",
                                        interactive=detector.can_guide, elem_id="memory-guided")
            button = gr.Button("Detect", variant="primary", elem_id="detect-button")
            files = example_files(examples_dir)
            examples = None
            if files:
                classes = sorted({p.stem.partition("_")[0] for p in files})  # <class>_<defect>.png
                examples = gr.Examples([[str(p)] for p in files], inputs=[image], examples_per_page=12,
                                       label=f"Examples: normal and defective {', '.join(classes)} (click one)")
        with gr.Column(scale=2):
            caption = gr.Textbox(label=detector.captioner_title, lines=3, interactive=False, elem_id="caption")
            with gr.Row():
                reconstruction = gr.Image(label="Diffusion reconstruction", format="png", interactive=False,
                                          elem_id="reconstruction", height=300)
                overlay = gr.Image(label="Anomaly heatmap overlay", format="png", interactive=False,
                                   elem_id="overlay", height=300)
            opacity = gr.Slider(0.0, 1.0, value=DEFAULT_OPACITY, step=0.05, label="Heatmap opacity",
                                info="red = at or above the class threshold", elem_id="opacity")
            verdict = gr.HTML(message_html("Upload an image or click an example.", "info"), label="Verdict",
                              elem_id="verdict")
            score = gr.Number(None, label="Anomaly score", interactive=False, elem_id="score")
    last = gr.State(None, time_to_live=SESSION_TTL_S)  # the key of this visitor's last detection
    recent = RecentDetections()

    def detect_and_remember(*inputs):
        *shown, detection = detect(service, *inputs)
        return (*shown, recent.add(detection))

    run = dict(
        fn=detect_and_remember,
        inputs=[image, class_select, strength, steps, seed, opacity, session, memory_guided],
        outputs=[caption, reconstruction, overlay, verdict, score, last],
        preprocess=False,  # the service reads the file, so a bad upload gets a clear message
        trigger_mode="always_last",
    )
    gr.on(triggers=[image.input, button.click, strength.release, steps.release, class_select.input, seed.submit,
                    memory_guided.input],
          api_name="detect",
          api_description="Caption, reconstruct and score one image: caption, reconstruction, overlay, verdict, score",
          **run)
    if examples is not None:
        examples.load_input_event.then(api_visibility="private", **run)
    opacity.change(lambda key, value: reblend(recent.get(key), value), inputs=[last, opacity], outputs=[overlay], api_visibility="private",
                   trigger_mode="always_last", show_progress="hidden")
    return DetectTab(image, class_select, strength, caption, reconstruction, overlay, verdict, score)
