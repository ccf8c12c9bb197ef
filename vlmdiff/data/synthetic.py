"""Synthetic anomalies made from normal images, for choices that must not see real defects.

Each kind changes one region of a normal image and returns the region as its mask:
- cut-paste: a patch of the image pasted elsewhere, a little brighter or darker (CutPaste);
- patch swap: two patches exchanged, so every local look is normal but the arrangement is not;
- colour shift: a region's colour turned (a wrong liquid, label or wire colour);
- removal: a region covered by a patch of the image's border (a part missing, background showing).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]  # top, left, height, width
AREA = (0.02, 0.08)  # share of the image one changed region covers


def _box(shape: tuple[int, int], rng: np.random.Generator, area: tuple[float, float]) -> Box:
    """A random box of `area` (share of the image) and aspect 1:2 to 2:1, inside the image."""
    height, width = shape
    share, aspect = rng.uniform(*area), np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
    box_h = int(np.clip(np.sqrt(share * height * width / aspect), 4, height // 2))
    box_w = int(np.clip(box_h * aspect, 4, width // 2))
    return int(rng.integers(0, height - box_h + 1)), int(rng.integers(0, width - box_w + 1)), box_h, box_w


def _elsewhere(shape: tuple[int, int], box: Box, rng: np.random.Generator) -> Box:
    """A box of the same size that does not overlap `box` (the far corner when none is found)."""
    top, left, box_h, box_w = box
    for _ in range(20):
        other = int(rng.integers(0, shape[0] - box_h + 1)), int(rng.integers(0, shape[1] - box_w + 1))
        if abs(other[0] - top) >= box_h or abs(other[1] - left) >= box_w:
            return other[0], other[1], box_h, box_w
    return shape[0] - box_h - top, shape[1] - box_w - left, box_h, box_w


def _region(pixels: np.ndarray, box: Box) -> np.ndarray:
    top, left, box_h, box_w = box
    return pixels[top : top + box_h, left : left + box_w]


def cut_paste(pixels: np.ndarray, rng: np.random.Generator, area: tuple[float, float]) -> Box:
    source = _box(pixels.shape[:2], rng, area)
    target = _elsewhere(pixels.shape[:2], source, rng)
    patch = _region(pixels, source).astype(np.float32) * rng.uniform(0.8, 1.2)
    _region(pixels, target)[:] = np.clip(patch, 0, 255)
    return target


def patch_swap(pixels: np.ndarray, rng: np.random.Generator, area: tuple[float, float]) -> list[Box]:
    first = _box(pixels.shape[:2], rng, area)
    second = _elsewhere(pixels.shape[:2], first, rng)
    a, b = _region(pixels, first).copy(), _region(pixels, second).copy()
    _region(pixels, first)[:], _region(pixels, second)[:] = b, a
    return [first, second]


def colour_shift(pixels: np.ndarray, rng: np.random.Generator, area: tuple[float, float]) -> Box:
    box = _box(pixels.shape[:2], rng, (area[0] * 2, area[1] * 1.5))  # larger: a colour is the whole part
    region = _region(pixels, box).astype(np.float32)
    order = rng.permutation(3) if rng.random() < 0.5 else np.array([1, 2, 0])  # channels rotated or shuffled
    if (order == np.arange(3)).all():
        order = np.array([2, 0, 1])
    _region(pixels, box)[:] = np.clip(region[..., order] * rng.uniform(0.9, 1.1, 3), 0, 255)
    return box


def removal(pixels: np.ndarray, rng: np.random.Generator, area: tuple[float, float]) -> Box:
    box = _box(pixels.shape[:2], rng, area)
    _, _, box_h, box_w = box
    height, width = pixels.shape[:2]
    corner = [(0, 0), (0, width - box_w), (height - box_h, 0), (height - box_h, width - box_w)][rng.integers(4)]
    background = _region(pixels, (*corner, box_h, box_w)).mean((0, 1))
    _region(pixels, box)[:] = np.clip(background + rng.normal(0, 3, (box_h, box_w, 3)), 0, 255)
    return box


KINDS: dict[str, Callable[[np.ndarray, np.random.Generator, tuple[float, float]], Box | list[Box]]] = {
    "cut-paste": cut_paste, "patch swap": patch_swap, "colour shift": colour_shift, "removal": removal,
}


def synthetic_anomaly(image: Image.Image, rng: np.random.Generator, kind: str | None = None,
                      area: tuple[float, float] = AREA) -> tuple[Image.Image, np.ndarray]:
    """(anomalous image, (H, W) bool mask of the changed region) made from a normal RGB image; `kind` one of
    KINDS (default: drawn); each changed region covers a share of the image drawn from `area`."""
    pixels = np.array(image.convert("RGB"))
    name = kind or list(KINDS)[rng.integers(len(KINDS))]
    boxes = KINDS[name](pixels, rng, area)
    mask = np.zeros(pixels.shape[:2], bool)
    for top, left, box_h, box_w in boxes if isinstance(boxes, list) else [boxes]:
        mask[top : top + box_h, left : left + box_w] = True
    return Image.fromarray(pixels), mask
