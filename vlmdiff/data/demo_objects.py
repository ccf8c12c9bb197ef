"""Object classes of the built-in benchmark, drawn procedurally: a metal washer and a small circuit board.

Each sample draws its parameters (pose, size, colour, lighting, a grain seed) so that normal images
vary, and renders them deterministically, so a part defect can re-render the same scene with one
thing changed (a chipped edge, a missing or misplaced component) and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from vlmdiff.data.canvas import box, disc
from vlmdiff.data.defects import Scene

# ---- washer ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WasherParams:
    """A flat metal ring on a dark table."""

    center: tuple[float, float]
    outer: float  # outer radius, pixels
    inner: float  # inner radius, pixels
    metal: tuple[float, float, float]  # RGB of the lit metal
    light: float  # direction of the light, radians
    background: float  # grey level of the table
    grain_seed: int
    chip: tuple[float, float] | None = None  # (angle, radius) of a piece broken off the outer edge


def sample_washer(rng: np.random.Generator, size: int) -> WasherParams:
    scale = size / 256
    outer = rng.uniform(76, 92) * scale
    return WasherParams(
        center=(size / 2 + rng.normal(0, 5 * scale), size / 2 + rng.normal(0, 5 * scale)),
        outer=outer,
        inner=outer * rng.uniform(0.4, 0.5),
        metal=tuple(np.array([178.0, 176.0, 170.0]) + rng.normal(0, 6) + rng.normal(0, 2.5, 3)),
        light=-2.3 + rng.normal(0, 0.3),
        background=rng.uniform(38, 60),
        grain_seed=int(rng.integers(2**31)),
    )


def render_washer(params: WasherParams, size: int) -> np.ndarray:
    grain = np.random.default_rng(params.grain_seed)
    ys, xs = np.mgrid[:size, :size].astype(np.float32)
    dx, dy = xs - params.center[0], ys - params.center[1]
    dist, theta = np.hypot(dx, dy), np.arctan2(dy, dx)
    alpha = np.clip(params.outer - dist + 0.5, 0, 1) * np.clip(dist - params.inner + 0.5, 0, 1)
    if params.chip is not None:
        angle, radius = params.chip
        edge = (params.center[0] + params.outer * np.cos(angle), params.center[1] + params.outer * np.sin(angle))
        bite = np.hypot(xs - edge[0], ys - edge[1]) / radius
        bite *= 1 + 0.12 * np.sin(7 * np.arctan2(ys - edge[1], xs - edge[0]))  # ragged fracture
        alpha *= np.clip((bite - 1) * radius + 0.5, 0, 1)
    across = np.clip((dist - params.inner) / (params.outer - params.inner), 0, 1)  # 0 inner .. 1 outer edge
    facing = np.cos(theta - params.light)
    glint = np.exp(-(np.angle(np.exp(1j * (theta - params.light))) / 0.35) ** 2) * np.exp(-((across - 0.6) / 0.15) ** 2)
    shade = (0.72 + 0.22 * np.sin(np.pi * across) + 0.14 * facing * (across - 0.5) * 2
             + 0.03 * np.sin(dist * 2.1) + 0.25 * glint)
    metal = np.array(params.metal, np.float32) * shade[..., None]
    table = params.background * (1 + 0.12 * (ys / size - 0.5))[..., None] * np.ones(3, np.float32)
    image = table * (1 - alpha[..., None]) + metal * alpha[..., None] + grain.normal(0, 2.5, (size, size, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def washer_scene(rng: np.random.Generator, size: int) -> Scene:
    params = sample_washer(rng, size)
    ys, xs = np.mgrid[:size, :size]
    dist = np.hypot(xs - params.center[0], ys - params.center[1])
    support = (dist > params.inner + 2) & (dist < params.outer - 2)
    return Scene(params, render_washer(params, size), support, lambda p: render_washer(p, size))


def break_washer(params: WasherParams, rng: np.random.Generator) -> WasherParams:
    """A piece broken off the outer edge, small or large."""
    return replace(params, chip=(rng.uniform(0, 2 * np.pi), rng.uniform(0.08, 0.3) * params.outer))


# ---- circuit board ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    """One component at a position on the board (canonical 256 px coordinates)."""

    kind: str
    x: float
    y: float
    angle: float = 0.0  # degrees
    present: bool = True


# The nominal layout: component kind, position and orientation.
LAYOUT = (
    Part("chip", 128, 92), Part("resistor", 62, 172), Part("resistor", 128, 204),
    Part("resistor", 202, 170, 90), Part("capacitor", 52, 56), Part("capacitor", 204, 54), Part("led", 196, 226),
)
TRACES = (
    ((62, 172), (62, 120), (93, 120)), ((141, 172), (163, 140)), ((128, 204), (128, 126)),
    ((202, 150), (202, 110), (163, 104)), ((52, 56), (93, 70)), ((204, 54), (163, 66)),
    ((196, 226), (222, 226), (222, 190)), ((88, 204), (40, 204), (40, 172)),
)
BOARD_MARGIN = 24  # board drawn beyond the frame, so posing never shows an edge
RESISTOR_BANDS = ((30, 30, 140), (20, 20, 20), (40, 120, 200), (30, 140, 60))


@dataclass(frozen=True)
class CircuitParams:
    """A green circuit board seen from above, slightly shifted and rotated."""

    board: tuple[float, float, float]
    shift: tuple[float, float]
    rotation: float  # degrees
    gain: float
    parts: tuple[Part, ...]
    grain_seed: int


def sample_circuit(rng: np.random.Generator, size: int) -> CircuitParams:
    parts = tuple(replace(p, x=p.x + rng.normal(0, 0.8), y=p.y + rng.normal(0, 0.8),
                          angle=p.angle + rng.normal(0, 1.0)) for p in LAYOUT)
    return CircuitParams(
        board=tuple(np.array([30.0, 105.0, 55.0]) + rng.normal(0, 3, 3)),
        shift=tuple(rng.normal(0, 4 * size / 256, 2)),
        rotation=rng.normal(0, 2.5),
        gain=rng.uniform(0.9, 1.1),
        parts=parts,
        grain_seed=int(rng.integers(2**31)),
    )


def _axes(part: Part) -> tuple[np.ndarray, np.ndarray]:
    a = np.deg2rad(part.angle)
    return np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])


def _pads(canvas: np.ndarray, part: Part) -> None:
    """Solder pads stay on the board when a part is missing or moved."""
    u, v = _axes(part)
    c, pad = np.array([part.x, part.y]), (226, 200, 140)
    if part.kind == "chip":
        for i in range(8):
            for side in (-1, 1):
                box(canvas, c + u * (i - 3.5) * 8 + v * side * 27, (4, 8), part.angle, pad)
    else:
        span = {"resistor": 17, "capacitor": 7, "led": 5}[part.kind]
        for side in (-1, 1):
            box(canvas, c + u * side * span, (7, 7), part.angle, pad)


def _component(canvas: np.ndarray, part: Part, index: int) -> None:
    u, v = _axes(part)
    c = np.array([part.x, part.y])
    if part.kind == "chip":
        for i in range(8):
            for side in (-1, 1):
                box(canvas, c + u * (i - 3.5) * 8 + v * side * 24, (3, 8), part.angle, (185, 185, 180))
        box(canvas, c, (70, 42), part.angle, (28, 28, 32))
        disc(canvas, c - u * 28 - v * 13, 2.5, (90, 90, 95))
        for k in (-1, 1):
            box(canvas, c + v * k * 5, (36, 2), part.angle, (120, 120, 125))
    elif part.kind == "resistor":
        for side in (-1, 1):
            box(canvas, c + u * side * 15, (8, 2), part.angle, (170, 170, 165))
        box(canvas, c, (24, 9), part.angle, (196, 168, 118))
        for k, offset in enumerate((-6, -2, 2)):
            box(canvas, c + u * offset, (2, 9), part.angle, RESISTOR_BANDS[(index + k) % len(RESISTOR_BANDS)])
    elif part.kind == "capacitor":
        disc(canvas, c, 13, (70, 80, 120))
        disc(canvas, c, 11.5, (32, 40, 92))
        box(canvas, c - u * 8, (4, 14), part.angle, (170, 175, 190))
        box(canvas, c + u * 2, (12, 1.5), part.angle + 45, (110, 115, 140))
        box(canvas, c + u * 2, (12, 1.5), part.angle - 45, (110, 115, 140))
    else:  # led
        disc(canvas, c, 6, (200, 30, 30))
        disc(canvas, c - u * 2 - v * 2, 1.8, (255, 190, 190))


def render_circuit(params: CircuitParams, size: int) -> np.ndarray:
    """Draw the board on a canvas larger than the 256 px layout, then pose and crop it to size x size."""
    grain = np.random.default_rng(params.grain_seed)
    side, m = 256 + 2 * BOARD_MARGIN, BOARD_MARGIN
    board = np.array(params.board, np.float32)
    weave = cv2.GaussianBlur(grain.normal(0, 1, (side, side)).astype(np.float32), (0, 0), 1.2)[..., None]
    canvas = np.clip(board * (1 + 0.08 * weave), 0, 255).astype(np.uint8)
    trace = tuple(int(v) for v in np.clip(board * 1.35 + 12, 0, 255))
    for path in TRACES:
        cv2.polylines(canvas, [np.array(path, np.int32) + m], False, trace, 3, cv2.LINE_AA)
    for x, y in ((14, 14), (242, 14), (14, 242), (242, 242)):
        disc(canvas, np.array([x + m, y + m]), 7, (205, 180, 110))
        disc(canvas, np.array([x + m, y + m]), 4, (20, 20, 20))
    for part in LAYOUT:
        _pads(canvas, replace(part, x=part.x + m, y=part.y + m))
    for index, part in enumerate(params.parts):
        if part.present:
            _component(canvas, replace(part, x=part.x + m, y=part.y + m), index)
    matrix = cv2.getRotationMatrix2D((side / 2, side / 2), params.rotation, size / 256)
    matrix[:, 2] += (size / 2 - side / 2 + params.shift[0], size / 2 - side / 2 + params.shift[1])
    image = cv2.warpAffine(canvas, matrix, (size, size), flags=cv2.INTER_LINEAR)
    image = image.astype(np.float32) * params.gain + grain.normal(0, 2.5, (size, size, 3))
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def circuit_scene(rng: np.random.Generator, size: int) -> Scene:
    params = sample_circuit(rng, size)
    support = np.ones((size, size), bool)
    return Scene(params, render_circuit(params, size), support, lambda p: render_circuit(p, size))


def _change_part(params: CircuitParams, index: int, part: Part) -> CircuitParams:
    parts = list(params.parts)
    parts[index] = part
    return replace(params, parts=tuple(parts))


def remove_part(params: CircuitParams, rng: np.random.Generator) -> CircuitParams:
    """One component is missing; its pads are bare."""
    index = int(rng.integers(len(params.parts)))
    return _change_part(params, index, replace(params.parts[index], present=False))


def misplace_part(params: CircuitParams, rng: np.random.Generator) -> CircuitParams:
    """One component is shifted off its pads and/or turned."""
    index = int(rng.integers(len(params.parts)))
    part = params.parts[index]
    distance, direction = rng.uniform(4, 12), rng.uniform(0, 2 * np.pi)
    turn = rng.choice([-1, 1]) * rng.uniform(8, 35) if rng.random() < 0.7 else 0.0
    moved = replace(part, x=part.x + distance * np.cos(direction), y=part.y + distance * np.sin(direction),
                    angle=part.angle + turn)
    return _change_part(params, index, moved)
