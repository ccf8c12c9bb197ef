"""A memory of normal patch features (PatchCore-style kNN), an option of the anomaly map.

It embeds each image at its own aspect ratio (long side `long_side`) with a frozen
backbone (locally averaged features of several blocks on the 1/8 grid), keeps a greedy
coreset of the normal patches of each class, and scores a new image by the distance of
each patch to its nearest normal patches of that image's class. The mean feature of
each class lets the pipeline guess the class of an image ("auto").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image

from vlmdiff.features import create_feature_extractor
from vlmdiff.images import images_to_tensor

SEARCH_CHUNK = 4096
DEFAULT_VECTORS_PER_CLASS = 8000  # coreset size of a class when none is given
GRID_STRIDE = 8


def greedy_coreset(vectors: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of a k-center greedy coreset of (N, D) vectors (farthest-point selection)."""
    squared = (vectors * vectors).sum(1)
    selected = [0]
    centre = vectors[0]
    nearest = squared - 2 * vectors @ centre + centre @ centre  # (N,) squared distance to the coreset
    for _ in range(min(count, len(vectors)) - 1):
        index = int(nearest.argmax())
        selected.append(index)
        centre = vectors[index]
        nearest = torch.minimum(nearest, squared - 2 * vectors @ centre + centre @ centre)
    return torch.tensor(selected)


def two_stage_coreset(patches: torch.Tensor, count: int, projection_dim: int = 64, seed: int = 0) -> torch.Tensor:
    """Flat indices of a coreset of (I, P, C) per-image patches: greedy within each image to
    about 3 x count / I patches, then greedy over their union, on a random projection."""
    images, per_image, channels = patches.shape
    if count >= images * per_image:
        return torch.arange(images * per_image)
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(channels, projection_dim, generator=generator) / projection_dim**0.5
    projected = patches.float() @ projection  # (I, P, D)
    keep = max(1, min(per_image, round(3 * count / images)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the greedy loop is many tiny ops: one thread is faster
    try:
        candidates = torch.cat([greedy_coreset(projected[i], keep) + i * per_image for i in range(images)])
        if count >= len(candidates):
            return candidates
        return candidates[greedy_coreset(projected.reshape(-1, projection_dim)[candidates], count)]
    finally:
        torch.set_num_threads(threads)


class NormalFeatureMemory(ModelMixin, ConfigMixin):
    """Per-class coresets of normal patch features (N, C) and per-class mean features (K, C)."""

    @register_to_config
    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layers: tuple[int, ...] = (2, 4, 10),
        feature_channels: int = 176,
        long_side: int = 384,
        aggregation_kernel: int = 3,
        neighbours: int = 1,
        bank_size: int = 1,
        class_names: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.register_buffer("bank", torch.zeros(bank_size, feature_channels, dtype=torch.float16))
        self.register_buffer("bank_class", torch.zeros(bank_size, dtype=torch.int64))
        self.register_buffer("class_means", torch.zeros(len(class_names), feature_channels))
        self._extractor: list[torch.nn.Module] = []  # frozen backbone, built on first use, never saved

    # ------------------------------------------------------------------ features
    @property
    def extractor(self) -> torch.nn.Module:
        if not self._extractor:
            self._extractor.append(create_feature_extractor(self.config.backbone, tuple(self.config.layers)))
        return self._extractor[0]

    def input_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) with the long side at `long_side`, aspect kept, multiples of the grid stride."""
        scale = self.config.long_side / max(width, height)
        snap = lambda side: max(GRID_STRIDE * 4, round(side * scale / GRID_STRIDE) * GRID_STRIDE)  # noqa: E731
        return snap(height), snap(width)

    @torch.no_grad()
    def embed(self, image: Image.Image) -> torch.Tensor:
        """Locally aggregated features of one image on its 1/8 grid: (C, h, w)."""
        height, width = self.input_size(*image.size)
        pixels = images_to_tensor([image.resize((width, height), Image.Resampling.BILINEAR)], max(height, width))
        pixels = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False)
        grid = (height // GRID_STRIDE, width // GRID_STRIDE)
        kernel = self.config.aggregation_kernel
        maps = [
            F.interpolate(
                F.avg_pool2d(f, kernel, 1, kernel // 2, count_include_pad=False) if kernel > 1 else f,
                size=grid, mode="bilinear", align_corners=False,
            )
            for f in self.extractor(pixels)
        ]
        return torch.cat(maps, 1)[0]

    # ------------------------------------------------------------------ building
    @classmethod
    @torch.no_grad()
    def fit(
        cls, images: list[Image.Image], class_names: list[str], vectors_per_class: int = DEFAULT_VECTORS_PER_CLASS, seed: int = 0, **config
    ) -> "NormalFeatureMemory":
        """A memory of the normal `images` (any sizes), one coreset of `vectors_per_class` per class."""
        if len(images) != len(class_names) or not images:
            raise ValueError("give one class name per image, and at least one image")
        memory = cls(**config)
        for name in sorted(set(class_names)):
            members = [image for image, n in zip(images, class_names) if n == name]
            memory = memory.with_class(members, name, vectors_per_class, seed)
        return memory

    @torch.no_grad()
    def with_class(
        self, images: list[Image.Image], class_name: str, vectors: int = DEFAULT_VECTORS_PER_CLASS, seed: int = 0
    ) -> "NormalFeatureMemory":
        """A new memory in which `class_name` holds the coreset of these images (replacing any earlier one)."""
        features = [self.embed(image) for image in images]  # each (C, h, w)
        shapes = {f.shape for f in features}
        if len(shapes) == 1:
            patches = torch.stack([f.flatten(1).T for f in features])  # (I, P, C)
            chosen = patches.reshape(-1, patches.shape[-1])[two_stage_coreset(patches, vectors, seed=seed)]
        else:  # images of different sizes: one flat pool
            flat = torch.cat([f.flatten(1).T for f in features])
            chosen = flat[two_stage_coreset(flat[None], vectors, seed=seed)]
        mean = torch.stack([f.mean(dim=(1, 2)) for f in features]).mean(0)
        keep = [i for i, n in enumerate(self.config.class_names) if n != class_name] if self.config.class_names else []
        names = tuple(sorted({self.config.class_names[i] for i in keep} | {class_name}))
        old_rows = torch.isin(self.bank_class, torch.tensor(keep, dtype=torch.int64)) if keep else torch.zeros(
            len(self.bank), dtype=torch.bool
        )
        remap = {self.config.class_names[i]: names.index(self.config.class_names[i]) for i in keep}
        old_classes = torch.tensor(
            [remap[self.config.class_names[c]] for c in self.bank_class[old_rows].tolist()], dtype=torch.int64
        )
        config = {**self.config, "bank_size": int(old_rows.sum()) + len(chosen), "class_names": names}
        memory = type(self)(**{k: v for k, v in config.items() if not k.startswith("_")})
        memory.bank.copy_(torch.cat([self.bank[old_rows], chosen.half()]))
        memory.bank_class.copy_(torch.cat([old_classes, torch.full((len(chosen),), names.index(class_name))]))
        means = {self.config.class_names[i]: self.class_means[i] for i in keep}
        means[class_name] = mean
        memory.class_means.copy_(torch.stack([means[n] for n in names]))
        memory._extractor = self._extractor
        return memory.eval()

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def nearest_class(self, features: torch.Tensor) -> str:
        """The class whose mean feature is closest to this image's (C, h, w) mean feature."""
        if not self.config.class_names:
            return "unknown"
        distances = torch.cdist(features.mean(dim=(1, 2))[None], self.class_means)[0]
        return self.config.class_names[int(distances.argmin())]

    @torch.no_grad()
    def distance_map(self, features: torch.Tensor, class_name: str | None = None) -> torch.Tensor:
        """Mean L2 distance of each patch of (C, h, w) features to its k nearest normal patches: (h, w).

        With a known `class_name` only that class's patches are searched; otherwise all.
        """
        channels, height, width = features.shape
        bank = self.bank.float()
        if class_name in self.config.class_names:
            bank = bank[self.bank_class == self.config.class_names.index(class_name)]
        queries = features.flatten(1).T  # (h*w, C)
        bank_norms = (bank * bank).sum(1)
        distances = []
        for chunk in queries.split(SEARCH_CHUNK):
            squared = torch.addmm(bank_norms, chunk, bank.T, alpha=-2) + (chunk * chunk).sum(1, keepdim=True)  # (n, N)
            if self.config.neighbours == 1:
                nearest = squared.amin(1, keepdim=True)
            else:
                nearest = squared.topk(self.config.neighbours, dim=1, largest=False).values
            distances.append(nearest.clamp_min(0).sqrt().mean(1))
        return torch.cat(distances).view(height, width)
