"""`vlmdiff push-to-hub MODEL OWNER/NAME`: upload a model folder to the Hugging Face hub with a Hub model card."""
from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push-to-hub", help="upload a model folder to a Hugging Face hub repository, with a Hub model card",
        description="Upload a model folder to a hub model repository (created if missing) in one commit. Its "
                    "README.md is the folder's model card under Hub metadata (library_name vlmdiff, licence, "
                    "tags, datasets), so `python app.py --model OWNER/NAME` or a Space can serve it.",
    )
    parser.add_argument("model", help="model folder (or hub id) to upload")
    parser.add_argument("repo_id", help="model repository, OWNER/NAME")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--license", help="Hub licence id, e.g. apache-2.0 or cc-by-nc-sa-4.0 "
                                          "(default: the one in the model card's metadata; required without it)")
    parser.add_argument("--dataset", action="append", default=[], metavar="HUB_ID",
                        help="a hub dataset the model was trained on, for the card's metadata (repeatable)")
    parser.add_argument("--token", help="a token with write access (default: HF_TOKEN or `hf auth login`'s; "
                                        "a command line is visible to other users of the machine)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlmdiff.hub import push_model

    url = push_model(args.model, args.repo_id, private=args.private, license=args.license, datasets=args.dataset,
                     token=args.token)
    print(f"uploaded {args.model} to {url}\nserve it with: python app.py --model {args.repo_id}")
    return 0
