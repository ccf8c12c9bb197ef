"""A picture of what the diffusion does to the shipped examples: one row per example, one column
per setting (the input, then each strength unguided and memory-guided), labelled.

    python benchmarks/show_reconstructions.py --model assets/vlmdiff-default --out docs/reconstructions.jpg
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from vlmdiff import DetectionSettings, VLMDiffPipeline
from vlmdiff.images import load_image

ROOT = Path(__file__).resolve().parents[1]
TILE = 192
LABEL_HEIGHT = 18


def labelled(image: Image.Image, text: str, side: int = TILE) -> Image.Image:
    """`image` resized to side x side under a one-line label."""
    tile = Image.new("RGB", (side, side + LABEL_HEIGHT), "white")
    tile.paste(image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR), (0, LABEL_HEIGHT))
    ImageDraw.Draw(tile).text((4, 3), text, fill="black")
    return tile


def save_sheet(rows: list[list[Image.Image]], path: Path) -> None:
    """Labelled tiles of one size, row by row, saved as one picture."""
    width, height = rows[0][0].size
    sheet = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)), "white")
    for r, tiles in enumerate(rows):
        for c, tile in enumerate(tiles):
            sheet.paste(tile, (c * width, r * height))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, quality=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "assets" / "vlmdiff-default")
    parser.add_argument("--examples", type=Path, default=ROOT / "assets" / "examples")
    parser.add_argument("--names", default="brick_crack,textile_hole,washer_broken,circuit_misplaced_part,"
                                           "grass_contamination,tire_hole", help="example file stems, one row each")
    parser.add_argument("--strengths", default="", help="strengths to show (default: the model's)")
    parser.add_argument("--memory-guidance", type=float, help="threshold of the guided columns (default: the model's, "
                                                                 "else the library default)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "reconstructions.jpg")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    pipe = VLMDiffPipeline.from_pretrained(args.model)
    strengths = [float(s) for s in args.strengths.split(",")] if args.strengths else [pipe.config.strength]
    guidance = args.memory_guidance or DetectionSettings(memory_guidance=True).resolved(pipe.config).memory_guidance
    columns = [(s, g) for s in strengths for g in (0.0, guidance if pipe.memory is not None else 0.0)]
    columns = list(dict.fromkeys(columns))
    rows = []
    for name in args.names.split(","):
        image = load_image(args.examples / f"{name}.png")
        tiles = [labelled(image, name)]
        for strength, memory_guidance in columns:
            result = pipe(image, strength=strength, memory_guidance=memory_guidance)[0]
            how = f"guided {memory_guidance:g}" if memory_guidance else "unguided"
            tiles.append(labelled(result.reconstruction, f"{strength:g}, {how}"))
        rows.append(tiles)
    save_sheet(rows, args.out)
    print(f"wrote {args.out} ({len(rows)} examples x {len(columns)} settings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
