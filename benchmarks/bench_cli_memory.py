"""Peak memory of the CLI on huge images: `vlmdiff predict` of one 7000 x 7000 PNG
and `vlmdiff finetune --memory-only` of six, on the shipped model, each in a subprocess.

The images are example images upscaled (bicubic) to the side asked for, so they compress like photos
rather than like a flat colour. A thread samples the resident memory of the command's process tree
(VmRSS in /proc, bench_app.RssSampler) every 50 ms. Targets: predict <= 1.5 GB. Prints a Markdown
table and writes benchmarks/results/cli_memory.json.

    OMP_NUM_THREADS=2 python benchmarks/bench_cli_memory.py [--model assets/vlmdiff-default] [--side 7000]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_app import EXAMPLES, ROOT, RssSampler  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "cli_memory.json"
TARGETS_MB = {"predict": 1536}
FINETUNE_IMAGES = 6


def make_images(folder: Path, side: int, count: int) -> list[Path]:
    """`count` example images (normal ones first) upscaled to side x side PNGs in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted(EXAMPLES.glob("*_good.png")) + sorted(EXAMPLES.glob("*.png"))
    paths = []
    for source in sources[:count]:
        path = folder / f"{source.stem}_{side}.png"
        Image.open(source).convert("RGB").resize((side, side), Image.Resampling.BICUBIC).save(path)
        paths.append(path)
    return paths


def measure(command: list[str]) -> dict:
    """Run `command`; its wall time, exit code and the peak RSS of its process tree."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = RssSampler(process.pid)
    sampler.start()
    output, _ = process.communicate()
    sampler.stop()
    peak = sampler.peak()  # the process has ended: its samples are all there is
    if process.returncode:
        print(output, file=sys.stderr)
    return {"command": " ".join(command), "exit_code": process.returncode, "seconds": time.perf_counter() - started,
            "peak_rss_mb": peak / 2**20}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "vlmdiff-default"))
    parser.add_argument("--side", type=int, default=7000, help="side of the square test images (px)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    cli = [sys.executable, "-m", "vlmdiff.cli"]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        images = make_images(scratch / "images", args.side, FINETUNE_IMAGES)
        runs = {
            "predict": measure([*cli, "predict", args.model, str(images[0]), "--out", str(scratch / "predict")]),
            "finetune": measure([*cli, "finetune", args.model, "--images", str(scratch / "images"), "--class", "bench",
                                 "--memory-only", "--out", str(scratch / "finetuned")]),
        }
        overlay = Image.open(scratch / "predict" / f"{images[0].stem}_overlay.png").size
    document = {
        "model": args.model, "side": args.side, "finetune_images": FINETUNE_IMAGES, "overlay_size": overlay,
        "targets_mb": TARGETS_MB, "runs": runs,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"| command ({args.side} x {args.side} PNG) | peak RSS (MB) | target (MB) | seconds | exit |")
    print("|---|---:|---:|---:|---:|")
    for name, run in runs.items():
        target = TARGETS_MB.get(name, "")
        print(f"| {name} | {run['peak_rss_mb']:.0f} | {target} | {run['seconds']:.1f} | {run['exit_code']} |")
    print(f"\noverlay written at {overlay[0]} x {overlay[1]}; results in {args.out}")


if __name__ == "__main__":
    main()
