"""Anomaly maps and image scores from feature pyramids (DiAD / VLMDiff scoring)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

REFERENCE_RESOLUTION = 256  # the published blur sigma and pooling are defined at 256 px


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1 - F.cosine_similarity(a, b, dim=1)  # (B, h, w)


def l2_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).pow(2).sum(dim=1).sqrt()  # (B, h, w)


DISTANCES = {"cosine": cosine_distance, "l2": l2_distance}


def window_distance(a: torch.Tensor, b: torch.Tensor, distance: str, window: int = 1) -> torch.Tensor:
    """For each position of `a` (B, C, h, w), the smallest distance to `b` within a window x window
    neighbourhood (GLAD's tolerance to small misalignment); window 1 compares position by position."""
    measure = DISTANCES[distance]
    if window == 1:
        return measure(a, b)
    pad = window // 2
    batch, channels, height, width = b.shape
    neighbours = F.unfold(F.pad(b, (pad,) * 4, mode="replicate"), window)  # (B, C * window^2, h * w)
    neighbours = neighbours.view(batch, channels, window * window, height, width)
    return torch.stack([measure(a, neighbours[:, :, i]) for i in range(window * window)]).amin(0)


def reconstruction_map(
    features_in: list[torch.Tensor], features_rec: list[torch.Tensor], size: tuple[int, int], distance: str,
    window: int = 1,
) -> torch.Tensor:
    """Sum over layers of the per-position (or best-in-window) distance, bilinearly upsampled: (B, H, W)."""
    maps = [
        F.interpolate(window_distance(a, b, distance, window)[:, None], size=size, mode="bilinear", align_corners=False)
        for a, b in zip(features_in, features_rec)
    ]
    return torch.stack(maps).sum(0)[:, 0]


def _symmetric_pad(x: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """Pad `dim` by `radius` on both sides as scipy.ndimage's mode "reflect" (d c b a | a b c d), any radius."""
    size = x.shape[dim]
    index = torch.arange(-radius, size + radius, device=x.device) % (2 * size)
    index = torch.where(index >= size, 2 * size - 1 - index, index)
    return x.index_select(dim, index)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps as scipy.ndimage.gaussian_filter (truncate 4, mode reflect)."""
    if sigma <= 0:
        return maps
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    x = maps[:, None]
    x = F.conv2d(_symmetric_pad(x, radius, 3), kernel.view(1, 1, 1, -1))
    x = F.conv2d(_symmetric_pad(x, radius, 2), kernel.view(1, 1, -1, 1))
    return x[:, 0]


def image_scores(maps: torch.Tensor, pool_size: int = 8, repeats: int = 2) -> torch.Tensor:
    """Max of the map after repeated pool_size x pool_size average pooling (stride 1): (B,)."""
    x = maps[:, None]
    for _ in range(repeats):
        x = F.avg_pool2d(x, pool_size, stride=1)
    return x.flatten(1).amax(1)


def scaled_sigma(sigma: float, resolution: int) -> float:
    """A blur sigma given at the reference resolution, at `resolution`."""
    return sigma * resolution / REFERENCE_RESOLUTION
