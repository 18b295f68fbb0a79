"""Images in: from `data:` URLs to RGB Pillow images, safely and off the event loop.

No HTTP here: the service hands in the URL string and the part's path (for error messages), and
gets an image or a `MediaError` naming that part.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

# Formats a client may send; anything else is refused before decoding.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class MediaError(ValueError):
    """An image the server will not use, with the request field it came from."""

    def __init__(self, message: str, param: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status


def _data_url_bytes(url: str, param: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise MediaError("Malformed data URL: no ',' separates the header from the data.", param)
    meta = header[5:].split(";")
    if "base64" not in meta[1:]:
        raise MediaError("Only base64 data URLs are supported (data:image/png;base64,...).", param)
    media_type = meta[0].strip().lower()
    if media_type and not media_type.startswith("image/"):
        raise MediaError(f"Data URL media type {media_type!r} is not an image type.", param)
    # base64 needs 4 characters per 3 bytes: refuse oversize payloads before decoding them.
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:
        raise MediaError(f"Image is larger than the limit of {max_bytes} bytes.", param, status=413)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"Image data is not valid base64: {exc}.", param) from None


def decode_image(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """Bytes to an RGB image: format whitelist, size checked before pixels are decoded,
    EXIF orientation applied, alpha composited on white."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise MediaError(
                    f"Image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}.", param
                )
            image.load()
    except MediaError:
        raise
    except UnidentifiedImageError:
        raise MediaError(f"Not an image in a supported format ({', '.join(ALLOWED_FORMATS)}).", param) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(f"Image refused as a decompression bomb: {exc}", param) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"Image could not be decoded (truncated or corrupt): {exc}", param) from None
    image = ImageOps.exif_transpose(image) or image
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping.
        image = image.point(lambda v: v / 256).convert("L") if image.mode != "I" else image.convert("L")
    return image.convert("RGB")


def _load_sync(url: str, param: str, max_bytes: int, max_pixels: int) -> Image.Image:
    if url.startswith("data:"):
        data = _data_url_bytes(url, param, max_bytes)
    else:
        scheme = url.split(":", 1)[0] if ":" in url else ""
        raise MediaError(f"Unsupported image URL scheme {scheme!r}: send a data: URL.", param)
    if len(data) > max_bytes:
        raise MediaError(f"Image is {len(data)} bytes, over the limit of {max_bytes}.", param, status=413)
    return decode_image(data, param, max_pixels)


async def load_image(url: str, param: str, *, max_bytes: int, max_pixels: int) -> Image.Image:
    return await asyncio.to_thread(_load_sync, url, param, max_bytes, max_pixels)
