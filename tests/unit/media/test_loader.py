"""A request's images through the worker's MediaLoader (qwen_server/media/loader.py): repeats
decoded once and shared, and the per-request byte total."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from qwen_server.errors import Kind
from qwen_server.media.errors import MediaError
from tests.helpers.media import QWEN25, budget, data_url, encode, loader, photo


def test_repeated_images_are_decoded_once() -> None:
    url = data_url(encode(photo(640, 480), "JPEG"), "image/jpeg")
    other = budget({"max_pixels": 50176})

    async def run():
        media = loader()
        try:
            first, second = await media.load_all([(url, "a"), (url, "b")], QWEN25)
            third = await media.load(url, "c", QWEN25)
            smaller = await media.load(url, "d", other)
            return first, second, third, smaller
        finally:
            await media.aclose()

    first, second, third, smaller = asyncio.run(run())
    assert first.pixels is second.pixels is third.pixels  # one decode, shared
    assert first.uuid == third.uuid != smaller.uuid  # the budget is part of the identity
    width, height = other.target(640, 480)
    assert smaller.pixels.shape == (height, width, 3)


def test_the_model_processor_does_not_write_to_shared_pixels(tiny_model) -> None:
    """Cached arrays go to every request with that image: the processor must only read them."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(str(tiny_model))
    for size in ((224, 224), (600, 400)):  # as is, and through the processor's own resize
        pixels = np.array(photo(*size))
        before = pixels.copy()
        processor(images=[pixels], return_tensors="pt")
        assert (pixels == before).all()


def test_total_image_bytes_per_request_is_limited() -> None:
    png = encode(photo(300, 300), "PNG")
    urls = [(data_url(png), f"messages[0].content[{i}].image_url") for i in range(3)]

    async def run():
        media = loader(max_request_image_bytes=int(len(png) * 2.5))
        try:
            await media.load_all(urls, None)
        finally:
            await media.aclose()

    with pytest.raises(MediaError) as info:
        asyncio.run(run())
    assert info.value.kind is Kind.TOO_LARGE and info.value.reason == "request_too_large"
    assert info.value.param in {param for _, param in urls}
