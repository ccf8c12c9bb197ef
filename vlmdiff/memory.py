"""A memory of normal patch features (PatchCore-style kNN), an option of the anomaly map.

It stores locally aggregated feature vectors of normal training images (optionally a
greedy coreset) and scores a feature map by the distance of each position to its
nearest normal neighbours. It also keeps one mean feature per class, which lets the
pipeline guess the class of an image ("auto").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

SEARCH_CHUNK = 4096


def aggregate_patches(features: torch.Tensor, kernel: int) -> torch.Tensor:
    """3x3 (kernel x kernel) local averaging of a feature map, PatchCore's neighbourhood aggregation."""
    if kernel <= 1:
        return features
    return F.avg_pool2d(features, kernel, stride=1, padding=kernel // 2, count_include_pad=False)


def greedy_coreset(vectors: torch.Tensor, count: int, projection_dim: int = 128, seed: int = 0) -> torch.Tensor:
    """Indices of a k-center greedy coreset, selected on a random projection (PatchCore)."""
    generator = torch.Generator().manual_seed(seed)
    if vectors.shape[1] > projection_dim:
        projection = torch.randn(vectors.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        vectors = vectors @ projection
    selected = [int(torch.randint(len(vectors), (1,), generator=generator))]
    nearest = torch.cdist(vectors, vectors[selected]).squeeze(1)  # (N,)
    for _ in range(count - 1):
        index = int(nearest.argmax())
        selected.append(index)
        nearest = torch.minimum(nearest, torch.cdist(vectors, vectors[index : index + 1]).squeeze(1))
    return torch.tensor(selected)


class NormalFeatureMemory(ModelMixin, ConfigMixin):
    """Normal patch features (N, C) and per-class mean features (K, C)."""

    @register_to_config
    def __init__(
        self,
        feature_channels: int,
        bank_size: int = 1,
        class_names: tuple[str, ...] = (),
        aggregation_kernel: int = 3,
        neighbours: int = 1,
    ) -> None:
        super().__init__()
        self.register_buffer("bank", torch.zeros(bank_size, feature_channels, dtype=torch.float16))
        self.register_buffer("class_means", torch.zeros(len(class_names), feature_channels))

    @classmethod
    @torch.no_grad()
    def fit(
        cls,
        features: torch.Tensor,  # (N, C, h, w) of normal images
        class_names: list[str],  # one per image
        coreset_ratio: float = 0.1,
        aggregation_kernel: int = 3,
        neighbours: int = 1,
        seed: int = 0,
    ) -> "NormalFeatureMemory":
        if not 0 < coreset_ratio <= 1:
            raise ValueError(f"coreset_ratio must be in (0, 1], got {coreset_ratio}")
        names = sorted(set(class_names))
        patches = aggregate_patches(features.float(), aggregation_kernel)
        vectors = patches.permute(0, 2, 3, 1).reshape(-1, features.shape[1])  # (N*h*w, C)
        count = max(neighbours, int(len(vectors) * coreset_ratio))
        if count < len(vectors):
            vectors = vectors[greedy_coreset(vectors, count, seed=seed)]
        memory = cls(features.shape[1], len(vectors), tuple(names), aggregation_kernel, neighbours)
        memory.bank.copy_(vectors.half())
        pooled = features.float().mean(dim=(2, 3))  # (N, C)
        for index, name in enumerate(names):
            members = torch.tensor([n == name for n in class_names])
            memory.class_means[index] = pooled[members].mean(0)
        return memory

    @torch.no_grad()
    def with_class(self, features: torch.Tensor, class_name: str, coreset_ratio: float, seed: int = 0) -> "NormalFeatureMemory":
        """A new memory that also holds (or refreshes the mean of) one class's normal features."""
        added = NormalFeatureMemory.fit(
            features, [class_name] * len(features), coreset_ratio,
            self.config.aggregation_kernel, self.config.neighbours, seed,
        )
        means = dict(zip(self.config.class_names, self.class_means))
        means[class_name] = added.class_means[0]
        names = tuple(sorted(means))
        memory = NormalFeatureMemory(
            self.config.feature_channels, len(self.bank) + len(added.bank), names,
            self.config.aggregation_kernel, self.config.neighbours,
        )
        memory.bank.copy_(torch.cat([self.bank, added.bank]))
        memory.class_means.copy_(torch.stack([means[n] for n in names]))
        return memory.eval()

    @torch.no_grad()
    def distance_map(self, features: torch.Tensor) -> torch.Tensor:
        """Mean distance of each position to its k nearest normal patches: (B, h, w)."""
        batch, channels, height, width = features.shape
        queries = aggregate_patches(features.float(), self.config.aggregation_kernel)
        queries = queries.permute(0, 2, 3, 1).reshape(-1, channels)
        bank = self.bank.float()
        distances = torch.cat([
            torch.cdist(chunk, bank).topk(self.config.neighbours, largest=False).values.mean(1)
            for chunk in queries.split(SEARCH_CHUNK)
        ])
        return distances.view(batch, height, width)

    @torch.no_grad()
    def nearest_class(self, features: torch.Tensor) -> list[str]:
        """The class whose mean feature is closest to each image's mean feature."""
        if not self.config.class_names:
            return ["unknown"] * len(features)
        pooled = features.float().mean(dim=(2, 3))
        indices = torch.cdist(pooled, self.class_means).argmin(1)
        return [self.config.class_names[i] for i in indices.tolist()]
