"""A memory of normal patch features (PatchCore-style kNN), an option of the anomaly map.

It embeds each image at its own aspect ratio (long side `long_side`) with a frozen
backbone (locally averaged features of several blocks on the 1/8 grid), keeps a greedy
coreset of the normal patches of each class (a fraction `coreset_ratio` of them, between
MIN_CORESET and MAX_CORESET), and scores a new image by the distance of each patch to its
nearest normal patches of that image's class. The mean feature of each class lets the pipeline
guess the class of an image ("auto").

The coreset has two stages, so that building it costs time linear in the images: each image's
patches are ordered by a greedy (farthest-point) selection on their own (`image_candidates`,
any image size), and the first patches of each image in that order, about
CANDIDATES_PER_ROW x the coreset size in all, form the pool of a second greedy selection
(`NormalFeatureMemory.with_candidates`). The pool is at most CANDIDATES_PER_ROW x MAX_CORESET
patches, so the second stage's cost does not grow with the number of images.
"""
from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image

from vlmdiff.bounds import Bounds, check_bounds
from vlmdiff.features import FEATURE_RECIPE, create_feature_extractor
from vlmdiff.images import WORK_SIDE, images_to_tensor

SEARCH_BLOCK = 2**24  # distances in a search's buffer (64 MB): above glibc's largest mmap threshold, so it goes
# back to the system when freed (smaller blocks from the heap fragmented it: +20 MB per scored image)
SEARCH_ROWS = 256  # queries per search step: their distances to a class's rows stay in cache (1.5x faster than 1365)
GRID_STRIDE = 8
MIN_CORESET = 1000  # a class keeps at least this many patches (all of them if it has fewer)
# ... and at most this many: the cost of scoring a patch grows with it, and so would building the coreset
# (3% of 100 square images at 512 px; the shipped memory's built-in classes hold 7373 rows each, tire 12288)
MAX_CORESET = 12288
CANDIDATES_PER_ROW = 3  # the per-image stage passes about 3 x the coreset size to the second stage
PROJECTION_DIM = 64  # the greedy selections compare patches on a random projection to this many dimensions
UNKNOWN_CLASS_DISTANCE = 2.0  # an image farther than this from every class (in class radii) is of no known class
# A saved memory's sizes, checked from its files' headers before it is built (the shipped one: 78645 x 152,
# long side 512); the bank (bank_size x feature_channels float16 values) stays within 512 MB.
MAX_BANK_VALUES = 2**28
MEMORY_BOUNDS: Bounds = {
    "feature_channels": (1, 4096), "long_side": (32, WORK_SIDE), "aggregation_kernel": (1, 15), "neighbours": (1, 64),
    "coreset_ratio": (0.0, 1.0), "rotations": (1, 64), "bank_size": (1, MAX_BANK_VALUES),
}
RECIPE_KEYS = (
    "backbone", "layers", "feature_channels", "long_side", "aggregation_kernel", "neighbours", "coreset_ratio", "rotations",
)


def nearest_squared_distances(
    queries: torch.Tensor, rows: torch.Tensor, row_norms: torch.Tensor | None = None, k: int = 1
) -> torch.Tensor:
    """(n, k) squared L2 distances of each of (n, C) queries to its k nearest of (N, C) rows (`row_norms`: their
    squared norms, when known). SEARCH_ROWS queries at a time, all in one buffer of at least SEARCH_BLOCK values."""
    row_norms = (rows * rows).sum(1) if row_norms is None else row_norms
    buffer = torch.empty(max(SEARCH_BLOCK, SEARCH_ROWS * len(rows)), dtype=rows.dtype)
    nearest = []
    for chunk in queries.split(SEARCH_ROWS):
        # |q - b|^2 = |q|^2 + (|b|^2 - 2 q.b): the query's own term is added after the search
        shifted = buffer[: len(chunk) * len(rows)].view(len(chunk), len(rows))
        torch.addmm(row_norms, chunk, rows.T, alpha=-2, out=shifted)
        best = shifted.amin(1, keepdim=True) if k == 1 else shifted.topk(k, dim=1, largest=False).values
        nearest.append(best + (chunk * chunk).sum(1, keepdim=True))
    return torch.cat(nearest).clamp_min(0)


def greedy_coreset(vectors: torch.Tensor, count: int, start: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of a k-center greedy coreset of (N, D) vectors (farthest-point selection): `count` steps of
    one (N, D) matrix-vector product each. It starts from row 0, or continues from the indices `start`
    (kept first, in their order; only the first `count` of them when they are more).

    The steps run in NumPy: its BLAS matrix-vector product is 2-3x faster here than torch's, whose
    per-step overhead dominates these small products."""
    count = min(count, len(vectors))
    start = torch.zeros(1, dtype=torch.int64) if start is None or not len(start) else start[:count]
    squared = (vectors * vectors).sum(1)
    nearest = nearest_squared_distances(vectors, vectors[start], squared[start])[:, 0]  # (N,) to the coreset
    points = vectors.float().numpy()
    scaled = np.ascontiguousarray(-2 * points.T)  # (D, N): one step is a row vector times it
    squared, nearest = squared.float().numpy(), nearest.float().numpy()
    step = np.empty_like(nearest)
    selected = np.empty(count, dtype=np.int64)
    selected[: len(start)] = start.numpy()
    for k in range(len(start), count):
        index = int(nearest.argmax())
        selected[k] = index
        np.dot(points[index], scaled, out=step)
        step += squared
        step += squared[index]
        np.minimum(nearest, step, out=nearest)
    return torch.from_numpy(selected)


def projection_matrix(channels: int, seed: int = 0, dim: int = PROJECTION_DIM) -> torch.Tensor:
    """The random projection (channels, dim) the greedy selections compare patches on."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(channels, dim, generator=generator) / dim**0.5


@dataclass
class ImageCandidates:
    """The per-image stage of the coreset for one feature map (one training image, or one turn of it):
    its first patches in a greedy (farthest-point) order of all its patches, and its mean feature."""

    rows: torch.Tensor  # (k, C) float16, in greedy order: any prefix is that image's greedy coreset
    projected: torch.Tensor  # (k, D) the same rows on the projection
    patches: int  # how many patches the image has (k of them kept)
    mean: torch.Tensor  # (C,) mean feature of the image


@torch.no_grad()
def image_candidates(features: torch.Tensor, limit: int, projection: torch.Tensor) -> ImageCandidates:
    """The first `limit` patches of a greedy order of one image's (C, h, w) features (all of them when
    `limit` >= h * w, in their own order)."""
    patches = features.flatten(1).T.float()  # (P, C)
    projected = patches @ projection  # (P, D)
    if limit < len(patches):
        order = greedy_coreset(projected, limit)
        patches, projected = patches[order], projected[order]
    return ImageCandidates(patches.half(), projected, features[0].numel(), features.float().mean(dim=(1, 2)))


def candidate_keep(candidates: Sequence[ImageCandidates], count: int) -> list[int]:
    """How many of each image's candidates go to the second stage, for a coreset of `count`:
    CANDIDATES_PER_ROW x count shared in proportion to the images' patches (at least one each)."""
    total = sum(c.patches for c in candidates)
    return [max(1, min(len(c.rows), round(CANDIDATES_PER_ROW * count * c.patches / total))) for c in candidates]


@dataclass
class Coreset:
    """The second stage's choice: rows in greedy order (any prefix is a coreset too) and where each came from."""

    rows: torch.Tensor  # (count, C) float16
    image: torch.Tensor  # (count,) which of the candidates (images) each row came from
    position: torch.Tensor  # (count,) its place in that image's candidates

    def restricted(self, images: Sequence[int]) -> "Coreset":
        """The rows of these images only (indices into the candidates it was selected from), the images
        renumbered by their place in `images`: where a selection over a subset of the images starts."""
        renumber = {int(old): new for new, old in enumerate(images)}
        kept = torch.tensor([k for k, i in enumerate(self.image.tolist()) if i in renumber], dtype=torch.int64)
        image = torch.tensor([renumber[i] for i in self.image[kept].tolist()], dtype=torch.int64)
        return Coreset(self.rows[kept], image, self.position[kept])


@torch.no_grad()
def select_coreset(candidates: Sequence[ImageCandidates], count: int, start: Coreset | None = None) -> Coreset:
    """The second stage: `count` rows chosen by a greedy selection over the images' first candidates
    (`candidate_keep`; every candidate when they are not more than `count`). With `start`, a selection over
    (a superset of) these images, the greedy continues from its rows that are in the pool: a subset of the
    images (one fold's complement) then costs only the steps its own rows need."""
    keep = candidate_keep(candidates, count)
    image = torch.cat([torch.full((k,), i, dtype=torch.int64) for i, k in enumerate(keep)])
    position = torch.cat([torch.arange(k) for k in keep])
    rows = torch.cat([c.rows[:k] for c, k in zip(candidates, keep)])
    if count >= len(rows):
        return Coreset(rows, image, position)
    first = None
    if start is not None:
        offsets = torch.tensor([0, *keep]).cumsum(0)
        pooled = start.position < torch.tensor(keep)[start.image]
        first = offsets[start.image[pooled]] + start.position[pooled]
    projected = torch.cat([c.projected[:k] for c, k in zip(candidates, keep)])
    chosen = greedy_coreset(projected, count, first)
    return Coreset(rows[chosen], image[chosen], position[chosen])


@dataclass(frozen=True)
class ClassMatch:
    """Which known classes an image resembles most (nearest mean feature first); distances are in
    units of each class's radius (1 = as far from the class mean as its farthest training image lies
    from the mean of the others)."""

    name: str
    distance: float
    runner_up: str | None = None
    runner_up_distance: float | None = None

    @property
    def known(self) -> bool:
        """False when the image lies far outside every known class."""
        return self.distance <= UNKNOWN_CLASS_DISTANCE

    def describe(self) -> str:
        """In words, for the app and the CLI."""
        nearest = f"{self.name} ({self.distance:.1f}x its normal spread)"
        if self.runner_up is not None:
            nearest += f", then {self.runner_up} ({self.runner_up_distance:.1f}x)"
        if self.known:
            return f"class {self.name}: nearest {nearest}"
        return f"unknown class: the image matches no known class; nearest {nearest}"


class NormalFeatureMemory(ModelMixin, ConfigMixin):
    """Per-class coresets of normal patch features (N, C) and per-class mean features (K, C)."""

    @register_to_config
    def __init__(
        self,
        backbone: str = FEATURE_RECIPE.backbone,
        layers: tuple[int, ...] = FEATURE_RECIPE.layers,
        feature_channels: int = FEATURE_RECIPE.channels,
        long_side: int = 512,
        aggregation_kernel: int = 3,
        neighbours: int = 1,
        coreset_ratio: float = 0.03,
        rotations: int = 1,
        bank_size: int = 1,
        class_names: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self.register_buffer("bank", torch.zeros(bank_size, feature_channels, dtype=torch.float16))
        self.register_buffer("bank_class", torch.zeros(bank_size, dtype=torch.int64))
        self.register_buffer("class_means", torch.zeros(len(class_names), feature_channels))
        # per class: the farthest any of its training images' mean features lies from the mean of the others
        self.register_buffer("class_radii", torch.zeros(len(class_names)))
        self._extractor: list[torch.nn.Module] = []  # frozen backbone, built on first use, never saved
        self._searched: tuple = (None, None, None)  # (key, bank rows, their squared norms) of the last search

    @classmethod
    def check_saved(cls, folder: Path) -> None:
        """ValueError naming the file and field when a saved memory's config.json is out of MEMORY_BOUNDS or its
        bank (shape read from the weights file's header, nothing loaded) does not match it."""
        from safetensors import safe_open

        config_file = Path(folder) / "config.json"
        defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()}
        config = {**defaults, **json.loads(config_file.read_text())}
        check_bounds(config, MEMORY_BOUNDS, f"{config_file}: ")
        shape = (config["bank_size"], config["feature_channels"])
        if shape[0] * shape[1] > MAX_BANK_VALUES:
            raise ValueError(f"{config_file}: bank_size x feature_channels must be at most {MAX_BANK_VALUES}; "
                             f"got {shape[0]} x {shape[1]}")
        for weights in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(weights, "pt") as file:
                saved = tuple(file.get_slice("bank").get_shape()) if "bank" in file.keys() else shape
            if saved != shape:
                raise ValueError(f"{weights}: bank is {saved[0]} x {saved[1]} but {config_file.name} gives "
                                 f"bank_size x feature_channels = {shape[0]} x {shape[1]}")

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

    def training_features(self, image: Image.Image) -> list[torch.Tensor]:
        """What a normal training image adds to the memory: its embedding, and those of the image
        turned by each multiple of 360 / `rotations` degrees (parts that lie in any orientation)."""
        turns = self.config.rotations
        return [self.embed(image.rotate(360 * k / turns, expand=True) if k else image) for k in range(turns)]

    # ------------------------------------------------------------------ building
    @property
    def recipe(self) -> dict:
        """How this memory embeds and subsamples (its config without the stored classes)."""
        return {key: self.config[key] for key in RECIPE_KEYS}

    def coreset_size(self, patches: int) -> int:
        """How many of a class's `patches` its coreset keeps: `coreset_ratio` of them, at least MIN_CORESET
        and at most MAX_CORESET."""
        return min(patches, MAX_CORESET, max(MIN_CORESET, math.ceil(self.config.coreset_ratio * patches)))

    def candidate_limit(self, patches: int, maps: int, vectors: int | None = None) -> int:
        """How many of an image's `patches` the per-image stage keeps when the image is one of at least `maps`
        feature maps of the class: enough for `select_coreset` of any such set (3 x the coreset's share)."""
        share = max(self.config.coreset_ratio * patches, (vectors or MIN_CORESET) / max(maps, 1))
        return min(patches, math.ceil(CANDIDATES_PER_ROW * share) + 1)

    @classmethod
    @torch.no_grad()
    def fit(
        cls, images: list[Image.Image], class_names: list[str], vectors_per_class: int | None = None, seed: int = 0, **config
    ) -> "NormalFeatureMemory":
        """A memory of the normal `images` (any sizes), one coreset per class (`vectors_per_class`
        patches, or by default `coreset_ratio` of the class's patches)."""
        if len(images) != len(class_names) or not images:
            raise ValueError("give one class name per image, and at least one image")
        memory = cls(**config)
        for name in sorted(set(class_names)):
            members = [image for image, n in zip(images, class_names) if n == name]
            memory = memory.with_class(members, name, vectors_per_class, seed)
        return memory

    @torch.no_grad()
    def with_class(
        self, images: list[Image.Image], class_name: str, vectors: int | None = None, seed: int = 0
    ) -> "NormalFeatureMemory":
        """A new memory in which `class_name` holds the coreset of these images (replacing any earlier one)."""
        features = [f for image in images for f in self.training_features(image)]
        return self.with_features(features, class_name, vectors, seed)

    @torch.no_grad()
    def with_features(
        self, features: list[torch.Tensor], class_name: str, vectors: int | None = None, seed: int = 0
    ) -> "NormalFeatureMemory":
        """`with_class` from the images' embeddings (each (C, h, w), any sizes, from `training_features`)."""
        vectors = vectors or self.coreset_size(sum(f[0].numel() for f in features))
        total = sum(f[0].numel() for f in features)
        projection = projection_matrix(self.config.feature_channels, seed)
        limits = [f[0].numel() if vectors >= total else
                  max(1, round(CANDIDATES_PER_ROW * vectors * f[0].numel() / total)) for f in features]
        candidates = [image_candidates(f, limit, projection) for f, limit in zip(features, limits)]
        return self.with_candidates(candidates, class_name, vectors)

    @torch.no_grad()
    def with_candidates(
        self, candidates: Sequence[ImageCandidates], class_name: str, vectors: int | None = None,
        start: Coreset | None = None,
    ) -> "NormalFeatureMemory":
        """A new memory in which `class_name` holds the coreset (`select_coreset`, continuing from `start`) of
        these images' candidates (`image_candidates` of each image's `training_features`), replacing any
        earlier one."""
        return self.with_coreset(self.select(candidates, vectors, start), candidates, class_name)

    def select(
        self, candidates: Sequence[ImageCandidates], vectors: int | None = None, start: Coreset | None = None
    ) -> Coreset:
        """A class's coreset from its images' candidates (`select_coreset`): `vectors` rows, or by default
        `coreset_size` of the class's patches."""
        return select_coreset(candidates, vectors or self.coreset_size(sum(c.patches for c in candidates)), start)

    @torch.no_grad()
    def with_coreset(
        self, coreset: Coreset, candidates: Sequence[ImageCandidates], class_name: str
    ) -> "NormalFeatureMemory":
        """A new memory in which `class_name` holds `coreset`, selected from these images' candidates."""
        chosen = coreset.rows
        image_means = torch.stack([c.mean for c in candidates])
        mean = image_means.mean(0)
        # leave-one-out: how far each image lies from the mean of the others (0 for a single image)
        count = len(candidates)
        radius = (image_means - mean).norm(dim=1).max() * count / max(count - 1, 1) if count > 1 else torch.tensor(0.0)
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
        means = {self.config.class_names[i]: (self.class_means[i], self.class_radii[i]) for i in keep}
        means[class_name] = (mean, radius)
        memory.class_means.copy_(torch.stack([means[n][0] for n in names]))
        memory.class_radii.copy_(torch.stack([means[n][1] for n in names]))
        memory._extractor = self._extractor
        return memory.eval()

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def match_class(self, features: torch.Tensor) -> ClassMatch:
        """The known classes whose mean features are nearest to an image's (C, h, w) mean feature, with
        each distance in units of that class's radius (0, always known, for a class without a radius:
        one image, or a memory saved before radii were kept)."""
        if not self.config.class_names:
            raise ValueError("the memory holds no class")
        distances = torch.cdist(features.mean(dim=(1, 2))[None], self.class_means)[0]
        radii = self.class_radii
        relative = torch.where(radii > 0, distances / radii.clamp_min(1e-12), torch.zeros_like(distances))
        order = distances.argsort().tolist()
        names = self.config.class_names
        runner_up = (names[order[1]], float(relative[order[1]])) if len(order) > 1 else (None, None)
        return ClassMatch(names[order[0]], float(relative[order[0]]), *runner_up)

    def _search_rows(self, class_name: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The bank rows a search of `class_name` compares with (float32) and their squared norms, kept for the
        next search of the same class (scoring many images of one class: calibration, a folder, the app)."""
        version = None if self.bank.is_inference() else self.bank._version  # inference tensors keep no count
        key = (class_name, self.bank.device, self.bank.data_ptr(), version)
        cached_key, bank, norms = self._searched
        if cached_key != key:
            bank = self.bank
            if class_name in self.config.class_names:
                bank = bank[self.bank_class == self.config.class_names.index(class_name)]
            bank = bank.float()
            norms = (bank * bank).sum(1)
            self._searched = (key, bank, norms)
        return bank, norms

    @torch.no_grad()
    def distance_map(self, features: torch.Tensor, class_name: str | None = None) -> torch.Tensor:
        """Mean L2 distance of each patch of (C, h, w) features to its k nearest normal patches: (h, w).

        With a known `class_name` only that class's patches are searched; otherwise all.
        """
        channels, height, width = features.shape
        bank, bank_norms = self._search_rows(class_name)
        queries = features.flatten(1).T  # (h*w, C)
        nearest = nearest_squared_distances(queries, bank, bank_norms, self.config.neighbours)
        return nearest.sqrt().mean(1).view(height, width)
