"""Images in: from a request's image URLs to RGB Pillow images sized for the model, safely and fast.

Sources: `data:` URLs, `http(s)://` URLs (`fetch.py`: SSRF guard, byte and time limits) and local
files under one allowed directory. Decoding runs in threads, behind a format whitelist and size
checks made from the header before any pixel is decoded. Images are resized here to the model's
pixel budget (Qwen's `smart_resize`), JPEGs through Pillow's draft mode (decoded at 1/2, 1/4 or
1/8 scale by the codec), so the model's processor finds them at their final size. A content hash
keys a small cache of results and is handed to vLLM as the item's UUID, so its multimodal cache is
hit without hashing pixels. No HTTP server code here: errors are `MediaError`s naming the part.
"""

from __future__ import annotations

import asyncio
import binascii
import io
import math
import os
import stat
import threading
import time
import urllib.parse
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import blake3
import numpy as np
import pybase64
from PIL import Image, ImageOps, UnidentifiedImageError

from qwen_server import metrics
from qwen_server.fetch import Fetcher, FetchError
from qwen_server.settings import Settings

# Formats a client may send; anything else is refused before decoding.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_MAX_ASPECT_RATIO = 200  # what Qwen's processor accepts


class MediaError(ValueError):
    """An image the server will not use: the request field it came from and a short reason."""

    def __init__(self, message: str, param: str, reason: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.reason = reason
        self.status = status


# Per-request mm_processor_kwargs any client may set: the image pixel budget, within the server's.
REQUEST_MM_KEYS = ("min_pixels", "max_pixels")
# Keys that fix the model's patch grid: any other value than the model's own breaks its vision tower
# (temporal_patch_size 0 killed the engine), so they are refused even from trusted clients.
_GRID_KEYS = {"patch_size": "patch_size", "temporal_patch_size": "temporal_patch_size",
              "merge_size": "merge_size", "spatial_merge_size": "merge_size"}


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
        size = kwargs.get("size") if trusted and isinstance(kwargs.get("size"), Mapping) else {}
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
                f"mm_processor_kwargs.min_pixels ({_clip_number(low)}) must not exceed max_pixels ({high}).", "min_pixels"
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
            image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
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


# --- sources ---


def _data_url_bytes(url: str, param: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise MediaError("Malformed data URL: no ',' separates the header from the data.", param, "bad_data_url")
    meta = header[5:].split(";")
    if "base64" not in meta[1:]:
        raise MediaError("Only base64 data URLs are supported (data:image/png;base64,...).", param, "bad_data_url")
    media_type = meta[0].strip().lower()
    if media_type and not media_type.startswith("image/"):
        raise MediaError(f"Data URL media type {media_type!r} is not an image type.", param, "bad_data_url")
    # base64 needs 4 characters per 3 bytes: refuse oversize payloads before decoding them.
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:
        raise MediaError(f"Image is larger than the limit of {max_bytes} bytes.", param, "too_large", 413)
    try:
        # pybase64 (SIMD): 0.2 ms for a 400 KB payload against 1.4 ms for the stdlib's decoder. It is
        # stricter (it refuses excess padding the stdlib lets through), as vLLM's own server is.
        return pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"Image data is not valid base64: {exc}.", param, "bad_data_url") from None


def _file_bytes(url: str, param: str, root: str | None, max_bytes: int) -> bytes:
    if root is None:
        raise MediaError(
            "Local image files are not enabled on this server (see --allowed-local-media-path).", param, "unsupported_url"
        )
    if url.startswith("file:"):
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc not in ("", "localhost"):
            raise MediaError(f"file: URLs must name a local path, not host {parsed.netloc!r}.", param, "unsupported_url")
        path = urllib.parse.unquote(parsed.path)
    else:
        path = url
    # realpath resolves '..' and every symlink, so whatever the name says, the file must be in root.
    real = os.path.realpath(os.path.join(root, path))  # an absolute path replaces root in join
    if os.path.commonpath([real, root]) != root:
        raise MediaError("The image path is outside the allowed local media directory.", param, "forbidden_path")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise MediaError(f"The image file could not be opened: {exc.strerror}.", param, "not_found") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MediaError("The image path is not a regular file.", param, "not_found")
        if info.st_size > max_bytes:
            raise MediaError(f"Image is {info.st_size} bytes, over the limit of {max_bytes}.", param, "too_large", 413)
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(max_bytes + 1)
    finally:
        os.close(fd)


def _digest(data: bytes) -> str:
    return blake3.blake3(data).hexdigest(16)  # 0.07 ms for 400 KB; hashlib's blake2b took 0.44


# --- loading ---


@dataclass(frozen=True, slots=True)
class LoadedImage:
    """Pixels as an (height, width, 3) uint8 array: the model's processor takes arrays directly,
    which skips the PIL-to-tensor copy (and vLLM's EXIF pass) a PIL image costs it per request."""

    pixels: np.ndarray
    uuid: str  # content hash + geometry: the same image at the same budget has the same id


class _Budget:
    """Encoded bytes of one request's images, against the per-request total."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int, param: str) -> None:
        self.used += size
        if self.used > self.limit:
            raise MediaError(
                f"The request's images total more than {self.limit} bytes.", param, "request_too_large", 413
            )


class _Cache:
    """LRU of decoded images, bounded by their pixel bytes; shared by the worker's requests."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._items: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            image = self._items.get(key)
            if image is not None:
                self._items.move_to_end(key)
            return image

    def put(self, key: str, pixels: np.ndarray) -> None:
        if pixels.nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = pixels
            self.used += pixels.nbytes
            while self.used > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.used -= old.nbytes


class MediaLoader:
    """Loads a request's images concurrently; one per worker, created in the app's lifespan."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        root = settings.allowed_local_media_path
        self._root = os.path.realpath(root) if root else None
        self._fetcher = Fetcher(
            timeout=settings.media_fetch_timeout,
            max_redirects=settings.media_max_redirects,
            allowed_domains=settings.allowed_media_domains,
            allowed_networks=settings.allowed_media_networks or (),
        )
        self._cache = _Cache(settings.image_cache_bytes)
        self._inflight: dict[str, asyncio.Future[np.ndarray]] = {}

    async def aclose(self) -> None:
        await self._fetcher.aclose()

    async def load_all(self, urls: list[tuple[str, str]], geometry: Geometry | None) -> list[LoadedImage]:
        """`urls` as (url, request path) pairs; all are loaded at once, the first error wins."""
        budget = _Budget(self.settings.max_request_image_bytes)
        tasks = [asyncio.ensure_future(self.load(url, param, geometry, budget)) for url, param in urls]
        try:
            return list(await asyncio.gather(*tasks))
        except MediaError as exc:
            metrics.IMAGE_REJECTIONS.labels(exc.reason).inc()
            raise
        finally:
            for task in tasks:  # one failed: the others' fetches and decodes are not needed
                task.cancel()

    async def load(self, url: str, param: str, geometry: Geometry | None, budget: _Budget | None = None) -> LoadedImage:
        source = _source(url)
        t0 = time.perf_counter()
        data, digest = await self._bytes(url, source, param)
        metrics.IMAGE_SECONDS.labels(source, "read").observe(time.perf_counter() - t0)
        metrics.IMAGE_BYTES.labels(source).inc(len(data))
        if budget is not None:
            budget.take(len(data), param)
        key = f"{digest}:{geometry.key if geometry else 'native'}"
        pixels = self._cache.get(key)
        metrics.IMAGES.labels("cached" if pixels is not None else "decoded").inc()
        if pixels is None:
            t0 = time.perf_counter()
            pending = self._inflight.get(key)
            if pending is None:
                pending = asyncio.ensure_future(asyncio.to_thread(self._decode, data, param, geometry))
                self._inflight[key] = pending
                pending.add_done_callback(lambda _: self._inflight.pop(key, None))
            try:
                pixels = await asyncio.shield(pending)
            except MediaError as exc:  # the decode may have been started for another request's part
                raise MediaError(exc.message, param, exc.reason, exc.status) from None
            metrics.IMAGE_SECONDS.labels(source, "decode").observe(time.perf_counter() - t0)
            self._cache.put(key, pixels)
        return LoadedImage(pixels, key)

    def _decode(self, data: bytes, param: str, geometry: Geometry | None) -> np.ndarray:
        s = self.settings
        image = decode_image(data, param, max_pixels=s.max_image_pixels, max_side=s.max_image_side, geometry=geometry)
        # Shared through the cache: the model's processor reads it (tests/test_media.py checks it
        # does not write to it); writable, because torch warns on read-only arrays.
        return np.array(image)

    async def _bytes(self, url: str, source: str, param: str) -> tuple[bytes, str]:
        max_bytes = self.settings.max_image_bytes
        if source == "data":
            return await asyncio.to_thread(_hashed, _data_url_bytes, url, param, max_bytes)
        if source == "http":
            try:
                data = await self._fetcher.fetch(url, max_bytes)
            except FetchError as exc:
                raise MediaError(exc.message, param, exc.reason, exc.status) from None
            return data, await asyncio.to_thread(_digest, data)
        if source == "file":
            return await asyncio.to_thread(_hashed, _file_bytes, url, param, self._root, max_bytes)
        scheme = url.split(":", 1)[0] if ":" in url else ""
        raise MediaError(
            f"Unsupported image URL scheme {scheme!r}: send a data:, http(s):// or (if enabled) file: URL.",
            param,
            "unsupported_url",
        )


def _source(url: str) -> str:
    """data, http (http and https), file (file: URLs and absolute paths) or other."""
    scheme = url[: url.find(":")].lower() if ":" in url[:8] else ""
    if scheme in ("data", "file"):
        return scheme
    if scheme in ("http", "https"):
        return "http"
    return "file" if url.startswith("/") else "other"


def _hashed(read: Any, *args: Any) -> tuple[bytes, str]:
    data = read(*args)
    return data, _digest(data)
