"""The public app as an attacker sees it: raw JSON to every event of the running app (named endpoints
and the private ones the page uses, by fn_index), naming files on the server instead of uploading them.
Nothing is read, and the replies do not tell whether a named file exists or is an image."""
from __future__ import annotations

import itertools
import json
import re
import uuid
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from vlmdiff.app.common import NOT_RECEIVED
from app_harness import build_tiny_model, running_app

ROOT = Path(__file__).resolve().parents[1]
FILE_COMPONENTS = {"image": False, "file": True}  # component type -> takes a list of files
VOLATILE = re.compile(r"[0-9a-f]{8,}|\d+\.\d+ s|/[^\s\"']*gradio[^\s\"']*")  # event ids, timings, temp paths


@pytest.fixture(scope="module")
def public_app(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("attacked")
    model = build_tiny_model(workdir / "model")
    with running_app(ROOT / "app.py", model, workdir, options=("--public",)) as url:
        yield url, workdir


def secrets(folder: Path) -> dict[str, Path]:
    """Three server paths outside Gradio's upload folder: an image, a file that is not one, a missing file."""
    image = folder / "secret.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(image)
    text = folder / "secret.txt"
    text.write_text("credentials")
    return {"image": image, "text": text, "missing": folder / "nothing-here.png"}


def file_events(config: dict) -> list[tuple[int, list]]:
    """(fn_index, inputs) of every event with a file input; inputs as (kind, default) per input."""
    components = {item["id"]: item for item in config["components"]}
    events = []
    for index, dependency in enumerate(config["dependencies"]):
        kinds = [components[i]["type"] for i in dependency["inputs"]]
        if any(kind in FILE_COMPONENTS for kind in kinds):
            inputs = [(components[i]["type"], components[i].get("props", {}).get("value")) for i in dependency["inputs"]]
            events.append((dependency.get("id", index), inputs))
    return events


def request_data(inputs: list, path: Path, meta: bool) -> list:
    """The event's data with `path` in every file input, in a payload with or without Gradio's `meta` tag."""
    named = {"path": str(path), **({"meta": {"_type": "gradio.FileData"}} if meta else {})}
    return [([named] if FILE_COMPONENTS[kind] else named) if kind in FILE_COMPONENTS else default
            for kind, default in inputs]


def call(client: httpx.Client, fn_index: int, data: list) -> str:
    """Run one event through the queue with a fresh session; the stream of messages it sends back."""
    session = uuid.uuid4().hex
    joined = client.post("gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": session,
                                                        "event_data": None, "trigger_id": None})
    joined.raise_for_status()
    messages = []
    with client.stream("GET", "gradio_api/queue/data", params={"session_hash": session}) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                messages.append(message)
                if message.get("msg") in ("process_completed", "close_stream"):
                    break
    return json.dumps([m for m in messages if m.get("msg") == "process_completed"], sort_keys=True)


def returned_images(client: httpx.Client, reply: str) -> list[np.ndarray]:
    """Every picture a reply links to, downloaded from the app."""
    return [np.asarray(Image.open(BytesIO(client.get(url).raise_for_status().content)).convert("RGB"))
            for url in re.findall(r'"url": "([^"]+)"', reply)]


def test_no_event_reads_a_server_path_or_tells_whether_it_exists(public_app, tmp_path):
    url, workdir = public_app
    paths = secrets(tmp_path)
    secret = np.asarray(Image.open(paths["image"]).convert("RGB"))
    with httpx.Client(base_url=url, timeout=120) as client:
        events = file_events(client.get("config").raise_for_status().json())
        assert len(events) >= 4  # detect (and the examples' detection), score_calibration, finetune
        for (fn_index, inputs), meta in itertools.product(events, (False, True)):
            replies = {}
            for kind, path in paths.items():
                reply = call(client, fn_index, request_data(inputs, path, meta))
                assert "credentials" not in reply and str(tmp_path) not in reply
                for picture in returned_images(client, reply):
                    assert picture.shape != secret.shape or not np.array_equal(picture, secret)
                replies[kind] = VOLATILE.sub("#", reply)
            refused = NOT_RECEIVED in replies["image"] or '"success": false' in replies["image"]  # ours, or Gradio's
            assert refused, (fn_index, meta, replies["image"])
            assert replies["image"] == replies["text"] == replies["missing"], (fn_index, meta)
