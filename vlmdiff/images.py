"""Loading and validating user images: one place that turns files/arrays into RGB images."""
from __future__ import annotations

import math
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence, TypeVar, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

MIN_SIDE = 32
MAX_SIDE = 8000
MAX_PIXELS = 50_000_000  # refused from the header, before decoding
WORK_SIDE = 1024  # the app and the CLI jobs decode every image to at most this long side
# Modes converted to RGB; any other mode (CMYK, float, LAB...) is rejected with a message.
CONVERTIBLE_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "I", "I;16", "I;16B", "I;16L", "I;16N"}
ImageInput = Union[str, Path, Image.Image, np.ndarray]
Item, Read = TypeVar("Item"), TypeVar("Read")


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
    if width * height > MAX_PIXELS:
        raise ImageInputError(f"image is {width}x{height} ({_megapixels(width * height)} megapixels); "
                              f"at most {MAX_PIXELS // 1_000_000} megapixels are accepted")


def _megapixels(pixels: int) -> str:
    """`pixels` in megapixels with the fewest decimals (at least one) that still show it above MAX_PIXELS."""
    digits = 1
    while float(f"{pixels / 1e6:.{digits}f}") * 1e6 <= MAX_PIXELS and digits < 6:
        digits += 1
    return f"{pixels / 1e6:.{digits}f}"


def _check_mode(mode: str) -> None:
    if mode not in CONVERTIBLE_MODES:
        raise ImageInputError(f"unsupported image mode {mode!r}; use RGB, grayscale, RGBA or 16-bit images")


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding it; ImageInputError naming the file."""
    path = Path(path)
    with _opened(path) as image:
        return image.size


@contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """The file opened lazily (header only); errors become ImageInputError naming the file."""
    if not path.is_file():
        raise ImageInputError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            yield image
    except ImageInputError as error:
        raise ImageInputError(f"{path.name}: {error}") from error
    except Image.DecompressionBombError as error:
        raise ImageInputError(f"{path.name}: image is too large (over {MAX_PIXELS // 1_000_000} megapixels)") from error
    except UnidentifiedImageError as error:
        raise ImageInputError(f"{path.name}: not a readable image file (not a known image format)") from error
    except (OSError, SyntaxError) as error:
        raise ImageInputError(f"{path.name}: not a readable image file (damaged or truncated)") from error


def _open(path: Path, max_side: int | None) -> Image.Image:
    with _opened(path) as image:
        _check_size(*image.size)  # from the header: huge files are refused before decoding
        _check_mode(image.mode)
        if max_side and max(image.size) > max_side:
            scale = max_side / max(image.size)
            image.draft(None, (math.ceil(image.width * scale), math.ceil(image.height * scale)))  # JPEG: decode small
        image.load()
        return _shrink(image, max_side) if max_side else image.copy()


def _shrink(image: Image.Image, max_side: int) -> Image.Image:
    """A copy with the long side at most `max_side` (modes resampling cannot handle are widened first)."""
    if max(image.size) <= max_side:
        return image.copy()
    if image.mode.startswith("I;16"):  # not resampled by PIL; "I" holds the same values
        image = image.convert("I")
    elif image.mode == "1":  # bilevel and palette images would be resampled nearest-neighbour
        image = image.convert("L")
    elif image.mode in ("P", "PA"):
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    else:
        image = image.copy()
    image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return image


def load_image(source: ImageInput, max_side: int | None = None) -> Image.Image:
    """An RGB PIL image from a path, PIL image or array; raises ImageInputError with the reason.

    With `max_side`, the long side is reduced to at most that many pixels while decoding (JPEG
    decodes at a fraction of its size; others are reduced before any conversion), so memory stays
    bounded by the working size instead of the file's pixel count.
    """
    if isinstance(source, (str, Path)):
        image = _open(Path(source), max_side)
    else:
        if isinstance(source, np.ndarray):
            image = _array_to_image(source)
        elif isinstance(source, Image.Image):
            image = source
        else:
            raise ImageInputError(f"expected an image path, PIL image or array; got {type(source).__name__}")
        _check_mode(image.mode)
        _check_size(*image.size)
        if max_side:
            image = _shrink(image, max_side)
    if image.mode.startswith("I"):
        return _sixteen_bit_to_rgb(image)
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image if image.mode == "RGB" else image.convert("RGB")  # an RGB image is used as it is


def read_ahead(read: Callable[[Item], Read], items: Sequence[Item], ahead: int = 2) -> Iterator[Read]:
    """`read(item)` of each item in order, the next `ahead` items read meanwhile in a background thread:
    decoding releases the GIL, so reading the next images overlaps the work on this one. An error of a
    read is raised when its item's turn comes."""
    with ThreadPoolExecutor(1) as reader:
        pending = deque(reader.submit(read, item) for item in items[:ahead])
        for item in items[ahead:]:
            result = pending.popleft().result()
            pending.append(reader.submit(read, item))
            yield result
        while pending:
            yield pending.popleft().result()


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image at its own size: (1, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()


def images_to_tensor(images: list[Image.Image], resolution: int) -> torch.Tensor:
    """RGB images resized to the model resolution: (B, 3, R, R) in [0, 1]."""
    return torch.cat([image_to_tensor(image.resize((resolution, resolution), Image.Resampling.BILINEAR))
                      for image in images])


def tensor_to_images(batch: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [0, 1] -> RGB PIL images."""
    arrays = (batch.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(array) for array in arrays]
