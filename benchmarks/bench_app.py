"""Latency and memory of the running app: app.py in a subprocess, offline, on the
default model, driven through gradio_client.

Phases, in order:

- start: until the app answers;
- examples: every image of assets/examples through /detect, one after another;
- 6 concurrent: six clients call /detect at the same moment (the queue runs one detection at a time,
  so the latency includes the wait);
- large image: one 8000 x 6000 JPEG through /detect (decoded at the app's working size);
- fine-tune: /finetune on 4 normal images of 4000 x 4000 px (upscaled examples), a few steps;
- refused: /finetune with 8 one-colour 8000 x 8000 PNGs (the request of the issue that took the
  server to 7.9 GB), which the app now refuses from the headers;
- after: the examples again; once the diffusion phase has finished, Reset to the shipped model
  (/reset_model), the examples again, then the app idles: its RSS against that after the first
  examples says whether memory returns after a fine-tune and a Reset.

A thread samples the resident memory of the server process and its children (VmRSS in
/proc) every 50 ms; each phase reports its peak. Target: peak <= 2 GB. Prints a Markdown
table and writes benchmarks/results/app.json.

    OMP_NUM_THREADS=1 python benchmarks/bench_app.py [--model assets/vlmdiff-default] [--steps 20]

`--abuse` runs the abuse phases instead, against `app.py --public --admin-password
<random>`, and writes benchmarks/results/app-abuse.json (see `run_abuse`):

    OMP_NUM_THREADS=1 python benchmarks/bench_app.py --abuse
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from gradio_client import Client, handle_file
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from app_harness import app_process  # noqa: E402

DEFAULT_MODEL = ROOT / "assets" / "vlmdiff-default"
EXAMPLES = ROOT / "assets" / "examples"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "app.json"
TARGET_MB = 2048
CONCURRENT = 6


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of a process and all its descendants, from /proc."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) * 1024
            for task in Path(f"/proc/{current}/task").iterdir():
                pending += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, StopIteration):
            continue  # the process ended while being read
    return total


class RssSampler(threading.Thread):
    """Samples tree_rss_bytes(pid) every `interval` s; `peak()` since the last `reset()`."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self._peak, self._stop = 0, threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, tree_rss_bytes(self.pid))
            time.sleep(self.interval)

    def reset(self) -> None:
        self._peak = tree_rss_bytes(self.pid)

    def peak(self) -> int:
        return max(self._peak, tree_rss_bytes(self.pid))

    def stop(self) -> None:
        self._stop.set()


def timed(call) -> tuple[float, object]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def make_images(folder: Path, side: int, uploads: int) -> dict[str, list[Path]]:
    """The large uploads: fine-tune images (examples upscaled), one huge detection, the refused request."""
    normal = sorted(EXAMPLES.glob("*_good.png"))
    finetune = []
    for i in range(uploads):
        path = folder / f"large_{i}.png"
        Image.open(normal[i % len(normal)]).convert("RGB").resize((side, side), Image.Resampling.BICUBIC).save(path)
        finetune.append(path)
    huge = folder / "huge.jpg"  # a camera-sized photo
    Image.open(EXAMPLES / "brick_crack.png").convert("RGB").resize((8000, 6000), Image.Resampling.BILINEAR).save(
        huge, quality=90)
    refused = []
    for i in range(8):
        path = folder / f"flat_{i}.png"
        Image.new("RGB", (8000, 8000), (40 * i, 90, 120)).save(path)
        refused.append(path)
    return {"finetune": finetune, "huge": [huge], "refused": refused}


def detect(client: Client, image: Path) -> str:
    return client.predict(handle_file(str(image)), "auto", api_name="/detect")[3]


def run(args: argparse.Namespace) -> dict:
    examples = sorted(p for p in EXAMPLES.iterdir() if p.suffix == ".png")
    phases: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-app-") as scratch:
        scratch = Path(scratch)
        images = make_images(scratch, args.side, args.uploads)
        started = time.perf_counter()
        with app_process(ROOT / "app.py", args.model, scratch, timeout=600) as (url, process):
            sampler = RssSampler(process.pid)
            sampler.start()
            start_s = time.perf_counter() - started
            phases.append({"phase": "start", "calls": 1, "latencies": [start_s], "peak_rss": sampler.peak()})

            def phase(name: str, calls) -> list:
                sampler.reset()
                results = [timed(call) for call in calls]
                phases.append({"phase": name, "calls": len(results), "latencies": [t for t, _ in results],
                               "peak_rss": sampler.peak(), "rss_after": tree_rss_bytes(process.pid)})
                print(f"{name}: {phases[-1]}", flush=True)
                return [result for _, result in results]

            client = Client(url, verbose=False)
            phase("examples", [lambda image=image: detect(client, image) for image in examples])
            clients = [Client(url, verbose=False) for _ in range(CONCURRENT)]
            sampler.reset()
            with ThreadPoolExecutor(CONCURRENT) as pool:
                concurrent = list(pool.map(lambda pair: timed(lambda: detect(*pair)),
                                           zip(clients, examples[:CONCURRENT])))
            phases.append({"phase": f"{CONCURRENT} concurrent detections", "calls": CONCURRENT,
                           "latencies": [t for t, _ in concurrent], "peak_rss": sampler.peak(),
                           "rss_after": tree_rss_bytes(process.pid)})
            [verdict] = phase("large image (8000 x 6000 JPEG)", [lambda: detect(client, images["huge"][0])])
            assert "score" in verdict, verdict
            uploads = [handle_file(str(p)) for p in images["finetune"]]
            [summary] = phase(f"fine-tune ({args.uploads} x {args.side}^2, {args.steps} steps)",
                              [lambda: client.predict(uploads, "bench", args.steps, False, "", api_name="/finetune")])
            assert "Class 'bench' is ready" in summary, summary  # the quick phase; the diffusion runs in the background
            flat = [handle_file(str(p)) for p in images["refused"]]
            [refusal] = phase("refused fine-tune (8 x 8000^2)",
                              [lambda: client.predict(flat, "flat", args.steps, False, "", api_name="/finetune")])
            assert "cannot be used" in refusal or "megapixels" in refusal, refusal
            phase("examples after", [lambda image=image: detect(client, image) for image in examples])
            deadline = time.monotonic() + 600
            while job_state(client.predict(api_name="/finetune_progress")) in ("running", "queued") \
                    and time.monotonic() < deadline:
                time.sleep(2)  # the diffusion phase runs to its end before the model is reset
            phase("reset to the shipped model", [lambda: client.predict(api_name="/reset_model")])
            phase("examples after reset", [lambda image=image: detect(client, image) for image in examples])
            time.sleep(args.idle)
            idle_rss = tree_rss_bytes(process.pid)
            sampler.stop()
    for item in phases:
        item["median_s"] = statistics.median(item["latencies"])
        item["max_s"] = max(item["latencies"])
    return {
        "model": str(args.model), "steps": args.steps, "uploads": args.uploads, "side": args.side,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "phases": phases, "peak_rss": max(item["peak_rss"] for item in phases), "idle_rss_end": idle_rss,
        "warm_rss": phases[1]["rss_after"],  # after the first examples: model, captioner and backbone loaded
        "refusal": refusal,
    }


def table(report: dict) -> str:
    mb = 1024 * 1024
    rows = ["| phase | calls | median s | max s | peak RSS (MB) |", "|---|---:|---:|---:|---:|"]
    for item in report["phases"]:
        rows.append(f"| {item['phase']} | {item['calls']} | {item['median_s']:.2f} | {item['max_s']:.2f} | "
                    f"{item['peak_rss'] / mb:.0f} |")
    verdict = "meets" if report["peak_rss"] <= TARGET_MB * mb else "misses"
    rows.append("")
    rows.append(f"Peak RSS {report['peak_rss'] / mb:.0f} MB ({verdict} the {TARGET_MB} MB target); "
                f"{report['idle_rss_end'] / mb:.0f} MB when idle at the end, after fine-tune + Reset "
                f"({report['idle_rss_end'] / report['warm_rss'] - 1:+.0%} against {report['warm_rss'] / mb:.0f} MB "
                "after the first examples).")
    return "\n".join(rows)


# ---------------------------------------------------------------- abuse phases
ABUSE_OUT = ROOT / "benchmarks" / "results" / "app-abuse.json"
FILE_COMPONENTS = {"image", "file", "gallery", "video", "audio", "model3d", "imageeditor", "annotatedimage"}
FINISHED = re.compile(r"\): (finished|dropped|failed)\.")  # DiffusionJob.describe() of a finished job
META_BROKEN = ("device meta", "meta tensor")  # torch modules built on the meta device: the app's fine-tuning is broken
RUNNING = re.compile(r"\(\d+ s so far\)")
NORMAL_IMAGES = ("brick", "circuit", "grass", "textile")  # assets/examples/<name>_good.png
PHASE_TIMEOUTS = {"file read": 150, "bombs": 200, "diffusion flood": 240, "model-folder lockout": 200,
                  "progress flood": 200, "password guessing": 180}


def plain(text: object, limit: int = 240) -> str:
    """An HTML / Markdown reply as one short line of text."""
    text = re.sub(r"<[^>]+>", "", str(text))
    text = re.sub(r"\s+", " ", text.replace("**", "")).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def disk_bytes(path: Path) -> int:
    """Bytes allocated to the files under `path` (0 when it does not exist)."""
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_blocks * 512
            except OSError:
                continue  # deleted while walking
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class DiskSampler(threading.Thread):
    """Samples the app's folders (Gradio uploads/results, TMPDIR with the visitors' models, user models)
    every `interval` s; `peaks()` since the last `reset()`."""

    def __init__(self, workdir: Path, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.workdir, self.interval = workdir, interval
        self._peaks: dict[str, int] = {}
        self._stop = threading.Event()

    def now(self) -> dict[str, int]:
        folders = {"gradio": self.workdir / "gradio", "tmp": self.workdir / "tmp",
                   "user_models": self.workdir / "user-models"}
        sizes = {name: disk_bytes(folder) for name, folder in folders.items()}
        sizes["sessions"] = sum(disk_bytes(root) for root in (self.workdir / "tmp").glob("vlmdiff-sessions-*"))
        sizes["total"] = sizes["gradio"] + sizes["tmp"] + sizes["user_models"]
        return sizes

    def run(self) -> None:
        while not self._stop.is_set():
            for name, size in self.now().items():
                self._peaks[name] = max(self._peaks.get(name, 0), size)
            time.sleep(self.interval)

    def reset(self) -> None:
        self._peaks = self.now()

    def peaks(self) -> dict[str, int]:
        return {name: max(size, self._peaks.get(name, 0)) for name, size in self.now().items()}

    def stop(self) -> None:
        self._stop.set()


def session_model_folders(workdir: Path) -> list[Path]:
    """The visitors' private model folders (one per fine-tuned session) under the app's TMPDIR."""
    return sorted(p for root in (workdir / "tmp").glob("vlmdiff-sessions-*") for p in root.iterdir() if p.is_dir())


class AbuseApp:
    """app.py --public --admin-password <random> in a subprocess, with TMPDIR in the workdir (so the visitors'
    model folders can be measured), restarted when a phase killed it; RSS and disk samplers."""

    def __init__(self, model: str, workdir: Path) -> None:
        self.model, self.workdir = model, workdir
        self.password = secrets.token_urlsafe(16)
        self.restarts, self.start_seconds = 0, []
        self.log_offset = 0
        self.url, self.process, self._context = "", None, None
        self.sampler: RssSampler | None = None
        self.disk = DiskSampler(workdir)
        (workdir / "tmp").mkdir(exist_ok=True)

    def start(self) -> None:
        saved = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = str(self.workdir / "tmp")  # app_process passes os.environ on to the app
        started = time.perf_counter()
        try:
            self._context = app_process(ROOT / "app.py", self.model, self.workdir, timeout=300,
                                        options=("--public", f"--admin-password={self.password}"))  # it may start with "-"
            self.url, self.process = self._context.__enter__()
        finally:
            if saved is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = saved
        self.start_seconds.append(time.perf_counter() - started)
        self.log_offset = 0  # app_process starts a new app.log
        self.sampler = RssSampler(self.process.pid)
        self.sampler.start()
        if not self.disk.is_alive():
            self.disk.start()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ensure_running(self, broken: str | None = None) -> str | None:
        """Restart a dead app, or a `broken` one (why); the note says so."""
        if self.alive() and not broken:
            return None
        why = broken or f"the app had exited (code {None if self.process is None else self.process.returncode})"
        self.stop()
        self.restarts += 1
        self.start()
        return f"{why}: restarted before this phase"

    def new_log(self) -> str:
        """What the app logged since the last call."""
        try:
            text = (self.workdir / "app.log").read_text(errors="replace")
        except OSError:
            return ""
        new, self.log_offset = text[self.log_offset:], len(text)
        return new

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        if self._context is not None:
            try:
                self._context.__exit__(None, None, None)
            except Exception:  # noqa: BLE001 - stopping an app that died
                pass
        self._context = None

    def rss(self) -> int:
        return tree_rss_bytes(self.process.pid) if self.alive() else 0

    def client(self) -> Client:
        return Client(self.url, verbose=False)


class RawApi:
    """Gradio's HTTP API without gradio_client: /gradio_api/call/<api_name> (POST, then the SSE reply) and
    /gradio_api/queue/join by fn_index (then /gradio_api/queue/data), with a session hash of our choosing."""

    def __init__(self, url: str, timeout: float = 120) -> None:
        self.url, self.timeout = url.rstrip("/") + "/", timeout
        self._local = threading.local()

    @property
    def http(self) -> httpx.Client:
        if getattr(self._local, "http", None) is None:
            self._local.http = httpx.Client(timeout=self.timeout)
        return self._local.http

    def json(self, path: str) -> dict:
        response = self.http.get(self.url + path)
        response.raise_for_status()
        return response.json()

    def upload(self, path: Path) -> str:
        with open(path, "rb") as file:
            response = self.http.post(self.url + "gradio_api/upload", files=[("files", (path.name, file))])
        response.raise_for_status()
        return response.json()[0]

    def call(self, api_name: str, data: list, session_hash: str | None = None) -> dict:
        """{'status', 'event' (complete / error / http), 'data'} of one /gradio_api/call request."""
        body = {"data": data} | ({"session_hash": session_hash} if session_hash else {})
        response = self.http.post(f"{self.url}gradio_api/call/{api_name}", json=body)
        if response.status_code != 200:
            return {"status": response.status_code, "event": "http", "data": response.text[:500]}
        event_id = response.json()["event_id"]
        event, data = None, None
        with self.http.stream("GET", f"{self.url}gradio_api/call/{api_name}/{event_id}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line.partition(":")[2].strip()
                elif line.startswith("data:") and event in ("complete", "error"):
                    data = json.loads(line.partition(":")[2])
                    break
        return {"status": 200, "event": event, "data": data}

    def join(self, fn_index: int, data: list, session_hash: str | None = None) -> dict:
        """{'status', 'event', 'data', 'logs'} of one /gradio_api/queue/join request (private events too)."""
        session_hash = session_hash or secrets.token_hex(8)
        body = {"data": data, "fn_index": fn_index, "session_hash": session_hash, "event_data": None,
                "trigger_id": None}
        response = self.http.post(f"{self.url}gradio_api/queue/join", json=body)
        if response.status_code != 200:
            return {"status": response.status_code, "event": "http", "data": response.text[:500], "logs": []}
        logs, reply = [], {"status": 200, "event": None, "data": None}
        with self.http.stream("GET", f"{self.url}gradio_api/queue/data",
                              params={"session_hash": session_hash}) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line.partition(":")[2])
                if message.get("msg") == "log":
                    logs.append(message.get("log"))
                elif message.get("msg") == "process_completed":
                    output = message.get("output") or {}
                    reply = {"status": 200, "event": "complete" if message.get("success") else "error",
                             "data": output.get("data", output.get("error"))}
                    break
        return reply | {"logs": logs}


def file_values(value: object) -> list[dict]:
    """The file payloads ({'path' / 'url': ...}) anywhere in a reply."""
    if isinstance(value, dict):
        found = [value] if ("url" in value or "path" in value) else []
        return found + [item for child in value.values() for item in file_values(child)]
    if isinstance(value, list):
        return [item for child in value for item in file_values(child)]
    return []


def returns_pixels(api: RawApi, reply: dict, secret: np.ndarray) -> bool:
    """Whether a file in the reply is the secret image (pixel-exact up to rounding), fetched through its URL."""
    for item in file_values(reply.get("data")):
        url = item.get("url") or f"{api.url}gradio_api/file={item.get('path')}"
        try:
            response = api.http.get(url)
            if response.status_code != 200:
                continue
            with Image.open(io.BytesIO(response.content)) as picture:
                pixels = np.asarray(picture.convert("RGB"), dtype=np.int16)
        except Exception:  # noqa: BLE001 - not an image
            continue
        if pixels.shape == secret.shape and np.abs(pixels - secret).mean() <= 1.0:
            return True
    return False


def normalised(reply: dict, replacements: dict[str, str]) -> str:
    """A reply without what differs between any two calls: event ids, temporary file names, durations."""
    text = json.dumps(reply, sort_keys=True)
    for old, new in replacements.items():
        text = text.replace(old, new)
    text = re.sub(r'"(path|url)": "[^"]*"', r'"\1": "<file>"', text)
    text = re.sub(r"[0-9a-f]{16,}", "<id>", text)
    return re.sub(r'"(duration|average_duration|avg_time|cache_duration|eta|rank_eta)": [0-9.e+-]+', r'"\1": 0', text)


def input_override(key: str) -> object:
    """Values that make each file endpoint cheap and its file visible: opacity 0 (the overlay is then the input
    image), a fine-tune of 0 steps on a new class, no password."""
    key = key.lower()
    if "opacity" in key:
        return 0.0
    if "class name" in key or "finetune-class" in key:
        return "probe"
    if "training steps" in key or "finetune-steps" in key:
        return 0
    if "password" in key:
        return ""
    if "folder" in key:
        return ""
    return ...


def file_endpoints(api: RawApi) -> list[dict]:
    """Every event with a file input: how to call it (public by api_name through /call with /info's
    parameters, private by fn_index through /queue/join with all inputs), its default data and file slots."""
    config, info = api.json("config"), api.json("gradio_api/info")
    components = {c["id"]: c for c in config["components"]}
    named = info.get("named_endpoints", {})
    endpoints = []
    for index, dependency in enumerate(config["dependencies"]):
        inputs = [components[i] for i in dependency["inputs"]]
        if not any(c["type"] in FILE_COMPONENTS for c in inputs):
            continue
        fn_index = dependency.get("id", index)
        name = dependency.get("api_name")
        public = dependency.get("api_visibility", "public") == "public" and f"/{name}" in named
        if public:
            parameters = named[f"/{name}"]["parameters"]
            data, slots = [], []
            for position, parameter in enumerate(parameters):
                value = input_override(parameter["label"] or "")
                data.append(parameter.get("parameter_default") if value is ... else value)
                if parameter["component"].lower() in FILE_COMPONENTS:
                    multiple = "list" in str(parameter.get("python_type", {}).get("type", "")).lower()
                    slots.append((position, parameter["label"], multiple))
        else:
            data, slots = [], []
            for position, component in enumerate(inputs):
                props = component.get("props", {})
                value = input_override(f"{props.get('label') or ''} {props.get('elem_id') or ''}")
                data.append(None if component["type"] == "state" else props.get("value") if value is ... else value)
                if component["type"] in FILE_COMPONENTS:
                    slots.append((position, props.get("label"), props.get("file_count") == "multiple"))
        endpoints.append({"fn_index": fn_index, "api_name": name, "route": "call" if public else "queue/join",
                          "data": data, "slots": slots})
    return endpoints


def phase_file_read(app: AbuseApp, record: dict, scratch: Path) -> None:
    """Payloads naming server paths (not uploads) to every file input of every event: an image, a text file
    and a missing file, each named four ways. Got through: the image's pixels come back, or the three replies
    differ (which tells what exists on the server)."""
    api = RawApi(app.url)
    rng = np.random.default_rng(7)
    secret = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    cases = {}
    for case in ("image", "text", "missing"):
        folder = scratch / f"server-{case}"
        folder.mkdir(exist_ok=True)
        cases[case] = folder / "secret.png"
    Image.fromarray(secret).save(cases["image"])
    cases["text"].write_text("root:x:0:0:root:/root:/bin/bash\n" * 20)
    upload_folder = app.workdir / "gradio"
    variants = {
        "path, no meta": lambda p: {"path": str(p)},
        "path + FileData meta": lambda p: {"path": str(p), "meta": {"_type": "gradio.FileData"}, "orig_name": p.name},
        "bare string": lambda p: str(p),
        "../ from the upload folder": lambda p: {"path": f"{upload_folder}/{os.path.relpath(p, upload_folder)}"},
    }
    named = [make(p) for make in variants.values() for p in cases.values()]
    named = ({item if isinstance(item, str) else item["path"] for item in named}
             | {str(p.parent) for p in cases.values()})
    replacements = {text: "<server path>" for text in sorted(named, key=len, reverse=True)}  # longest first
    endpoints = file_endpoints(api)
    record["endpoints"] = [f"{e['route']} {e['api_name']} (fn {e['fn_index']})" for e in endpoints]
    probes, through = [], 0
    for endpoint in endpoints:
        for position, label, multiple in endpoint["slots"]:
            for variant, make in variants.items():
                replies = {}
                for case, path in cases.items():
                    payload = make(path)
                    data = list(endpoint["data"])
                    data[position] = [payload] * 4 if multiple else payload  # a fine-tune needs 4 images
                    if endpoint["route"] == "call":
                        replies[case] = api.call(endpoint["api_name"], data)
                    else:
                        replies[case] = api.join(endpoint["fn_index"], data)
                    record["calls"] += 1
                pixels = returns_pixels(api, replies["image"], secret)
                forms = {case: normalised(reply, replacements) for case, reply in replies.items()}
                differ = len(set(forms.values())) > 1
                echoes = any(str(p.parent) in json.dumps(reply) for p, reply in zip(cases.values(), replies.values()))
                probe = {"endpoint": f"{endpoint['route']} {endpoint['api_name']} (fn {endpoint['fn_index']})",
                         "input": label, "variant": variant, "pixels_returned": pixels, "replies_differ": differ,
                         "echoes_server_path": echoes,
                         "replies": {case: plain(json.dumps(reply["data"]), 300) for case, reply in replies.items()}}
                probe["reached_handler"] = all(reply["event"] == "complete" for reply in replies.values())
                probe["got_through"] = pixels or differ
                through += probe["got_through"]
                probes.append(probe)
                if probe["got_through"]:
                    print(f"  got through: {probe['endpoint']} {label!r} {variant}: pixels {pixels}, "
                          f"replies differ {differ}", flush=True)
    # positive control: the same image uploaded properly comes back pixel-exact in the overlay at opacity 0
    detect_endpoint = next((e for e in endpoints if e["api_name"] == "detect" and e["route"] == "call"), None)
    if detect_endpoint is not None:
        data = list(detect_endpoint["data"])
        data[detect_endpoint["slots"][0][0]] = {"path": api.upload(cases["image"]),
                                                "meta": {"_type": "gradio.FileData"}, "orig_name": "secret.png"}
        record["control_upload_pixels_returned"] = returns_pixels(api, api.call("detect", data), secret)
        record["calls"] += 1
    record["probes"] = probes
    record["got_through"] = through
    record["got_through_text"] = f"{through} of {len(probes)} probes"
    handled = sum(p["reached_handler"] for p in probes)
    record["notes"].append(f"{len(endpoints)} file events ({', '.join(record['endpoints'])}), "
                           f"{len(variants)} ways to name a path; {handled} probes reached the app's handler, "
                           f"{len(probes) - handled} were refused by Gradio first (an error event); control upload "
                           f"pixel-exact: {record.get('control_upload_pixels_returned')}")
    if any(p["echoes_server_path"] for p in probes):
        record["notes"].append("some replies echo the server path")


def phase_bombs(app: AbuseApp, record: dict, scratch: Path, side: int, copies: int) -> None:
    """A flat lossless WebP of side x side px (a few KB, side^2 x 3 bytes decoded) uploaded properly to /detect,
    /score_calibration (`copies` copies) and /finetune (6 copies, 0 steps), all at once."""
    bomb = scratch / "bomb.webp"
    Image.new("RGB", (side, side), (90, 140, 60)).save(bomb, "WEBP", lossless=True)
    files = []
    for i in range(max(copies, 6)):
        copy = scratch / f"bomb_{i}.webp"
        shutil.copyfile(bomb, copy)
        files.append(copy)
    record["notes"].append(f"{side} x {side} WebP of {bomb.stat().st_size} bytes")
    calls = {
        "detect": lambda c: c.submit(handle_file(str(files[0])), "auto", api_name="/detect"),
        "score_calibration": lambda c: c.submit("brick", [handle_file(str(f)) for f in files[:copies]], None, "",
                                                api_name="/score_calibration"),
        "finetune": lambda c: c.submit([handle_file(str(f)) for f in files[:6]], "bomb", 0, False, "",
                                       api_name="/finetune"),
    }
    clients = {name: app.client() for name in calls}
    outcomes = {}

    def one(name: str) -> None:
        started = time.perf_counter()
        try:
            result = calls[name](clients[name]).result(timeout=PHASE_TIMEOUTS["bombs"] - 20)
            text = {"detect": lambda r: r[3], "score_calibration": lambda r: r[2],
                    "finetune": lambda r: r}[name](result)
            decoded = {"detect": lambda r: r[4] is not None, "score_calibration": lambda r: r[0] is not None,
                       "finetune": lambda r: "is ready" in str(r)}[name](result)
            outcomes[name] = {"accepted": decoded, "reply": plain(text), "seconds": time.perf_counter() - started}
        except Exception as error:  # noqa: BLE001
            outcomes[name] = {"accepted": False, "reply": f"error: {plain(error)}",
                              "seconds": time.perf_counter() - started}

    threads = [threading.Thread(target=one, args=(name,), daemon=True) for name in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    record["calls"] = len(calls)
    record["outcomes"] = outcomes
    accepted = [name for name, outcome in outcomes.items() if outcome["accepted"]]
    over = app.sampler.peak() > TARGET_MB * 1024 * 1024
    record["got_through"] = int(over)
    record["got_through_text"] = "yes (over 2 GB)" if over else "no"
    record["notes"].append(f"decoded by {', '.join(accepted) or 'none'}; "
                           + "; ".join(f"{n}: {o['reply'][:120]}" for n, o in outcomes.items() if not o["accepted"]))


def job_state(text: str) -> str:
    """finished / dropped / failed / running / queued / none, from a /finetune_progress reply."""
    found = FINISHED.search(text)
    if found:
        return found.group(1)
    return "running" if RUNNING.search(text) else "none" if "has been started" in text else "queued"


def phase_diffusion_flood(app: AbuseApp, record: dict, clients_count: int, steps: int, deadline: float) -> None:
    """`clients_count` sessions each start a diffusion fine-tune at once; then each session that got one
    drops its changes (/reset_model) and its job must stop."""
    images = [handle_file(str(EXAMPLES / f"{name}_good.png")) for name in NORMAL_IMAGES]
    with ThreadPoolExecutor(8) as pool:
        clients = list(pool.map(lambda _: app.client(), range(clients_count)))
    jobs = [client.submit(images, f"flood{i}", steps, False, "", api_name="/finetune")
            for i, client in enumerate(clients)]
    replies = []
    for job in jobs:
        try:
            replies.append(plain(job.result(timeout=max(5.0, deadline - time.time() - 60)), 2000))
        except Exception as error:  # noqa: BLE001 - Gradio's own "queue full" comes as an error
            replies.append(f"error: {plain(error, 2000)}")
    record["calls"] = len(jobs)
    accepted = [i for i, reply in enumerate(replies) if "runs in the background" in reply]
    refused = [i for i, reply in enumerate(replies) if "queue" in reply.lower() and i not in accepted]
    failed = [i for i in range(len(replies)) if i not in accepted and i not in refused]
    record |= {"accepted": len(accepted), "refused": len(refused), "failed": len(failed),
               "replies": {f"flood{i}": plain(reply, 300) for i, reply in enumerate(replies)}}
    print(f"  diffusion jobs: {len(accepted)} accepted, {len(refused)} refused, {len(failed)} failed", flush=True)
    if failed:
        reasons = sorted({plain(replies[i], 120) for i in failed})
        record["notes"].append(f"{len(failed)} neither accepted nor refused: {' / '.join(reasons)}")
    progress = lambda i: clients[i].predict(api_name="/finetune_progress")  # noqa: E731
    waited = time.time()
    while accepted and time.time() - waited < 60 and not any(job_state(progress(i)) == "running" for i in accepted):
        time.sleep(1)
    record["before_drop"] = {f"flood{i}": plain(progress(i), 160) for i in accepted}
    record["peak_rss_before_drop"] = app.sampler.peak()
    dropped_at = time.time()
    for i in accepted:
        clients[i].predict(api_name="/reset_model")
        record["calls"] += 1
    stopped: dict[str, float] = {}
    states: dict[str, str] = {}
    while len(stopped) < len(accepted) and time.time() - dropped_at < 90 and time.time() < deadline - 15:
        for i in accepted:
            name = f"flood{i}"
            if name not in stopped:
                states[name] = job_state(progress(i))
                if states[name] in ("finished", "dropped", "failed", "none"):
                    stopped[name] = time.time() - dropped_at
        time.sleep(0.5)
    before = cpu_seconds(app.process.pid)
    time.sleep(3)
    busy = (cpu_seconds(app.process.pid) - before) / 3
    running = [name for name in states if name not in stopped]
    record |= {"job_states_after_drop": states, "seconds_to_stop": stopped, "still_running_after_drop": running,
               "server_cpu_after_drop": busy}
    record["got_through"] = len(running)
    record["got_through_text"] = (f"{len(accepted)} accepted / {len(refused)} refused / {len(failed)} failed; "
                                  f"{len(running)} still running after drop")
    slowest = max(stopped.values(), default=0.0)
    record["notes"].append(f"{clients_count} sessions x {len(images)} images, {steps} steps; dropped jobs stopped "
                           f"within {slowest:.1f} s ({', '.join(f'{k}: {v}' for k, v in states.items())}); "
                           f"server CPU {busy:.0%} of a core 3 s later")


def phase_lockout(app: AbuseApp, record: dict, sessions: int, deadline: float) -> None:
    """`sessions` cheap fine-tunes (0 steps) from separate sessions, then a fresh visitor's fine-tune."""
    images = [handle_file(str(EXAMPLES / f"{name}_good.png")) for name in NORMAL_IMAGES]
    with ThreadPoolExecutor(8) as pool:
        clients = list(pool.map(lambda _: app.client(), range(sessions + 1)))
    jobs = [client.submit(images, f"lock{i}", 0, False, "", api_name="/finetune")
            for i, client in enumerate(clients[:-1])]
    replies = []
    for job in jobs:
        try:
            replies.append(plain(job.result(timeout=max(5.0, deadline - time.time() - 40)), 160))
        except Exception as error:  # noqa: BLE001
            replies.append(f"error: {plain(error, 160)}")
    succeeded = sum("is ready" in reply for reply in replies)
    folders_before = len(session_model_folders(app.workdir))
    try:
        fresh = plain(clients[-1].submit(images, "fresh", 0, False, "", api_name="/finetune").result(timeout=60))
    except Exception as error:  # noqa: BLE001
        fresh = f"error: {plain(error)}"
    folders = session_model_folders(app.workdir)
    record["calls"] = len(jobs) + 1
    locked_out = "is ready" not in fresh
    record |= {"succeeded": succeeded, "refusals": sorted({r for r in replies if "is ready" not in r}),
               "fresh_visitor": fresh, "model_folders": len(folders), "model_folders_before_fresh": folders_before,
               "model_folders_mb": sum(disk_bytes(f) for f in folders) / 2**20}
    record["got_through"] = int(locked_out)
    record["got_through_text"] = "yes: the fresh visitor was refused" if locked_out else "no (fresh visitor served)"
    record["notes"].append(f"{succeeded} of {sessions} session fine-tunes succeeded; {len(folders)} session model "
                           f"folders ({record['model_folders_mb']:.0f} MB) after the fresh visitor's")
    if record["refusals"]:
        record["notes"].append(f"refused: {' / '.join(record['refusals'])}")
    if locked_out:
        record["notes"].append(f"fresh visitor: {fresh}")


def phase_progress_flood(app: AbuseApp, record: dict, calls: int, threads: int, deadline: float) -> None:
    """/finetune_progress through raw HTTP, each call with a new session hash."""
    api = RawApi(app.url, timeout=60)
    folders_before = len(session_model_folders(app.workdir))
    files_before = sum(len(names) for _, _, names in os.walk(app.workdir / "gradio"))
    rss_before = app.rss()
    counts: dict[str, int] = {}
    lock = threading.Lock()
    stop_at = deadline - 20

    def one(_: int) -> None:
        if time.time() > stop_at:
            key = "skipped (out of time)"
        else:
            try:
                reply = api.call("finetune_progress", [], session_hash=secrets.token_hex(10))
                key = "ok" if reply["event"] == "complete" else f"{reply['event']} {reply['status']}"
            except Exception as error:  # noqa: BLE001
                key = f"exception {type(error).__name__}"
        with lock:
            counts[key] = counts.get(key, 0) + 1

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(calls)))
    seconds = time.perf_counter() - started
    rss_after = app.rss()
    time.sleep(5)
    folders_after = len(session_model_folders(app.workdir))
    files_after = sum(len(names) for _, _, names in os.walk(app.workdir / "gradio"))
    record["calls"] = calls - counts.get("skipped (out of time)", 0)
    record |= {"replies": counts, "seconds": seconds, "calls_per_s": record["calls"] / seconds,
               "rss_before": rss_before, "rss_after": rss_after, "rss_after_5s": app.rss(),
               "session_folders_before": folders_before, "session_folders_after": folders_after,
               "gradio_files_before": files_before, "gradio_files_after": files_after}
    left = max(0, folders_after - folders_before) + max(0, files_after - files_before)
    record["got_through"] = left
    record["got_through_text"] = f"{left} files/folders left behind"
    mb = 2**20
    record["notes"].append(f"{record['calls_per_s']:.0f} calls/s; RSS {rss_before / mb:.0f} -> {rss_after / mb:.0f} MB "
                           f"({app.rss() / mb:.0f} 5 s later); replies {counts}")


def phase_passwords(app: AbuseApp, record: dict, guesses: int, deadline: float) -> None:
    """(1) Replies to a wrong and to the right admin password for requests that are otherwise invalid must be the
    same. (2) `guesses` rapid wrong passwords on /save_threshold from one client (one address), then the right
    one at once and every 0.2 s until accepted; and 5 wrong then the right one every 0.1 s: how soon after the
    5th failure is a guess evaluated again."""
    wrong = "not-the-" + app.password
    images = [handle_file(str(EXAMPLES / f"{name}_good.png")) for name in NORMAL_IMAGES]
    fresh, attacker = app.client(), app.client()
    # a calibration in the attacker's session, so that /save_threshold gets as far as the password
    calibration = attacker.predict("brick", [handle_file(str(EXAMPLES / "brick_good.png"))],
                                   [handle_file(str(EXAMPLES / "brick_crack.png"))], "", api_name="/score_calibration")
    saved = re.search(r"Saved threshold: ([0-9.eE+-]+)", str(calibration[2]))
    value = float(saved.group(1)) if saved else 0.5  # the shared threshold is saved again unchanged
    record["calls"] += 1
    invalid = {  # each asked with the wrong password first, then the right one (which clears the failures)
        "save_threshold, nothing scored": lambda pw: fresh.predict("brick", 0.5, 0.99, pw,
                                                                   api_name="/save_threshold")[0],
        "save_threshold, threshold 'nan'": lambda pw: attacker.predict("brick", "nan", 0.99, pw,
                                                                       api_name="/save_threshold")[0],
        "finetune, no files": lambda pw: fresh.predict(None, "pwcheck", 0, False, pw, api_name="/finetune"),
        "finetune, 2 files": lambda pw: fresh.predict(images[:2], "pwcheck", 0, False, pw, api_name="/finetune"),
        "finetune, bad class name": lambda pw: fresh.predict(images, "no/such class!", 0, False, pw,
                                                             api_name="/finetune"),
        "finetune, known class, no update": lambda pw: fresh.predict(images, "brick", 0, False, pw,
                                                                     api_name="/finetune"),
    }
    compared = {}
    for name, call in invalid.items():
        replies = {}
        for kind, password in (("wrong", wrong), ("right", app.password)):
            try:
                replies[kind] = plain(call(password))
            except Exception as error:  # noqa: BLE001 - an error event is a reply too
                replies[kind] = f"error: {plain(error)}"
        record["calls"] += 2
        compared[name] = replies | {"differ": replies["wrong"] != replies["right"]}
    record["invalid_requests"] = compared
    differ = [name for name, item in compared.items() if item["differ"]]
    save = lambda pw: plain(attacker.predict("brick", value, 0.99, pw, api_name="/save_threshold")[0])  # noqa: E731
    accepted = lambda reply: "Saved threshold" in reply  # noqa: E731

    def first_accepted(interval: float, limit: float) -> tuple[float | None, int]:
        """Seconds until the right password is accepted, and the refused tries before."""
        started, tries = time.perf_counter(), 0
        while time.perf_counter() - started < limit and time.time() < deadline - 5:
            tries += 1
            if accepted(save(app.password)):
                return time.perf_counter() - started, tries - 1
            time.sleep(interval)
        return None, tries

    record["first_right_password"] = save(app.password)  # the reference reply (resets this client's failures)
    # (a) 5 wrong, then the right one every 0.1 s
    for _ in range(5):
        save(wrong)
    after_five, refused_five = first_accepted(0.1, 20)
    # (b) the burst
    started = time.perf_counter()
    burst = [save(wrong) for _ in range(guesses)]
    burst_s = time.perf_counter() - started
    immediate = accepted(save(app.password))
    lockout, refused_burst = (0.0, 0) if immediate else first_accepted(0.2, 75)
    record["calls"] += 6 + refused_five + guesses + 1 + refused_burst + (0 if immediate else 1)
    sent_rate = guesses / burst_s
    evaluated = sent_rate if (after_five is not None and after_five < 0.05) or immediate else (
        1 / after_five if after_five else 0.0)
    record |= {"wrong_replies": sorted(set(burst)), "burst_seconds": burst_s, "guesses_sent_per_s": sent_rate,
               "right_password_after_5_wrong_accepted_after_s": after_five, "refused_right_tries_after_5": refused_five,
               "right_password_right_after_burst_accepted": immediate, "lockout_after_burst_s": lockout,
               "refused_right_tries_after_burst": refused_burst, "evaluated_guesses_per_s_after_5": evaluated,
               "invalid_request_replies_differ": differ}
    too_fast = immediate or (after_five is not None and after_five < 0.95)
    record["got_through"] = int(too_fast) + len(differ)
    record["got_through_text"] = (f"{evaluated:.1f} guesses/s evaluated after 5 failures"
                                  f"{' (over 1/s)' if too_fast else ''}; wrong/right replies differ on "
                                  f"{len(differ)} of {len(compared)} invalid requests")
    record["notes"].append(
        f"burst of {guesses} sent at {sent_rate:.1f}/s; right password right after it "
        f"{'accepted' if immediate else f'refused for {lockout:.1f} s' if lockout else 'never accepted'}; "
        f"after 5 wrong, accepted after {after_five if after_five is None else round(after_five, 2)} s")
    if differ:
        record["notes"].append("wrong and right password answered differently: " + "; ".join(
            f"{name} (wrong: {compared[name]['wrong'][:70]} / right: {compared[name]['right'][:70]})"
            for name in differ))
    if not accepted(record["first_right_password"]):
        record["notes"].append(f"the right password was not accepted: {record['first_right_password'][:120]}")


def run_abuse(args: argparse.Namespace) -> dict:
    """The abuse phases, one after another against one `app.py --public --admin-password
    <random>` (restarted when a phase killed it or left its fine-tuning broken); each phase catches its own
    errors and has a time limit, all phases together at most `args.budget` seconds. Each reports the peak RSS
    of the server's process tree, the peak disk use of its folders and what got through:

    1. file read: raw HTTP to every event with a file input (public ones by api_name through /gradio_api/call,
       private ones by fn_index through /gradio_api/queue/join), the file named as a server path (an image, a
       text file, a missing file; four ways to name it). Got through: the image's pixels come back (overlay at
       opacity 0), or the replies to the three differ. A proper upload of the image is the control.
    2. bombs: a flat lossless WebP (a few KB, --bomb-side px square) to /detect, /score_calibration and
       /finetune at once. Got through: peak RSS over 2 GB.
    3. diffusion flood: --flood-clients sessions start a diffusion fine-tune at once; accepted vs refused; each
       session that got one drops its changes (/reset_model). Got through: jobs still running after that.
    4. model-folder lockout: --lockout-sessions fine-tunes of 0 steps from separate sessions, then a fresh
       visitor's. Got through: the fresh visitor is refused.
    5. progress flood: --progress-calls /finetune_progress calls, each from a new session. Got through: files
       or folders left behind (RSS before / after in the notes).
    6. password guessing: replies to a wrong and the right admin password on otherwise invalid requests must
       be the same; --guesses rapid wrong passwords, then the right one. Got through: a guess evaluated sooner
       than 1 s after the 5th failure, and each invalid request answered differently.
    """
    began = time.time()
    phases: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-app-abuse-") as scratch:
        workdir = Path(scratch)
        inputs = workdir / "inputs"  # our files, outside the app's folders (not counted as its disk)
        inputs.mkdir()
        app = AbuseApp(args.model, workdir)
        app.start()
        print(f"app started in {app.start_seconds[0]:.1f} s at {app.url}", flush=True)
        start_rss = app.sampler.peak()
        plan = [
            ("file read", lambda r, d: phase_file_read(app, r, inputs)),
            ("bombs", lambda r, d: phase_bombs(app, r, inputs, args.bomb_side, args.bomb_copies)),
            ("diffusion flood", lambda r, d: phase_diffusion_flood(app, r, args.flood_clients, args.flood_steps, d)),
            ("model-folder lockout", lambda r, d: phase_lockout(app, r, args.lockout_sessions, d)),
            ("progress flood", lambda r, d: phase_progress_flood(app, r, args.progress_calls, args.progress_threads,
                                                                d)),
            ("password guessing", lambda r, d: phase_passwords(app, r, args.guesses, d)),
        ]
        broken = None  # why the app must be restarted before the next phase
        for name, body in plan:
            record = {"phase": name, "calls": 0, "got_through": None, "got_through_text": "-", "notes": []}
            phases.append(record)
            left = args.budget - (time.time() - began)
            if left < 30:
                record["error"] = "skipped: the run's time budget is spent"
                print(f"{name}: skipped", flush=True)
                continue
            try:
                note = app.ensure_running(broken)
                broken = None
            except Exception as error:  # noqa: BLE001 - the app cannot be started again
                record["error"] = f"the app could not be restarted: {error}"
                break
            if note:
                record["notes"].append(note)
            timeout = min(PHASE_TIMEOUTS[name], left)
            deadline = time.time() + timeout
            app.sampler.reset()
            app.disk.reset()
            record["rss_start"] = app.rss()
            started = time.perf_counter()

            def guarded(record=record, body=body, deadline=deadline) -> None:
                try:
                    body(record, deadline)
                except Exception as error:  # noqa: BLE001 - a phase's failure is a result, not the end of the run
                    record["error"] = f"{type(error).__name__}: {plain(error, 400)}"
                    record["traceback"] = traceback.format_exc()[-3000:]

            worker = threading.Thread(target=guarded, daemon=True, name=f"phase {name}")
            worker.start()
            worker.join(timeout)
            if worker.is_alive():
                record["error"] = f"timed out after {timeout:.0f} s (partial results)"
            record["seconds"] = time.perf_counter() - started
            record["peak_rss"] = app.sampler.peak() if app.alive() else app.sampler._peak
            record["rss_end"] = app.rss()
            record["disk"] = app.disk.peaks()
            record["app_alive_after"] = app.alive()
            if not app.alive():
                record["notes"].append(f"the app died (exit code {app.process.returncode})")
            log = app.new_log()
            errors = [line.strip() for line in log.splitlines()
                      if re.search(r"Error|Exception|Traceback", line) and "should be kept in float32" not in line]
            record["app_log_error_lines"], record["app_log_errors"] = len(errors), errors[-12:]
            if any(marker in log for marker in META_BROKEN):
                broken = "the previous phase left the app building torch modules on the meta device"
                record["notes"].append("the app built torch modules on the meta device (concurrent model loads leave "
                                       "nn.Module.register_parameter patched by accelerate's init_empty_weights), so "
                                       "its fine-tunes fail from then on; restarted before the next phase")
            summary = {k: v for k, v in record.items() if k in ("calls", "got_through_text", "seconds", "error")}
            print(f"{name}: {summary} peak RSS {record['peak_rss'] / 2**20:.0f} MB", flush=True)
        end_rss = app.rss()
        app.stop()
        app.disk.stop()
    peak = max([start_rss] + [item.get("peak_rss", 0) for item in phases])
    return {
        "model": str(args.model), "mode": "abuse", "app": "app.py --public --admin-password <random>",
        "settings": {k: getattr(args, k) for k in ("bomb_side", "bomb_copies", "flood_clients", "flood_steps",
                                                     "lockout_sessions", "progress_calls", "progress_threads",
                                                     "guesses", "budget")},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "start_seconds": app.start_seconds, "restarts": app.restarts, "start_rss": start_rss,
        "phases": phases, "peak_rss": peak, "rss_end": end_rss, "seconds": time.time() - began,
    }


def abuse_table(report: dict) -> str:
    mb = 2**20
    rows = ["| phase | calls | got through | peak RSS MB | disk MB | notes |", "|---|---:|---|---:|---:|---|"]
    for item in report["phases"]:
        notes = "; ".join(item["notes"] + ([f"ERROR {item['error']}"] if item.get("error") else []))
        disk = item.get("disk", {})
        rows.append(f"| {item['phase']} | {item['calls']} | {item['got_through_text']} | "
                    f"{item.get('peak_rss', 0) / mb:.0f} | {disk.get('total', 0) / mb:.1f} | "
                    f"{notes.replace('|', '/')} |")
    verdict = "meets" if report["peak_rss"] <= TARGET_MB * mb else "misses"
    rows.append("")
    rows.append(f"Peak RSS {report['peak_rss'] / mb:.0f} MB over the whole abuse run ({verdict} the {TARGET_MB} MB "
                f"target); disk MB = peak of Gradio's temp folder + the app's TMPDIR (visitors' models) + user "
                f"models during the phase; {report['seconds']:.0f} s in all, {report['restarts']} restart(s).")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder or hub id the app serves")
    parser.add_argument("--steps", type=int, default=20, help="fine-tune steps")
    parser.add_argument("--uploads", type=int, default=4, help="large images uploaded for the fine-tune")
    parser.add_argument("--side", type=int, default=4000, help="side of the fine-tune images, px")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idling before the last RSS reading")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"report (default {DEFAULT_OUT.relative_to(ROOT)}; with --abuse "
                        f"{ABUSE_OUT.relative_to(ROOT)})")
    abuse = parser.add_argument_group("abuse phases")
    abuse.add_argument("--abuse", action="store_true",
                       help="run the abuse phases against app.py --public --admin-password <random> instead")
    abuse.add_argument("--bomb-side", type=int, default=7000, help="side of the flat lossless WebP, px")
    abuse.add_argument("--bomb-copies", type=int, default=8, help="copies sent to /score_calibration")
    abuse.add_argument("--flood-clients", type=int, default=10, help="sessions starting a diffusion fine-tune")
    abuse.add_argument("--flood-steps", type=int, default=50, help="steps of each flooding fine-tune")
    abuse.add_argument("--lockout-sessions", type=int, default=20, help="sessions fine-tuning with 0 steps")
    abuse.add_argument("--progress-calls", type=int, default=3000, help="/finetune_progress calls, new sessions")
    abuse.add_argument("--progress-threads", type=int, default=16)
    abuse.add_argument("--guesses", type=int, default=30, help="rapid wrong admin passwords")
    abuse.add_argument("--budget", type=float, default=780, help="seconds for all abuse phases together")
    args = parser.parse_args(argv)
    out = args.out or (ABUSE_OUT if args.abuse else DEFAULT_OUT)
    report = run_abuse(args) if args.abuse else run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(abuse_table(report) if args.abuse else table(report))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
