"""The bytes behind a media URL (`data:`, local files under one allowed directory), within a size
limit, and their content digest. HTTP(S) sources are `fetch.Fetcher`'s."""

from __future__ import annotations

import binascii
import os
import stat
import urllib.parse
from typing import Any

import blake3
import pybase64

from qwen_server.errors import Kind
from qwen_server.media.errors import MediaError


def _base64_payload(url: str, param: str, supported: str) -> tuple[str, str]:
    """A base64 data URL's media type (lower case) and payload; `supported` names what is accepted."""
    header, sep, payload = url.partition(",")
    if not sep:
        raise MediaError("Malformed data URL: no ',' separates the header from the data.", param, "bad_data_url")
    meta = header[5:].split(";")
    if "base64" not in meta[1:]:
        raise MediaError(f"Only base64 {supported} are supported.", param, "bad_data_url")
    return meta[0].strip().lower(), payload


def data_url_bytes(url: str, param: str, max_bytes: int, noun: str = "image") -> bytes:
    example = "data:image/png;base64,..." if noun == "image" else f"data:{noun}/mp4;base64,..."
    media_type, payload = _base64_payload(url, param, f"data URLs ({example})")
    if media_type and not media_type.startswith(f"{noun}/"):
        article = "an" if noun[0] in "aeiou" else "a"
        raise MediaError(f"Data URL media type {media_type!r} is not {article} {noun} type.", param, "bad_data_url")
    # base64 needs 4 characters per 3 bytes: refuse oversize payloads before decoding them.
    if len(payload) > (max_bytes + 2) // 3 * 4 + 4:
        raise MediaError(
            f"{noun.capitalize()} is larger than the limit of {max_bytes} bytes.", param, "too_large", Kind.TOO_LARGE
        )
    try:
        # pybase64: SIMD, several times the stdlib's speed (benchmarks/README.md), and as strict about
        # padding as vLLM's own server.
        return pybase64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"{noun.capitalize()} data is not valid base64: {exc}.", param, "bad_data_url") from None


def is_frame_list(url: str) -> bool:
    """vLLM's frame-list video: `data:video/jpeg;base64,<JPEG>,<JPEG>,...`, frames the client sampled."""
    return url[:16].lower() == "data:video/jpeg;"


def data_url_frames(url: str, param: str, max_bytes: int) -> list[bytes]:
    """The JPEGs of a frame-list data URL, `max_bytes` for them all."""
    _, payload = _base64_payload(url, param, "frame lists (data:video/jpeg;base64,...)")
    if len(payload) > (max_bytes + 2) // 3 * 4 * 2:  # room for every frame's padding and comma
        raise MediaError(f"Video is larger than the limit of {max_bytes} bytes.", param, "too_large", Kind.TOO_LARGE)
    try:
        frames = [pybase64.b64decode(part, validate=True) for part in payload.split(",")]
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"Video frame data is not valid base64: {exc}.", param, "bad_data_url") from None
    if sum(map(len, frames)) > max_bytes:
        raise MediaError(f"Video is larger than the limit of {max_bytes} bytes.", param, "too_large", Kind.TOO_LARGE)
    return frames


def file_bytes(url: str, param: str, root: str | None, max_bytes: int, noun: str = "image") -> bytes:
    if root is None:
        raise MediaError(
            f"Local {noun} files are not enabled on this server (see --allowed-local-media-path).",
            param,
            "unsupported_url",
        )
    if url.startswith("file:"):
        parsed = urllib.parse.urlsplit(url)
        if parsed.netloc not in ("", "localhost"):
            raise MediaError(
                f"file: URLs must name a local path, not host {parsed.netloc!r}.", param, "unsupported_url"
            )
        path = urllib.parse.unquote(parsed.path)
    else:
        path = url
    # realpath resolves '..' and every symlink, so whatever the name says, the file must be in root.
    real = os.path.realpath(os.path.join(root, path))  # an absolute path replaces root in join
    if os.path.commonpath([real, root]) != root:
        raise MediaError(f"The {noun} path is outside the allowed local media directory.", param, "forbidden_path")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise MediaError(f"The {noun} file could not be opened: {exc.strerror}.", param, "not_found") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise MediaError(f"The {noun} path is not a regular file.", param, "not_found")
        if info.st_size > max_bytes:
            raise MediaError(
                f"{noun.capitalize()} is {info.st_size} bytes, over the limit of {max_bytes}.",
                param,
                "too_large",
                Kind.TOO_LARGE,
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(max_bytes + 1)
    finally:
        os.close(fd)


def digest(data: bytes) -> str:
    return blake3.blake3(data).hexdigest(16)  # the fastest content hash we measured (benchmarks/README.md)


def source_of(url: str) -> str:
    """data, http (http and https), file (file: URLs and absolute paths) or other."""
    scheme = url[: url.find(":")].lower() if ":" in url[:8] else ""
    if scheme in ("data", "file"):
        return scheme
    if scheme in ("http", "https"):
        return "http"
    return "file" if url.startswith("/") else "other"


def hashed(read: Any, *args: Any) -> tuple[bytes, str]:
    data = read(*args)
    return data, digest(data)
