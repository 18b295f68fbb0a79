"""Video decoding (qwen_server/media/video.py) on clips written here with OpenCV: the header caps, the
formats, parity with the model's own video processor, and memory bounded by the kept frames."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from qwen_server.errors import Kind
from qwen_server.media.errors import MediaError
from qwen_server.media.sources import data_url_frames
from qwen_server.media.video import VideoGeometry, VideoLimits, decode_frame_list, decode_video


def uniform(total: int, source_fps: float, fps: float, max_frames: int) -> list[int]:
    """A stand-in for vLLM's Qwen sampler (the real one is the engine's): `fps` frames a second, even count."""
    n = max(2, min(max_frames, int(total / source_fps * fps)) // 2 * 2)
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


GEOMETRY = VideoGeometry(
    factor=28, min_pixels=56 * 56, max_pixels=224 * 224, temporal_patch=2, per_clip=False, fps=2.0,
    max_frames=768, sample=uniform,
)  # fmt: skip
LIMITS = VideoLimits(
    max_seconds=60, max_frame_pixels=1920 * 1080, max_source_frames=2000, max_frames=64, max_pixels=10**8
)


def write_clip(
    path: Path, frames: int = 40, fps: float = 10.0, size=(320, 240), fourcc: str = "MJPG", noise=True
) -> bytes:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    if noise:
        base = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    else:  # smooth: a small file even at 1080p
        x = np.linspace(0, 255, size[0], dtype=np.uint8)
        base = np.broadcast_to(x[None, :, None], (size[1], size[0], 3)).copy()
    for i in range(frames):
        writer.write(np.roll(base, 4 * i, axis=1))
    writer.release()
    return path.read_bytes()


def decode(data: bytes, limits: VideoLimits = LIMITS, geometry: VideoGeometry = GEOMETRY, **kw: Any):
    return decode_video(data, "v", limits, geometry, fps=kw.get("fps", 2.0), max_frames=kw.get("max_frames", 64))


def test_kept_frames_are_sampled_and_sized_as_the_models_video_processor_sizes_them(
    tmp_path: Path, tiny_model: Path
) -> None:
    from transformers import AutoVideoProcessor

    data = write_clip(tmp_path / "a.avi")
    video = decode(data)
    assert video.frames.shape == (8, 168, 252, 3)  # 4 s at 2 fps; 320x240 within 224*224 pixels, sides of 28
    assert video.metadata["frames_indices"] == uniform(40, 10.0, 2.0, 64)
    assert video.metadata["fps"] == 10.0 and video.metadata["total_num_frames"] == 40
    assert video.metadata["do_sample_frames"] is False
    processor = AutoVideoProcessor.from_pretrained(tiny_model)
    ours = processor(videos=[video.frames], return_tensors="np", do_sample_frames=False)
    capture, full = cv2.VideoCapture(str(tmp_path / "a.avi")), []
    for i in range(40):
        ok, frame = capture.read()
        if ok and i in video.metadata["frames_indices"]:
            full.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    theirs = processor(videos=[np.stack(full)], return_tensors="np", do_sample_frames=False)
    assert (ours["video_grid_thw"] == theirs["video_grid_thw"]).all()  # the same grid, so the same tokens
    assert np.abs(ours["pixel_values_videos"] - theirs["pixel_values_videos"]).mean() < 0.1  # close pixels


def test_a_clip_smaller_than_the_budget_keeps_its_size_and_qwen3_counts_the_budget_over_the_clip(
    tmp_path: Path,
) -> None:
    data = write_clip(tmp_path / "small.avi", size=(112, 84))
    assert decode(data).frames.shape[1:3] == (84, 112)
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    per_clip = VideoGeometry(32, 64 * 64, 8 * 224 * 224, 2, True, 2.0, 768, uniform)
    frames = decode(write_clip(tmp_path / "a.avi"), geometry=per_clip).frames
    assert frames.shape[1:3] == smart_resize(8, 240, 320, 2, 32, 64 * 64, 8 * 224 * 224) == (192, 256)


@pytest.mark.parametrize(
    ("limits", "reason"),
    [
        (VideoLimits(2, 1920 * 1080, 2000, 64, 10**8), "too_long"),  # 4 s
        (VideoLimits(60, 100 * 100, 2000, 64, 10**8), "too_large"),  # frame pixels
        (VideoLimits(60, 1920 * 1080, 20, 64, 10**8), "too_long"),  # source frames read
        (VideoLimits(60, 1920 * 1080, 2000, 64, 8 * 168 * 252 - 1), "too_large"),  # kept pixels
    ],
)
def test_caps_are_checked_from_the_header_before_decoding(tmp_path: Path, limits: VideoLimits, reason: str) -> None:
    with pytest.raises(MediaError) as err:
        decode(write_clip(tmp_path / "a.avi"), limits)
    assert err.value.reason == reason and err.value.kind is Kind.TOO_LARGE


def test_the_rate_and_frame_count_asked_for_are_honoured_within_the_cap(tmp_path: Path) -> None:
    data = write_clip(tmp_path / "a.avi", frames=100)
    assert len(decode(data, fps=2.0).frames) == 20
    assert len(decode(data, fps=1.0).frames) == 10
    assert len(decode(data, fps=2.0, max_frames=6).frames) == 6
    assert len(decode(data, VideoLimits(60, 1920 * 1080, 2000, 4, 10**8), fps=2.0).frames) == 4  # the server's cap


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"plain text, not a video", "unsupported_format"),
        (b"RIFF\0\0\0\0AVI " + b"\0" * 500, "corrupt"),
        (b"\x00\x00\x00\x18ftypisom" + b"\1" * 500, "corrupt"),
    ],
)
def test_unknown_or_corrupt_bytes_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(MediaError) as err:
        decode(data)
    assert err.value.reason == reason and err.value.kind is Kind.INVALID


def test_a_truncated_clip_is_corrupt_not_a_short_answer(tmp_path: Path) -> None:
    data = write_clip(tmp_path / "a.avi")
    with pytest.raises(MediaError) as err:
        decode(data[: len(data) // 2])
    assert err.value.reason == "corrupt"


def test_a_codec_outside_the_list_is_refused(tmp_path: Path) -> None:
    data = write_clip(tmp_path / "a.avi", fourcc="MJPG")
    fourcc = data.find(b"MJPG")
    assert fourcc > 0
    renamed = data.replace(b"MJPG", b"ZZZZ")  # the stream header's codec and the frames' own
    with pytest.raises(MediaError) as err:
        decode(renamed)
    assert err.value.reason in ("unsupported_codec", "corrupt")


def test_peak_memory_is_the_kept_frames_at_their_final_size_not_the_clip(tmp_path: Path) -> None:
    """A 1080p clip of 300 frames (6.2 MB a frame decoded): kept at 2 fps of 30, 20 frames of 168x280
    (0.14 MB each) come back, and the decode never holds more than a few source frames."""
    data = write_clip(tmp_path / "hd.avi", frames=300, fps=30.0, size=(1920, 1080), noise=False)
    source_frame = 1920 * 1080 * 3
    tracemalloc.start()
    try:
        video = decode(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert video.frames.shape == (20, 168, 280, 3)
    kept = video.frames.nbytes
    assert peak < kept + 3 * source_frame, (peak, kept)
    assert peak < len(video.frames) * source_frame / 4  # what holding the sampled frames at source size costs


def write_h264(path: Path, frames: int = 40, fps: int = 10, size=(320, 240)) -> bytes:
    """An H.264 MP4 written with PyAV's libx264 (OpenCV here has no H.264 encoder)."""
    import av

    base = np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.roll(base, 4 * i, axis=1), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path.read_bytes()


def in_opencv_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode every frame in order with OpenCV, as vLLM's loader does: the reference for PyAV's skipping."""
    from qwen_server.media import video as video_mod

    monkeypatch.setattr(video_mod, "_kept_frames_pyav", lambda *args, **kw: -1)


def test_intra_only_clips_decode_only_the_kept_frames_to_the_same_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MJPG: PyAV decodes only the kept packets; the frames are those of decoding every frame in order."""
    data = write_clip(tmp_path / "a.avi", frames=60, fps=30.0, size=(640, 360))
    skipping = decode(data)
    assert len(skipping.metadata["frames_indices"]) == 4  # 2 s at 2 fps, of 60 frames
    in_opencv_only(monkeypatch)
    in_order = decode(data)
    assert skipping.metadata == in_order.metadata
    assert np.abs(skipping.frames.astype(int) - in_order.frames).max() <= 1, "the same frames, resized the same way"


def test_h264_frames_not_kept_are_skipped_to_the_same_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """H.264 with B-frames: PyAV lets the decoder drop unreferenced frames that are not kept; every kept
    frame is, bit for bit, the one OpenCV gives decoding every frame, at every sampling rate."""
    import av

    data = write_h264(tmp_path / "a.mp4")
    with av.open(str(tmp_path / "a.mp4")) as container:
        types = {av.video.frame.PictureType(frame.pict_type).name for frame in container.decode(video=0)}
    assert "B" in types, types  # the clip has frames the decoder may drop
    skipping = [decode(data, fps=fps) for fps in (1.0, 2.0, 5.0, 10.0)]
    in_opencv_only(monkeypatch)
    for fps, video in zip((1.0, 2.0, 5.0, 10.0), skipping, strict=True):
        reference = decode(data, fps=fps)
        assert video.metadata == reference.metadata
        assert np.array_equal(video.frames, reference.frames), fps


def test_h264_clips_are_decoded_in_order(tmp_path: Path) -> None:
    data = write_h264(tmp_path / "a.mp4")
    video = decode(data)
    assert video.frames.shape == (8, 168, 252, 3) and video.metadata["total_num_frames"] == 40
    capture, expected = cv2.VideoCapture(str(tmp_path / "a.mp4")), []
    for i in range(40):
        ok, frame = capture.read()
        if ok and i in video.metadata["frames_indices"]:
            expected.append(
                cv2.cvtColor(cv2.resize(frame, (252, 168), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
            )
    assert np.array_equal(video.frames, np.stack(expected))
    with pytest.raises(MediaError) as err:
        decode(data[: len(data) // 3])
    assert err.value.reason == "corrupt"


# --- vLLM's frame-list video: data:video/jpeg;base64,<JPEG>,<JPEG>,... ---


def jpeg_frames(n: int = 6, size=(320, 240), fmt: str = ".jpg") -> list[bytes]:
    base = np.random.default_rng(2).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    base = cv2.GaussianBlur(base, (9, 9), 3)  # camera-like: JPEG keeps it close
    return [cv2.imencode(fmt, np.roll(base, 8 * i, axis=1))[1].tobytes() for i in range(n)]


def frame_list_url(jpegs: list[bytes]) -> str:
    import base64

    return "data:video/jpeg;base64," + ",".join(base64.b64encode(j).decode() for j in jpegs)


def test_a_frame_list_gives_what_vllms_own_frame_list_loader_gives(tiny_model: Path) -> None:
    """Every frame kept, at the request's fps; the processor sees the same grid and close pixels as
    from vLLM's `VideoMediaIO.load_base64("video/jpeg", ...)`, which keeps the frames at source size."""
    from transformers import AutoVideoProcessor
    from vllm.multimodal.media.image import ImageMediaIO
    from vllm.multimodal.media.video import VideoMediaIO

    url = frame_list_url(jpeg_frames())
    video = decode_frame_list(data_url_frames(url, "v", 10**8), "v", LIMITS, GEOMETRY, fps=2.0, max_frames=64)
    assert video.frames.shape == (6, 168, 252, 3)
    theirs_frames, theirs_meta = (
        VideoMediaIO(ImageMediaIO(), num_frames=-1, fps=2.0).load_base64("video/jpeg", url.partition(",")[2]).media
    )
    assert theirs_frames.shape == (6, 240, 320, 3)
    assert {k: video.metadata[k] for k in theirs_meta} == theirs_meta  # the same metadata, backend's name included
    processor = AutoVideoProcessor.from_pretrained(tiny_model)
    ours = processor(videos=[video.frames], return_tensors="np", do_sample_frames=False)
    theirs = processor(videos=[theirs_frames], return_tensors="np", do_sample_frames=False)
    assert (ours["video_grid_thw"] == theirs["video_grid_thw"]).all()
    assert np.abs(ours["pixel_values_videos"] - theirs["pixel_values_videos"]).mean() < 0.1


@pytest.mark.parametrize(
    ("jpegs", "limits", "max_frames", "reason", "kind"),
    [
        (jpeg_frames(6), LIMITS, 5, "too_long", Kind.TOO_LARGE),  # more frames than the request allows
        (jpeg_frames(6), VideoLimits(60, 1920 * 1080, 2000, 4, 10**8), 64, "too_long", Kind.TOO_LARGE),
        (jpeg_frames(2), VideoLimits(60, 100 * 100, 2000, 64, 10**8), 64, "too_large", Kind.TOO_LARGE),
        (jpeg_frames(6), VideoLimits(60, 1920 * 1080, 2000, 64, 6 * 168 * 252 - 1), 64, "too_large", Kind.TOO_LARGE),
        (jpeg_frames(2) + jpeg_frames(1, size=(160, 120)), LIMITS, 64, "mixed_frame_sizes", Kind.INVALID),
        (jpeg_frames(2, fmt=".png"), LIMITS, 64, "unsupported_format", Kind.INVALID),
        ([*jpeg_frames(1), b"not a jpeg"], LIMITS, 64, "corrupt", Kind.INVALID),
        ([jpeg_frames(1)[0][:300]], LIMITS, 64, "corrupt", Kind.INVALID),  # truncated past the header
    ],
)
def test_a_frame_list_the_server_refuses(
    jpegs: list[bytes], limits: VideoLimits, max_frames: int, reason: str, kind: Kind
) -> None:
    with pytest.raises(MediaError) as err:
        decode_frame_list(jpegs, "v", limits, GEOMETRY, fps=2.0, max_frames=max_frames)
    assert (err.value.reason, err.value.kind) == (reason, kind), err.value.message


def test_a_frame_list_url_is_read_within_the_byte_cap() -> None:
    jpegs = jpeg_frames(3)
    assert data_url_frames(frame_list_url(jpegs), "v", 10**6) == jpegs
    with pytest.raises(MediaError) as err:
        data_url_frames(frame_list_url(jpegs), "v", sum(map(len, jpegs)) - 1)
    assert err.value.reason == "too_large"
    for bad, says in (
        ("data:video/jpeg;base64,AAAA,!!!!", "not valid base64"),
        ("data:video/jpeg,AAAA", "Only base64 frame lists"),
        ("data:video/jpeg;base64", "no ','"),  # no payload at all: not one empty frame
    ):
        with pytest.raises(MediaError) as err:
            data_url_frames(bad, "v", 10**6)
        assert (err.value.reason, err.value.param) == ("bad_data_url", "v")
        assert says in err.value.message, err.value.message
