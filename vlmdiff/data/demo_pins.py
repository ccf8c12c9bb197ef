"""A grid of pins seen from above (a pin-grid package), for logical anomalies: a missing or an extra pin.

Normal packages carry a pin on every position of a 7 x 7 grid except the keyed ones (a corner and
the centre), each pin sitting in its plated hole; pose, lighting and grain vary. Logical defects
re-render the same photograph with a pin missing (its empty hole shows) or a pin where none
belongs (a keyed position or between four pins); a scratch on the board is the structural defect.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from vlmdiff.data.canvas import View, at, blank, box, disc, photograph, posed_support, sample_view
from vlmdiff.data.defects import Scene

GRID, PITCH = 7, 28.0
KEYED = frozenset({(0, 0), (3, 3)})  # (row, col) positions without a pin


@dataclass(frozen=True)
class PinParams:
    """One package photograph: where pins stand (layout x, y) and the holes of the grid."""

    view: View
    board: tuple[float, float, float]
    pins: tuple[tuple[float, float], ...]


def _position(row: float, col: float) -> tuple[float, float]:
    """Layout (x, y) of a grid position; half-integer rows and columns lie between pins."""
    return 128 + (col - (GRID - 1) / 2) * PITCH, 128 + (row - (GRID - 1) / 2) * PITCH


HOLES = tuple(_position(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in KEYED)


def draw_pins(p: PinParams) -> np.ndarray:
    """Board, plated holes, then the pins (gold head, rim, highlight)."""
    board = np.asarray(p.board)
    canvas = blank(board * 0.6)
    box(canvas, at(128, 128), (GRID * PITCH + 10, GRID * PITCH + 10), 0, board)
    for x, y in HOLES:
        disc(canvas, at(x, y), 5, (170, 130, 70))
        disc(canvas, at(x, y), 3, (20, 18, 16))
    for x, y in p.pins:
        disc(canvas, at(x, y), 7, (160, 125, 45))
        disc(canvas, at(x, y), 5.5, (220, 180, 80))
        disc(canvas, at(x - 2, y - 2), 1.8, (255, 240, 190))
    return canvas


def _board() -> np.ndarray:
    """Canvas pixels of the board (where a scratch may start)."""
    canvas = np.zeros(blank(0).shape[:2], np.uint8)
    box(canvas, at(128, 128), (GRID * PITCH + 10, GRID * PITCH + 10), 0, 255)
    return canvas > 127


def sample_pins(rng: np.random.Generator, size: int) -> Scene:
    pins = tuple((x + float(rng.normal(0, 0.4)), y + float(rng.normal(0, 0.4))) for x, y in HOLES)
    params = PinParams(sample_view(rng, shift=6.0, rotation=4.0),
                       tuple(np.array((40.0, 70.0, 50.0)) + rng.normal(0, 6, 3)), pins)
    render = lambda p: photograph(draw_pins(p), p.view, size)  # noqa: E731
    return Scene(params, render(params), posed_support(_board(), params.view, size), render)


def remove_pin(params: PinParams, rng: np.random.Generator) -> PinParams:
    """One pin is missing; its hole is empty."""
    gone = int(rng.integers(len(params.pins)))
    return replace(params, pins=params.pins[:gone] + params.pins[gone + 1 :])


def add_pin(params: PinParams, rng: np.random.Generator) -> PinParams:
    """A pin on a keyed position or between four pins."""
    if rng.random() < 0.5:
        row, col = sorted(KEYED)[rng.integers(len(KEYED))]
    else:
        row, col = rng.integers(0, GRID - 1, 2) + 0.5
    return replace(params, pins=params.pins + (_position(row, col),))
