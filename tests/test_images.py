"""load_image: supported inputs become RGB, bad inputs raise ImageInputError saying why."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from vlmdiff.images import (
    MAX_PIXELS, MAX_SIDE, MIN_SIDE, ImageInputError, image_size, images_to_tensor, load_image, read_ahead,
    tensor_to_images,
)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def png_claiming_size(width: int, height: int) -> bytes:
    """A small PNG whose header claims another size (what a huge file looks like before decoding)."""
    data = bytearray(png_bytes(Image.new("L", (40, 40))))
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # IHDR CRC
    return bytes(data)


def pixel(image: Image.Image) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image)[0, 0])


# ---------------------------------------------------------------- accepted and converted
def test_rgb_file_path_and_array_round_trip(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "x.png")
    for source in (tmp_path / "x.png", str(tmp_path / "x.png"), array, Image.fromarray(array)):
        image = load_image(source)
        assert image.mode == "RGB" and image.size == (50, 40)
        assert np.array_equal(np.asarray(image), array)


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (40, 40), 77), (77, 77, 77)),
        (Image.new("1", (40, 40), 1), (255, 255, 255)),
        (Image.new("LA", (40, 40), (100, 255)), (100, 100, 100)),
        (Image.new("RGBA", (40, 40), (10, 20, 30, 255)), (10, 20, 30)),
        (Image.new("RGBA", (40, 40), (10, 20, 30, 0)), (255, 255, 255)),  # transparent -> white background
        (Image.new("I;16", (40, 40), 65535), (255, 255, 255)),
        (Image.new("I;16", (40, 40), 32896), (128, 128, 128)),
        (Image.new("I;16B", (40, 40), 65535), (255, 255, 255)),
        (Image.new("I", (40, 40), 65535), (255, 255, 255)),
        (Image.fromarray(np.full((40, 40), 65535, np.uint16)), (255, 255, 255)),
    ],
    ids=["L", "1", "LA", "RGBA-opaque", "RGBA-transparent", "I;16-max", "I;16-mid", "I;16B", "I", "uint16-PIL"],
)
def test_other_modes_are_converted_to_rgb(image, expected):
    converted = load_image(image)
    assert converted.mode == "RGB" and converted.size == image.size
    assert pixel(converted) == expected


def test_palette_image_is_converted_with_its_colours():
    image = Image.new("P", (40, 40), 1)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    assert pixel(load_image(image)) == (200, 100, 50)


def test_sixteen_bit_png_file_is_scaled_to_eight_bits(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 40).reshape(40, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "depth.png")
    converted = np.asarray(load_image(tmp_path / "depth.png"))
    assert converted.shape == (40, 64, 3)
    assert converted[0, 0].tolist() == [0, 0, 0] and converted[-1, -1].tolist() == [255, 255, 255]
    np.testing.assert_allclose(converted[..., 0], ramp / 65535 * 255, atol=1)


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (np.full((40, 40), 65535, np.uint16), (255, 255, 255)),
        (np.full((40, 40, 3), 257 * 100, np.uint16), (100, 100, 100)),
        (np.full((40, 40), 0.5, np.float32), (128, 128, 128)),
        (np.full((40, 40, 1), 9, np.uint8), (9, 9, 9)),
        (np.full((40, 40, 4), (1, 2, 3, 255), np.uint8), (1, 2, 3)),
        (np.full((40, 40, 3), 2.0), (255, 255, 255)),  # floats are clipped to [0, 1]
    ],
    ids=["uint16-gray", "uint16-rgb", "float-gray", "HxWx1", "HxWx4", "float-clipped"],
)
def test_arrays_are_converted_to_rgb(array, expected):
    converted = load_image(array)
    assert converted.mode == "RGB" and converted.size == (40, 40)
    assert pixel(converted) == expected


# ---------------------------------------------------------------- rejected
def test_text_file_named_png_is_rejected(tmp_path):
    path = tmp_path / "x.png"
    path.write_text("this is not an image")
    with pytest.raises(ImageInputError, match="x.png: not a readable image"):
        load_image(path)


def test_truncated_png_is_rejected(tmp_path):
    data = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageInputError, match="cut.png: not a readable image"):
        load_image(path)


def test_missing_file_and_folder_are_rejected(tmp_path):
    with pytest.raises(ImageInputError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageInputError, match="no such file"):
        load_image(tmp_path)


@pytest.mark.parametrize("size", [(MIN_SIDE - 1, 100), (100, MIN_SIDE - 1), (MAX_SIDE + 1, 40), (40, MAX_SIDE + 1)])
def test_image_sides_outside_limits_are_rejected(size):
    with pytest.raises(ImageInputError, match=rf"image is {size[0]}x{size[1]}; each side must be at"):
        load_image(Image.new("L", size))


def test_limits_themselves_are_accepted():
    assert load_image(Image.new("L", (MIN_SIDE, MIN_SIDE))).size == (MIN_SIDE, MIN_SIDE)
    assert load_image(Image.new("L", (MAX_SIDE, MIN_SIDE))).size == (MAX_SIDE, MIN_SIDE)


def test_oversized_file_is_rejected_by_its_header(tmp_path):
    path = tmp_path / "wide.png"
    path.write_bytes(png_claiming_size(MAX_SIDE + 1000, 40))  # the pixel data would not even decode
    with pytest.raises(ImageInputError, match=f"each side must be at most {MAX_SIDE}"):
        load_image(path)


def test_decompression_bomb_is_an_image_input_error(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming_size(20000, 20000))  # over PIL's pixel limit: PIL refuses to open it
    with pytest.raises(ImageInputError, match="bomb.png: image is too large"):
        load_image(path)


@pytest.mark.parametrize("mode", ["CMYK", "F", "LAB", "YCbCr", "HSV"])
def test_unsupported_modes_are_rejected(mode):
    with pytest.raises(ImageInputError, match=f"unsupported image mode '{mode}'"):
        load_image(Image.new(mode, (40, 40)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_array_with_nan_or_inf_is_rejected(bad):
    array = np.zeros((40, 40, 3), np.float32)
    array[3, 4, 1] = bad
    with pytest.raises(ImageInputError, match="NaN or infinite"):
        load_image(array)


@pytest.mark.parametrize("shape", [(40,), (40, 40, 2), (40, 40, 5), (2, 40, 40, 3), (3, 40, 40)])
def test_array_of_wrong_shape_is_rejected(shape):
    with pytest.raises(ImageInputError, match=r"HxW, HxWx3 or HxWx4; got shape"):
        load_image(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("dtype", [np.int64, np.int8, bool, np.complex64])
def test_array_of_unsupported_dtype_is_rejected(dtype):
    with pytest.raises(ImageInputError, match="unsupported image array dtype"):
        load_image(np.zeros((40, 40, 3), dtype))


@pytest.mark.parametrize("source", [None, 3, b"\x89PNG", torch.zeros(3, 40, 40)])
def test_other_python_objects_are_rejected(source):
    with pytest.raises(ImageInputError, match="expected an image path, PIL image or array"):
        load_image(source)


def test_image_input_error_is_a_value_error():
    assert issubclass(ImageInputError, ValueError)


# ---------------------------------------------------------------- reduced while decoding
def test_max_side_keeps_the_aspect_and_small_images_as_they_are(tmp_path):
    Image.new("RGB", (3000, 1500), (10, 200, 30)).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png", max_side=512)
    assert image.size == (512, 256) and pixel(image) == (10, 200, 30)
    assert load_image(Image.new("L", (300, 200)), max_side=512).size == (300, 200)
    assert load_image(np.zeros((900, 300, 3), np.uint8), max_side=300).size == (100, 300)


def test_jpeg_is_decoded_at_a_fraction_of_its_size(tmp_path, monkeypatch):
    from PIL import JpegImagePlugin

    Image.new("RGB", (4000, 3000), (90, 60, 30)).save(tmp_path / "big.jpg", quality=90)
    decoded = []
    original = JpegImagePlugin.JpegImageFile.load

    def recording_load(self):
        decoded.append(self.size)
        return original(self)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", recording_load)
    image = load_image(tmp_path / "big.jpg", max_side=600)
    assert image.size == (600, 450)
    assert decoded and max(decoded[0]) <= 1000  # the JPEG decoder's draft mode skipped most pixels


@pytest.mark.parametrize(("image", "expected"), [
    (Image.new("I;16", (400, 200), 65535), (255, 255, 255)),
    (Image.new("1", (400, 200), 1), (255, 255, 255)),
    (Image.new("LA", (400, 200), (100, 255)), (100, 100, 100)),
], ids=["I;16", "1", "LA"])
def test_reduced_images_of_other_modes_keep_their_values(tmp_path, image, expected):
    image.save(tmp_path / "x.png")
    for source in (image, tmp_path / "x.png"):
        reduced = load_image(source, max_side=100)
        assert reduced.mode == "RGB" and reduced.size == (100, 50) and pixel(reduced) == expected


def test_palette_image_is_reduced_with_its_colours(tmp_path):
    image = Image.new("P", (400, 400), 1)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    image.save(tmp_path / "palette.png")
    assert pixel(load_image(tmp_path / "palette.png", max_side=64)) == (200, 100, 50)


def test_too_many_pixels_are_refused_from_the_header_naming_the_file(tmp_path):
    side = int((MAX_PIXELS + 1_000_000) ** 0.5) + 1
    path = tmp_path / "poster.png"
    path.write_bytes(png_claiming_size(side, side))  # the pixel data would not even decode
    with pytest.raises(ImageInputError, match=rf"^poster.png: image is {side}x{side} \(51.0 megapixels\); at most"):
        load_image(path, max_side=256)
    assert image_size(path) == (side, side)  # the header alone


@pytest.mark.parametrize(("width", "height", "shown"), [(7100, 7100, "50.4"), (7072, 7071, "50.01")])
def test_the_refused_pixel_count_never_reads_as_the_limit(tmp_path, width, height, shown):
    path = tmp_path / "poster.png"
    path.write_bytes(png_claiming_size(width, height))
    with pytest.raises(ImageInputError, match=rf"\({shown} megapixels\); at most 50 megapixels are accepted$"):
        load_image(path)


def test_unreadable_files_are_described_in_plain_words(tmp_path):
    (tmp_path / "notes.png").write_text("hello")
    with pytest.raises(ImageInputError) as error:
        image_size(tmp_path / "notes.png")
    assert str(error.value) == "notes.png: not a readable image file (not a known image format)"
    assert "Error" not in str(error.value)


# ---------------------------------------------------------------- tensors
def test_images_to_tensor_and_back():
    array = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    tensor = images_to_tensor([Image.fromarray(array)] * 2, 48)
    assert tensor.shape == (2, 3, 48, 48) and tensor.dtype == torch.float32
    assert 0.0 <= float(tensor.min()) and float(tensor.max()) <= 1.0
    assert np.array_equal(np.asarray(tensor_to_images(tensor)[1]), array)
    assert images_to_tensor([Image.fromarray(array)], 32).shape == (1, 3, 32, 32)


# ---------------------------------------------------------------- reading ahead
def test_read_ahead_keeps_the_order_and_raises_at_the_failing_item():
    def read(item: int) -> int:
        if item == 4:
            raise ImageInputError("item 4 is unreadable")
        return item * item

    assert list(read_ahead(read, list(range(4)))) == [0, 1, 4, 9]
    assert list(read_ahead(read, [], ahead=3)) == []
    results = read_ahead(read, list(range(7)), ahead=2)
    assert [next(results) for _ in range(4)] == [0, 1, 4, 9]  # items 4 and 5 already read meanwhile
    with pytest.raises(ImageInputError, match="item 4"):
        next(results)
