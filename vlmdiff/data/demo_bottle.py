"""A bottle seen from the side, for logical and global anomalies: fill level, label and liquid colour.

Every normal bottle is filled to the same line (within a pixel or two), wears the product's own
label and holds liquid of the product's colour; pose, lighting and grain vary. The defects
re-render the same photograph with one of those rules broken, or scratch the glass.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from vlmdiff.data.canvas import View, at, blank, box, disc, photograph, polygon, posed_support, sample_view
from vlmdiff.data.defects import Scene

TOP, SHOULDER, BODY, BOTTOM = 40.0, 72.0, 100.0, 226.0  # layout heights: neck top, neck end, body start, base
NECK, WIDTH = 12.0, 38.0  # half-widths of neck and body
WALL = 3.5  # glass thickness
LABEL = (142.0, 196.0)  # label top and bottom
FILL_LEVEL = 90.0
JUICE = (228.0, 138.0, 28.0)
WRONG_LIQUIDS = ((110.0, 175.0, 40.0), (150.0, 25.0, 55.0), (60.0, 95.0, 205.0), (236.0, 226.0, 190.0))


@dataclass(frozen=True)
class Label:
    """A product label: background, a band across its top, a logo disc and text lines."""

    paper: tuple[float, float, float]
    band: tuple[float, float, float]
    logo: tuple[float, float, float]
    text: tuple[float, float, float]


OWN_LABEL = Label((240, 238, 230), (200, 35, 35), (200, 35, 35), (70, 70, 75))
OTHER_LABELS = (Label((40, 80, 170), (240, 200, 40), (245, 245, 240), (230, 230, 235)),
                Label((35, 120, 60), (245, 245, 240), (30, 40, 35), (240, 240, 235)),
                Label((25, 25, 28), (210, 170, 70), (210, 170, 70), (200, 200, 200)))


@dataclass(frozen=True)
class BottleParams:
    """One bottle photograph."""

    view: View
    level: float  # liquid surface height (layout y)
    liquid: tuple[float, float, float]
    label: Label | None
    label_shift: float  # how far the label sits below its nominal place
    cap: tuple[float, float, float]
    background: tuple[float, float, float]


def _half_width(y: np.ndarray) -> np.ndarray:
    """Outer half-width of the bottle at layout height y (neck, rounded shoulder, body)."""
    t = np.clip((y - SHOULDER) / (BODY - SHOULDER), 0, 1)
    return NECK + (WIDTH - NECK) * np.sin(np.pi / 2 * t) ** 2


def _outline(top: float, bottom: float, inset: float) -> np.ndarray:
    """Canvas polygon of the bottle between two heights, `inset` pixels inside the glass."""
    ys = np.linspace(top, bottom, 64)
    half = _half_width(ys) - inset
    right = np.stack([128 + half, ys], 1)
    left = np.stack([128 - half, ys], 1)[::-1]
    return np.concatenate([right, left]) + at(0, 0)


def _pour(canvas: np.ndarray, level: float, liquid: tuple[float, float, float]) -> None:
    """Liquid inside the glass below `level`; the same outline at every level, so only the level moves."""
    inside = np.zeros(canvas.shape[:2], np.uint8)
    polygon(inside, _outline(TOP + 1, BOTTOM - WALL, WALL), 255)
    ys = np.arange(canvas.shape[0], dtype=np.float32)[:, None]
    cover = (inside.astype(np.float32) / 255 * np.clip(ys - at(0, level)[1] + 0.5, 0, 1))[..., None]
    mixed = canvas.astype(np.float32) * (1 - cover) + np.asarray(liquid, np.float32) * cover
    canvas[:] = np.clip(np.round(mixed), 0, 255).astype(np.uint8)


def _label(canvas: np.ndarray, label: Label, shift: float) -> None:
    """The label wrapped round the body: paper, band, logo and two lines of text."""
    top, bottom = LABEL[0] + shift, LABEL[1] + shift
    middle = (top + bottom) / 2
    box(canvas, at(128, middle), (2 * WIDTH, bottom - top), 0, label.paper)
    box(canvas, at(128, top + 5), (2 * WIDTH, 8), 0, label.band)
    disc(canvas, at(128, middle - 2), 10, label.logo)
    for k, length in enumerate((46, 34)):
        box(canvas, at(128, middle + 15 + 6 * k), (length, 2.5), 0, label.text)


def draw_bottle(p: BottleParams) -> np.ndarray:
    """The bottle on its canvas: glass, liquid up to the level, label, cap, a highlight down the glass."""
    canvas = blank(p.background)
    polygon(canvas, _outline(TOP, BOTTOM, 0), (95, 112, 108))  # glass edge
    polygon(canvas, _outline(TOP + 1, BOTTOM - WALL, WALL), (176, 194, 188))  # empty glass
    _pour(canvas, p.level, p.liquid)
    if p.label is not None:
        _label(canvas, p.label, p.label_shift)
    box(canvas, at(128, TOP - 7), (2 * NECK + 6, 16), 0, p.cap)
    _highlight(canvas)
    return canvas


def _highlight(canvas: np.ndarray) -> None:
    """The glass reflects the light from the left: a soft brighter stripe down the bottle."""
    ys = np.linspace(TOP + 4, BOTTOM - 8, 48)
    x = 128 - 0.55 * _half_width(ys)
    stripe = np.zeros(canvas.shape[:2], np.uint8)
    polygon(stripe, np.concatenate([np.stack([x - 2, ys], 1), np.stack([x + 2, ys], 1)[::-1]]) + at(0, 0), 255)
    lit = canvas.astype(np.float32) * (1 + 0.25 * stripe[..., None].astype(np.float32) / 255)
    canvas[:] = np.clip(np.round(lit), 0, 255).astype(np.uint8)


def _glass() -> np.ndarray:
    """Canvas pixels of the bottle (where a scratch may start)."""
    canvas = np.zeros(blank(0).shape[:2], np.uint8)
    polygon(canvas, _outline(TOP, BOTTOM, 0), 255)
    return canvas > 127


def sample_bottle(rng: np.random.Generator, size: int) -> Scene:
    params = BottleParams(
        view=sample_view(rng, shift=5.0, rotation=2.0),
        level=FILL_LEVEL + float(rng.normal(0, 1.0)),
        liquid=tuple(np.array(JUICE) + rng.normal(0, 5, 3)),
        label=OWN_LABEL,
        label_shift=float(rng.normal(0, 1.5)),
        cap=tuple(np.array((170.0, 30.0, 30.0)) + rng.normal(0, 8, 3)),
        background=tuple(np.full(3, rng.uniform(160, 185)) + rng.normal(0, 3, 3)),  # bright, never over-exposed
    )
    render = lambda p: photograph(draw_bottle(p), p.view, size)  # noqa: E731
    return Scene(params, render(params), posed_support(_glass(), params.view, size), render)


def wrong_fill_level(params: BottleParams, rng: np.random.Generator) -> BottleParams:
    """Filled too low (still above the label) or too high (into the neck)."""
    level = rng.uniform(112, 134) if rng.random() < 0.6 else rng.uniform(50, 66)
    return replace(params, level=float(level))


def remove_label(params: BottleParams, rng: np.random.Generator) -> BottleParams:
    """The label is missing."""
    return replace(params, label=None)


def swap_label(params: BottleParams, rng: np.random.Generator) -> BottleParams:
    """Another product's label."""
    return replace(params, label=OTHER_LABELS[rng.integers(len(OTHER_LABELS))])


def wrong_liquid(params: BottleParams, rng: np.random.Generator) -> BottleParams:
    """The liquid has another product's colour."""
    colour = np.array(WRONG_LIQUIDS[rng.integers(len(WRONG_LIQUIDS))]) + rng.normal(0, 5, 3)
    return replace(params, liquid=tuple(colour))
