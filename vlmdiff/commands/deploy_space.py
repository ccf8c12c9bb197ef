"""`vlmdiff deploy-space OWNER/NAME`: deploy the Gradio app to a Hugging Face Space in one command."""
from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "deploy-space", help="deploy the app to a Hugging Face Space (gradio SDK)",
        description="Create the Space (gradio SDK) if missing and upload what the app needs (app.py, vlmdiff/, "
                    "assets/ with the embedded model, docs/, requirements.txt, a README with Space metadata) in "
                    "one commit; the weights go through LFS by themselves.",
    )
    parser.add_argument("space_id", help="Space repository, OWNER/NAME")
    parser.add_argument("--model", help="hub model the Space serves (Space variable VLMDIFF_MODEL; default: the "
                                        "embedded model; a private one needs the Space secret HF_TOKEN)")
    parser.add_argument("--captioner", help="VLM hub id whose caption the Detect tab shows (Space variable "
                                            "VLMDIFF_CAPTIONER, e.g. Salesforce/blip-image-captioning-base)")
    parser.add_argument("--private", action="store_true", help="create the Space private")
    parser.add_argument("--project", help="source checkout holding app.py (default: the one this vlmdiff runs from)")
    parser.add_argument("--token", help="a token with write access (default: HF_TOKEN or `hf auth login`'s; "
                                        "a command line is visible to other users of the machine)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vlmdiff.hub import PROJECT_ROOT, deploy_space

    project = Path(args.project) if args.project else PROJECT_ROOT
    url = deploy_space(args.space_id, project, model=args.model, captioner=args.captioner, private=args.private,
                       token=args.token)
    print(f"deployed the app to {url} (it builds there in a few minutes)")
    return 0
