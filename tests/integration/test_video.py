"""Video parts on the real engine (the session server, tiny Qwen2.5-VL): clips the test writes with
OpenCV, sent as data URLs, over loopback HTTP and as allowed local files."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np
import pytest

from tests.helpers.media import image_data_url
from tests.helpers.serverproc import ServerProcess


def write_clip(path: Path, fourcc: str = "MJPG", frames: int = 40, fps: float = 10.0, size=(320, 240)) -> bytes:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, size)
    base = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    for i in range(frames):
        writer.write(np.roll(base, 4 * i, axis=1))
    writer.release()
    return path.read_bytes()


@pytest.fixture(scope="module")
def clips(media_dir: Path) -> dict[str, bytes]:
    return {
        "clip.avi": write_clip(media_dir / "clip.avi"),
        "clip.mp4": write_clip(media_dir / "clip.mp4", "mp4v"),
        "clip.webm": write_clip(media_dir / "clip.webm", "VP80"),
        "long.avi": write_clip(media_dir / "long.avi", frames=120),
    }


def video_part(url: str) -> dict[str, Any]:
    return {"type": "video_url", "video_url": {"url": url}}


def data_url(data: bytes, mime: str = "video/x-msvideo") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def chat(server: ServerProcess, *parts: dict[str, Any], **extra: Any) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "What happens?"}]}]}
    return httpx.post(server.url + "/v1/chat/completions", json={**body, "max_tokens": 2, **extra}, timeout=120)


def prompt_tokens(server: ServerProcess, *parts: dict[str, Any], **extra: Any) -> int:
    r = chat(server, *parts, **extra)
    assert r.status_code == 200, r.text[:400]
    return int(r.json()["usage"]["prompt_tokens"])


def test_a_clip_gives_the_same_prompt_from_every_source(
    server: ServerProcess, clips: dict[str, bytes], image_host: str, media_dir: Path
) -> None:
    counts = {
        "data": prompt_tokens(server, video_part(data_url(clips["clip.avi"]))),
        "http": prompt_tokens(server, video_part(f"{image_host}/clip.avi")),
        "file": prompt_tokens(server, video_part(f"file://{media_dir / 'clip.avi'}")),
    }
    assert len(set(counts.values())) == 1, counts
    text_only = prompt_tokens(server)
    assert counts["data"] > text_only + 8  # the video's tokens


@pytest.mark.parametrize("name", ["clip.mp4", "clip.webm"])
def test_other_containers_decode(server: ServerProcess, clips: dict[str, bytes], name: str) -> None:
    assert prompt_tokens(server, video_part(data_url(clips[name], "video/mp4"))) > prompt_tokens(server)


def test_a_lower_rate_and_fewer_frames_give_fewer_tokens(server: ServerProcess, clips: dict[str, bytes]) -> None:
    part = video_part(data_url(clips["long.avi"]))
    at_2 = prompt_tokens(server, part, mm_processor_kwargs={"fps": 2})
    at_1 = prompt_tokens(server, part, mm_processor_kwargs={"fps": 1})
    capped = prompt_tokens(server, part, mm_processor_kwargs={"fps": 2, "max_frames": 4})
    assert at_2 > at_1 > capped
    smaller = prompt_tokens(server, part, mm_processor_kwargs={"fps": 2, "max_frames": 4, "max_pixels": 112 * 112})
    assert capped > smaller  # a smaller pixel budget: smaller frames, fewer tokens


def frame_list_url(n: int, size=(320, 240)) -> str:
    """vLLM's frame-list video: the client's sampled frames as JPEGs in one data URL."""
    base = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    jpegs = [cv2.imencode(".jpg", np.roll(base, 4 * i, axis=1))[1].tobytes() for i in range(n)]
    return "data:video/jpeg;base64," + ",".join(base64.b64encode(j).decode() for j in jpegs)


def test_a_frame_list_costs_what_the_same_frames_sampled_from_a_clip_cost(
    server: ServerProcess, clips: dict[str, bytes]
) -> None:
    clip = prompt_tokens(server, video_part(data_url(clips["clip.avi"])), mm_processor_kwargs={"fps": 2})
    frames = prompt_tokens(server, video_part(frame_list_url(8)), mm_processor_kwargs={"fps": 2})
    assert frames == clip  # 4 s at 2 fps: 8 frames of 320x240 either way, the same grid
    assert prompt_tokens(server, video_part(frame_list_url(4))) < frames


def test_a_video_and_an_image_in_one_request_answer(server: ServerProcess, clips: dict[str, bytes]) -> None:
    image = {"type": "image_url", "image_url": {"url": image_data_url()}}
    both = prompt_tokens(server, image, video_part(data_url(clips["clip.avi"])))
    assert both > prompt_tokens(server, video_part(data_url(clips["clip.avi"])))


@pytest.mark.parametrize(
    ("make", "extra", "status", "code"),
    [
        (lambda c: data_url(b"RIFF\0\0\0\0AVI garbage" * 50), {}, 400, "video_corrupt"),
        (lambda c: data_url(c["clip.avi"][: len(c["clip.avi"]) // 3]), {}, 400, "video_corrupt"),
        (lambda c: data_url(b"not a video at all"), {}, 400, "video_unsupported_format"),
        (lambda c: data_url(c["clip.avi"], "image/png"), {}, 400, "video_bad_data_url"),
        (lambda c: data_url(c["clip.avi"]), {"mm_processor_kwargs": {"max_frames": 10**6}}, 400, None),
        (lambda c: data_url(c["clip.avi"]), {"mm_processor_kwargs": {"fps": 0}}, 400, None),
        (lambda c: "file:///etc/passwd", {}, 400, "video_forbidden_path"),
        (lambda c: frame_list_url(2) + "," + frame_list_url(1, (160, 120))[23:], {}, 400, "video_mixed_frame_sizes"),
        (lambda c: frame_list_url(9), {"mm_processor_kwargs": {"max_frames": 8}}, 413, "video_too_long"),
    ],
)
def test_bad_videos_are_refused_naming_the_part(
    server: ServerProcess, clips: dict[str, bytes], make: Any, extra: dict, status: int, code: str | None
) -> None:
    r = chat(server, video_part(make(clips)), **extra)
    assert r.status_code == status, r.text[:400]
    error = r.json()["error"]
    if code is not None:
        assert error["code"] == code and error["param"] == "messages[0].content[0].video_url", error
    else:
        assert error["param"].startswith("mm_processor_kwargs."), error
    assert httpx.get(server.url + "/health").status_code == 200
