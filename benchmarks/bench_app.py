"""Latency and memory of the running app (issue 13, item 2): app.py in a subprocess, offline, on the
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
- after: the examples again, then the app idles.

A thread samples the resident memory of the server process and its children (VmRSS in
/proc) every 50 ms; each phase reports its peak. Target: peak <= 2 GB. Prints a Markdown
table and writes benchmarks/results/app.json.

    OMP_NUM_THREADS=1 python benchmarks/bench_app.py [--model assets/vlmdiff-default] [--steps 20]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gradio_client import Client, handle_file
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vlmdiff.app.testing import app_process  # noqa: E402

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
            assert "Fine-tuned class 'bench'" in summary, summary
            flat = [handle_file(str(p)) for p in images["refused"]]
            [refusal] = phase("refused fine-tune (8 x 8000^2)",
                              [lambda: client.predict(flat, "flat", args.steps, False, "", api_name="/finetune")])
            assert "cannot be used" in refusal or "megapixels" in refusal, refusal
            phase("examples after", [lambda image=image: detect(client, image) for image in examples])
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
                f"{report['idle_rss_end'] / mb:.0f} MB when idle at the end.")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model folder or hub id the app serves")
    parser.add_argument("--steps", type=int, default=20, help="fine-tune steps")
    parser.add_argument("--uploads", type=int, default=4, help="large images uploaded for the fine-tune")
    parser.add_argument("--side", type=int, default=4000, help="side of the fine-tune images, px")
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idling before the last RSS reading")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
