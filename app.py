"""vlmdiff Gradio app (also the Hugging Face Spaces entry point): detect, tune thresholds, fine-tune.

    python app.py [--model DIR_OR_HUB_ID] [--user-models DIR] [--share] [--server-name 0.0.0.0] [--server-port 7860]

The UI only: each tab is built by a function in vlmdiff/app/, all work is done by DetectorService.
"""
from __future__ import annotations

import argparse
import os
from functools import partial
from pathlib import Path

import gradio as gr

from vlmdiff.app import (
    DetectorService, build_about_tab, build_detect_tab, build_finetune_tab, build_thresholds_tab, refresh_views,
    reset_model,
)
from vlmdiff.app.model_store import USER_MODELS_ENV, default_user_models_dir

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE / "assets" / "vlmdiff-default"
EXAMPLES = HERE / "assets" / "examples"
QUEUE_SIZE = 32  # waiting requests; more get "queue full" instead of waiting forever


def build_demo(service: DetectorService, examples_dir: Path | None = EXAMPLES) -> gr.Blocks:
    with gr.Blocks(title="vlmdiff: visual anomaly detection") as demo:
        gr.Markdown("# vlmdiff: find defects with vision-language-guided latent diffusion")
        with gr.Row():
            status = gr.Markdown(service.status_markdown(), elem_id="model-status")
            reset = gr.Button("Reset to the shipped model", visible=service.has_user_changes, size="sm",
                              scale=0, min_width=220, elem_id="reset-model")
        with gr.Tab("Detect"):
            detect = build_detect_tab(service, examples_dir)
        with gr.Tab("Thresholds"):
            thresholds = build_thresholds_tab(service)
        with gr.Tab("Fine-tune"):
            finetune = build_finetune_tab(service)
        with gr.Tab("About"):
            about = build_about_tab(service)
        views = [status, reset, detect.class_select, thresholds.class_select, about.card]
        refresh = partial(refresh_views, service)  # after a change of model, and for each new visitor
        finetune.finished.then(refresh, outputs=views, api_visibility="private")
        thresholds.saved.then(refresh, outputs=views, api_visibility="private")
        reset.click(partial(reset_model, service), outputs=views, api_name="reset_model")
        demo.load(refresh, outputs=views, api_visibility="private")
    demo.queue(max_size=QUEUE_SIZE, default_concurrency_limit=1)
    return demo


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=os.environ.get("VLMDIFF_MODEL") or str(DEFAULT_MODEL),
                        help="model folder or Hugging Face hub id (env VLMDIFF_MODEL; default: the embedded model)")
    parser.add_argument("--user-models", default=None,
                        help="folder for the user's model copies with saved thresholds and fine-tuned classes "
                        f"(env {USER_MODELS_ENV}; default: {default_user_models_dir()})")
    parser.add_argument("--share", action="store_true", help="also serve on a public gradio.live link")
    parser.add_argument("--server-name", default=None, help="address to bind, e.g. 0.0.0.0 (default: Gradio's)")
    parser.add_argument("--server-port", type=int, default=None, help="port (default: Gradio's, 7860)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    service = DetectorService(args.model, fallback=DEFAULT_MODEL, user_models_dir=args.user_models)
    build_demo(service).launch(share=args.share, server_name=args.server_name, server_port=args.server_port,
                               max_file_size="64mb")


if __name__ == "__main__":
    main()
