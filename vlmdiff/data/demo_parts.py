"""Small-part classes of the built-in benchmark: a screw and a coil spring, drawn procedurally.

Like real inspection data of small parts, each lies anywhere on a plain light table in any
orientation (grey metal, fine periodic structure: thread crests, coil turns), and the defects
are small: a few chipped crests, a bent tip, a broken or squeezed coil. The part is drawn in its
own frame on a canvas, then posed (rotation + shift) and given sensor grain; a part defect
re-renders the same pose and grain with one parameter changed, so masks stay exact.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from vlmdiff.data.defects import Scene

CANVAS = 256  # the part's own frame, in pixels at 256 px output


@dataclass(frozen=True)
class Pose:
    """Where the part lies and how the table looks."""

    angle: float  # degrees
    shift: tuple[float, float]  # pixels at 256 px
    table: float  # grey level of the table
    metal: float  # grey level of the lit metal
    grain_seed: int


def sample_pose(rng: np.random.Generator, reach: float) -> Pose:
    """Any orientation; the part's centre within `reach` pixels of the image centre (at 256 px)."""
    return Pose(
        angle=rng.uniform(0, 360),
        shift=tuple(rng.uniform(-reach, reach, 2)),
        table=rng.uniform(195, 220),
        metal=rng.uniform(120, 150),
        grain_seed=int(rng.integers(2**31)),
    )


def place(frame_image: np.ndarray, pose: Pose, size: int) -> np.ndarray:
    """A CANVAS x CANVAS array in the part's frame, rotated and shifted into the size x size image."""
    matrix = cv2.getRotationMatrix2D((CANVAS / 2, CANVAS / 2), pose.angle, size / CANVAS)
    matrix[:, 2] += (size / 2 - CANVAS / 2 + pose.shift[0] * size / CANVAS,
                     size / 2 - CANVAS / 2 + pose.shift[1] * size / CANVAS)
    return cv2.warpAffine(frame_image, matrix, (size, size), flags=cv2.INTER_LINEAR)


def pose_and_grain(layer: np.ndarray, alpha: np.ndarray, pose: Pose, size: int) -> np.ndarray:
    """Place a part (grey layer + alpha, CANVAS x CANVAS, part frame) on the table: an RGB image."""
    part, cover = place(layer, pose, size), place(alpha, pose, size)
    shadow = cv2.GaussianBlur(cover, (0, 0), 3 * size / CANVAS)
    ys = np.mgrid[:size, :size][0].astype(np.float32) / size
    table = pose.table * (1 - 0.25 * np.roll(shadow, (2, 2), (0, 1))) * (1 + 0.05 * (ys - 0.5))
    grey = table * (1 - cover) + part * cover
    grain = np.random.default_rng(pose.grain_seed).normal(0, 2.0, (size, size))
    grey = np.clip(np.round(grey + grain), 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


def _frame() -> tuple[np.ndarray, np.ndarray]:
    """(u, v): coordinates of the part frame, u along the part's axis, v across it, origin at the centre."""
    ys, xs = np.mgrid[:CANVAS, :CANVAS].astype(np.float32)
    return xs - CANVAS / 2, ys - CANVAS / 2


def _support(alpha: np.ndarray, pose: Pose, size: int) -> np.ndarray:
    """Image pixels well inside the part (where painted defects may start)."""
    inner = cv2.erode((alpha > 0.5).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(np.float32)
    return place(inner, pose, size) > 0.5


# ---- screw ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScrewParams:
    """A countersunk screw lying on its side: head, threaded shank, pointed tip."""

    pose: Pose
    length: float  # shank length, pixels at 256 px
    radius: float  # shank core radius
    pitch: float  # thread pitch
    chip: tuple[float, float, float] | None = None  # (u start, length, side +-1): crests broken off
    bend: float = 0.0  # tip bent sideways by this many pixels


def sample_screw(rng: np.random.Generator, size: int) -> Scene:
    params = ScrewParams(sample_pose(rng, 40), length=rng.uniform(120, 140), radius=rng.uniform(8, 9.5),
                         pitch=rng.uniform(6.5, 7.5))
    layer, alpha = draw_screw(params)
    render = lambda p: pose_and_grain(*draw_screw(p), p.pose, size)  # noqa: E731
    return Scene(params, render(params), _support(alpha, params.pose, size), render)


def draw_screw(p: ScrewParams) -> tuple[np.ndarray, np.ndarray]:
    """The screw's grey layer and alpha in its own frame."""
    u, v = _frame()
    start, end = -p.length / 2, p.length / 2
    tip = end - 3 * p.radius
    along = np.clip((u - tip) / (end - tip), 0, 1)
    v = v - p.bend * along**2  # a bent tip
    crest = 1 - 2 * np.abs(((u - start) / p.pitch) % 1 - 0.5)  # 0 root .. 1 crest, triangular
    half = p.radius * (1 + 0.35 * crest) * (1 - along)
    if p.chip is not None:
        begin, span, side = p.chip
        broken = (u > begin) & (u < begin + span) & (np.sign(v) == side)
        half = np.where(broken, p.radius * (1 - 0.15 * crest), half)
    shank = (u > start) & (np.abs(v) < half)
    head_len, head_half = 0.55 * p.radius * 2, 2.2 * p.radius
    head = (u <= start) & (u > start - head_len) & (np.abs(v) < head_half - (start - u) * 0.3)
    alpha = cv2.GaussianBlur((shank | head).astype(np.float32), (0, 0), 0.6)
    roundness = np.sqrt(np.clip(1 - (v / (np.maximum(half, 1) * 1.2)) ** 2, 0, 1))
    flank = 0.75 + 0.35 * np.sin(2 * np.pi * ((u - start) / p.pitch + 0.15 * v / p.radius))
    shade = np.where(head, 0.9 + 0.15 * np.cos(np.pi * v / head_half), roundness * flank)
    slot = head & (np.abs(v) < 1.5)
    shade = np.where(slot, 0.35, shade)
    return (p.pose.metal * shade).astype(np.float32), alpha


def chip_thread(params: ScrewParams, rng: np.random.Generator) -> ScrewParams:
    """One to three neighbouring thread crests broken off on one side."""
    span = params.pitch * rng.integers(1, 4)
    begin = rng.uniform(-params.length / 2 + params.pitch, params.length / 2 - 4 * params.radius - span)
    return replace(params, chip=(begin, span, float(rng.choice([-1, 1]))))


def bend_tip(params: ScrewParams, rng: np.random.Generator) -> ScrewParams:
    """The tip bent sideways by a few pixels."""
    return replace(params, bend=float(rng.choice([-1, 1]) * rng.uniform(3, 8)))


# ---- spring --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpringParams:
    """A helical compression spring seen from the side: `turns` coils of round wire."""

    pose: Pose
    turns: int
    pitch: float  # axial distance between coils
    radius: float  # coil radius
    wire: float  # wire radius
    gap: tuple[float, float] | None = None  # (turn position, length in radians): a broken-out piece
    squeeze: tuple[int, float] | None = None  # (coil index, factor): one coil narrower


def sample_spring(rng: np.random.Generator, size: int) -> Scene:
    params = SpringParams(sample_pose(rng, 35), turns=int(rng.integers(9, 12)), pitch=rng.uniform(10, 12),
                          radius=rng.uniform(20, 25), wire=rng.uniform(2.2, 2.8))
    layer, alpha = draw_spring(params)
    render = lambda p: pose_and_grain(*draw_spring(p), p.pose, size)  # noqa: E731
    return Scene(params, render(params), _support(alpha, params.pose, size), render)


def draw_spring(p: SpringParams) -> tuple[np.ndarray, np.ndarray]:
    """The spring's grey layer and alpha: the wire drawn back half first, front half over it."""
    scale = 16  # cv2 sub-pixel drawing
    layer = np.zeros((CANVAS, CANVAS), np.float32)
    alpha = np.zeros((CANVAS, CANVAS), np.float32)
    s = np.linspace(0, 2 * np.pi * p.turns, 120 * p.turns)
    coil = (s // (2 * np.pi)).astype(int)
    radius = np.full_like(s, p.radius)
    if p.squeeze is not None:
        radius = np.where(coil == p.squeeze[0], p.radius * p.squeeze[1], radius)
    u = (s / (2 * np.pi) - p.turns / 2) * p.pitch + CANVAS / 2
    v = radius * np.cos(s) + CANVAS / 2
    keep = np.ones_like(s, bool) if p.gap is None else ~((s > p.gap[0]) & (s < p.gap[0] + p.gap[1]))
    thickness = max(1, int(round(2 * p.wire)))
    for front in (False, True):
        drawn = keep & ((np.sin(s) > 0) == front)
        runs = np.split(np.arange(len(s)), np.flatnonzero(np.diff(drawn.astype(int))) + 1)
        for run in (r for r in runs if drawn[r[0]] and len(r) > 1):
            points = np.round(np.stack([u[run], v[run]], 1) * scale).astype(np.int32)
            tone = p.pose.metal * (1.05 if front else 0.7)
            cv2.polylines(layer, [points], False, tone, thickness, cv2.LINE_AA, shift=4)
            cv2.polylines(alpha, [points], False, 1.0, thickness, cv2.LINE_AA, shift=4)
            highlight = np.round(np.stack([u[run], v[run] - 0.4 * p.wire], 1) * scale).astype(np.int32)
            cv2.polylines(layer, [highlight], False, tone * 1.25, 1, cv2.LINE_AA, shift=4)
    return layer, np.clip(alpha, 0, 1)


def break_coil(params: SpringParams, rng: np.random.Generator) -> SpringParams:
    """A short piece missing from the front half of one coil (where it is not hidden behind other wire)."""
    length = rng.uniform(0.5, 1.2)
    start = 2 * np.pi * rng.integers(1, params.turns - 1) + rng.uniform(0.3, np.pi - 0.3 - length)
    return replace(params, gap=(start, length))


def squeeze_coil(params: SpringParams, rng: np.random.Generator) -> SpringParams:
    """One coil deformed narrower than the others."""
    return replace(params, squeeze=(int(rng.integers(1, params.turns - 1)), rng.uniform(0.6, 0.8)))
