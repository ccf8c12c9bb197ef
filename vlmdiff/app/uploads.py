"""Uploaded files: the name the user knows each by, image loading at the working size with messages
that use that name under one decode budget for all requests, the pixel budget of a request, and
calibration zips unpacked safely."""
from __future__ import annotations

import shutil
import threading
import zipfile
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from PIL import Image

from vlmdiff.allocator import release_freed_memory
from vlmdiff.app.errors import ServiceError
from vlmdiff.app.limits import MAX_ZIP_MB, MAX_ZIP_MEMBERS, WORK_SIDE
from vlmdiff.images import ImageInputError, image_size, load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
TRIM_AFTER_PIXELS = 4_000_000  # a decode this large hands its freed memory back to the system
ZIP_LABELS = {"normal": 0, "defective": 1}  # folder name in a calibration zip -> label (1 = anomalous)


class Upload(NamedTuple):
    """A file on this server and the name the user knows it by."""

    path: Path
    name: str


def _reason(error: ImageInputError, upload: Upload) -> str:
    return str(error).removeprefix(f"{upload.path.name}: ")


def upload_size(upload: Upload) -> tuple[int, int]:
    """(width, height) from the upload's header; ServiceError naming the upload."""
    try:
        return image_size(upload.path)
    except ImageInputError as error:
        raise ServiceError(f"{upload.name} cannot be used: {_reason(error, upload)}") from error


class DecodeBudget:
    """Pixels being decoded at full size at once, all requests together, counted from the headers: a
    decode waits until its image fits, so concurrent requests of huge images take turns instead of
    adding up (one image of the largest accepted size fits alone)."""

    def __init__(self, megapixels: int) -> None:
        self.pixels = megapixels * 1_000_000
        self._in_use = 0
        self._free = threading.Condition()

    def load(self, upload: Upload) -> Image.Image:
        """The image at the working size (reduced while decoding); ServiceError naming the upload."""
        width, height = upload_size(upload)
        cost = min(width * height, self.pixels)
        with self._free:
            self._free.wait_for(lambda: self._in_use + cost <= self.pixels)
            self._in_use += cost
        try:
            return load_image(upload.path, max_side=WORK_SIDE)
        except ImageInputError as error:
            raise ServiceError(f"{upload.name} cannot be used: {_reason(error, upload)}") from error
        finally:
            if cost > TRIM_AFTER_PIXELS:
                release_freed_memory()  # the full-size buffers, before the next decode adds its own
            with self._free:
                self._in_use -= cost
                self._free.notify_all()


def check_pixels(uploads: list[Upload], megapixels: int) -> None:
    """Refuse a request whose images hold more than `megapixels` in all (read from their headers)."""
    total = 0
    for upload in uploads:
        width, height = upload_size(upload)
        total += width * height
    if total > megapixels * 1_000_000:
        raise ServiceError(f"The {len(uploads)} images hold {total / 1e6:.0f} megapixels in all; one request may "
                           f"send at most {megapixels}. Send fewer or smaller images.")


def _zip_label(member: zipfile.ZipInfo) -> int | None:
    """0 / 1 for an image inside a normal/ or defective/ folder; None for anything else."""
    path = PurePosixPath(member.filename.replace("\\", "/"))
    if member.is_dir() or path.suffix.lower() not in IMAGE_SUFFIXES:
        return None
    if any(part.startswith((".", "__MACOSX")) for part in path.parts):  # '..', hidden files, macOS resource forks
        return None
    labels = [ZIP_LABELS[part.lower()] for part in path.parts[:-1] if part.lower() in ZIP_LABELS]
    return labels[-1] if labels else None


def unpack_zip(upload: Upload, scratch: Path) -> list[tuple[Upload, int]]:
    """(image, label) for the images in a calibration zip's normal/ and defective/ folders.

    Each image is written to `scratch` under a name made here, never one from the archive, so no
    entry can reach outside it; the declared sizes (which the reader enforces) are capped first.
    """
    try:
        archive = zipfile.ZipFile(upload.path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ServiceError(f"{upload.name} is not a readable zip file.") from error
    with archive:
        members = archive.infolist()
        if len(members) > MAX_ZIP_MEMBERS:
            raise ServiceError(f"{upload.name} has {len(members)} entries; at most {MAX_ZIP_MEMBERS} are accepted.")
        chosen = [(member, label) for member in members if (label := _zip_label(member)) is not None]
        if not chosen:
            raise ServiceError(f"{upload.name} has no images in normal/ or defective/ folders.")
        size = sum(member.file_size for member, _ in chosen)
        if size > MAX_ZIP_MB * 1_000_000:
            raise ServiceError(f"{upload.name} unpacks to {size / 1e6:.0f} MB of images; at most {MAX_ZIP_MB} MB "
                               "are accepted.")
        images = []
        for index, (member, label) in enumerate(chosen):
            target = scratch / f"{index:05d}{PurePosixPath(member.filename).suffix.lower()}"
            try:
                with archive.open(member) as source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink)
            except (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError) as error:
                raise ServiceError(f"{upload.name}: {member.filename} cannot be unpacked (damaged, encrypted or "
                                   "compressed in an unsupported way).") from error
            images.append((Upload(target, f"{upload.name}/{member.filename}"), label))
    return images
