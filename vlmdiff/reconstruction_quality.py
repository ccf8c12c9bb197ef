"""How good a reconstruction is, measured against ground truth.

- Fidelity to the input (normal images): PSNR and SSIM (scikit-image) of the reconstruction
  against the input, and the mean cosine similarity of their frozen features.
- Defect removal (defective images with a defect-free source, e.g. the built-in benchmark's
  `test_clean/`): the mean feature distance between reconstruction and clean source inside the
  defect mask, divided by that between input and clean source (1 = the defect was copied,
  0 = it was removed), and the PSNR against the input outside the mask (the rest is kept).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import binary_dilation
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vlmdiff.features import FEATURE_RECIPE, create_feature_extractor
from vlmdiff.images import images_to_tensor

FEATURE_SIDE = 256  # images are compared at this long side
PSNR_CAP = 100.0  # dB for identical images (skimage says infinity)


@dataclass
class ReconstructionQuality:
    """One image's numbers; the defect ones are NaN for a normal image or without a clean source."""

    psnr: float
    ssim: float
    feature_cosine: float
    defect_removal: float = math.nan
    psnr_outside_defect: float = math.nan


class ReconstructionJudge:
    """Measures reconstructions (PIL images of any size: all are compared at the input's size)."""

    def __init__(self) -> None:
        self.features = create_feature_extractor(FEATURE_RECIPE.backbone, FEATURE_RECIPE.layers)

    @torch.no_grad()
    def _feature_maps(self, images: list[Image.Image], size: tuple[int, int]) -> torch.Tensor:
        """(B, C, h, w) concatenated features on the 1/8 grid of `size` (h, w)."""
        pixels = images_to_tensor(images, FEATURE_SIDE)
        pixels = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
        grid = (max(1, size[0] // 8), max(1, size[1] // 8))
        return torch.cat([F.interpolate(f, size=grid, mode="bilinear", align_corners=False) for f in self.features(pixels)], 1)

    def measure(
        self, image: Image.Image, reconstruction: Image.Image, clean: Image.Image | None = None, mask: np.ndarray | None = None
    ) -> ReconstructionQuality:
        """Fidelity of `reconstruction` to `image`, and defect removal when `clean` and `mask` (H, W) are given."""
        scale = FEATURE_SIDE / max(image.size)
        size = (max(8, round(image.height * scale)), max(8, round(image.width * scale)))  # (h, w)
        pictures = [image, reconstruction] + ([clean] if clean is not None else [])
        arrays = [np.asarray(p.convert("RGB").resize(size[::-1], Image.Resampling.BILINEAR)) for p in pictures]
        features = self._feature_maps(pictures, size)  # (2 or 3, C, h, w)
        quality = ReconstructionQuality(
            psnr=_psnr(arrays[0], arrays[1]),
            ssim=float(structural_similarity(arrays[0], arrays[1], channel_axis=2, data_range=255)),
            feature_cosine=float(F.cosine_similarity(features[0], features[1], dim=0).mean()),
        )
        if clean is None or mask is None or not np.asarray(mask).any():
            return quality
        grid = features.shape[-2:]
        inside = F.interpolate(torch.from_numpy(np.asarray(mask, np.float32))[None, None], size=grid, mode="area")[0, 0]
        inside = inside > 0.5 if (inside > 0.5).any() else inside == inside.max()  # at least the most-covered cell
        to_clean = (features[:2] - features[2:3]).norm(dim=1)  # (2, h, w): input and reconstruction vs clean
        quality.defect_removal = float(to_clean[1][inside].mean() / to_clean[0][inside].mean().clamp_min(1e-8))
        resized = np.asarray(Image.fromarray(np.asarray(mask, np.uint8) * 255).resize(size[::-1], Image.Resampling.NEAREST)) > 0
        outside = ~binary_dilation(resized, iterations=2)  # resizing blurs the defect's edge by a pixel or two
        if outside.any():
            quality.psnr_outside_defect = _psnr(arrays[0][outside], arrays[1][outside])
        return quality


def _psnr(reference: np.ndarray, test: np.ndarray) -> float:
    if np.array_equal(reference, test):
        return PSNR_CAP
    return min(float(peak_signal_noise_ratio(reference, test, data_range=255)), PSNR_CAP)


def summarize(qualities: list[ReconstructionQuality], labels: list[int]) -> dict[str, float]:
    """Means: fidelity over normal images (label 0), defect removal over defective ones; NaN when absent."""
    def mean(values: list[float]) -> float:
        values = [v for v in values if not math.isnan(v)]
        return float(np.mean(values)) if values else math.nan

    normal = [q for q, label in zip(qualities, labels) if label == 0]
    defective = [q for q, label in zip(qualities, labels) if label == 1]
    summary = {f"normal_{name}": mean([getattr(q, name) for q in normal]) for name in ("psnr", "ssim", "feature_cosine")}
    summary["defect_removal"] = mean([q.defect_removal for q in defective])
    summary["psnr_outside_defect"] = mean([q.psnr_outside_defect for q in defective])
    return summary

