"""A request's media, loaded concurrently: one loader per worker, created in the app's lifespan.

A content digest keys a small cache of decoded results and is handed to vLLM as the item's UUID, so
its multimodal cache is hit without hashing pixels; concurrent requests for the same item share one
decode.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from qwen_server import metrics
from qwen_server.errors import Kind
from qwen_server.media.errors import MediaError
from qwen_server.media.fetch import Fetcher, FetchError
from qwen_server.media.image import Geometry, decode_image
from qwen_server.media.sources import (
    data_url_bytes,
    data_url_frames,
    digest,
    file_bytes,
    hashed,
    is_frame_list,
    source_of,
)
from qwen_server.media.video import DecodedVideo, VideoGeometry, VideoLimits, decode_frame_list, decode_video
from qwen_server.settings import Settings


@dataclass(frozen=True, slots=True)
class LoadedImage:
    """Pixels as an (height, width, 3) uint8 array: the model's processor takes arrays directly,
    which skips the PIL-to-tensor copy (and vLLM's EXIF pass) a PIL image costs it per request."""

    pixels: np.ndarray
    uuid: str  # content hash + geometry: the same image at the same budget has the same id


@dataclass(frozen=True, slots=True)
class LoadedVideo:
    """The kept frames at the model's size, (frames, height, width, 3) uint8, and the metadata the
    model's processor reads (source fps, frame count, the kept indices)."""

    frames: np.ndarray
    metadata: dict[str, Any]
    uuid: str  # content hash + budget + sampling: the same clip sampled the same way has the same id


class _Budget:
    """Encoded bytes of one request's images, against the per-request total."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, size: int, param: str) -> None:
        self.used += size
        if self.used > self.limit:
            raise MediaError(
                f"The request's images total more than {self.limit} bytes.", param, "request_too_large", Kind.TOO_LARGE
            )


class _Cache:
    """LRU of decoded images, bounded by their pixel bytes; shared by the worker's requests."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        with self._lock:
            image = self._items.get(key)
            if image is not None:
                self._items.move_to_end(key)
            return image

    def put(self, key: str, item: Any) -> None:
        """`item`: an image's pixels, or a decoded video (its frames count)."""
        size = _nbytes(item)
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = item
            self.used += size
            while self.used > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.used -= _nbytes(old)


def _nbytes(item: Any) -> int:
    return int(item.nbytes) if isinstance(item, np.ndarray) else int(item.frames.nbytes)


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
        self._inflight: dict[str, asyncio.Future[Any]] = {}

    async def aclose(self) -> None:
        await self._fetcher.aclose()

    async def load_all(self, urls: list[tuple[str, str]], geometry: Geometry | None) -> list[LoadedImage]:
        """`urls` as (url, request path) pairs; all are loaded at once, the first error wins."""
        budget = _Budget(self.settings.max_request_image_bytes)
        loads = [self.load(url, param, geometry, budget) for url, param in urls]
        return await _all_or_first_error(loads, metrics.IMAGE_REJECTIONS)

    async def load(self, url: str, param: str, geometry: Geometry | None, budget: _Budget | None = None) -> LoadedImage:
        source = source_of(url)
        t0 = time.perf_counter()
        data, content_hash = await self._bytes(url, source, param)
        metrics.IMAGE_SECONDS.labels(source, "read").observe(time.perf_counter() - t0)
        metrics.IMAGE_BYTES.labels(source).inc(len(data))
        if budget is not None:
            budget.take(len(data), param)
        key = f"{content_hash}:{geometry.key if geometry else 'native'}"
        t0 = time.perf_counter()
        pixels, cached = await self._decoded(key, param, self._decode, data, param, geometry)
        metrics.IMAGES.labels("cached" if cached else "decoded").inc()
        if not cached:
            metrics.IMAGE_SECONDS.labels(source, "decode").observe(time.perf_counter() - t0)
        return LoadedImage(pixels, key)

    async def _decoded(self, key: str, param: str, decode: Any, *args: Any) -> tuple[Any, bool]:
        """The cached item for `key` (and True), or `decode(*args)` run in a thread (and False); the
        decodes of one key running at once are one decode."""
        item = self._cache.get(key)
        if item is not None:
            return item, True
        pending = self._inflight.get(key)
        if pending is None:
            pending = asyncio.ensure_future(asyncio.to_thread(decode, *args))
            self._inflight[key] = pending
            pending.add_done_callback(lambda _: self._inflight.pop(key, None))
        try:
            item = await asyncio.shield(pending)
        except MediaError as exc:  # the decode may have been started for another request's part
            raise MediaError(exc.message, param, exc.reason, exc.kind) from None
        self._cache.put(key, item)
        return item, False

    def _decode(self, data: bytes, param: str, geometry: Geometry | None) -> np.ndarray:
        s = self.settings
        image = decode_image(data, param, max_pixels=s.max_image_pixels, max_side=s.max_image_side, geometry=geometry)
        # Shared through the cache: the model's processor reads it (tests/unit/media/test_loader.py checks it
        # does not write to it); writable, because torch warns on read-only arrays.
        return np.array(image)

    async def load_videos(
        self, urls: list[tuple[str, str]], geometry: VideoGeometry, *, fps: float, max_frames: int
    ) -> list[LoadedVideo]:
        """`urls` as (url, request path) pairs, sampled at `fps` (at most `max_frames` each); all are
        loaded at once, the first error wins."""
        loads = [self.load_video(url, param, geometry, fps, max_frames) for url, param in urls]
        return await _all_or_first_error(loads, metrics.VIDEO_REJECTIONS)

    async def load_video(
        self, url: str, param: str, geometry: VideoGeometry, fps: float, max_frames: int
    ) -> LoadedVideo:
        source = source_of(url)
        t0 = time.perf_counter()
        decode: Any = self._decode_video
        if source == "data" and is_frame_list(url):
            decode = self._decode_frame_list
            data: Any = await asyncio.to_thread(data_url_frames, url, param, self.settings.max_video_bytes)
            # Each frame's length is hashed with it: [A, B] and [AB] are different videos.
            framed = b"".join(len(jpeg).to_bytes(8, "little") + jpeg for jpeg in data)
            content_hash = "frames:" + await asyncio.to_thread(digest, framed)
            size = sum(map(len, data))
        else:
            data, content_hash = await self._bytes(url, source, param, "video")
            size = len(data)
        metrics.VIDEO_SECONDS.labels(source, "read").observe(time.perf_counter() - t0)
        metrics.VIDEO_BYTES.labels(source).inc(size)
        key = f"video:{content_hash}:{geometry.factor}:{geometry.min_pixels}:{geometry.max_pixels}:{fps:g}:{max_frames}"
        t0 = time.perf_counter()
        video: DecodedVideo
        video, cached = await self._decoded(key, param, decode, data, param, geometry, fps, max_frames)
        metrics.VIDEOS.labels("cached" if cached else "decoded").inc()
        if not cached:
            metrics.VIDEO_SECONDS.labels(source, "decode").observe(time.perf_counter() - t0)
            metrics.VIDEO_FRAMES.inc(len(video.frames))
        return LoadedVideo(video.frames, dict(video.metadata), key)

    def _video_limits(self) -> VideoLimits:
        s = self.settings
        return VideoLimits(
            max_seconds=s.max_video_seconds,
            max_frame_pixels=s.max_video_frame_pixels,
            max_source_frames=s.max_video_source_frames,
            max_frames=s.max_video_frames,
            max_pixels=s.max_video_pixels,
        )

    def _decode_video(
        self, data: bytes, param: str, geometry: VideoGeometry, fps: float, max_frames: int
    ) -> DecodedVideo:
        return decode_video(data, param, self._video_limits(), geometry, fps=fps, max_frames=max_frames)

    def _decode_frame_list(
        self, jpegs: list[bytes], param: str, geometry: VideoGeometry, fps: float, max_frames: int
    ) -> DecodedVideo:
        return decode_frame_list(jpegs, param, self._video_limits(), geometry, fps=fps, max_frames=max_frames)

    async def _bytes(self, url: str, source: str, param: str, noun: str = "image") -> tuple[bytes, str]:
        max_bytes = self.settings.max_image_bytes if noun == "image" else self.settings.max_video_bytes
        if source == "data":
            return await asyncio.to_thread(hashed, data_url_bytes, url, param, max_bytes, noun)
        if source == "http":
            try:
                data = await self._fetcher.fetch(url, max_bytes)
            except FetchError as exc:
                message = exc.message if noun == "image" else exc.message.replace("image", noun)
                raise MediaError(message, param, exc.reason, exc.kind) from None
            return data, await asyncio.to_thread(digest, data)
        if source == "file":
            return await asyncio.to_thread(hashed, file_bytes, url, param, self._root, max_bytes, noun)
        scheme = url.split(":", 1)[0] if ":" in url else ""
        raise MediaError(
            f"Unsupported {noun} URL scheme {scheme!r}: send a data:, http(s):// or (if enabled) file: URL.",
            param,
            "unsupported_url",
        )


async def _all_or_first_error(loads: list[Any], rejections: Any) -> list[Any]:
    """Every load at once; the first MediaError wins (counted in `rejections` by its reason)."""
    tasks = [asyncio.ensure_future(load) for load in loads]
    try:
        return list(await asyncio.gather(*tasks))
    except MediaError as exc:
        rejections.labels(exc.reason).inc()
        raise
    finally:
        for task in tasks:  # one failed: the others' fetches and decodes are not needed
            task.cancel()
