"""Images for the tests, made in memory, a chat body carrying one, and a MediaLoader with the media unit
tests' limits."""

from __future__ import annotations

import asyncio
import base64
import io

from PIL import Image

from qwen_server.media.image import Geometry
from qwen_server.media.loader import MediaLoader
from qwen_server.settings import Settings


def image_data_url(size: tuple[int, int] = (224, 224), color=(200, 30, 30), fmt: str = "JPEG") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, fmt)
    mime = {"JPEG": "image/jpeg", "PNG": "image/png"}[fmt]
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(max_tokens: int = 8, image: str | None = None, **extra) -> dict:
    """A chat request body: a text part, after an image part if `image` is given; `extra` fields merged."""
    content: list[dict] = [{"type": "text", "text": "Describe."}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        **extra,
    }


PARAM = "messages[0].content[0].image_url"
LIMITS = {"max_image_bytes": 5 * 1024 * 1024, "max_image_pixels": 10_000_000}
QWEN25 = Geometry(
    factor=28,
    min_pixels=56 * 56,
    max_pixels=28 * 28 * 1280,
    grid=(("patch_size", 14), ("temporal_patch_size", 2), ("merge_size", 2)),
)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def photo(width: int, height: int) -> Image.Image:
    """Smooth gradients with noise: compresses like a photo, unlike a flat colour."""
    gradient = Image.linear_gradient("L").resize((width, height))
    noise = Image.effect_noise((width, height), 40)
    return Image.merge("RGB", (gradient, noise, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))


def loader(**settings) -> MediaLoader:
    return MediaLoader(Settings(**{**LIMITS, **settings}))


def load(url: str, geometry: Geometry | None = None, **settings) -> Image.Image:
    async def run() -> Image.Image:
        media = loader(**settings)
        try:
            return Image.fromarray((await media.load(url, PARAM, geometry)).pixels)
        finally:
            await media.aclose()

    return asyncio.run(run())


def budget(kwargs, trusted: bool = False) -> Geometry:
    return QWEN25.with_request_kwargs(kwargs, trusted=trusted, pixel_cap=64_000_000)
