"""Fine-tune tab: upload normal images of a class (new, or known with 'Update existing class'),
choose the steps, Start. Runs in the queue, one fine-tune at a time; on success the service
switches to the new model (the visitor's own on a gated app) and the class selectors are
refreshed; on failure nothing changes."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gradio as gr

from vlmdiff.app.class_names import same_name_note
from vlmdiff.app.common import message_html, uploads, user_message, warn
from vlmdiff.app.service import DetectorService
from vlmdiff.app.session import Session
from vlmdiff.training.finetune import MIN_IMAGES, FinetuneConfig


def start_finetune(service: DetectorService, files, class_name, steps=FinetuneConfig.steps, update_existing=False,
                   password: str | None = None, session: Session | None = None,
                   progress=gr.Progress(track_tqdm=True)):
    """(a summary: images used, time, new threshold; or the reason it did not run, session)."""
    try:
        result = service.finetune(uploads(files), class_name, steps, bool(update_existing),
                                  progress=lambda fraction, text: progress(fraction, desc=text),
                                  session=session, password=password)
    except Exception as error:  # noqa: BLE001 - every error becomes a message
        message = user_message(error)
        warn(message)
        return message_html(message), session
    note = same_name_note(class_name, result.class_name)
    where = (f"The model in {result.output_dir} is in use now" if not service.access.gated
             else "Your fine-tuned model is in use in this session" if not password
             else "The fine-tuned model is in use for everyone")
    return message_html(
        f"{note + ' ' if note else ''}Fine-tuned class {result.class_name!r} on {result.images_used} images: "
        f"{result.steps} steps in {result.seconds:.0f} s, final loss {result.final_loss:.4f}. New threshold "
        f"{result.threshold:.4g}. {where}; the class is in the Detect and Thresholds tabs.",
        "success",
    ), session


@dataclass
class FinetuneTab:
    finished: object  # the Start event; chain `.then(...)` to refresh other views


def build_finetune_tab(service: DetectorService, session: gr.State) -> FinetuneTab:
    limits = service.access.finetune_limits
    gr.Markdown(f"Upload {MIN_IMAGES} to {limits.images} **normal** (defect-free) images of one class. The model "
                "learns to reconstruct them and calibrates a threshold for the class; the current model stays in "
                "use until training succeeds."
                + (" On this public app the fine-tuned class is yours alone: it lives in this browser session."
                   if service.access.gated else ""))
    with gr.Row():
        with gr.Column():
            files = gr.File(label="Normal images", file_count="multiple", file_types=["image"],
                            elem_id="finetune-files")
        with gr.Column():
            class_name = gr.Textbox(label="Class name", placeholder="e.g. bottle", elem_id="finetune-class",
                                    info="letters, digits, '_' or '-'; a new class, or a known one to re-tune "
                                         "(case and surrounding spaces are ignored)")
            update_existing = gr.Checkbox(False, label="Update existing class", elem_id="finetune-update",
                                          info="needed to re-tune a class the model already knows")
            steps = gr.Slider(1, limits.steps, value=min(FinetuneConfig.steps, limits.steps), step=1,
                              label="Training steps", elem_id="finetune-steps")
            password = gr.Textbox(label="Admin password (fine-tunes for everyone; empty: for your session only)",
                                  type="password", visible=bool(service.access.admin_password),
                                  elem_id="finetune-password")
            start = gr.Button("Start fine-tuning", variant="primary", elem_id="finetune-start")
    result = gr.HTML(label="Fine-tune summary", elem_id="finetune-summary")
    inputs = [files, class_name, steps, update_existing, password, session]
    event = start.click(partial(start_finetune, service), inputs, [result, session], api_name="finetune",
                        preprocess=False, concurrency_limit=1, concurrency_id="finetune")
    return FinetuneTab(event)
