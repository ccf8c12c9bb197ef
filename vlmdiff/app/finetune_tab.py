"""Fine-tune tab: upload normal images of a class (new, or known with 'Update existing class'),
choose the steps, Start. The quick phase (memory + threshold) runs in the queue, one at a time, and
makes the class usable at once; with steps > 0 the diffusion phase then runs in the background and
its progress is shown below (a timer refreshes it while it runs). On success the service switches to
the new model (the visitor's own on a gated app) and the class selectors are refreshed; on failure
nothing changes."""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import gradio as gr

from vlmdiff.app.class_names import same_name_note
from vlmdiff.app.common import client_address, message_html, uploads, user_message, warn
from vlmdiff.app.finetune_jobs import DiffusionJob
from vlmdiff.app.service import DetectorService
from vlmdiff.app.session import Session
from vlmdiff.training.finetune import MIN_IMAGES, FinetuneConfig, FinetuneSummary

PROGRESS_EVERY_S = 2.0
NO_JOB = "No diffusion fine-tune has been started."


def quick_message(service: DetectorService, summary: FinetuneSummary, job: DiffusionJob | None,
                  password: str | None) -> str:
    """What the quick phase did, where the model is in use, and what happens to the reconstruction."""
    where = (f"The model in {summary.output_dir} is in use now" if not service.access.gated
             else "Your fine-tuned model is in use in this session" if not password
             else "The fine-tuned model is in use for everyone")
    fpr = "n/a" if summary.expected_fpr is None else f"{summary.expected_fpr:.1%}"
    after = (f"the diffusion fine-tune ({job.steps_text}) runs in the background and gives the class its own "
             "reconstructions when it finishes: its progress is below" if job is not None
             else "0 training steps, so the diffusion is not fine-tuned")
    return (f"Class {summary.class_name!r} is ready: memory and threshold from {summary.images_used} images in "
            f"{summary.seconds:.0f} s. Threshold {summary.threshold:.4g}, expected false-positive rate {fpr}. "
            f"{where}; the class is in the Detect and Thresholds tabs. Its reconstruction is still the model's "
            f"generic one, not adapted to these images: {after}.")


def start_finetune(service: DetectorService, files, class_name, steps=FinetuneConfig.steps, update_existing=False,
                   password: str | None = None, session: Session | None = None, client: str = "local",
                   progress=gr.Progress(track_tqdm=True)):
    """(a summary of the quick phase: images used, time, threshold; or the reason it did not run, session)."""
    try:
        summary, job = service.finetuning.start(uploads(files), class_name, steps, bool(update_existing),
                                        progress=lambda fraction, text: progress(fraction, desc=text),
                                        session=session, password=password, client=client)
    except Exception as error:  # noqa: BLE001 - every error becomes a message
        message = user_message(error)
        warn(message)
        return message_html(message), session
    note = same_name_note(class_name, summary.class_name)
    return message_html(f"{note + ' ' if note else ''}{quick_message(service, summary, job, password)}",
                        "success"), session


def diffusion_progress(service: DetectorService, session: Session | None = None) -> str:
    """The diffusion phase this visitor follows, in words (Markdown)."""
    job = service.finetuning.job(session)
    return job.describe() if job is not None else NO_JOB


def watch_progress(service: DetectorService, session: Session | None = None):
    """(progress Markdown, the timer: active while the diffusion phase is queued or running)."""
    job = service.finetuning.job(session)
    active = job is not None and not job.finished  # read before the text: a job finishing between gets one more tick
    return diffusion_progress(service, session), gr.Timer(active=active)


@dataclass
class FinetuneTab:
    finished: object  # the Start event; chain `.then(...)` to refresh other views
    progress: gr.Markdown  # the diffusion phase's progress
    timer: gr.Timer  # refreshes `progress` while the diffusion phase runs


def build_finetune_tab(service: DetectorService, session: gr.State) -> FinetuneTab:
    limits = service.access.finetune_limits()
    gr.Markdown(f"Upload {MIN_IMAGES} to {limits.images} **normal** (defect-free) images of one class. In seconds "
                "the class gets its normal-feature memory and a calibrated threshold and can be detected; then, "
                "with training steps above 0, the diffusion learns to reconstruct it in the background (minutes). "
                "The current model stays in use until each phase succeeds."
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
            steps = gr.Slider(0, limits.steps, value=min(FinetuneConfig.steps, limits.steps), step=1,
                              label="Diffusion training steps", elem_id="finetune-steps",
                              info="0: memory and threshold only; more: the reconstruction adapts too, "
                                   "in the background")
            password = gr.Textbox(label="Admin password (fine-tunes for everyone; empty: for your session only)",
                                  type="password", visible=bool(service.access.admin_password),
                                  elem_id="finetune-password")
            start = gr.Button("Start fine-tuning", variant="primary", elem_id="finetune-start")
    result = gr.HTML(label="Fine-tune summary", elem_id="finetune-summary")
    with gr.Row():
        progress = gr.Markdown(NO_JOB, elem_id="finetune-progress")
        check = gr.Button("Check progress", size="sm", scale=0, min_width=160, elem_id="finetune-check")
    timer = gr.Timer(PROGRESS_EVERY_S, active=False)
    inputs = [files, class_name, steps, update_existing, password, session]

    def start_for_client(files, class_name, steps, update_existing, password, session, request: gr.Request,
                         progress=gr.Progress(track_tqdm=True)):
        return start_finetune(service, files, class_name, steps, update_existing, password, session,
                              client_address(request), progress)

    event = start.click(start_for_client, inputs, [result, session], api_name="finetune",
                        preprocess=False, concurrency_limit=1, concurrency_id="finetune")
    watch = dict(fn=partial(watch_progress, service), inputs=[session], outputs=[progress, timer],
                 api_visibility="private", concurrency_limit=None, show_progress="hidden")
    event.then(**watch)
    timer.tick(**watch)
    check.click(partial(diffusion_progress, service), inputs=[session], outputs=[progress],
                api_name="finetune_progress", concurrency_limit=None, show_progress="hidden")
    return FinetuneTab(event, progress, timer)
