"""Video preprocessing per clip: qwen_server's decoder against vLLM's own loader, each followed by the
model's video processor (what the engine then receives), at the same output grid.

- "vllm": vLLM's video loader for the model's processor (`VIDEO_LOADER_REGISTRY`, OpenCV, frames
  decoded at their source size), then the HF video processor, which resizes them.
- "ours": `qwen_server.media.video.decode_video` (header checks, the same sampler, each kept frame
  resized as it is decoded), then the same processor, whose resize is then a no-op.

Clips are written here (MJPG in AVI by OpenCV, H.264 in MP4 by PyAV's libx264), seeded moving
content, 10 s at 30 fps by default, sampled at the model's 2 fps. The two paths are timed
alternately so machine noise hits both; each row reports the median ms per clip, the speedup, the
peak traced memory (tracemalloc: numpy buffers included) and the mean absolute difference of the
processor outputs (in the processor's units: 0-255 for the tiny checkpoint, which neither rescales
nor normalises), and checks that the grids are equal.

    .venv/bin/python -m benchmarks.video_decode [--repeats 5] [--sizes 720p,1080p] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import platform
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np

SIZES = {"480p": (854, 480), "720p": (1280, 720), "1080p": (1920, 1080)}


def write_clip(
    path: Path, size: tuple[int, int], seconds: float, fps: float, seed: int = 0, codec: str = "mjpg"
) -> bytes:
    """MJPG in AVI written by OpenCV, or H.264 in MP4 by PyAV's libx264 (OpenCV here has no H.264 encoder)."""
    import cv2

    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 97 + y / 61)], axis=-1)
    base = (base + rng.normal(0, 10, base.shape)).clip(0, 255).astype(np.uint8)
    frames = []
    for i in range(int(seconds * fps)):
        frame = np.roll(base, 6 * i, axis=1)
        cv2.circle(frame, (int(width * (i % 60) / 60), height // 2), height // 8, (255, 255, 255), -1)
        frames.append(frame)
    if codec == "h264":
        import av

        with av.open(str(path), "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=int(fps))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="bgr24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return path.read_bytes()
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, size)
    for frame in frames:
        writer.write(frame)
    writer.release()
    return path.read_bytes()


# qwen-vl-utils' video budget per frame (VIDEO_MIN_PIXELS 128 x 28 x 28, VIDEO_MAX_PIXELS 768 x 28 x 28):
# the released models' processors, where the tiny checkpoint's is only 224 x 224.
QWEN_VIDEO_BUDGET = {"size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 768 * 28 * 28}}


def model_parts(model: str, mm_processor_kwargs: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The model's video processor as vLLM builds it, our budget for it, and vLLM's loader for it."""
    from vllm.config import ModelConfig
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    from qwen_server.engine import vllm_compat
    from qwen_server.engine.lifecycle import video_geometry_of

    config = ModelConfig(model=model, mm_processor_kwargs=mm_processor_kwargs or None)
    processor = vllm_compat.cached_video_processor(config)
    geometry = video_geometry_of(config)
    if geometry is None:
        raise SystemExit(f"{model}: no video processor this server samples for")
    name = VIDEO_LOADER_REGISTRY.get_backend_for_video_processor(type(processor).__name__) or "opencv"
    return processor, geometry, VIDEO_LOADER_REGISTRY.load(name)


def process(processor: Any, frames: Any, metadata: dict[str, Any]) -> Any:
    """The processor called as vLLM's Qwen-VL processing calls it: sampled frames, their metadata."""
    hf_metadata = {k: v for k, v in metadata.items() if k != "do_sample_frames"}
    return processor(videos=[frames], video_metadata=[hf_metadata], do_sample_frames=False, return_tensors="np")


def run_vllm(data: bytes, processor: Any, loader: Any, fps: float) -> Any:
    frames, metadata = loader.load_bytes(data, fps=fps)
    return process(processor, frames, metadata)


def run_ours(data: bytes, processor: Any, geometry: Any, limits: Any, fps: float) -> Any:
    from qwen_server.media.video import decode_video

    video = decode_video(data, "video", limits, geometry, fps=fps, max_frames=geometry.max_frames)
    return process(processor, video.frames, video.metadata)


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def peak_bytes(fn: Any) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint (default: the tiny demo Qwen2.5-VL)")
    parser.add_argument("--sizes", default="720p,1080p")
    parser.add_argument("--codecs", default="mjpg,h264", help="mjpg (AVI, OpenCV's writer), h264 (MP4, PyAV's libx264)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--source-fps", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    parser.add_argument(
        "--mm-processor-kwargs",
        default=json.dumps(QWEN_VIDEO_BUDGET),
        help="the processor's options, as the server's flag (default: the released Qwen2.5-VL video budget)",
    )
    args = parser.parse_args()

    from qwen_server.demo.model import demo_model_path
    from qwen_server.media.video import VideoLimits
    from qwen_server.settings import Settings

    model = args.model or str(demo_model_path())
    processor, geometry, loader = model_parts(model, json.loads(args.mm_processor_kwargs))
    s = Settings()
    limits = VideoLimits(
        s.max_video_seconds, s.max_video_frame_pixels, s.max_video_source_frames, s.max_video_frames, s.max_video_pixels
    )
    fps = geometry.fps
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size_name, codec in itertools.product(args.sizes.split(","), args.codecs.split(",")):
            path = Path(tmp) / f"{size_name}.{'mp4' if codec == 'h264' else 'avi'}"
            data = write_clip(path, SIZES[size_name], args.seconds, args.source_fps, codec=codec)
            ours_fn = functools.partial(run_ours, data, processor, geometry, limits, fps)
            vllm_fn = functools.partial(run_vllm, data, processor, loader, fps)
            a, b = ours_fn(), vllm_fn()  # warm-up, and the outputs compared
            grid_ours, grid_vllm = a["video_grid_thw"].tolist(), b["video_grid_thw"].tolist()
            diff = (
                float(np.abs(a["pixel_values_videos"].astype(np.float64) - b["pixel_values_videos"]).mean())
                if grid_ours == grid_vllm
                else None
            )
            times: dict[str, list[float]] = {"ours": [], "vllm": []}
            for i in range(args.repeats):
                order = [("ours", ours_fn), ("vllm", vllm_fn)] if i % 2 == 0 else [("vllm", vllm_fn), ("ours", ours_fn)]
                for name, fn in order:
                    times[name].append(timed(fn)[0])
            row = {
                "clip": f"{size_name} {args.seconds:g} s @ {args.source_fps:g} fps, "
                f"{'H.264 MP4' if codec == 'h264' else 'MJPG AVI'}, {len(data) / 1e6:.1f} MB",
                "sampled_at_fps": fps,
                "grid_thw": grid_ours,
                "same_grid": grid_ours == grid_vllm,
                "mean_abs_diff": diff,
                "ours_ms": 1000 * statistics.median(times["ours"]),
                "vllm_ms": 1000 * statistics.median(times["vllm"]),
                "ours_peak_mb": peak_bytes(ours_fn) / 2**20,
                "vllm_peak_mb": peak_bytes(vllm_fn) / 2**20,
            }
            row["speedup"] = row["vllm_ms"] / row["ours_ms"]
            rows.append(row)
            print(
                f"{row['clip']}: grid {grid_ours} (same: {row['same_grid']}, mean |diff| {diff}); "
                f"ours {row['ours_ms']:.0f} ms, vLLM {row['vllm_ms']:.0f} ms, {row['speedup']:.2f}x; "
                f"peak {row['ours_peak_mb']:.0f} vs {row['vllm_peak_mb']:.0f} MiB",
                flush=True,
            )
    if args.json:
        meta = {
            "model": model,
            "mm_processor_kwargs": json.loads(args.mm_processor_kwargs),
            "python": platform.python_version(),
            "repeats": args.repeats,
        }
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
