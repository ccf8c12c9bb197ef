"""Does the caption steer what the diffusion draws? Two measurements per model.

1. (with --data and --captions) Generation from pure noise (strength 1.0, no input image) with captions of each class's normal
   training images, and with the empty caption: each generated image is given the class whose mean
   EfficientNet-Lite0 feature is nearest (class means fitted on `--match-images` training images per
   class). "Follows the caption" = the share drawn as the caption's class (chance: 1 / classes).
2. Reconstructions of the test images of `--recon-data` (the logical classes; `--classes` to pick) conditioned on the
   captioner's description of each test image against the empty caption, whole image (no memory
   guidance), at each `--strengths`: reconstruction-only I-AUROC / AUPRO, defect removal and PSNR
   outside the defect against the defect-free source.

    python benchmarks/bench_caption_steering.py --models shipped=assets/vlmdiff-default \\
        caption=runs/steer/caption/model empty=runs/steer/empty/model \\
        --data runs/bench_demo ../shared/data/mvtec3d_tire runs/logical --captions runs/steer/captions_bench_demo.json \\
        runs/steer/captions_mvtec3d_tire.json runs/steer/captions_logical.json \\
        --recon-data runs/logical --out benchmarks/results/caption_steering.json --grid docs/caption_steering.jpg \\
        --recon-grid docs/caption_steering_reconstructions.jpg --recon-examples bottle/test/fill_level/000.png \\
        bottle/test/swapped_label/000.png box/test/swapped_items/000.png box/test/missing_item/000.png \\
        connector/test/swapped_wires/000.png pins/test/extra_pin/000.png
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlmdiff import DetectionSettings, VLMDiffPipeline
from vlmdiff.captioning import create_captioner
from vlmdiff.captioning.store import CaptionStore
from vlmdiff.data import read_dataset
from vlmdiff.images import load_image
from vlmdiff.map_variants import evaluate_map_variants
from vlmdiff.memory import NormalFeatureMemory
from vlmdiff.scoring import MEMORY, RECONSTRUCTION

sys.path.insert(0, str(Path(__file__).resolve().parent))
from show_reconstructions import labelled, save_sheet  # noqa: E402

TILE = 128  # side of a picture's tiles
GRID_STRENGTHS = [0.8, 1.0]  # the reconstruction picture's columns
CLASS_MEAN_VECTORS = 50  # only the class means matter for the match


@torch.inference_mode()
def generate(pipe: VLMDiffPipeline, captions: list[str] | None, count: int, seed: int, guidance: float) -> list[Image.Image]:
    """`count` images drawn from pure noise with the captions (None: the empty caption), 10 DDIM steps."""
    settings = DetectionSettings(strength=1.0, seed=seed, guidance_scale=guidance, captions=captions).resolved(pipe.config)
    side = pipe.config.resolution
    latents = pipe.encode(torch.zeros(1, 3, side, side))
    noise = torch.stack([torch.randn(latents.shape[1:], generator=torch.Generator().manual_seed(seed + i))
                         for i in range(count)])
    context = pipe.caption_context(captions, count)
    uncond = pipe.caption_context(None, count) if captions is not None else None
    hint = torch.zeros(count, 3, side, side)
    denoised = pipe.denoise(noise * pipe.scheduler.init_noise_sigma, pipe.timesteps(settings), hint, context,
                            settings.guidance_scale, uncond)
    pixels = pipe.decode(denoised).clamp(0, 1).permute(0, 2, 3, 1).mul(255).byte().numpy()
    return [Image.fromarray(p) for p in pixels]


def captions_of_classes(data: list[str], caption_files: list[str]) -> tuple[dict[str, list[str]], list]:
    """Each class's training captions, and the records of the datasets."""
    if len(caption_files) != len(data):
        raise SystemExit("give one caption file per dataset, in the order of --data")
    records = [r for d in data for r in read_dataset(d)]
    by_path = {Path(r.image_path).resolve(): r.class_name for r in records}
    captions_by_class: dict[str, list[str]] = {}
    for root, file in zip(data, caption_files):
        for key, text in CaptionStore.load(file).captions.items():
            name = by_path.get((Path(root) / key).resolve())
            if name is not None:
                captions_by_class.setdefault(name, []).append(text)
    return captions_by_class, records


def class_matcher(records, classes: list[str], per_class: int) -> NormalFeatureMemory:
    memory = NormalFeatureMemory()
    fitted = memory
    for name in classes:
        train = [r for r in records if r.class_name == name and r.split == "train" and not r.is_anomalous][:per_class]
        features = [f for r in train for f in memory.training_features(load_image(r.image_path))]
        fitted = fitted.with_features(features, name, CLASS_MEAN_VECTORS)
    return fitted


def caption_following(pipe, matcher, captions_by_class, per_class, guidance, seed) -> tuple[dict, dict]:
    """Share drawn as the caption's class, per class and overall; what the empty caption draws; tiles."""
    rows, tiles = {}, {}
    for name, captions in sorted(captions_by_class.items()):
        chosen = random.Random(seed).sample(captions, min(per_class, len(captions)))
        images = generate(pipe, chosen, len(chosen), seed, guidance)
        matched = [matcher.match_class(matcher.embed(image)).name for image in images]
        rows[name] = float(np.mean([m == name for m in matched]))
        tiles[name] = images[:2]
    empty = generate(pipe, None, per_class * 2, seed, guidance)
    drawn = Counter(matcher.match_class(matcher.embed(image)).name for image in empty)
    tiles["(empty caption)"] = empty[:2]
    return {"per_class": rows, "mean": float(np.mean(list(rows.values()))),
            "empty_caption_draws": dict(drawn.most_common())}, tiles


def reconstruction_rows(pipe, records, strengths, seed) -> dict:
    """Reconstruction-only metrics and quality, with the test image's description and with the empty caption."""
    pipe.memory = None  # whole-image reconstructions; the logical classes are not in the shipped memory
    pipe.config.memory_guidance = 0.0
    out = {}
    for strength in strengths:
        pipe.config.strength = strength
        for captioned in (False, True):
            report = evaluate_map_variants(pipe, records, {"reconstruction": {RECONSTRUCTION: 1.0, MEMORY: 0.0}},
                                           seed=seed, caption_images=captioned, progress=False)
            per_class = {c: {"i_auroc": m.image_auroc, "aupro": m.aupro, **report.reconstruction[c]}
                         for c, m in report.metrics["reconstruction"].items()}
            key = f"strength {strength} {'description' if captioned else 'empty'}"
            out[key] = {"per_class": per_class,
                        "mean": {k: float(np.nanmean([row[k] for row in per_class.values()]))
                                 for k in next(iter(per_class.values()))}}
            print(key, json.dumps(out[key]["mean"]), file=sys.stderr)
    return out


@torch.inference_mode()
def reconstruction_tiles(pipe, name: str, image: Image.Image, strengths: list[float], captioner) -> list[Image.Image]:
    """The whole-image reconstruction of `image` at each strength, with its description and with the empty caption."""
    pixels = torch.from_numpy(np.array(image.convert("RGB").resize((pipe.config.resolution,) * 2))).float() / 255
    batch = pixels.permute(2, 0, 1)[None]
    description = captioner.caption([image])
    tiles = []
    for strength in strengths:
        for captions in (description, None):
            settings = DetectionSettings(strength=strength, captions=captions, memory_guidance=0.0).resolved(pipe.config)
            reconstruction = pipe.reconstruct(batch, settings)[2][0]
            picture = Image.fromarray(reconstruction.clamp(0, 1).permute(1, 2, 0).mul(255).byte().numpy())
            tiles.append(labelled(picture, f"{name} {strength:g} {'descr.' if captions else 'empty'}", TILE))
    return tiles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True, help="NAME=MODEL_DIR ...")
    parser.add_argument("--data", nargs="*", default=[], help="datasets whose classes the captions describe (part 1)")
    parser.add_argument("--captions", nargs="*", default=[], help="caption files (vlmdiff caption) of --data, one each")
    parser.add_argument("--recon-data", type=Path, help="dataset whose test images are reconstructed (part 2)")
    parser.add_argument("--classes", nargs="*", default=[], help="classes of --recon-data (default: all)")
    parser.add_argument("--strengths", default="0.6,0.8,1.0", help="of part 2; empty: skip part 2")
    parser.add_argument("--per-class", type=int, default=8, help="generations per class")
    parser.add_argument("--match-images", type=int, default=20)
    parser.add_argument("--guidance", default="1,3", help="classifier-free guidance scales of the generations")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--grid", type=Path, help="picture: per class a real image and generations per model")
    parser.add_argument("--recon-grid", type=Path, help="picture: --recon-examples reconstructed by each model")
    parser.add_argument("--recon-examples", nargs="*", default=[], help="test images of --recon-data (relative paths)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    strengths = [float(s) for s in args.strengths.split(",") if s]
    captions_by_class, records = captions_of_classes(args.data, args.captions)
    classes = sorted(captions_by_class)
    if classes:
        matcher = class_matcher(records, classes, args.match_images)
        real = {c: load_image(next(r.image_path for r in records if r.class_name == c and r.split == "train"))
                for c in classes}
    captioner = None
    example_rows = [[labelled(load_image(args.recon_data / e), e.split("/")[0] + " " + e.split("/")[2], TILE),
                     labelled(load_image(args.recon_data / e.replace("/test/", "/test_clean/")), "defect-free", TILE)]
                    for e in args.recon_examples]
    results: dict = {"classes": classes, "chance": 1 / len(classes) if classes else None, "models": {}}
    grid_rows = [[labelled(real[c], c, TILE) for c in classes] + [labelled(Image.new("RGB", (8, 8), "grey"), "(empty caption)", TILE)]]
    grid_rows = grid_rows if classes else []
    for spec in args.models:
        name, folder = spec.split("=", 1)
        pipe = VLMDiffPipeline.from_pretrained(folder)
        model_result = {"max_train_timestep": pipe.config.max_train_timestep, "generation": {}}
        for guidance in (float(g) for g in args.guidance.split(",") if classes):
            following, tiles = caption_following(pipe, matcher, captions_by_class, args.per_class, guidance, args.seed)
            model_result["generation"][f"guidance {guidance:g}"] = following
            print(name, guidance, f"follows {following['mean']:.2f}", following["empty_caption_draws"], file=sys.stderr)
            grid_rows.append([labelled(tiles[c][0], f"{name} g{guidance:g}", TILE) for c in [*classes, "(empty caption)"]])
        if example_rows:
            captioner = captioner or create_captioner(pipe.config.captioner)
            for row, example in zip(example_rows, args.recon_examples):
                row += reconstruction_tiles(pipe, name, load_image(args.recon_data / example), GRID_STRENGTHS, captioner)
        if args.recon_data and strengths:
            recon = [r for r in read_dataset(args.recon_data)
                     if r.split == "test" and (not args.classes or r.class_name in args.classes)]
            model_result["reconstruction"] = reconstruction_rows(pipe, recon, strengths, args.seed)
        results["models"][name] = model_result
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    if args.grid:
        save_sheet(grid_rows, args.grid)
    if args.recon_grid:
        save_sheet(example_rows, args.recon_grid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
