"""Inference speed, memory and FLOPs of VLMDiffPipeline on CPU.

For each model (the default model folder, or the random `tiny` preset, and the paper-sized
`sd15` preset with random weights) at 256 px and 10 DDIM steps:

- latency per image at batch 1 (median of repeated full `pipeline(images)` calls after a
  warm-up) and throughput at larger batches;
- peak RSS of the process that loaded and ran the model (each model runs in its own
  subprocess, so the numbers do not mix);
- a per-stage split (the pipeline's own stages through its public `stage_hook`: preprocess,
  memory embedding, encode, denoising loop, decode, component maps, fuse + results), timed and FLOP-counted
  (torch.utils.flop_counter: matmuls, convolutions and attention; elementwise ops are not
  counted);
- this machine's float32 matmul rate (2048 x 2048 x 2048 matmuls) and the achieved FLOP/s as
  a fraction of it, overall and in the denoising loop;
- an overhead check: the same modules driven by a plain hand-written loop of diffusers calls
  (encode, add_noise, for t: guided UNet + scheduler.step, decode) against
  `pipeline.reconstruct`; the ratio pipeline / hand loop (target <= 1.05).

Prints Markdown tables and writes benchmarks/results/inference.json.

Threads: every measurement runs with torch.set_num_threads(--threads), 2 by default (the
2-core target machine). Run on a quiet machine: other processes distort every number.

    python benchmarks/bench_inference.py                       # full run
    python benchmarks/bench_inference.py --quick               # smoke test, minutes
    python benchmarks/bench_inference.py --model assets/vlmdiff-default --skip-sd15
"""
from __future__ import annotations

import argparse
import contextlib
from dataclasses import asdict
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vlmdiff.model_folder import MODEL_INDEX
from vlmdiff.pipeline import STAGES

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "assets" / "vlmdiff-default"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "inference.json"


# --------------------------------------------------------------------------- helpers
def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def matmul_rate(size: int = 2048, repeats: int = 5) -> dict:
    """float32 FLOP/s of size^3 matmuls (2 size^3 FLOPs each): best and median of `repeats`, after a warm-up."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    flops = 2 * size**3
    return {"size": size, "repeats": repeats, "best_flops_per_s": flops / min(times), "median_flops_per_s": flops / median(times)}


def random_images(count: int, size: int, seed: int = 0):
    """Deterministic RGB noise images, smoothed a little (content does not change the cost)."""
    import numpy as np
    from PIL import Image, ImageFilter

    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(2))
        for _ in range(count)
    ]


class StageClock:
    """Times (and optionally FLOP-counts) named stages of one inference."""

    def __init__(self, count_flops: bool = False) -> None:
        self.seconds: dict[str, float] = {}
        self.flops: dict[str, int] = {}
        self.count_flops = count_flops

    @contextlib.contextmanager
    def stage(self, name: str):
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False) if self.count_flops else contextlib.nullcontext()
        start = time.perf_counter()
        with counter:
            yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        if self.count_flops:
            self.flops[name] = self.flops.get(name, 0) + counter.get_total_flops()


# --------------------------------------------------------------------------- the pipeline, stage by stage
def staged_inference(pipe, pil_images, strength: float, steps: int, seed: int, clock: StageClock) -> None:
    """`pipe(pil_images)` itself, each stage timed through the pipeline's public stage hook."""
    pipe.stage_hook = clock.stage
    try:
        pipe(pil_images, strength=strength, num_inference_steps=steps, seed=seed)
    finally:
        pipe.stage_hook = None


def hand_loop(pipe, images, strength: float, steps: int, seed: int, encode_hint_once: bool):
    """The same modules through plain diffusers calls: what a user would write without the pipeline.

    The denoiser is the one function the pipeline and the trainer call (`guided_unet`).
    encode_hint_once: give the SG network the hint encoded once (what the pipeline does);
    otherwise the ControlNet encodes it at every step.
    """
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL

    from vlmdiff.models import guided_unet

    vae, unet, guidance, scheduler = pipe.autoencoder, pipe.unet, pipe.guidance, pipe.scheduler
    with torch.inference_mode():
        if isinstance(vae, AutoencoderKL):
            latents = vae.encode(images * 2 - 1).latent_dist.mode() * vae.config.scaling_factor
        else:
            latents = vae.encode_latents(images)
        context = pipe.caption_context(None, len(images))
        hint = images
        if pipe.config.hint_downsample > 1:
            small = F.interpolate(images, scale_factor=1 / pipe.config.hint_downsample, mode="area")
            hint = F.interpolate(small, size=images.shape[-2:], mode="bilinear", align_corners=False)
        hint = hint * 2 - 1
        if encode_hint_once and guidance is not None:
            hint = guidance.embed_hint(hint)
        scheduler.set_timesteps(steps)
        timesteps = [t for t in scheduler.timesteps if t <= strength * (scheduler.config.num_train_timesteps - 1)]
        noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(seed)) for _ in latents])
        x = scheduler.add_noise(latents, noise, timesteps[0].repeat(len(latents)))
        for t in timesteps:
            prediction = guided_unet(unet, guidance, x, t.repeat(len(x)), context, hint, pipe.config.sg_residuals)
            x = scheduler.step(prediction, t, x, eta=0.0).prev_sample
        if isinstance(vae, AutoencoderKL):
            return ((vae.decode(x / vae.config.scaling_factor).sample + 1) / 2).clamp(0, 1)
        return vae.decode_latents(x)


# --------------------------------------------------------------------------- one model (runs in a subprocess)
def load_model(spec: dict):
    """A pipeline for a spec: {"folder": path} or {"preset": name, "memory_images": n}."""
    import torch

    from vlmdiff import VLMDiffPipeline
    from vlmdiff.scoring import MEMORY

    if spec.get("folder"):
        return VLMDiffPipeline.from_pretrained(spec["folder"])
    pipe = VLMDiffPipeline.from_preset(spec["preset"])
    if spec["preset"] == "sd15":
        # The paper's CLIP ViT-L/14 text tower is a download; the empty-caption context is
        # computed once per process and cached, so a zero context of its shape costs the same.
        dim = pipe.unet.config.cross_attention_dim
        pipe.caption_context = lambda captions, batch: torch.zeros(batch, 77, dim)
    if spec.get("memory_images"):
        # A random model has no memory: fit one on noise images (one class) so its cost shows.
        from vlmdiff.memory import NormalFeatureMemory

        images = random_images(spec["memory_images"], spec["resolution"], seed=1)
        pipe.memory = NormalFeatureMemory.fit(images, ["bench"] * len(images)).eval()
        pipe.config.anomaly.weights[MEMORY] = 1.0
    return pipe


def bench_model(spec: dict) -> dict:
    import torch

    from vlmdiff.images import images_to_tensor
    from vlmdiff.pipeline import DetectionSettings

    torch.set_num_threads(spec["threads"])
    rss_start = current_rss_bytes()
    start = time.perf_counter()
    pipe = load_model(spec)
    load_seconds = time.perf_counter() - start
    pipe.config.resolution = spec["resolution"]
    rss_loaded = current_rss_bytes()
    steps, seed, repeats = spec["steps"], 0, spec["repeats"]
    strength = pipe.config.strength if spec["strength"] is None else spec["strength"]
    images = random_images(max(spec["batches"]), spec["resolution"])
    parameters = {
        name: sum(p.numel() for p in module.parameters())
        for name, module in (("autoencoder", pipe.autoencoder), ("unet", pipe.unet), ("guidance", pipe.guidance))
        if module is not None
    }

    # warm-up that also counts the FLOPs of one inference, stage by stage
    flop_clock = StageClock(count_flops=True)
    staged_inference(pipe, images[:1], strength, steps, seed, flop_clock)

    stage_runs = []
    for _ in range(repeats):
        clock = StageClock()
        staged_inference(pipe, images[:1], strength, steps, seed, clock)
        stage_runs.append(clock.seconds)
    stage_seconds = {name: median([run.get(name, 0.0) for run in stage_runs]) for name in STAGES}

    latencies = []
    for _ in range(repeats):
        begin = time.perf_counter()
        results = pipe(images[:1], num_inference_steps=steps, strength=strength, seed=seed, batch_size=1)
        latencies.append(time.perf_counter() - begin)

    throughput = {}
    for batch in spec["batches"]:
        if batch == 1:
            throughput["1"] = 1 / median(latencies)
            continue
        times = []
        for _ in range(spec["batch_repeats"]):
            begin = time.perf_counter()
            pipe(images[:batch], num_inference_steps=steps, strength=strength, seed=seed, batch_size=batch)
            times.append(time.perf_counter() - begin)
        throughput[str(batch)] = batch / median(times)

    # overhead: pipeline.reconstruct vs the hand loop, interleaved, batch 1
    tensor = images_to_tensor(images[:1], spec["resolution"])
    settings = DetectionSettings(strength, steps, seed).resolved(pipe.config)
    once = pipe.guidance is not None
    pipe_times, hand_times, plain_times = [], [], []
    with torch.inference_mode():
        for _ in range(spec["overhead_repeats"]):
            begin = time.perf_counter()
            _, _, from_pipe, _ = pipe.reconstruct(tensor, settings)
            pipe_times.append(time.perf_counter() - begin)
            begin = time.perf_counter()
            from_hand = hand_loop(pipe, tensor, strength, steps, seed, encode_hint_once=once)
            hand_times.append(time.perf_counter() - begin)
            if once and spec["plain_loop"]:
                begin = time.perf_counter()
                hand_loop(pipe, tensor, strength, steps, seed, encode_hint_once=False)
                plain_times.append(time.perf_counter() - begin)
    overhead = {
        "pipeline_reconstruct_s": median(pipe_times),
        "hand_loop_s": median(hand_times),
        "ratio": median(pipe_times) / median(hand_times),
        "hand_loop_encodes_hint_once": once,
        "max_abs_difference": float((from_pipe - from_hand).abs().max()),
    }
    if plain_times:
        overhead["plain_controlnet_loop_s"] = median(plain_times)
        overhead["ratio_vs_plain_controlnet_loop"] = median(pipe_times) / median(plain_times)

    total_flops = sum(flop_clock.flops.values())
    return {
        "label": spec["label"],
        "model": spec.get("folder") or f"preset {spec['preset']} (random weights)",
        "parameters": parameters,
        "memory_bank": int(len(pipe.memory.bank)) if pipe.memory is not None else 0,
        "strength": strength,
        "memory_guidance": pipe.config.memory_guidance,
        "anomaly": asdict(pipe.config.anomaly),
        "load_s": load_seconds,
        "latency_s": median(latencies),
        "latency_runs_s": latencies,
        "throughput_images_per_s": throughput,
        "stage_s": stage_seconds,
        "stage_flops": flop_clock.flops,
        "total_flops": total_flops,
        "overhead": overhead,
        "rss_start_bytes": rss_start,
        "rss_loaded_bytes": rss_loaded,
        "peak_rss_bytes": peak_rss_bytes(),
    }


# --------------------------------------------------------------------------- driver
def run_worker(spec: dict) -> dict:
    """Run one model's benchmark in a fresh interpreter (separate peak RSS)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--worker", json.dumps(spec), "--worker-out", str(out)]
        completed = subprocess.run(command, cwd=ROOT)
        if completed.returncode != 0 or not out.is_file():
            return {"label": spec["label"], "error": f"worker exited with {completed.returncode}"}
        return json.loads(out.read_text())


def gflops(value: float) -> str:
    return f"{value / 1e9:.1f}"


def markdown(report: dict) -> str:
    rate = report["matmul"]["best_flops_per_s"]
    lines = [
        f"float32 matmul rate ({report['matmul']['size']}^3, {report['settings']['threads']} threads): "
        f"best {gflops(rate)} GFLOP/s, median {gflops(report['matmul']['median_flops_per_s'])} GFLOP/s",
        "",
        "| model | latency b1 (s/img) | " + " | ".join(f"img/s b{b}" for b in report["settings"]["batches"])
        + " | peak RSS (MB) | GFLOP/img | achieved/matmul | denoise achieved/matmul | pipeline/hand loop |",
        "|---|---:|" + "---:|" * len(report["settings"]["batches"]) + "---:|---:|---:|---:|---:|",
    ]
    rows = [m for m in report["models"] if "error" not in m]
    for m in rows:
        denoise_rate = m["stage_flops"].get("denoise", 0) / max(m["stage_s"]["denoise"], 1e-12)
        cells = [
            m["label"], f"{m['latency_s']:.3f}",
            *(f"{m['throughput_images_per_s'][str(b)]:.2f}" if str(b) in m["throughput_images_per_s"] else "-"
              for b in report["settings"]["batches"]),
            f"{m['peak_rss_bytes'] / 2**20:.0f}", gflops(m["total_flops"]),
            f"{m['total_flops'] / m['latency_s'] / rate:.1%}", f"{denoise_rate / rate:.1%}",
            f"{m['overhead']['ratio']:.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Stages at batch 1 (median seconds, GFLOP counted by torch.utils.flop_counter):", ""]
    lines += ["| model | " + " | ".join(STAGES) + " |", "|---|" + "---:|" * len(STAGES)]
    for m in rows:
        cells = [f"{m['stage_s'][s]:.3f} s / {gflops(m['stage_flops'].get(s, 0))}" for s in STAGES]
        lines.append(f"| {m['label']} | " + " | ".join(cells) + " |")
    for m in report["models"]:
        if "error" in m:
            lines.append(f"\n{m['label']}: FAILED ({m['error']})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help=f"model folder (default: {DEFAULT_MODEL.relative_to(ROOT)} if present, else the random tiny preset)")
    parser.add_argument("--skip-sd15", action="store_true", help="do not run the paper-sized sd15 preset")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--strength", type=float, help="denoising strength (default: each model's own)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per measurement (median)")
    parser.add_argument("--sd15-repeats", type=int, default=1)
    parser.add_argument("--batches", default="1,4,8", help="batch sizes for throughput")
    parser.add_argument("--sd15-batches", default="1")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every measurement")
    parser.add_argument("--memory-images", type=int, default=8,
                        help="a random tiny model gets a memory fitted on this many noise images (0: none)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 repeat, batches 1,2, sd15 at 64 px / 2 steps")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = bench_model(json.loads(args.worker))
        Path(args.worker_out).write_text(json.dumps(result))
        return 0

    import torch

    torch.set_num_threads(args.threads)
    batches = [1, 2] if args.quick else [int(b) for b in args.batches.split(",")]
    repeats = 1 if args.quick else args.repeats
    base = dict(
        threads=args.threads, steps=args.steps, strength=args.strength, resolution=args.resolution,
        repeats=repeats, batch_repeats=1 if args.quick else max(1, repeats // 2), batches=batches,
        overhead_repeats=1 if args.quick else repeats, plain_loop=True,
    )
    folder = args.model or (str(DEFAULT_MODEL) if (DEFAULT_MODEL / MODEL_INDEX).is_file() else None)
    specs = [
        dict(base, label=f"default ({Path(folder).name})", folder=folder) if folder
        else dict(base, label="tiny (random)", preset="tiny", memory_images=args.memory_images)
    ]
    if not args.skip_sd15:
        sd15_batches = [1] if args.quick else [int(b) for b in args.sd15_batches.split(",")]
        sd15 = dict(base, label="sd15 (random, paper sizes)", preset="sd15", batches=sd15_batches,
                    repeats=1 if args.quick else args.sd15_repeats, batch_repeats=1,
                    overhead_repeats=1 if args.quick else args.sd15_repeats, plain_loop=False)
        if args.quick:
            sd15.update(resolution=64, steps=2)
        specs.append(sd15)

    print(f"matmul rate ({args.threads} threads)...", flush=True)
    matmul = matmul_rate(repeats=2 if args.quick else 5)
    models = []
    for spec in specs:
        print(f"benchmarking {spec['label']}...", flush=True)
        models.append(run_worker(spec))
    report = {
        "settings": dict(base, quick=args.quick, sd15=not args.skip_sd15),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "load_average": os.getloadavg()},
        "matmul": matmul,
        "models": models,
    }
    report["markdown"] = markdown(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(report["markdown"])
    print(f"wrote {args.out}")
    return 0 if all("error" not in m for m in models) else 1


if __name__ == "__main__":
    sys.exit(main())
