"""Loading and validating user images: one place that turns files/arrays into RGB images."""
from __future__ import annotations

from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

MIN_SIDE = 32
MAX_SIDE = 8000
# Modes converted to RGB; any other mode (CMYK, float, LAB...) is rejected with a message.
CONVERTIBLE_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "I", "I;16", "I;16B", "I;16L", "I;16N"}
ImageInput = Union[str, Path, Image.Image, np.ndarray]


class ImageInputError(ValueError):
    """An input that cannot be used as an image; the message says what was wrong."""


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
    array = np.asarray(image, dtype=np.float64)  # integer modes hold 16-bit values, as uint16 arrays do
    return Image.fromarray((array / 65535.0 * 255).round().clip(0, 255).astype(np.uint8)).convert("RGB")


def _array_to_image(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageInputError(f"an image array must be HxW, HxWx3 or HxWx4; got shape {array.shape}")
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ImageInputError("the image array contains NaN or infinite values")
        array = (array.clip(0, 1) * 255).round().astype(np.uint8)
    elif array.dtype == np.uint16:
        array = (array / 65535.0 * 255).round().astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ImageInputError(f"unsupported image array dtype {array.dtype} (use uint8, uint16 or float in [0, 1])")
    return Image.fromarray(array)


def _check_size(width: int, height: int) -> None:
    if min(width, height) < MIN_SIDE:
        raise ImageInputError(f"image is {width}x{height}; each side must be at least {MIN_SIDE} px")
    if max(width, height) > MAX_SIDE:
        raise ImageInputError(f"image is {width}x{height}; each side must be at most {MAX_SIDE} px")


def _open(path: Path) -> Image.Image:
    if not path.is_file():
        raise ImageInputError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            _check_size(*image.size)  # before decoding, so huge files are rejected cheaply
            image.load()
            return image.copy()
    except Image.DecompressionBombError as error:
        raise ImageInputError(f"{path.name}: image is too large ({error})") from error
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ImageInputError(f"{path.name}: not a readable image file ({error.__class__.__name__})") from error


def load_image(source: ImageInput) -> Image.Image:
    """An RGB PIL image from a path, PIL image or array; raises ImageInputError with the reason."""
    if isinstance(source, (str, Path)):
        image = _open(Path(source))
    elif isinstance(source, np.ndarray):
        image = _array_to_image(source)
    elif isinstance(source, Image.Image):
        image = source
    else:
        raise ImageInputError(f"expected an image path, PIL image or array; got {type(source).__name__}")
    if image.mode not in CONVERTIBLE_MODES:
        raise ImageInputError(f"unsupported image mode {image.mode!r}; use RGB, grayscale, RGBA or 16-bit images")
    _check_size(*image.size)
    if image.mode.startswith("I"):
        return _sixteen_bit_to_rgb(image)
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB")


def images_to_tensor(images: list[Image.Image], resolution: int) -> torch.Tensor:
    """RGB images resized to the model resolution: (B, 3, R, R) in [0, 1]."""
    arrays = [
        np.asarray(image.resize((resolution, resolution), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        for image in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def tensor_to_images(batch: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> RGB PIL images."""
    arrays = (batch.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in arrays]
