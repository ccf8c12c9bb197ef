"""Defect synthesis for the built-in benchmark.

A defect turns a clean image into a defective one and says which pixels it changed. Two kinds:
painted defects (scratch, crack, hole, stain, contamination, discoloration, thread) blend a layer
into the clean pixels through an alpha map; part defects re-render an object scene with changed
parameters (a missing or misplaced part, a broken edge). Either way every changed pixel lies in
the returned region, which is what makes the benchmark's masks exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import cv2
import numpy as np
from scipy.ndimage import binary_fill_holes

MIN_ALPHA = 0.12  # alpha below this is dropped so the region stays tight around visible change


@dataclass(frozen=True)
class Defect:
    """A defective image and the pixels the defect touched."""

    image: np.ndarray  # (H, W, 3) uint8
    region: np.ndarray  # (H, W) bool


@dataclass(frozen=True)
class Scene:
    """A clean rendered image plus what a defect needs: where it may go and how to re-render."""

    params: Any
    image: np.ndarray  # (H, W, 3) uint8
    support: np.ndarray  # (H, W) bool: surface pixels a painted defect may start on
    render: Callable[[Any], np.ndarray]  # params -> image, with the same noise and lighting


PaintFn = Callable[[np.ndarray, np.ndarray, np.random.Generator], Defect]
SceneDefect = Callable[[Scene, np.random.Generator], Defect]


# ---- shapes -----------------------------------------------------------------------------------

def pick_point(support: np.ndarray, rng: np.random.Generator, margin: int = 12) -> tuple[int, int]:
    """A random (x, y) on the support, at least `margin` pixels from the border when possible."""
    h, w = support.shape
    inner = np.zeros_like(support)
    inner[margin : h - margin, margin : w - margin] = support[margin : h - margin, margin : w - margin]
    ys, xs = np.nonzero(inner if inner.any() else support)
    i = rng.integers(len(xs))
    return int(xs[i]), int(ys[i])


def blob(shape: tuple[int, int], center: tuple[float, float], radius: float, rng: np.random.Generator,
         roughness: float = 0.3, elongation: float = 1.0) -> np.ndarray:
    """An irregular filled blob as an anti-aliased alpha map in [0, 1]."""
    angles = np.linspace(0, 2 * np.pi, 72, endpoint=False)
    r = np.ones_like(angles)
    for k in range(2, 7):  # smooth random wobble of the outline
        r += roughness / k * rng.uniform(-1, 1) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
    tilt = rng.uniform(0, np.pi)
    x, y = radius * r * np.cos(angles) * elongation, radius * r * np.sin(angles)
    points = np.stack([center[0] + x * np.cos(tilt) - y * np.sin(tilt),
                       center[1] + x * np.sin(tilt) + y * np.cos(tilt)], axis=1)
    canvas = np.zeros(shape, np.uint8)
    cv2.fillPoly(canvas, [np.round(points * 16).astype(np.int32)], 255, cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255.0


def wander(start: tuple[float, float], length: float, rng: np.random.Generator, bend: float = 0.15,
           step: float = 3.0, heading: float | None = None) -> np.ndarray:
    """A random-walk polyline of about `length` pixels with smoothly changing heading, (N, 2)."""
    heading = rng.uniform(0, 2 * np.pi) if heading is None else heading
    points = [np.asarray(start, np.float64)]
    for _ in range(max(2, int(length / step))):
        heading += rng.normal(0, bend)
        points.append(points[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
    return np.stack(points)


def stroke(shape: tuple[int, int], paths: list[np.ndarray], width: int) -> np.ndarray:
    """Anti-aliased polylines as an alpha map in [0, 1]."""
    canvas = np.zeros(shape, np.uint8)
    for path in paths:
        cv2.polylines(canvas, [np.round(path * 16).astype(np.int32)], False, 255, width, cv2.LINE_AA, shift=4)
    return canvas.astype(np.float32) / 255.0


def composite(clean: np.ndarray, layer: np.ndarray, alpha: np.ndarray) -> Defect:
    """Blend `layer` into `clean` through `alpha`; the region is exactly where alpha is kept."""
    alpha = np.where(alpha < MIN_ALPHA, 0.0, np.clip(alpha, 0.0, 1.0)).astype(np.float32)[..., None]
    mixed = clean.astype(np.float32) * (1 - alpha) + np.clip(layer, 0, 255) * alpha
    image = np.where(alpha > 0, np.round(mixed), clean).astype(np.uint8)
    return Defect(image, alpha[..., 0] > 0)


def _grain(shape: tuple[int, int], rng: np.random.Generator, sigma: float) -> np.ndarray:
    return rng.normal(0, sigma, (*shape, 1)).astype(np.float32)


def _confine(alpha: np.ndarray, support: np.ndarray) -> np.ndarray:
    """Keep a defect on the object surface (no-op for textures, whose support is everywhere)."""
    return alpha * support


# ---- painted defects --------------------------------------------------------------------------

def scratch(clean: np.ndarray, support: np.ndarray, rng: np.random.Generator) -> Defect:
    """One to three thin, nearly straight lines, lighter or darker than the surface."""
    start = pick_point(support, rng)
    heading = rng.uniform(0, 2 * np.pi)
    paths = [wander((start[0] + rng.normal(0, 4), start[1] + rng.normal(0, 4)), rng.uniform(18, 110), rng,
                    bend=0.04, heading=heading + rng.normal(0, 0.05)) for _ in range(rng.integers(1, 4))]
    alpha = _confine(stroke(clean.shape[:2], paths, int(rng.integers(1, 3))), support) * rng.uniform(0.6, 0.95)
    tone = 235.0 if rng.random() < 0.6 else 25.0
    return composite(clean, np.full(clean.shape, tone, np.float32) + _grain(clean.shape[:2], rng, 8), alpha)


def crack(clean: np.ndarray, support: np.ndarray, rng: np.random.Generator) -> Defect:
    """A dark, jagged, branching fissure."""
    trunk = wander(pick_point(support, rng), rng.uniform(25, 120), rng, bend=0.3, step=4.0)
    paths = [trunk] + [wander(trunk[rng.integers(len(trunk))], rng.uniform(6, 30), rng, bend=0.5, step=2.0)
                       for _ in range(rng.integers(0, 4))]
    alpha = _confine(stroke(clean.shape[:2], paths, int(rng.integers(1, 4))), support) * 0.95
    return composite(clean, clean.astype(np.float32) * rng.uniform(0.1, 0.3), alpha)


def hole(clean: np.ndarray, support: np.ndarray, rng: np.random.Generator,
         radius_range: tuple[float, float] = (4, 22)) -> Defect:
    """A dark cavity with an inner shadow and a lighter, broken rim."""
    shape = clean.shape[:2]
    center, radius = pick_point(support, rng), rng.uniform(*radius_range)
    inside = blob(shape, center, radius, rng, roughness=0.35)
    rim = np.clip(cv2.dilate(inside, np.ones((5, 5), np.uint8)) - inside, 0, 1)
    ys, xs = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    light = rng.uniform(0, 2 * np.pi)  # the far wall catches light, the near wall is in shadow
    depth = 0.5 + 0.5 * ((xs - center[0]) * np.cos(light) + (ys - center[1]) * np.sin(light)) / max(radius, 1)
    surface = cv2.GaussianBlur(clean.astype(np.float32), (0, 0), 6)  # the material's own colour, darkened
    cavity = surface * (0.1 + 0.3 * np.clip(depth, 0, 1))[..., None]
    layer = np.where(inside[..., None] > 0, cavity, clean.astype(np.float32) * 1.25 + 15)
    return composite(clean, layer + _grain(shape, rng, 4), _confine(np.maximum(inside, 0.6 * rim), support))


STAIN_TINTS = ((0.55, 0.45, 0.35), (0.45, 0.45, 0.5), (0.95, 0.8, 0.45), (0.7, 0.5, 0.5))


def stain(clean: np.ndarray, support: np.ndarray, rng: np.random.Generator) -> Defect:
    """A soft-edged spot that darkens and tints the surface while keeping its texture (oil, rust, paint)."""
    shape = clean.shape[:2]
    radius = rng.uniform(6, 36)
    alpha = blob(shape, pick_point(support, rng), radius, rng, roughness=0.5, elongation=rng.uniform(1, 1.8))
    alpha = cv2.GaussianBlur(alpha, (0, 0), max(1.0, radius / 6)) * rng.uniform(0.6, 0.9)
    tint = np.array(STAIN_TINTS[rng.integers(len(STAIN_TINTS))], np.float32)
    return composite(clean, clean.astype(np.float32) * tint, _confine(alpha, support))


CONTAMINANT_COLOURS = ((20, 20, 22), (235, 235, 225), (40, 70, 170), (200, 120, 30), (150, 30, 30))


def contamination(clean: np.ndarray, support: np.ndarray, rng: np.random.Generator) -> Defect:
    """One to three small foreign particles (debris, paint flakes, plastic) or a stray fibre."""
    shape = clean.shape[:2]
    colour = np.array(CONTAMINANT_COLOURS[rng.integers(len(CONTAMINANT_COLOURS))], np.float32)
    if rng.random() < 0.3:
        alpha = stroke(shape, [wander(pick_point(support, rng), rng.uniform(20, 70), rng, bend=0.3)], 1)
    else:
        center = pick_point(support, rng)
        alpha = np.zeros(shape, np.float32)
        for _ in range(rng.integers(1, 4)):
            offset = (center[0] + rng.normal(0, 8), center[1] + rng.normal(0, 8))
            alpha = np.maximum(alpha, blob(shape, offset, rng.uniform(2, 9), rng, roughness=0.6))
    shade = 0.8 + 0.4 * rng.random(shape).astype(np.float32)[..., None]
    return composite(clean, colour * shade, _confine(alpha * 0.97, support))


SPECK_COLOURS = ((25, 25, 25), (90, 90, 90), (230, 230, 230), (120, 80, 50))


def speck(clean: np.ndarray, support: np.ndarray, rng: np.random.Generator) -> Defect:
    """One or two particles a few pixels wide (dust, a metal chip, a rust dot)."""
    shape = clean.shape[:2]
    colour = np.array(SPECK_COLOURS[rng.integers(len(SPECK_COLOURS))], np.float32)
    center = pick_point(support, rng, margin=4)
    alpha = np.zeros(shape, np.float32)
    for _ in range(rng.integers(1, 3)):
        offset = (center[0] + rng.normal(0, 3), center[1] + rng.normal(0, 3))
        alpha = np.maximum(alpha, blob(shape, offset, rng.uniform(1.2, 3.0), rng, roughness=0.4))
    return composite(clean, colour + _grain(shape, rng, 6), _confine(alpha * 0.97, support))


def nick(clean: np.ndarray, support: np.ndarray, rng: np.random.Generator) -> Defect:
    """A short, one-pixel-wide scratch, 6 to 20 pixels long."""
    path = wander(pick_point(support, rng, margin=6), rng.uniform(6, 20), rng, bend=0.05, step=2.0)
    alpha = _confine(stroke(clean.shape[:2], [path], 1), support) * rng.uniform(0.7, 0.95)
    tone = 235.0 if rng.random() < 0.5 else 25.0
    return composite(clean, np.full(clean.shape, tone, np.float32) + _grain(clean.shape[:2], rng, 8), alpha)


def discoloration(clean: np.ndarray, support: np.ndarray, rng: np.random.Generator) -> Defect:
    """A large soft patch whose colour has faded to a dry brown-yellow while its texture remains."""
    shape = clean.shape[:2]
    radius = rng.uniform(12, 45)
    alpha = blob(shape, pick_point(support, rng), radius, rng, roughness=0.6)
    alpha = cv2.GaussianBlur(alpha, (0, 0), radius / 5) * rng.uniform(0.7, 0.95)
    grey = clean.astype(np.float32).mean(axis=2, keepdims=True)
    return composite(clean, grey * np.array([1.25, 1.0, 0.55], np.float32), _confine(alpha, support))


def thread(clean: np.ndarray, support: np.ndarray, rng: np.random.Generator) -> Defect:
    """A long, loosely curving foreign thread lying on the surface."""
    path = wander(pick_point(support, rng), rng.uniform(40, 160), rng, bend=0.12, step=3.0)
    alpha = _confine(stroke(clean.shape[:2], [path], int(rng.integers(1, 3))), support)
    colour = np.array(CONTAMINANT_COLOURS[rng.integers(len(CONTAMINANT_COLOURS))], np.float32)
    return composite(clean, colour + _grain(clean.shape[:2], rng, 10), alpha * 0.95)


# ---- adapters to scene defects ----------------------------------------------------------------

def painted(paint: PaintFn) -> SceneDefect:
    """A scene defect that paints onto the clean image."""
    return lambda scene, rng: paint(scene.image, scene.support, rng)


def part_change(change: Callable[[Any, np.random.Generator], Any], solid: bool = False) -> SceneDefect:
    """A scene defect that re-renders the scene with changed parameters; the region is the changed pixels.

    With `solid`, holes in the changed region are filled: a swapped label or item is wrong as a whole,
    including pixels the right and the wrong one happen to share.
    """

    def apply(scene: Scene, rng: np.random.Generator) -> Defect:
        image = scene.render(change(scene.params, rng))
        region = (image != scene.image).any(axis=2)
        return Defect(image, binary_fill_holes(region) if solid else region)

    return apply
