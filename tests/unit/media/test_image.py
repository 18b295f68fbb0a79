"""Images from data URLs: formats, modes, orientation, sizing for the model, and refusal of bad or
hostile input (qwen_server/media/image.py, through the loader as a request's images go). The cache
and per-request totals: test_loader.py; local files: test_sources.py; remote URLs: test_fetch.py
(fetcher) and tests/integration/test_api.py."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from qwen_server.errors import Kind
from qwen_server.media.errors import MediaError
from qwen_server.media.image import Geometry, MMKwargsError, check_request_mm_kwargs, decode_image
from tests.helpers.media import PARAM, QWEN25, budget, data_url, encode, load, photo


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
        ("data:image/png;base64,iVBORw0K\niVBO", "not valid base64"),  # a line break
        ("data:image/png;base64,iVBORw0K==", "not valid base64"),  # padding after full quanta: vLLM refuses it too
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
    assert info.value.kind is Kind.INVALID


def test_truncated_file_is_refused() -> None:
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with pytest.raises(MediaError, match="truncated or corrupt"):
        load(data_url(data[: len(data) // 2]))


def test_decompression_bomb_is_refused_before_decoding() -> None:
    # 15000 x 15000 = 225 M pixels in a few kB of PNG: Pillow's own guard refuses it.
    bomb = encode(Image.new("1", (15000, 15000)), "PNG")
    assert len(bomb) < 100_000
    with pytest.raises(MediaError, match="decompression bomb"):
        load(data_url(bomb))
    # 5000 x 5000 = 25 M pixels: under Pillow's guard, over the server's limit, refused from the header.
    with pytest.raises(MediaError, match="over the limit of 10000000"):
        load(data_url(encode(Image.new("1", (5000, 5000)), "PNG")))


def test_oversize_payload_is_413_before_decoding() -> None:
    data = encode(Image.effect_noise((512, 512), 80).convert("RGB"), "PNG")
    with pytest.raises(MediaError) as info:
        load(data_url(data), max_image_bytes=len(data) // 2)
    assert info.value.kind is Kind.TOO_LARGE


def test_huge_dimensions_in_tiny_bytes_are_refused_from_the_header() -> None:
    thin = encode(Image.new("1", (20000, 4)), "PNG")  # 80 k pixels, but a side over 16384
    assert len(thin) < 2000
    with pytest.raises(MediaError, match="at most 16384") as info:
        load(data_url(thin))
    assert info.value.reason == "too_many_pixels"


def test_gif_first_frame_is_used() -> None:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100)
    r, _, b = load(data_url(buf.getvalue(), "image/gif")).getpixel((8, 8))
    assert r > 200 and b < 50


def test_truncated_jpeg_is_refused() -> None:
    data = encode(photo(256, 256), "JPEG")
    with pytest.raises(MediaError, match="truncated or corrupt"):
        load(data_url(data[: len(data) // 3], "image/jpeg"))


def test_format_comes_from_the_bytes_not_the_declared_type() -> None:
    png = encode(Image.new("RGB", (5, 5)), "PNG")
    assert load(data_url(png, "image/jpeg")).size == (5, 5)


def test_decode_image_directly() -> None:
    assert decode_image(encode(Image.new("RGB", (3, 3)), "BMP"), "p", max_pixels=100, max_side=10).size == (3, 3)


# --- sizing for the model ---


@pytest.mark.parametrize("arch_factor", [28, 32])
def test_target_matches_transformers_smart_resize(arch_factor: int) -> None:
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    geometry = Geometry(arch_factor, 56 * 56, 28 * 28 * 1280)
    for width, height in [(224, 224), (3840, 2160), (1920, 1080), (17, 3000), (100, 20), (4000, 4000), (57, 85)]:
        h, w = smart_resize(height, width, factor=arch_factor, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
        assert geometry.target(width, height) == (w, h)


@pytest.mark.parametrize(("size", "fmt"), [((3840, 2160), "JPEG"), ((1920, 1080), "PNG"), ((300, 200), "JPEG")])
def test_presized_image_gives_the_processor_the_same_input(size: tuple[int, int], fmt: str) -> None:
    """The model's own processor on the raw image and on ours: same grid, pixels equal within rounding."""
    import numpy as np
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    processor = Qwen2VLImageProcessorPil()
    data = encode(photo(*size), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    ours = decode_image(data, PARAM, max_pixels=10**8, max_side=16384, geometry=QWEN25)
    assert ours.size == QWEN25.target(*size)
    raw = processor(images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="np")
    pre = processor(images=[ours], return_tensors="np")
    assert (raw["image_grid_thw"] == pre["image_grid_thw"]).all()
    # pixel_values are normalised (std ~0.27 per 1/255 step is ~0.015): a mean difference under
    # 0.05 is about 3 grey levels, the difference between two bicubic paths.
    diff = float(np.abs(raw["pixel_values"] - pre["pixel_values"]).mean())
    assert diff < 0.05, diff


def test_exif_rotation_is_sized_on_the_displayed_sides() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 1600x400, displayed 400x1600
    data = encode(photo(1600, 400), "JPEG", exif=exif)
    image = decode_image(data, PARAM, max_pixels=10**8, max_side=16384, geometry=Geometry(28, 3136, 200_000))
    assert image.size == Geometry(28, 3136, 200_000).target(400, 1600)


def test_request_kwargs_change_the_budget() -> None:
    assert budget({"max_pixels": 50176}).target(3840, 2160) == (280, 168)
    assert budget({"size": {"shortest_edge": 3136, "longest_edge": 50176}}, trusted=True).max_pixels == 50176
    assert budget(None) is QWEN25
    with pytest.raises(MMKwargsError, match="min_pixels") as info:
        budget({"min_pixels": 10, "max_pixels": 5})
    assert info.value.key == "min_pixels"


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"max_pixels": 28 * 28 * 1280 + 1}, "max_pixels"),  # above the server's budget
        ({"min_pixels": 2**70}, "min_pixels"),  # was an OverflowError (500) in the resize
        ({"min_pixels": 400_000_000, "max_pixels": 500_000_000}, "max_pixels"),  # upsized 16x16 to 20020x20020
        ({"min_pixels": 0}, "min_pixels"),
        ({"max_pixels": -5}, "max_pixels"),
        ({"max_pixels": 1.5}, "max_pixels"),
        ({"max_pixels": True}, "max_pixels"),
        ({"max_pixels": "50176"}, "max_pixels"),
        ({"temporal_patch_size": 0}, "temporal_patch_size"),  # killed EngineCore in the model's patch_embed
        ({"size": {"shortest_edge": 3136}}, "size"),  # only the two budget keys without trust
        ({"fps": 2}, "fps"),
        ({"do_resize": False}, "do_resize"),
    ],
)
def test_untrusted_request_kwargs_are_the_budget_within_the_servers(kwargs, key: str) -> None:
    with pytest.raises(MMKwargsError) as info:
        budget(kwargs)
    assert info.value.key == key, info.value.message


def test_trusted_request_kwargs_still_refuse_what_crashes_the_model() -> None:
    # Trusted: other keys reach the processor, but the grid must stay the model's and sizes positive.
    assert budget({"do_resize": True, "temporal_patch_size": 2, "patch_size": 14}, trusted=True) == QWEN25
    assert budget({"max_pixels": 2_000_000}, trusted=True).max_pixels == 2_000_000  # above the default budget
    for kwargs, key in (
        ({"temporal_patch_size": 0}, "temporal_patch_size"),
        ({"temporal_patch_size": 3}, "temporal_patch_size"),
        ({"patch_size": 2.0}, "patch_size"),
        ({"spatial_merge_size": 4}, "spatial_merge_size"),
        ({"max_pixels": 64_000_001}, "max_pixels"),  # the decode cap bounds trusted budgets too
        ({"size": {"longest_edge": 0}}, "size"),
        ({"min_pixels": -1}, "min_pixels"),
    ):
        with pytest.raises(MMKwargsError) as info:
            budget(kwargs, trusted=True)
        assert info.value.key == key, (kwargs, info.value.message)


def test_a_model_without_a_known_budget_takes_no_untrusted_kwargs() -> None:
    check_request_mm_kwargs(None, None, trusted=False)
    with pytest.raises(MMKwargsError):
        check_request_mm_kwargs({"max_pixels": 50176}, None, trusted=False)
    with pytest.raises(MMKwargsError):  # trusted, but the grid cannot be checked against the model's
        check_request_mm_kwargs({"temporal_patch_size": 2}, None, trusted=True)
    check_request_mm_kwargs({"max_pixels": 50176}, None, trusted=True)


def test_a_resize_past_the_pixel_limit_is_refused_before_decoding() -> None:
    data = encode(photo(16, 16), "PNG")
    huge = Geometry(28, 400_000_000, 500_000_000)
    with pytest.raises(MediaError, match="over the limit") as info:
        decode_image(data, PARAM, max_pixels=64_000_000, max_side=16384, geometry=huge)
    assert info.value.reason == "too_many_pixels"


def test_extreme_aspect_ratio_is_a_clear_error() -> None:
    with pytest.raises(MediaError, match="aspect ratio") as info:
        load(data_url(encode(Image.new("RGB", (2000, 5)), "PNG")), QWEN25)
    assert info.value.reason == "bad_aspect_ratio"
