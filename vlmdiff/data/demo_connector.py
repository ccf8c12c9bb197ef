"""A cable connector seen from above, for logical anomalies: six wires in a fixed colour order.

Normal connectors have the six wires in the same colour order, each bending a little differently;
pose, lighting and grain vary. Logical defects re-render the same photograph with two wires
swapped or one wire of a colour the cable does not use; a scratch on the housing or the wires is
the structural defect.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from vlmdiff.data.canvas import MARGIN, View, at, blank, box, line, photograph, posed_support, sample_view
from vlmdiff.data.defects import Scene

WIRE_COLOURS = ((35, 35, 38), (125, 72, 35), (205, 35, 35), (240, 135, 25), (235, 205, 35), (40, 150, 65))
WRONG_COLOURS = ((45, 75, 205), (240, 240, 235), (135, 55, 170), (140, 140, 145))
PITCH, WIDTH = 24.0, 14.0  # wire spacing and width (layout px)
HOUSING = (128.0, 72.0, 170.0, 56.0)  # centre x, centre y, width, height


@dataclass(frozen=True)
class ConnectorParams:
    """One connector photograph: wire colours left to right and each wire's bend."""

    view: View
    colours: tuple[tuple[float, float, float], ...]
    bends: tuple[tuple[float, float, float], ...]  # per wire: amplitude, wavelength, phase of its sideways bend
    housing: tuple[float, float, float]
    mat: tuple[float, float, float]


def _wire_path(index: int, bend: tuple[float, float, float]) -> np.ndarray:
    """Canvas points of a wire from inside the housing down past the bottom of the canvas."""
    x0 = HOUSING[0] + (index - 2.5) * PITCH
    ys = np.linspace(HOUSING[1], 256 + MARGIN, 60)
    along = (ys - HOUSING[1]) / (256 - HOUSING[1])
    amplitude, wavelength, phase = bend
    xs = x0 + amplitude * along * np.sin(2 * np.pi * along / wavelength + phase)
    return np.stack([xs, ys], 1) + at(0, 0)


def draw_connector(p: ConnectorParams) -> np.ndarray:
    """Mat, wires (insulation with a highlight), then the housing with one contact per wire."""
    canvas = blank(p.mat)
    for index, (colour, bend) in enumerate(zip(p.colours, p.bends)):
        path = _wire_path(index, bend)
        line(canvas, path, colour, int(WIDTH))
        line(canvas, path - (WIDTH / 4, 0), np.minimum(255, np.asarray(colour) * 1.3 + 35), 2)
    x, y, width, height = HOUSING
    box(canvas, at(x, y), (width, height), 0, p.housing)
    box(canvas, at(x, y - height / 2 + 4), (width, 8), 0, np.asarray(p.housing) * 0.85)
    for index in range(len(p.colours)):
        contact = at(x + (index - 2.5) * PITCH, y - 6)
        box(canvas, contact, (12, 16), 0, (60, 60, 62))
        box(canvas, contact, (6, 10), 0, (200, 180, 110))
    return canvas


def _support(p: ConnectorParams) -> np.ndarray:
    """Canvas pixels of the housing and the wires."""
    canvas = np.zeros(blank(0).shape[:2], np.uint8)
    for index, bend in enumerate(p.bends):
        line(canvas, _wire_path(index, bend), 255, int(WIDTH))
    box(canvas, at(*HOUSING[:2]), HOUSING[2:], 0, 255)
    return canvas > 127


def sample_connector(rng: np.random.Generator, size: int) -> Scene:
    params = ConnectorParams(
        view=sample_view(rng, shift=6.0, rotation=4.0),
        colours=tuple(tuple(np.array(c, float) + rng.normal(0, 4, 3)) for c in WIRE_COLOURS),
        bends=tuple((float(rng.uniform(2, 8)), float(rng.uniform(0.8, 2.0)), float(rng.uniform(0, 2 * np.pi)))
                    for _ in WIRE_COLOURS),
        housing=tuple(np.array((225.0, 220.0, 200.0)) + rng.normal(0, 4, 3)),
        mat=tuple(np.array((70.0, 95.0, 90.0)) + rng.normal(0, 5, 3)),
    )
    render = lambda p: photograph(draw_connector(p), p.view, size)  # noqa: E731
    return Scene(params, render(params), posed_support(_support(params), params.view, size), render)


def swap_wires(params: ConnectorParams, rng: np.random.Generator) -> ConnectorParams:
    """Two wires (any two) in each other's place."""
    a, b = (int(i) for i in rng.choice(len(params.colours), 2, replace=False))
    colours = list(params.colours)
    colours[a], colours[b] = colours[b], colours[a]
    return replace(params, colours=tuple(colours))


def wrong_wire(params: ConnectorParams, rng: np.random.Generator) -> ConnectorParams:
    """One wire of a colour the cable does not use."""
    colours = list(params.colours)
    colours[int(rng.integers(len(colours)))] = WRONG_COLOURS[rng.integers(len(WRONG_COLOURS))]
    return replace(params, colours=tuple(colours))
