"""Images: the formats a client may send, the model's pixel budget and decoding to RGB pixels.

Decoding checks the header (format, size, aspect) before any pixel is decoded and resizes to the
model's budget (Qwen's `smart_resize`); JPEGs go through Pillow's draft mode (decoded at 1/2, 1/4 or
1/8 scale by the codec), so the model's processor finds them at their final size.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from qwen_server.media.errors import MediaError

# Formats a client may send; anything else is refused before decoding.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_MAX_ASPECT_RATIO = 200  # what Qwen's processor accepts


# Per-request mm_processor_kwargs any client may set: the image pixel budget, within the server's.
REQUEST_MM_KEYS = ("min_pixels", "max_pixels")
# Keys that fix the model's patch grid: any other value than the model's own breaks its vision tower
# (temporal_patch_size 0 killed the engine), so they are refused even from trusted clients.
_GRID_KEYS = {
    "patch_size": "patch_size",
    "temporal_patch_size": "temporal_patch_size",
    "merge_size": "merge_size",
    "spatial_merge_size": "merge_size",
}


class MMKwargsError(ValueError):
    """A per-request mm_processor_kwargs entry the server refuses; `key` names it."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.message = message
        self.key = key


def _positive_int(value: Any) -> bool:
    return type(value) is int and value > 0


@dataclass(frozen=True, slots=True)
class Geometry:
    """The model processor's pixel budget: sides are multiples of `factor` (patch x merge size)
    and the area lies within [min_pixels, max_pixels]. `grid` holds the processor's own patch
    sizes (patch_size, temporal_patch_size, merge_size)."""

    factor: int
    min_pixels: int
    max_pixels: int
    grid: tuple[tuple[str, int], ...] = ()

    def with_request_kwargs(self, kwargs: Mapping[str, Any] | None, *, trusted: bool, pixel_cap: int) -> Geometry:
        """The budget for one request's `mm_processor_kwargs`, checked (see `check_request_mm_kwargs`)."""
        check_request_mm_kwargs(kwargs, self, trusted=trusted)
        if not kwargs:
            return self
        size: Mapping[str, Any] = kwargs["size"] if trusted and isinstance(kwargs.get("size"), Mapping) else {}
        low = kwargs.get("min_pixels", size.get("shortest_edge", self.min_pixels))
        high = kwargs.get("max_pixels", size.get("longest_edge", self.max_pixels))
        for key, value in (("min_pixels", low), ("max_pixels", high)):
            if not _positive_int(value):
                raise MMKwargsError(f"mm_processor_kwargs.{key} must be a positive integer.", key)
        # A client lowers the budget; only a trusted one may raise it, and never past the decode cap.
        cap = pixel_cap if trusted else self.max_pixels
        if high > cap:
            raise MMKwargsError(
                f"mm_processor_kwargs.max_pixels {_clip_number(high)} is over this server's limit of {cap} pixels.",
                "max_pixels",
            )
        if low > high:
            raise MMKwargsError(
                f"mm_processor_kwargs.min_pixels ({_clip_number(low)}) must not exceed max_pixels ({high}).",
                "min_pixels",
            )
        return Geometry(self.factor, low, high, self.grid)

    @property
    def key(self) -> str:
        return f"{self.factor}:{self.min_pixels}:{self.max_pixels}"

    def target(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) as Qwen's `smart_resize` computes it (transformers' formula, re-stated
        here so that media needs no transformers import; tests compare the two)."""
        f = self.factor
        h_bar, w_bar = round(height / f) * f, round(width / f) * f
        if h_bar * w_bar > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h_bar = max(f, math.floor(height / beta / f) * f)
            w_bar = max(f, math.floor(width / beta / f) * f)
        elif h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h_bar, w_bar = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
        return w_bar, h_bar


def check_request_mm_kwargs(kwargs: Mapping[str, Any] | None, geometry: Geometry | None, *, trusted: bool) -> None:
    """Refuse per-request processor options that are not the pixel budget (unless `trusted`), and,
    trusted or not, values that could crash the model: grid sizes other than the model's own, and
    sizes that are not positive integers. Raises MMKwargsError naming the key."""
    for key, value in (kwargs or {}).items():
        if key in REQUEST_MM_KEYS:
            if geometry is None and not trusted:
                raise MMKwargsError(
                    f"mm_processor_kwargs.{key} is not accepted per request for this model.", _clip(key)
                )
            continue
        if not trusted:
            raise MMKwargsError(
                f"mm_processor_kwargs.{_clip(key)} is not accepted per request on this server: only "
                f"{' and '.join(REQUEST_MM_KEYS)} are (--trust-request-mm-kwargs passes others to the processor).",
                _clip(key),
            )
        if key in _GRID_KEYS:
            own = dict(geometry.grid).get(_GRID_KEYS[key]) if geometry else None
            if own is None or type(value) is not int or value != own:
                raise MMKwargsError(
                    f"mm_processor_kwargs.{key} must be the model's own ({own}): it fixes the vision tower's patch grid.",
                    key,
                )
        elif key == "size":
            if not isinstance(value, Mapping) or not all(_positive_int(v) for v in value.values()):
                raise MMKwargsError("mm_processor_kwargs.size must map edges to positive integers.", key)
        elif key.endswith(("_pixels", "_size", "_frames")) and not _positive_int(value):
            raise MMKwargsError(f"mm_processor_kwargs.{_clip(key)} must be a positive integer.", _clip(key))


def _clip(text: str, limit: int = 64) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _clip_number(value: int) -> str:
    return _clip(str(value), 24)


def geometry_of(image_processor: Any) -> Geometry | None:
    """The budget of a Qwen-VL image processor; None for processors this server does not pre-size for."""
    if not type(image_processor).__name__.startswith(("Qwen2VLImageProcessor", "Qwen3VLImageProcessor")):
        return None
    size = getattr(image_processor, "size", None) or {}
    get = size.get if isinstance(size, Mapping) else lambda key: getattr(size, key, None)
    low = get("shortest_edge") or getattr(image_processor, "min_pixels", None)
    high = get("longest_edge") or getattr(image_processor, "max_pixels", None)
    if not (low and high):
        return None
    grid = tuple(
        (name, int(getattr(image_processor, name)))
        for name in ("patch_size", "temporal_patch_size", "merge_size")
        if isinstance(getattr(image_processor, name, None), int)
    )
    return Geometry(image_processor.patch_size * image_processor.merge_size, int(low), int(high), grid)


# --- decoding ---


def decode_image(
    data: bytes, param: str, *, max_pixels: int, max_side: int, geometry: Geometry | None = None
) -> Image.Image:
    """Bytes to an RGB image: format whitelist, dimensions checked before pixels are decoded, EXIF
    orientation applied, alpha composited on white, and (with a geometry) resized to the model's
    budget, JPEGs decoded directly at a reduced scale when that is enough."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image: Image.Image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
            width, height = image.size
            if width > max_side or height > max_side:
                raise MediaError(
                    f"Image is {width}x{height}; each side may be at most {max_side} pixels.", param, "too_many_pixels"
                )
            if width * height > max_pixels:
                raise MediaError(
                    f"Image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}.",
                    param,
                    "too_many_pixels",
                )
            target = None
            if geometry is not None:
                target = _target_size(image, geometry, param)
                if target[0] * target[1] > max_pixels:  # the budget is checked per request; the last guard
                    raise MediaError(
                        f"Image would be resized to {target[0]}x{target[1]}, over the limit of {max_pixels} pixels.",
                        param,
                        "too_many_pixels",
                    )
                if image.format == "JPEG":
                    # The codec scales by 1/2, 1/4 or 1/8 while decoding, never below the request.
                    draft = target if _orientation(image) < 5 else (target[1], target[0])
                    image.draft("RGB", draft)
            image.load()
    except MediaError:
        raise
    except UnidentifiedImageError:
        raise MediaError(
            f"Not an image in a supported format ({', '.join(ALLOWED_FORMATS)}).", param, "unsupported_format"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(f"Image refused as a decompression bomb: {exc}", param, "too_many_pixels") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise MediaError(f"Image could not be decoded (truncated or corrupt): {exc}", param, "corrupt") from None
    if _orientation(image) != 1:  # exif_transpose copies even when there is nothing to turn
        image = ImageOps.exif_transpose(image) or image
    image = _to_rgb(image)
    if target is not None and image.size != target:
        # reducing_gap: a cheap box reduction first, then bicubic over at most 3x the final size.
        image = image.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return image


def _orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block only means "no rotation"
        return 1


def _target_size(image: Image.Image, geometry: Geometry, param: str) -> tuple[int, int]:
    width, height = image.size
    if _orientation(image) >= 5:  # rotated by 90 degrees: the model sees the sides swapped
        width, height = height, width
    if max(width, height) / min(width, height) > _MAX_ASPECT_RATIO:
        raise MediaError(
            f"Image is {width}x{height}; the model accepts aspect ratios up to {_MAX_ASPECT_RATIO}:1.",
            param,
            "bad_aspect_ratio",
        )
    return geometry.target(width, height)


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
