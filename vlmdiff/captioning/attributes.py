"""Colour, texture and shape attributes measured from pixels, for the offline captioner.

Everything works on a fixed 128 px copy of the image, so the words depend only on its content.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

SIDE = 128  # analysis resolution

# Hue ranges in degrees (OpenCV float HSV) -> colour name; greys are named by value.
HUE_NAMES = ((15, "red"), (40, "orange"), (65, "yellow"), (160, "green"), (195, "cyan"), (255, "blue"),
             (290, "purple"), (340, "pink"), (360, "red"))


@dataclass(frozen=True)
class ColourInfo:
    names: tuple[str, ...]  # dominant colour names, most frequent first
    brightness: str
    saturation: str
    contrast: str


@dataclass(frozen=True)
class TextureInfo:
    density: str  # how busy the surface is
    scale: str  # fine or coarse structure
    regularity: str  # a noun phrase
    orientation: str | None  # the grain direction when one dominates


@dataclass(frozen=True)
class ShapeInfo:
    is_object: bool  # one main object on a background, rather than a surface filling the frame
    shape: str = ""
    size: str = ""
    position: str = ""
    background: str = ""  # colour name of the background


def as_array(image: Image.Image) -> np.ndarray:
    """(SIDE, SIDE, 3) float32 RGB in [0, 1]."""
    small = image.convert("RGB").resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    return np.asarray(small, np.float32) / 255.0


def _pixel_names(rgb: np.ndarray) -> np.ndarray:
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)  # H in [0, 360), S and V in [0, 1]
    hue, sat, val = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    bounds = np.array([b for b, _ in HUE_NAMES])
    names = np.array([n for _, n in HUE_NAMES], dtype=object)[np.searchsorted(bounds, hue, side="right").clip(0, 8)]
    brownish = np.isin(names, ["red", "orange", "yellow"]) & (val < 0.6) & (sat > 0.25)
    names = np.where(brownish, "brown", names)
    greyish = sat < 0.18
    grey_names = np.where(val < 0.22, "black", np.where(val > 0.82, "white", "grey"))
    names = np.where(greyish | (val < 0.12), grey_names, names)
    return names


def colour_info(rgb: np.ndarray) -> ColourInfo:
    names, counts = np.unique(_pixel_names(rgb), return_counts=True)
    order = np.argsort(-counts, kind="stable")
    share = counts[order] / counts.sum()
    dominant = tuple(str(names[i]) for i, s in zip(order, share) if s >= 0.15)[:2] or (str(names[order[0]]),)
    luma = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    mean, spread, sat = float(luma.mean()), float(luma.std()), float(hsv[..., 1].mean())
    brightness = "dark" if mean < 0.3 else "moderately bright" if mean < 0.55 else "bright"
    saturation = "greyish" if sat < 0.15 else "muted" if sat < 0.4 else "vivid"
    contrast = "low" if spread < 0.08 else "moderate" if spread < 0.18 else "high"
    return ColourInfo(dominant, brightness, saturation, contrast)


def texture_info(rgb: np.ndarray) -> TextureInfo:
    grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    gx, gy = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    edges = float((np.hypot(gx, gy) > 0.25).mean())
    density = "mostly smooth" if edges < 0.1 else "moderately textured" if edges < 0.3 else "densely textured"
    power = np.abs(np.fft.fftshift(np.fft.fft2(grey - grey.mean()))) ** 2
    ys, xs = np.mgrid[:SIDE, :SIDE] - SIDE // 2
    radius = np.hypot(xs, ys)
    band = (radius > 3) & (radius < SIDE // 2)
    mean_radius = float((power[band] * radius[band]).sum() / max(power[band].sum(), 1e-12))
    scale = "fine-grained" if mean_radius > 14.5 else "coarse"
    peakiness = float(np.sort(power[band])[-8:].mean() / max(power[band].mean(), 1e-12))
    regularity = "a regular, repeating pattern" if peakiness > 200 else "an irregular pattern"
    jxx, jyy, jxy = float((gx * gx).sum()), float((gy * gy).sum()), float((gx * gy).sum())
    coherence = np.hypot(jxx - jyy, 2 * jxy) / max(jxx + jyy, 1e-12)
    orientation = None
    if coherence > 0.2:  # stripes run perpendicular to the dominant gradient
        angle = (np.degrees(0.5 * np.arctan2(2 * jxy, jxx - jyy)) + 90) % 180
        orientation = "horizontal" if angle < 22.5 or angle >= 157.5 else "vertical" if 67.5 <= angle < 112.5 \
            else "diagonal"
    return TextureInfo(density, scale, regularity, orientation)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros_like(mask, bool)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


def _shape_name(mask: np.ndarray) -> str:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    outer = max(contours, key=cv2.contourArea)
    filled = np.zeros(mask.shape, np.uint8)
    cv2.drawContours(filled, [outer], -1, 1, -1)
    if filled.sum() > 1.15 * mask.sum():
        return "ring-shaped"
    ys, xs = np.nonzero(filled)
    eigen = np.linalg.eigvalsh(np.cov(np.stack([xs, ys]).astype(np.float64)))
    if eigen[1] > 4 * max(eigen[0], 1e-6):
        return "elongated"
    area, perimeter = float(filled.sum()), cv2.arcLength(outer, True)
    roundness = 4 * np.pi * area / max(perimeter**2, 1e-6)
    return "round" if roundness > 0.8 else "angular" if roundness < 0.55 else "compact"


def _border(values: np.ndarray, width: int = 6) -> np.ndarray:
    return np.concatenate([values[:width].reshape(len(values[:width]) * values.shape[1], -1),
                           values[-width:].reshape(width * values.shape[1], -1),
                           values[:, :width].reshape(values.shape[0] * width, -1),
                           values[:, -width:].reshape(values.shape[0] * width, -1)])


def _colour_foreground(rgb: np.ndarray) -> np.ndarray:
    """Pixels whose colour differs from the frame's border colour."""
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    border = _border(lab)
    reference = np.median(border, axis=0)
    spread = np.percentile(np.linalg.norm(border - reference, axis=1), 90)
    return np.linalg.norm(lab - reference, axis=2) > max(12.0, 1.5 * spread)


def _texture_foreground(rgb: np.ndarray) -> np.ndarray:
    """Pixels busier with edges than the frame's border (a dark object on a dark background)."""
    grey = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    gx, gy = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
    energy = cv2.GaussianBlur(np.hypot(gx, gy), (0, 0), 4)
    return energy > max(0.05, 2 * np.percentile(_border(energy[..., None]), 90))


def _main_object(foreground: np.ndarray) -> np.ndarray | None:
    """The largest blob of `foreground` if it looks like one object inside the frame, else None."""
    foreground = cv2.morphologyEx(foreground.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0
    main = _largest_component(foreground)
    edge = np.concatenate([main[0], main[-1], main[:, 0], main[:, -1]])
    return main if 0.04 < main.mean() < 0.8 and edge.mean() <= 0.08 else None


def shape_info(rgb: np.ndarray) -> ShapeInfo:
    """One main object separated from the background by colour, or failing that by texture."""
    for cue in (_colour_foreground, _texture_foreground):
        main = _main_object(cue(rgb))
        if main is not None:
            break
    else:
        return ShapeInfo(False)
    ys, xs = np.nonzero(main)
    dx, dy = xs.mean() / SIDE - 0.5, ys.mean() / SIDE - 0.5
    if max(abs(dx), abs(dy)) < 0.12:
        position = "centred in the frame"
    else:
        horizontal = "left" if dx < -0.12 else "right" if dx > 0.12 else ""
        vertical = "top" if dy < -0.12 else "bottom" if dy > 0.12 else ""
        position = f"towards the {' '.join(w for w in (vertical, horizontal) if w)} of the frame"
    share = float(main.mean())
    size = "small" if share < 0.15 else "medium-sized" if share < 0.4 else "large"
    background = cv2.dilate(main.astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
    names, counts = np.unique(_pixel_names(rgb)[background], return_counts=True)
    return ShapeInfo(True, _shape_name(main), size, position, str(names[np.argmax(counts)]))
