"""Videos: the containers and codecs a client may send, the model's video budget, and decoding the
frames the model will see, at their final size.

The header (container, codec, frame size, frame count, fps, duration) is checked before any frame is
decoded. The frames to keep are chosen by the model's own sampler (vLLM's, handed over by the engine
in `VideoGeometry.sample`), and each kept frame is resized to the model's budget as soon as it is
decoded: the clip never exists at its source size, so memory is bounded by the kept frames at their
final size plus one source frame. OpenCV reads the header, as in vLLM's own video loader; PyAV
decodes, because it can pass over frames not kept (OpenCV's `grab()` decodes every frame it passes):
for codecs whose every frame stands alone (MJPG) only the kept packets are decoded (a 1080p 10 s clip,
20 frames kept: 2.2 s in OpenCV, 0.26 s), and for the others (H.264...) frames that no later frame
refers to are dropped by the decoder unless kept (a 720p 10 s libx264 clip: 0.47 s in OpenCV, 0.30 s).
OpenCV decodes what PyAV cannot place (packets without timestamps).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from qwen_server.errors import Kind
from qwen_server.media.errors import MediaError

# Containers by their magic bytes; anything else is refused before it reaches the decoder.
_CONTAINERS = ((b"RIFF", 0, "avi"), (b"ftyp", 4, "mp4"), (b"\x1a\x45\xdf\xa3", 0, "webm"))
# Codecs (OpenCV's FOURCC names) a client may send: common camera and web codecs.
ALLOWED_CODECS = frozenset(
    {"MJPG", "FMP4", "MP4V", "XVID", "DIVX", "H264", "AVC1", "X264", "HEVC", "HVC1", "HEV1", "VP80", "VP90", "AV01"}
)
# Intra-only codecs: any frame decodes without the ones before it, so only the kept ones are decoded.
_INTRA_ONLY = frozenset({"MJPG"})


@dataclass(frozen=True, slots=True)
class VideoLimits:
    """The server's caps, checked from the header before decoding."""

    max_seconds: float
    max_frame_pixels: int  # width x height of the source
    max_source_frames: int  # frames read (decoded or skipped) to reach the last kept one
    max_frames: int  # frames kept for the model
    max_pixels: int  # the kept frames' pixels at the model's size, all together


@dataclass(frozen=True, slots=True)
class VideoGeometry:
    """The model's video processor: frame sides are multiples of `factor`, their area lies within
    [min_pixels, max_pixels] (per frame, or over the whole clip when `per_clip`, as Qwen3-VL counts
    it); `sample(total, source_fps, fps, max_frames)` is its frame sampler; `fps` its default rate."""

    factor: int
    min_pixels: int
    max_pixels: int
    temporal_patch: int
    per_clip: bool
    fps: float
    max_frames: int
    sample: Callable[[int, float, float, int], list[int]]

    def target(self, frames: int, width: int, height: int) -> tuple[int, int]:
        """(width, height) of every kept frame, as the model's `smart_resize` computes it."""
        f = self.factor
        if height < f or width < f:
            scale = max(f / height, f / width)
            height, width = int(height * scale), int(width * scale)
        t = max(1, round(frames / self.temporal_patch) * self.temporal_patch) if self.per_clip else 1
        n = frames if self.per_clip else 1
        h_bar, w_bar = round(height / f) * f, round(width / f) * f
        if t * h_bar * w_bar > self.max_pixels:
            beta = math.sqrt(n * height * width / self.max_pixels)
            h_bar = max(f, math.floor(height / beta / f) * f)
            w_bar = max(f, math.floor(width / beta / f) * f)
        elif t * h_bar * w_bar < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (n * height * width))
            h_bar, w_bar = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
        return w_bar, h_bar


@dataclass(frozen=True, slots=True)
class DecodedVideo:
    frames: np.ndarray  # (frames, height, width, 3) uint8, at the model's size
    metadata: dict[str, Any]  # what the model's processor reads: source fps, frame count, kept indices


def _put(frame: np.ndarray, size: tuple[int, int], source: tuple[int, int], out: np.ndarray, at: int) -> None:
    """One decoded RGB source frame into `out[at]`, at the model's size (the only copy kept)."""
    import cv2

    if size != source:
        cv2.resize(frame, size, dst=out[at], interpolation=cv2.INTER_AREA)
    else:
        out[at] = frame


def _kept_frames(cap: Any, indices: list[int], source: tuple[int, int], size: tuple[int, int], out: np.ndarray) -> int:
    """OpenCV, in order: every frame up to the last kept one is decoded; the kept ones are resized
    into `out` one at a time. Returns how many were kept (fewer: the clip ended early)."""
    import cv2

    kept, wanted = 0, set(indices)
    for index in range(indices[-1] + 1):
        if not cap.grab():
            break
        if index not in wanted:
            continue
        ok, frame = cap.retrieve()
        if not ok or frame is None or frame.shape[:2] != (source[1], source[0]):
            break
        _put(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), size, source, out, kept)
        kept += 1
    return kept


# Packets demuxed past the last kept frame's index: a decoder reorders frames by fewer than this
# (H.264 allows 16), so the kept frames' timestamps are among the packets read.
_REORDER_SLACK = 32


def _kept_frames_pyav(
    data: bytes, indices: list[int], source: tuple[int, int], size: tuple[int, int], out: np.ndarray, *, intra: bool
) -> int:
    """PyAV: how many kept frames were written into `out` (fewer: the clip is corrupt or ended early),
    or -1 when PyAV cannot place the frames (not installed, packets without timestamps).

    Intra-only codecs (`intra`): packets are read in order and only the kept ones decoded. Other codecs:
    a frame's index is its timestamp's rank among the packets (presentation order); a packet whose
    frame is not kept is decoded with `skip_frame = NONREF`, so the decoder drops it unless later
    frames refer to it (B-frames mostly), and the kept frames decode to the same pixels."""
    try:
        import av
    except ImportError:
        return -1

    kept = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            codec = stream.codec_context
            if intra:
                wanted, index = set(indices), 0
                for packet in container.demux(stream):
                    if packet.size == 0:  # the demuxer's end-of-stream marker, or an empty (dropped) chunk
                        continue
                    if index in wanted:
                        decoded = codec.decode(packet)
                        if len(decoded) != 1 or not _placed(decoded[0], source, size, out, kept):
                            break
                        kept += 1
                    index += 1
                    if index > indices[-1]:
                        break
                return kept
            packets = []
            for packet in container.demux(stream):
                if packet.size:
                    packets.append(packet)
                    if len(packets) > indices[-1] + _REORDER_SLACK:
                        break
            if any(p.pts is None for p in packets):
                return -1
            shown = sorted(p.pts for p in packets if not p.is_discard and p.pts is not None)
            if len(shown) <= indices[-1]:
                return 0  # fewer frames than the header said: truncated
            slot = {shown[i]: n for n, i in enumerate(indices)}

            def in_order() -> Iterator[Any]:
                for packet in packets:
                    codec.skip_frame = "DEFAULT" if packet.pts in slot else "NONREF"
                    yield from codec.decode(packet)
                codec.skip_frame = "DEFAULT"
                yield from codec.decode(None)  # the frames the decoder still holds

            filled: set[int] = set()
            for frame in in_order():
                at = None if frame.pts is None else slot.get(frame.pts)
                if at is None or at in filled:
                    continue
                if not _placed(frame, source, size, out, at):
                    break
                filled.add(at)
                if len(filled) == len(indices):
                    break
            kept = len(filled)
    except av.FFmpegError:  # corrupt or truncated past the header: the caller reports the short count
        pass
    return kept


def _placed(frame: Any, source: tuple[int, int], size: tuple[int, int], out: np.ndarray, at: int) -> bool:
    """A PyAV frame into `out[at]`; False when it is not of the header's size (a corrupt stream)."""
    rgb = frame.to_ndarray(format="rgb24")
    if rgb.shape[:2] != (source[1], source[0]):
        return False
    _put(rgb, size, source, out, at)
    return True


def _check_frame_pixels(width: int, height: int, limits: VideoLimits, param: str) -> None:
    if width * height > limits.max_frame_pixels:
        raise MediaError(
            f"The video's frames are {width}x{height}, over this server's limit of {limits.max_frame_pixels} "
            "pixels per frame.",
            param,
            "too_large",
            Kind.TOO_LARGE,
        )


def _target_within(
    count: int, width: int, height: int, limits: VideoLimits, geometry: VideoGeometry, param: str, what: str, hint: str
) -> tuple[int, int]:
    """The kept frames' (width, height) at the model's size, all `count` of them within the pixel cap."""
    size = geometry.target(count, width, height)
    if count * size[0] * size[1] > limits.max_pixels:
        raise MediaError(
            f"The video's {count} {what} of {size[0]}x{size[1]} are over this server's limit of "
            f"{limits.max_pixels} pixels per video{hint}",
            param,
            "too_large",
            Kind.TOO_LARGE,
        )
    return size


def decode_frame_list(
    jpegs: list[bytes], param: str, limits: VideoLimits, geometry: VideoGeometry, *, fps: float, max_frames: int
) -> DecodedVideo:
    """vLLM's frame-list video (JPEG frames the client sampled): every frame is kept, at `fps`, each
    checked from its header and decoded at the model's size as the clip path decodes (Pillow's JPEG
    draft mode on the way); MediaError for a list the server refuses."""
    from PIL import Image, UnidentifiedImageError

    cap = min(max_frames, limits.max_frames)
    if not jpegs or len(jpegs) > cap:
        raise MediaError(
            f"The frame list has {len(jpegs)} frames; this server takes 1 to {cap} (max_frames).",
            param,
            "too_long",
            Kind.TOO_LARGE,
        )
    try:
        images = [Image.open(io.BytesIO(jpeg)) for jpeg in jpegs]
    except (UnidentifiedImageError, OSError):
        raise MediaError("A video frame is not an image: its data is corrupt.", param, "corrupt") from None
    if any(image.format != "JPEG" for image in images):
        raise MediaError("Every frame of a video/jpeg frame list must be a JPEG.", param, "unsupported_format")
    width, height = images[0].size
    if any(image.size != (width, height) for image in images):
        raise MediaError("The frames of a video differ in size.", param, "mixed_frame_sizes")
    _check_frame_pixels(width, height, limits, param)
    size = _target_within(len(images), width, height, limits, geometry, param, "frames", ".")
    frames = np.empty((len(images), size[1], size[0], 3), dtype=np.uint8)
    for at, image in enumerate(images):
        try:
            image.draft("RGB", size)  # JPEG's DCT scaling: decoded at 1/2, 1/4 or 1/8 when that still covers size
            rgb = np.asarray(image.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError):
            raise MediaError("A video frame could not be decoded: its data is corrupt.", param, "corrupt") from None
        _put(rgb, size, rgb.shape[1::-1], frames, at)
    metadata = {
        "total_num_frames": len(images),
        "fps": fps,
        "duration": len(images) / fps,
        "video_backend": "jpeg_sequence",
        "frames_indices": list(range(len(images))),
        "do_sample_frames": False,
    }
    return DecodedVideo(frames, metadata)


def container_of(data: bytes) -> str | None:
    for magic, offset, name in _CONTAINERS:
        if data[offset : offset + len(magic)] == magic:
            return name
    return None


def decode_video(
    data: bytes, param: str, limits: VideoLimits, geometry: VideoGeometry, *, fps: float, max_frames: int
) -> DecodedVideo:
    """The clip's kept frames at the model's size; MediaError for a video the server refuses."""
    import cv2

    if container_of(data) is None:
        raise MediaError("The video is not an AVI, MP4/MOV or WebM/MKV file.", param, "unsupported_format")
    # The stream must outlive the capture: OpenCV reads it until release() (a temporary crashes it).
    stream = io.BytesIO(data)
    cap = cv2.VideoCapture(stream, cv2.CAP_FFMPEG, [])  # type: ignore[call-overload]
    try:
        if not cap.isOpened():
            raise MediaError("The video could not be opened: its data is corrupt or truncated.", param, "corrupt")
        fourcc = int(cap.get(cv2.CAP_PROP_FOURCC))
        codec = "".join(chr((fourcc >> 8 * i) & 0xFF) for i in range(4)).upper()
        if codec not in ALLOWED_CODECS:
            raise MediaError(f"The video codec {codec!r} is not accepted.", param, "unsupported_codec")
        width, height = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
        source_fps = float(cap.get(cv2.CAP_PROP_FPS))
        if width < 1 or height < 1 or total < 1:
            raise MediaError("The video has no frames, or its header is corrupt.", param, "corrupt")
        if not math.isfinite(source_fps) or source_fps <= 0:
            raise MediaError("The video does not say its frame rate.", param, "unknown_fps")
        _check_frame_pixels(width, height, limits, param)
        seconds = total / source_fps
        if seconds > limits.max_seconds:
            raise MediaError(
                f"The video is {seconds:.1f} s long, over this server's limit of {limits.max_seconds:g} s.",
                param,
                "too_long",
                Kind.TOO_LARGE,
            )
        try:
            indices = sorted(
                {int(i) for i in geometry.sample(total, source_fps, fps, min(max_frames, limits.max_frames))}
            )
        except ValueError as exc:
            raise MediaError(f"The video cannot be sampled: {exc}", param, "corrupt") from None
        if not indices or indices[-1] >= limits.max_source_frames:
            raise MediaError(
                f"The video has {total} frames, over this server's limit of {limits.max_source_frames}.",
                param,
                "too_long",
                Kind.TOO_LARGE,
            )
        size = _target_within(
            len(indices),
            width,
            height,
            limits,
            geometry,
            param,
            "sampled frames",
            "; ask for fewer (mm_processor_kwargs fps or max_frames).",
        )
        frames = np.empty((len(indices), size[1], size[0], 3), dtype=np.uint8)
        kept = _kept_frames_pyav(data, indices, (width, height), size, frames, intra=codec in _INTRA_ONLY)
        if kept < 0:  # PyAV is not installed, or cannot place the frames
            kept = _kept_frames(cap, indices, (width, height), size, frames)
        if kept < len(indices):
            raise MediaError(
                f"The video ended after {kept} of the {len(indices)} frames sampled from it: it is truncated or "
                "corrupt.",
                param,
                "corrupt",
            )
    finally:
        cap.release()
        stream.close()
    metadata = {
        "total_num_frames": total,
        "fps": source_fps,
        "duration": seconds,
        "video_backend": "opencv",
        "frames_indices": indices,
        "do_sample_frames": False,
    }
    return DecodedVideo(frames, metadata)
