"""Fine-tune tab: upload normal images of a class (new, or known with 'Update existing class'),
choose the steps, Start. Runs in the queue, one fine-tune at a time; on success the service
switches to the new model and the class selectors are refreshed; on failure nothing changes."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gradio as gr

from vlmdiff.app.common import file_name, file_path, message_html, user_message, warn
from vlmdiff.app.service import MAX_FINETUNE_STEPS, DetectorService
from vlmdiff.training.finetune import MIN_IMAGES, FinetuneConfig


def start_finetune(service: DetectorService, files, class_name, steps=FinetuneConfig.steps, update_existing=False,
                   progress=gr.Progress(track_tqdm=True)):
    """A summary (images used, time, new threshold) or the reason it did not run."""
    try:
        uploads = [(file_path(f), file_name(f)) for f in (files or []) if file_path(f)]
        result = service.finetune(uploads, class_name, steps, bool(update_existing),
                                  progress=lambda fraction, text: progress(fraction, desc=text))
    except Exception as error:  # noqa: BLE001 - every error becomes a message
        message = user_message(error)
        warn(message)
        return message_html(message)
    return message_html(
        f"Fine-tuned class {result.class_name!r} on {result.images_used} images: {result.steps} steps in "
        f"{result.seconds:.0f} s, final loss {result.final_loss:.4f}. New threshold {result.threshold:.4g}. "
        f"The model in {result.output_dir} is in use now; the class is in the Detect and Thresholds tabs.",
        "success",
    )


@dataclass
class FinetuneTab:
    finished: object  # the Start event; chain `.then(...)` to refresh other views


def build_finetune_tab(service: DetectorService) -> FinetuneTab:
    gr.Markdown(f"Upload at least {MIN_IMAGES} **normal** (defect-free) images of one class. The model learns "
                "to reconstruct them and calibrates a threshold for the class; the current model stays in use "
                "until training succeeds.")
    with gr.Row():
        with gr.Column():
            files = gr.File(label="Normal images", file_count="multiple", file_types=["image"],
                            elem_id="finetune-files")
        with gr.Column():
            class_name = gr.Textbox(label="Class name", placeholder="e.g. bottle", elem_id="finetune-class",
                                    info="letters, digits, '_' or '-'; a new class, or a known one to re-tune")
            update_existing = gr.Checkbox(False, label="Update existing class", elem_id="finetune-update",
                                          info="needed to re-tune a class the model already knows")
            steps = gr.Slider(1, MAX_FINETUNE_STEPS, value=FinetuneConfig.steps, step=1, label="Training steps",
                              elem_id="finetune-steps")
            start = gr.Button("Start fine-tuning", variant="primary", elem_id="finetune-start")
    result = gr.HTML(label="Fine-tune summary", elem_id="finetune-summary")
    event = start.click(partial(start_finetune, service), [files, class_name, steps, update_existing], [result],
                        api_name="finetune", preprocess=False, concurrency_limit=1, concurrency_id="finetune")
    return FinetuneTab(event)
