"""Normal training images held in memory as one uint8 tensor, with their captions and classes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from PIL import Image

from vlmdiff.images import images_to_tensor, load_image, tensor_to_images


@dataclass
class TrainingSet:
    """Normal images (N, 3, R, R) uint8, one caption and one class name per image."""

    images: torch.Tensor
    captions: list[str]
    class_names: list[str]
    sources: list | None = None  # original files or PIL images (the memory embeds them at their own aspect)

    def __post_init__(self) -> None:
        if len(self.images) == 0:
            raise ValueError("the training set is empty: no normal images were found")
        if not len(self.images) == len(self.captions) == len(self.class_names):
            raise ValueError("images, captions and class names must have the same length")
        if self.sources is not None and len(self.sources) != len(self.images):
            raise ValueError("give one source per image")

    @classmethod
    def of_sources(cls, sources: list, class_name: str) -> "TrainingSet":
        """Uncaptioned images of one class known by their sources only, without model-resolution copies
        (nothing trains the diffusion on them): the memory reads each source when it embeds it."""
        empty = torch.empty(len(sources), 3, 0, 0, dtype=torch.uint8)
        return cls(empty, [""] * len(sources), [class_name] * len(sources), list(sources))

    def __len__(self) -> int:
        return len(self.images)

    def float_images(self, indices: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        return self.images[indices].float() / 255.0  # (B, 3, R, R) in [0, 1]

    def original(self, index: int) -> Image.Image:
        """The image at its original size (the model-resolution copy when no source is kept)."""
        if self.sources is None:
            return tensor_to_images(self.float_images([index]))[0]
        return load_image(self.sources[index])

    def subset(self, indices: list[int]) -> "TrainingSet":
        sources = [self.sources[i] for i in indices] if self.sources is not None else None
        return TrainingSet(
            self.images[indices], [self.captions[i] for i in indices], [self.class_names[i] for i in indices], sources
        )

    def concat(self, other: "TrainingSet") -> "TrainingSet":
        sources = self.sources + other.sources if self.sources is not None and other.sources is not None else None
        return TrainingSet(
            torch.cat([self.images, other.images]), self.captions + other.captions,
            self.class_names + other.class_names, sources,
        )


@torch.no_grad()
def encode_training_set(autoencoder: torch.nn.Module, data: TrainingSet, flip: bool) -> torch.Tensor:
    """Latents of every image (and of its mirror image when flipping): (N, V, C, h, w), V = 2 with flips."""
    from vlmdiff.models import encode_latents

    latents = []
    for start in tqdm(range(0, len(data), 16), desc="encoding latents"):
        batch = data.float_images(slice(start, start + 16))
        views = [batch, batch.flip(-1)] if flip else [batch]
        latents.append(torch.stack([encode_latents(autoencoder, view) for view in views], 1))
    return torch.cat(latents)


def load_training_set(
    paths: list[Path], class_names: list[str], captions: list[str], resolution: int
) -> TrainingSet:
    """Read and resize images once (with a progress bar)."""
    tensors = [
        (images_to_tensor([load_image(path)], resolution)[0] * 255).round().byte()
        for path in tqdm(paths, desc="loading images")
    ]
    return TrainingSet(torch.stack(tensors), list(captions), list(class_names), list(paths))


def training_set_from_datasets(
    roots: list[str | Path], caption_files: list[str | Path] | None, resolution: int, split: str = "train"
) -> TrainingSet:
    """Normal `split` images of every dataset root, with captions from one caption file per root.

    Without caption files every caption is empty (the no-VLM ablation).
    """
    from vlmdiff.captioning.store import CaptionStore
    from vlmdiff.data import read_dataset

    if caption_files and len(caption_files) != len(roots):
        raise ValueError(f"give one caption file per dataset: {len(roots)} datasets, {len(caption_files)} caption files")
    paths, classes, captions = [], [], []
    for position, root in enumerate(roots):
        records = [r for r in read_dataset(root) if r.split == split and not r.is_anomalous]
        store = CaptionStore.load(caption_files[position]) if caption_files else None
        for record in records:
            key = Path(record.image_path).relative_to(Path(root)).as_posix()
            if store is not None and key not in store.captions:
                raise ValueError(f"{caption_files[position]} has no caption for {key}; run `vlmdiff caption` first")
            paths.append(record.image_path)
            classes.append(record.class_name)
            captions.append(store.captions[key] if store is not None else "")
    return load_training_set(paths, classes, captions, resolution)
