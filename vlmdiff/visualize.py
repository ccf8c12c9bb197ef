"""Pictures of anomaly detection results: heatmap overlays, a qualitative grid, per-class curves.

Figures are drawn on `matplotlib.figure.Figure` objects and saved through the Agg
canvas, so nothing here touches pyplot's global state or needs a display.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from vlmdiff.metrics import DEFAULT_FPR_LIMIT, _BinaryCurve, _image_inputs, _pixel_inputs, _Ranking, _region_weights

MAX_CURVE_POINTS = 2000  # curves are thinned to about this many points before plotting
GRID_COLUMNS = ("input", "reconstruction", "overlay", "ground truth")


# --------------------------------------------------------------------------- heatmaps


def normalize_map(anomaly_map: npt.ArrayLike, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """Map values to [0, 1] by `value_range` (lo -> 0, hi -> 1, clipped); the map's own min/max if None."""
    values = np.asarray(anomaly_map, dtype=np.float32)
    lo, hi = (float(values.min()), float(values.max())) if value_range is None else map(float, value_range)
    if hi <= lo:  # a flat map (or a degenerate range): everything at the bottom of the scale
        return np.zeros_like(values)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def heatmap(
    anomaly_map: npt.ArrayLike, value_range: tuple[float, float] | None = None, colormap: str = "jet"
) -> np.ndarray:
    """(H, W) map -> (H, W, 3) uint8 RGB image through a matplotlib colormap."""
    colours = matplotlib.colormaps[colormap](normalize_map(anomaly_map, value_range))  # (H, W, 4) in [0, 1]
    return (colours[..., :3] * 255).round().astype(np.uint8)


def threshold_range(threshold: float | None) -> tuple[float, float] | None:
    """The colour scale of a map with a class threshold: 0 at the bottom, the threshold in the middle,
    twice the threshold at the top; None (the map's own min-max) without a positive threshold."""
    if threshold is None or threshold <= 0:
        return None
    return 0.0, 2.0 * threshold


def overlay_heatmap(
    image: Image.Image | npt.ArrayLike,
    anomaly_map: npt.ArrayLike,
    alpha: float = 0.5,
    value_range: tuple[float, float] | None = None,
    colormap: str = "jet",
) -> Image.Image:
    """Blend the coloured map over the image: (1 - alpha) * image + alpha * heatmap.

    alpha is the heatmap's opacity in [0, 1]. A map of another size than the image
    is resized (bilinear) to the image first.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1]; got {alpha}")
    base = image.convert("RGB") if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)).convert("RGB")
    values = np.asarray(anomaly_map, dtype=np.float32)
    if values.shape != (base.height, base.width):
        values = np.asarray(Image.fromarray(values).resize(base.size, Image.Resampling.BILINEAR))
    colours = heatmap(values, value_range, colormap).astype(np.float32)
    blended = (1.0 - alpha) * np.asarray(base, dtype=np.float32) + alpha * colours
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


def mask_image(mask: npt.ArrayLike | None, size: tuple[int, int]) -> Image.Image:
    """A ground-truth mask as a white-on-black RGB image of `size` (width, height); black if None."""
    if mask is None:
        return Image.new("RGB", size)
    return Image.fromarray((np.asarray(mask) > 0.5).astype(np.uint8) * 255).convert("RGB").resize(size)


# --------------------------------------------------------------------------- qualitative grid


@dataclass
class GridRow:
    """One row of the qualitative grid: the four pictures and a label (class, defect, score)."""

    label: str
    image: Image.Image
    reconstruction: Image.Image
    overlay: Image.Image
    ground_truth: Image.Image


def _thumbnail(image: Image.Image, side: int) -> np.ndarray:
    small = image.copy()
    small.thumbnail((side, side))
    return np.asarray(small.convert("RGB"))


def save_qualitative_grid(rows: list[GridRow], path: str | Path, thumbnail_side: int = 192) -> Path:
    """Write a PNG with one row per example: input | reconstruction | overlay | ground truth."""
    if not rows:
        raise ValueError("no rows to draw in the qualitative grid")
    figure = Figure(figsize=(2.2 * len(GRID_COLUMNS), 2.2 * len(rows)), dpi=100, layout="constrained")
    axes = figure.subplots(len(rows), len(GRID_COLUMNS), squeeze=False)
    for row_axes, row in zip(axes, rows):
        pictures = (row.image, row.reconstruction, row.overlay, row.ground_truth)
        for ax, picture in zip(row_axes, pictures):
            ax.imshow(_thumbnail(picture, thumbnail_side))
            ax.set_xticks([])
            ax.set_yticks([])
        row_axes[0].set_ylabel(row.label, fontsize=8)
    for ax, title in zip(axes[0], GRID_COLUMNS):
        ax.set_title(title, fontsize=10)
    return _save(figure, path)


# --------------------------------------------------------------------------- per-class curves


def _save(figure: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path)
    return path


def _thin(*curves: np.ndarray, max_points: int = MAX_CURVE_POINTS) -> tuple[np.ndarray, ...]:
    """Keep about max_points evenly spaced points (always the first and last) of equally long curves."""
    if curves[0].size <= max_points:
        return curves
    keep = np.unique(np.linspace(0, curves[0].size - 1, max_points).round().astype(int))
    return tuple(curve[keep] for curve in curves)


def roc_points(curve: _BinaryCurve) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of a curve from metrics, starting at (0, 0)."""
    tpr = np.concatenate(([0.0], curve.tps / curve.tps[-1]))
    fpr = np.concatenate(([0.0], curve.fps / curve.fps[-1]))
    return fpr, tpr


def pro_curve(anomaly_maps: npt.ArrayLike, masks: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray] | None:
    """(FPR, PRO) points as in the official MVTec AD evaluation; None without regions or normal pixels."""
    map_stack, mask_stack = _pixel_inputs(anomaly_maps, masks)
    ranking = _Ranking.of(map_stack)
    normal = ~mask_stack
    n_normal = int(np.count_nonzero(normal))
    region_weights, n_regions = _region_weights(mask_stack)
    if n_normal == 0 or n_regions == 0:
        return None
    fpr = np.clip(ranking.cumulative(normal) / n_normal, 0.0, 1.0)
    pro = np.clip(ranking.cumulative(region_weights) / n_regions, 0.0, 1.0)
    return np.concatenate(([0.0], fpr, [1.0])), np.concatenate(([0.0], pro, [1.0]))


def plot_roc(
    path: str | Path,
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    anomaly_maps: npt.ArrayLike | None = None,
    masks: npt.ArrayLike | None = None,
    title: str = "ROC",
) -> Path:
    """Image ROC curve, plus the pixel ROC curve when maps and masks are given (AUROC in the legend)."""
    figure = Figure(figsize=(4.5, 4.2), dpi=100, layout="constrained")
    ax = figure.subplots()
    score_array, label_array = _image_inputs(scores, labels)
    curves = [("image", _BinaryCurve.of(_Ranking.of(score_array), label_array))]
    if anomaly_maps is not None and masks is not None:
        map_stack, mask_stack = _pixel_inputs(anomaly_maps, masks)
        curves.append(("pixel", _BinaryCurve.of(_Ranking.of(map_stack), mask_stack)))
    drawn = 0
    for name, curve in curves:
        if curve.tps[-1] == 0 or curve.fps[-1] == 0:
            continue  # ROC is undefined without both normal and anomalous samples
        fpr, tpr = _thin(*roc_points(curve))
        ax.plot(fpr, tpr, label=f"{name} AUROC {100 * curve.auroc():.1f}%")
        drawn += 1
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    if not drawn:
        ax.text(0.5, 0.5, "undefined: needs normal and anomalous samples", ha="center", va="center", fontsize=8)
    else:
        ax.legend(loc="lower right", fontsize=8)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title=title)
    return _save(figure, path)


def plot_pro(
    path: str | Path,
    anomaly_maps: npt.ArrayLike,
    masks: npt.ArrayLike,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
    aupro: float | None = None,
    title: str = "PRO",
) -> Path:
    """Per-region-overlap against pixel FPR, up to fpr_limit; the AUPRO (if given) in the legend."""
    figure = Figure(figsize=(4.5, 4.2), dpi=100, layout="constrained")
    ax = figure.subplots()
    points = pro_curve(anomaly_maps, masks)
    if points is None:
        ax.text(0.5, 0.5, "undefined: no defect regions", ha="center", va="center", fontsize=8, transform=ax.transAxes)
    else:
        fpr, pro = points
        end = int(np.searchsorted(fpr, fpr_limit, side="right"))
        fpr_part, pro_part = fpr[: end + 1], pro[: end + 1]  # one point past the limit, cut by xlim
        label = "PRO" if aupro is None else f"AUPRO@{fpr_limit:g} {100 * aupro:.1f}%"
        ax.plot(*_thin(fpr_part, pro_part), label=label)
        ax.legend(loc="lower right", fontsize=8)
    ax.set(xlim=(0, fpr_limit), ylim=(0, 1.01), xlabel="false positive rate", ylabel="per-region overlap", title=title)
    return _save(figure, path)


def plot_score_histogram(
    path: str | Path,
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    threshold: float | None = None,
    title: str = "image scores",
    bins: int = 30,
) -> Path:
    """Histograms of normal and anomalous image scores, with a vertical line at the threshold if given."""
    score_array, label_array = _image_inputs(scores, labels)
    figure = Figure(figsize=(5.0, 3.6), dpi=100, layout="constrained")
    ax = figure.subplots()
    edges = np.histogram_bin_edges(np.append(score_array, [] if threshold is None else [threshold]), bins=bins)
    for name, selected, colour in (("normal", ~label_array, "tab:blue"), ("anomalous", label_array, "tab:red")):
        if selected.any():
            ax.hist(score_array[selected], bins=edges, alpha=0.6, color=colour, label=f"{name} ({int(selected.sum())})")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2, label=f"threshold {threshold:.4g}")
    ax.legend(fontsize=8)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(xlabel="anomaly score", ylabel="images", title=title)
    return _save(figure, path)
