"""Image decoding from data URLs: formats, modes, orientation, and refusal of bad or hostile input."""

from __future__ import annotations

import asyncio
import base64
import io

import pytest
from PIL import Image

from qwen_server.media import MediaError, decode_image, load_image

LIMITS = {"max_bytes": 5 * 1024 * 1024, "max_pixels": 10_000_000}


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def load(url: str, **limits) -> Image.Image:
    return asyncio.run(load_image(url, "messages[0].content[0].image_url", **{**LIMITS, **limits}))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_whitelisted_formats_decode_to_rgb(fmt: str) -> None:
    image = load(data_url(encode(Image.new("RGB", (40, 30), (250, 10, 10)), fmt)))
    assert image.mode == "RGB" and image.size == (40, 30)
    r, g, b = image.getpixel((20, 15))
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize(
    ("mode", "color", "expected"),
    [
        ("RGBA", (0, 0, 0, 0), (255, 255, 255)),  # transparent composites on white
        ("LA", (0, 0), (255, 255, 255)),
        ("L", 128, (128, 128, 128)),
        ("1", 1, (255, 255, 255)),
        ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
        ("I;16", 65535, (255, 255, 255)),
        ("P", 0, None),
    ],
)
def test_modes_convert_to_rgb(mode: str, color, expected) -> None:
    fmt = "TIFF" if mode in ("CMYK", "I;16") else "PNG"
    image = load(data_url(encode(Image.new(mode, (8, 8), color), fmt)))
    assert image.mode == "RGB"
    if expected is not None:
        assert image.getpixel((4, 4)) == expected


def test_exif_orientation_is_applied() -> None:
    source = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    image = load(data_url(encode(source, "JPEG", exif=exif), "image/jpeg"))
    assert image.size == (20, 40)


def test_media_type_is_optional_but_must_be_an_image() -> None:
    png = encode(Image.new("RGB", (4, 4)), "PNG")
    assert load("data:;base64," + base64.b64encode(png).decode()).size == (4, 4)
    with pytest.raises(MediaError, match="not an image type"):
        load(data_url(png, "text/plain"))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("data:image/png;base64,@@@@", "not valid base64"),
        ("data:image/png,rawbytes", "Only base64"),
        ("data:image/png;base64", "Malformed data URL"),
        ("ftp://example.com/x.png", "Unsupported image URL scheme"),
        (data_url(b"%PDF-1.4 not an image"), "Not an image"),
    ],
)
def test_bad_input_is_a_media_error_naming_the_part(url: str, message: str) -> None:
    with pytest.raises(MediaError, match=message) as info:
        load(url)
    assert info.value.param == "messages[0].content[0].image_url"
    assert info.value.status == 400


def test_truncated_file_is_refused() -> None:
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with pytest.raises(MediaError, match="truncated or corrupt"):
        load(data_url(data[: len(data) // 2]))


def test_decompression_bomb_is_refused_before_decoding() -> None:
    # 20000 x 20000 = 400 M pixels in a few hundred bytes of PNG: Pillow's own guard refuses it.
    bomb = encode(Image.new("1", (20000, 20000)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(MediaError, match="decompression bomb"):
        load(data_url(bomb))
    # 5000 x 5000 = 25 M pixels: under Pillow's guard, over the server's limit, refused from the header.
    with pytest.raises(MediaError, match="over the limit of 10000000"):
        load(data_url(encode(Image.new("1", (5000, 5000)), "PNG")))


def test_oversize_payload_is_413_before_decoding() -> None:
    data = encode(Image.effect_noise((512, 512), 80).convert("RGB"), "PNG")
    with pytest.raises(MediaError) as info:
        load(data_url(data), max_bytes=len(data) // 2)
    assert info.value.status == 413


def test_decode_image_directly() -> None:
    assert decode_image(encode(Image.new("RGB", (3, 3)), "BMP"), "p", 100).size == (3, 3)
