"""vlmdiff Gradio app (also the Hugging Face Spaces entry point): detect, tune thresholds, fine-tune.

    python app.py [--model DIR_OR_HUB_ID] [--captioner HUB_ID_OR_DIR] [--user-models DIR] [--data-root DIR]
                  [--public] [--admin-password PW] [--share] [--server-name 0.0.0.0] [--server-port 7860]

The UI only: each tab is built by a function in vlmdiff/app/, all work is done by DetectorService.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from functools import partial
from pathlib import Path

import gradio as gr

from vlmdiff.app import (
    DetectorService, build_about_tab, build_detect_tab, build_finetune_tab, build_thresholds_tab, confirm_reset,
    refresh_views, reset_model,
)
from vlmdiff.app.access import ADMIN_PASSWORD_ENV, Access
from vlmdiff.app.finetune_tab import watch_progress
from vlmdiff.app.limits import MAX_UPLOAD_MB, SESSION_CAPACITY, SESSION_TTL_S, TEMP_FILES
from vlmdiff.app.model_store import USER_MODELS_ENV, default_user_models_dir
from vlmdiff.app.session import Session, close_session
from vlmdiff.captioning import CAPTIONER_ENV
from vlmdiff.hub import MODEL_ENV

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "assets" / "vlmdiff-default"
EXAMPLES = HERE / "assets" / "examples"
QUEUE_SIZE = 32  # waiting requests; more get "queue full" instead of waiting forever
LOCAL_ADDRESSES = ("127.0.0.1", "localhost", "::1")


def build_demo(service: DetectorService, examples_dir: Path | None = EXAMPLES) -> gr.Blocks:
    # delete_cache: uploads and result pictures in Gradio's temporary folder do not pile up
    with gr.Blocks(title="vlmdiff: visual anomaly detection", delete_cache=TEMP_FILES) as demo:
        session = gr.State(Session(), time_to_live=SESSION_TTL_S, delete_callback=close_session)
        gr.Markdown("# vlmdiff: find defects with vision-language-guided latent diffusion")
        with gr.Row():
            status = gr.Markdown(service.status_markdown(), elem_id="model-status")
            reset = gr.Button("Drop my changes" if service.access.gated else "Reset to the shipped model",
                              visible=service.can_reset(), size="sm", scale=0, min_width=220, elem_id="reset-model")
        with gr.Row(visible=False, elem_id="reset-confirm") as confirm_row:
            confirm_text = gr.Markdown()
            confirm = gr.Button("Yes, drop them", variant="stop", size="sm", scale=0, elem_id="reset-yes")
            cancel = gr.Button("Keep them", size="sm", scale=0, elem_id="reset-no")
        with gr.Tab("Detect"):
            detect = build_detect_tab(service, session, examples_dir)
        with gr.Tab("Thresholds"):
            thresholds = build_thresholds_tab(service, session)
        with gr.Tab("Fine-tune"):
            finetune = build_finetune_tab(service, session)
        with gr.Tab("About") as about_tab:
            about = build_about_tab(service)
        views = [status, reset, detect.class_select, thresholds.class_select, about.card]
        refresh = partial(refresh_views, service)  # as this visitor sees the model now
        for event in (finetune.finished.then, thresholds.saved.then, about_tab.select, demo.load):
            event(refresh, inputs=[session], outputs=views, api_visibility="private")
        reset.click(partial(confirm_reset, service), inputs=[session], outputs=[confirm_row, confirm_text],
                    api_visibility="private")
        hide = dict(fn=lambda: gr.update(visible=False), outputs=[confirm_row], api_visibility="private")
        confirm.click(partial(reset_model, service), inputs=[session], outputs=views, api_name="reset_model").then(**hide)
        cancel.click(**hide)
        demo.load(partial(watch_progress, service), inputs=[session], outputs=[finetune.progress, finetune.timer],
                  api_visibility="private")  # a diffusion fine-tune still running when the page opens
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=os.environ.get(MODEL_ENV) or str(DEFAULT_MODEL),
                       help=f"model folder or Hugging Face hub id (env {MODEL_ENV}; default: the embedded model)")
    model.add_argument("--captioner", default=os.environ.get(CAPTIONER_ENV) or None,
                       help="transformers VLM (hub id or folder) whose caption the Detect tab shows, e.g. "
                       f"Salesforce/blip-image-captioning-base (env {CAPTIONER_ENV}; default: the model's own "
                       "captioner, also used when the VLM cannot be loaded)")
    model.add_argument("--user-models", default=None,
                       help="folder for the user's model copies with saved thresholds and fine-tuned classes "
                       f"(env {USER_MODELS_ENV}; default: {default_user_models_dir()})")
    model.add_argument("--data-root", default=os.environ.get("VLMDIFF_DATA_ROOT"),
                       help="the only server folder the Thresholds tab may read labelled calibration folders from "
                       "(env VLMDIFF_DATA_ROOT; default: none, calibration images are uploaded)")
    access = parser.add_argument_group("who may change the model")
    access.add_argument("--public", action="store_true",
                        help="public deployment (implied on a Hugging Face Space): each visitor's changes stay in "
                        "their session, fine-tunes are capped")
    access.add_argument("--admin-password", default=os.environ.get(ADMIN_PASSWORD_ENV),
                        help=f"password that makes a change for everyone (env {ADMIN_PASSWORD_ENV}, preferred: "
                        "a command line is visible to other users of the machine)")
    server = parser.add_argument_group("server")
    server.add_argument("--share", action="store_true",
                        help="also serve on a public gradio.live link (implies --public)")
    server.add_argument("--server-name", default=None, help="address to bind, e.g. 0.0.0.0 (default: Gradio's)")
    server.add_argument("--server-port", type=int, default=None, help="port (default: Gradio's, 7860)")
    return parser.parse_args(argv)


def listens_beyond_localhost(server_name: str | None) -> bool:
    """Whether the server takes connections from other machines (Gradio binds GRADIO_SERVER_NAME, else 127.0.0.1)."""
    address = server_name or os.environ.get("GRADIO_SERVER_NAME") or "127.0.0.1"
    return address not in LOCAL_ADDRESSES


def access_from(args: argparse.Namespace) -> Access:
    """Public on a Hugging Face Space (SPACE_ID is set there), with --public, with --share (a public link) and
    whenever the app listens beyond localhost."""
    public = (args.public or args.share or bool(os.environ.get("SPACE_ID"))
              or listens_beyond_localhost(args.server_name))
    return Access(public=public, admin_password=args.admin_password or None)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # a stopped app cleans up (atexit) as one that ends
    service = DetectorService(args.model, fallback=DEFAULT_MODEL, user_models_dir=args.user_models,
                              access=access_from(args), data_root=args.data_root, captioner=args.captioner)
    build_demo(service).launch(share=args.share, server_name=args.server_name, server_port=args.server_port,
                               max_file_size=f"{MAX_UPLOAD_MB}mb", state_session_capacity=SESSION_CAPACITY)


if __name__ == "__main__":
    main()
