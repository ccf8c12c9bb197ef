"""Drawing on a canonical canvas and photographing it: shapes, pose, light and sensor grain.

A drawn class lays its object out in fixed 256 px coordinates on a canvas with a margin (so posing
never shows an edge), then `photograph` poses it (shift, rotation, zoom), lights it (gain and a
brightness gradient) and adds grain from a seed. Re-rendering the same `View` with one thing
changed on the canvas changes only those pixels, which keeps part-defect masks exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

CANVAS = 256  # layout coordinates; the output is scaled to the requested size
MARGIN = 24
SIDE = CANVAS + 2 * MARGIN
Colour = Sequence[float]


def at(x: float, y: float) -> np.ndarray:
    """Canvas position of layout point (x, y)."""
    return np.array([x + MARGIN, y + MARGIN], np.float64)


def blank(colour: Colour) -> np.ndarray:
    """An empty SIDE x SIDE RGB canvas."""
    return np.full((SIDE, SIDE, 3), np.clip(colour, 0, 255), np.uint8)


def box(canvas: np.ndarray, center: np.ndarray, size: tuple[float, float], angle: float, colour: Colour) -> None:
    """A filled rotated rectangle, anti-aliased."""
    corners = cv2.boxPoints(((float(center[0]), float(center[1])), size, angle))
    cv2.fillPoly(canvas, [np.round(corners * 16).astype(np.int32)], colour, cv2.LINE_AA, shift=4)


def disc(canvas: np.ndarray, center: np.ndarray, radius: float, colour: Colour) -> None:
    """A filled circle, anti-aliased."""
    point = tuple(int(round(v * 16)) for v in center)
    cv2.circle(canvas, point, int(round(radius * 16)), colour, -1, cv2.LINE_AA, shift=4)


def polygon(canvas: np.ndarray, points: np.ndarray, colour: Colour) -> None:
    """A filled polygon (N, 2) in canvas coordinates, anti-aliased."""
    cv2.fillPoly(canvas, [np.round(np.asarray(points) * 16).astype(np.int32)], colour, cv2.LINE_AA, shift=4)


def line(canvas: np.ndarray, points: np.ndarray, colour: Colour, width: int) -> None:
    """An open polyline (N, 2) in canvas coordinates, anti-aliased."""
    cv2.polylines(canvas, [np.round(np.asarray(points) * 16).astype(np.int32)], False, colour, width,
                  cv2.LINE_AA, shift=4)


@dataclass(frozen=True)
class View:
    """How a canvas is photographed: pose, light and the grain's seed."""

    shift: tuple[float, float]  # pixels at 256 px
    rotation: float  # degrees
    zoom: float
    gain: float  # overall brightness
    light: tuple[float, float]  # brightness change across the image in x and y (fraction)
    grain_seed: int


def sample_view(rng: np.random.Generator, shift: float = 5.0, rotation: float = 2.5) -> View:
    """A camera pose and lighting that vary from image to image, each within two deviations (a fixture
    bounds the pose and a lamp the light: no far-tail normal image unlike the rest of its class)."""
    return View(shift=tuple(_bounded(rng, shift, 2)), rotation=float(_bounded(rng, rotation)),
                zoom=float(rng.uniform(0.96, 1.04)), gain=float(rng.uniform(0.85, 1.12)),
                light=tuple(_bounded(rng, 0.1, 2)), grain_seed=int(rng.integers(2**31)))


def _bounded(rng: np.random.Generator, deviation: float, n: int | None = None) -> np.ndarray:
    """Normal draws clipped at two deviations."""
    return np.clip(rng.normal(0, deviation, n), -2 * deviation, 2 * deviation)


def pose(canvas: np.ndarray, view: View, size: int) -> np.ndarray:
    """The canvas (any dtype, 2-D or RGB) shifted, turned and scaled into a size x size image."""
    matrix = cv2.getRotationMatrix2D((SIDE / 2, SIDE / 2), view.rotation, view.zoom * size / CANVAS)
    scale = size / CANVAS
    matrix[:, 2] += (size / 2 - SIDE / 2 + view.shift[0] * scale, size / 2 - SIDE / 2 + view.shift[1] * scale)
    return cv2.warpAffine(canvas, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def photograph(canvas: np.ndarray, view: View, size: int, grain: float = 2.5) -> np.ndarray:
    """The posed canvas under the view's light with sensor grain: an RGB uint8 image."""
    ys, xs = np.mgrid[:size, :size].astype(np.float32) / size - 0.5
    light = view.gain * (1 + view.light[0] * xs + view.light[1] * ys)
    noise = np.random.default_rng(view.grain_seed).normal(0, grain, (size, size, 3))
    image = pose(canvas, view, size).astype(np.float32) * light[..., None] + noise
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def posed_support(mask: np.ndarray, view: View, size: int) -> np.ndarray:
    """Where a canvas mask (SIDE x SIDE bool) lies in the photograph, a little inside its edge."""
    inner = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(np.float32)
    return pose(inner, view, size) > 0.5
