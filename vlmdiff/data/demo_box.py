"""A compartment box seen from above, for logical anomalies: every compartment holds its own item.

Normal boxes hold exactly one item of the compartment's kind in each of the 3 x 3 compartments,
lying anywhere near the middle at any angle; pose, lighting and grain vary. Logical defects
re-render the same photograph with an item missing, an extra item or two compartments' items
swapped; a crack in the tray is the structural defect.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from vlmdiff.data.canvas import CANVAS, View, at, blank, box, disc, photograph, polygon, posed_support, sample_view
from vlmdiff.data.defects import Scene

GRID, CELL, WALL = 3, 76.0, 6.0  # compartments per side, compartment pitch, wall width (layout px)
ORIGIN = CANVAS / 2 - GRID * CELL / 2


def _hexagon(canvas: np.ndarray, c: np.ndarray, angle: float, radius: float, colour) -> None:
    turns = np.deg2rad(angle) + np.arange(6) * np.pi / 3
    polygon(canvas, c + radius * np.stack([np.cos(turns), np.sin(turns)], 1), colour)


def _nut(canvas: np.ndarray, c: np.ndarray, angle: float) -> None:
    _hexagon(canvas, c, angle, 13, (150, 150, 155))
    disc(canvas, c, 6, (60, 60, 66))


def _washer(canvas: np.ndarray, c: np.ndarray, angle: float) -> None:
    disc(canvas, c, 13, (185, 180, 170))
    disc(canvas, c, 5.5, (55, 62, 75))


def _cap(canvas: np.ndarray, c: np.ndarray, angle: float) -> None:
    disc(canvas, c, 12, (200, 40, 40))
    disc(canvas, c, 8, (230, 80, 70))


def _bolt(canvas: np.ndarray, c: np.ndarray, angle: float) -> None:
    u = np.array([np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))])
    box(canvas, c + 3 * u, (26, 7), angle, (165, 165, 170))
    box(canvas, c - 11 * u, (5, 14), angle, (135, 135, 140))


def _block(canvas: np.ndarray, c: np.ndarray, angle: float) -> None:
    box(canvas, c, (20, 20), angle, (40, 150, 70))
    box(canvas, c, (10, 10), angle, (70, 185, 100))


def _triangle(canvas: np.ndarray, c: np.ndarray, angle: float) -> None:
    turns = np.deg2rad(angle) + np.arange(3) * 2 * np.pi / 3
    polygon(canvas, c + 14 * np.stack([np.cos(turns), np.sin(turns)], 1), (235, 200, 40))


def _ball(canvas: np.ndarray, c: np.ndarray, angle: float) -> None:
    disc(canvas, c, 11, (40, 80, 200))
    disc(canvas, c - 3.5, 3.5, (140, 170, 240))


def _spring(canvas: np.ndarray, c: np.ndarray, angle: float) -> None:
    u = np.array([np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))])
    for k in range(-3, 4):
        box(canvas, c + 3.6 * k * u, (2.2, 16), angle, (200, 120, 50))


def _tab(canvas: np.ndarray, c: np.ndarray, angle: float) -> None:
    box(canvas, c, (24, 12), angle, (238, 236, 228))
    disc(canvas, c, 3, (120, 120, 125))


ITEMS: tuple[Callable[[np.ndarray, np.ndarray, float], None], ...] = (
    _nut, _washer, _cap, _bolt, _block, _triangle, _ball, _spring, _tab)


@dataclass(frozen=True)
class Item:
    """One item: which kind, where (offset from its compartment's centre) and how it is turned."""

    kind: int  # index into ITEMS
    offset: tuple[float, float]
    angle: float


@dataclass(frozen=True)
class BoxParams:
    """One box photograph: an item list per compartment (row-major)."""

    view: View
    tray: tuple[float, float, float]
    items: tuple[tuple[Item, ...], ...]


def _centre(cell: int) -> np.ndarray:
    """Canvas centre of a compartment (row-major index)."""
    row, col = divmod(cell, GRID)
    return at(ORIGIN + (col + 0.5) * CELL, ORIGIN + (row + 0.5) * CELL)


def draw_box(p: BoxParams) -> np.ndarray:
    """The tray with its walls and the items, on its canvas."""
    tray = np.asarray(p.tray)
    canvas = blank(tray * 0.55)
    box(canvas, at(128, 128), (GRID * CELL + WALL, GRID * CELL + WALL), 0, tray * 1.3)
    for cell, items in enumerate(p.items):
        box(canvas, _centre(cell), (CELL - WALL, CELL - WALL), 0, tray)
        for item in items:
            ITEMS[item.kind](canvas, _centre(cell) + item.offset, item.angle)
    return canvas


def _tray() -> np.ndarray:
    """Canvas pixels of the tray (where a crack may start)."""
    canvas = np.zeros(blank(0).shape[:2], np.uint8)
    box(canvas, at(128, 128), (GRID * CELL, GRID * CELL), 0, 255)
    return canvas > 127


def sample_box(rng: np.random.Generator, size: int) -> Scene:
    items = tuple((Item(cell, tuple(np.clip(rng.normal(0, 4, 2), -7, 7)), float(rng.uniform(0, 360))),)
                  for cell in range(GRID * GRID))
    params = BoxParams(sample_view(rng), tuple(np.array((70.0, 82.0, 100.0)) + rng.normal(0, 6, 3)), items)
    render = lambda p: photograph(draw_box(p), p.view, size)  # noqa: E731
    return Scene(params, render(params), posed_support(_tray(), params.view, size), render)


def _with(params: BoxParams, changes: dict[int, tuple[Item, ...]]) -> BoxParams:
    return replace(params, items=tuple(changes.get(cell, items) for cell, items in enumerate(params.items)))


def remove_item(params: BoxParams, rng: np.random.Generator) -> BoxParams:
    """One compartment is empty."""
    return _with(params, {int(rng.integers(GRID * GRID)): ()})


def add_item(params: BoxParams, rng: np.random.Generator) -> BoxParams:
    """A compartment holds a second item (of any kind) beside its own, in the corner farthest from it."""
    cell = int(rng.integers(GRID * GRID))
    own = params.items[cell][0]
    corner = -np.sign(np.asarray(own.offset) + 1e-6) * 20
    extra = Item(int(rng.integers(len(ITEMS))), tuple(corner), float(rng.uniform(0, 360)))
    return _with(params, {cell: (own, extra)})


def swap_items(params: BoxParams, rng: np.random.Generator) -> BoxParams:
    """Two compartments hold each other's items (each lying where the other's own would)."""
    a, b = (int(c) for c in rng.choice(GRID * GRID, 2, replace=False))
    first, second = params.items[a][0], params.items[b][0]
    return _with(params, {a: (replace(first, kind=second.kind),), b: (replace(second, kind=first.kind),)})
