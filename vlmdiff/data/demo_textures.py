"""Texture classes of the built-in benchmark: real photographs that ship offline, seen through a
random camera (crop, rotation, scale, flips) and coloured with a jittered two-tone palette."""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np

from vlmdiff.data.defects import Scene


@dataclass(frozen=True)
class TextureStyle:
    """How one texture class looks: its grey source photos, the camera jitter and the colour palette."""

    crop: tuple[float, float]  # side of the source region mapped to the output, in source pixels
    max_angle: float  # degrees of free rotation
    quarter_turns: bool  # also rotate by multiples of 90 degrees
    dark: tuple[float, float, float]  # RGB of the darkest grey level
    light: tuple[float, float, float]  # RGB of the lightest grey level


@lru_cache(maxsize=None)
def skimage_texture(name: str) -> tuple[np.ndarray, ...]:
    """A grey texture bundled with scikit-image (brick, grass, gravel; CC0)."""
    import skimage.data

    return (getattr(skimage.data, name)().astype(np.float32) / 255.0,)


@lru_cache(maxsize=None)
def textile_sources(count: int = 64) -> tuple[np.ndarray, ...]:
    """The first `count` nominal textile photos of conformal-clip-data (MIT licence), grey in [0, 1].

    Their last row and column are blank, so a 3-pixel border is trimmed."""
    import conformal_clip_data

    paths = sorted(conformal_clip_data.nominal_dir().glob("*.jpg"))[:count]
    return tuple(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)[3:-3, 3:-3].astype(np.float32) / 255.0 for p in paths)


def _view(source: np.ndarray, style: TextureStyle, rng: np.random.Generator, size: int) -> np.ndarray:
    """A random rotated, scaled crop of `source` (grey, [0, 1]) of size x size pixels."""
    side = rng.uniform(*style.crop)
    angle = rng.uniform(-style.max_angle, style.max_angle) + (90 * rng.integers(4) if style.quarter_turns else 0)
    h, w = source.shape
    turn = np.deg2rad(angle)
    half = min(side / 2 * (abs(np.cos(turn)) + abs(np.sin(turn))) + 1, min(h, w) / 2)  # rotated crop fits
    cx, cy = rng.uniform(half, w - half), rng.uniform(half, h - half)
    matrix = cv2.getRotationMatrix2D((cx, cy), angle, size / side)
    matrix[:, 2] += (size / 2 - cx, size / 2 - cy)
    view = cv2.warpAffine(source, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return view[:, ::-1] if rng.random() < 0.5 else view


def render_texture(sources: tuple[np.ndarray, ...], style: TextureStyle, rng: np.random.Generator,
                   size: int) -> Scene:
    """One defect-free texture image: a random view, contrast/brightness jitter, palette, sensor noise."""
    grey = _view(sources[rng.integers(len(sources))], style, rng, size)
    grey = np.clip((grey - grey.mean()) * rng.uniform(0.85, 1.15) + grey.mean() + rng.uniform(-0.06, 0.06), 0, 1)
    shift = rng.normal(0, 6) + rng.normal(0, 2.5, 3)  # mostly brightness, a little hue
    dark, light = np.array(style.dark) + shift, np.array(style.light) + shift
    colour = dark + grey[..., None] * (light - dark) + rng.normal(0, 2.0, (size, size, 3))
    image = np.clip(np.round(colour), 0, 255).astype(np.uint8)
    support = np.ones((size, size), bool)
    return Scene(None, image, support, lambda params: image)


STYLES = {
    "brick": TextureStyle(crop=(200, 300), max_angle=4, quarter_turns=False, dark=(55, 22, 18), light=(215, 135, 105)),
    "gravel": TextureStyle(crop=(150, 300), max_angle=180, quarter_turns=False, dark=(40, 38, 36),
                           light=(225, 215, 195)),
    "grass": TextureStyle(crop=(150, 300), max_angle=180, quarter_turns=False, dark=(15, 40, 8),
                          light=(165, 215, 95)),
    "textile": TextureStyle(crop=(170, 230), max_angle=3, quarter_turns=False, dark=(22, 32, 70),
                            light=(165, 185, 230)),
    "fabric": TextureStyle(crop=(120, 160), max_angle=3, quarter_turns=True, dark=(70, 62, 52),
                           light=(215, 205, 185)),
}
