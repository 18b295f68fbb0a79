"""Image decode + resize throughput: `qwen_server.media.decode_image` against plain Pillow.

"plain" is what a naive server does before the HF processor: open, convert("RGB") and a BICUBIC
resize to the model's size. "ours" is `decode_image` (JPEG draft mode, reducing_gap=3.0) with the
same geometry, so both produce the same size. Inputs are generated here (seeded, realistic content:
gradient, shapes and noise). The two methods are timed alternately so machine noise hits both.

Run from the project root:

    .venv/bin/python -m benchmarks.media_decode [--repeats 20] [--budgets qwen,224] [--json out.json]

Reports median ms per image, images/s, speedup (plain/ours) and the mean absolute difference
(0-255) between the two outputs.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from io import BytesIO

import numpy as np
import PIL
from PIL import Image, ImageDraw

from qwen_server.media.image import Geometry, decode_image

BUDGETS = {"qwen": 1280 * 28 * 28, "224": 224 * 224}  # Qwen2.5-VL's default max_pixels; a 224x224 budget
INPUTS = {  # name: (width, height, format, save options)
    "4K JPEG": (3840, 2160, "JPEG", {"quality": 90}),
    "1080p PNG": (1920, 1080, "PNG", {}),
    "1024px JPEG": (1024, 1024, "JPEG", {"quality": 90}),
    "224px JPEG": (224, 224, "JPEG", {"quality": 90}),
}


def make_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth colour gradient with seeded shapes and noise: compresses like a photo, not a flat fill."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([255 * x / width, 255 * y / height, 128 + 100 * np.sin(x / 97 + y / 61)], axis=-1)
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(8, width // 4 + 9)), y0 + int(rng.integers(8, height // 4 + 9))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    noise = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray((np.asarray(image, dtype=np.float32) + noise).clip(0, 255).astype(np.uint8))


def plain(data: bytes, geometry: Geometry) -> Image.Image:
    im = Image.open(BytesIO(data)).convert("RGB")
    return im.resize(geometry.target(*im.size), Image.Resampling.BICUBIC)


def ours(data: bytes, geometry: Geometry) -> Image.Image:
    return decode_image(data, "bench", max_pixels=64_000_000, max_side=16384, geometry=geometry)


def bench(data: bytes, geometry: Geometry, repeats: int) -> dict:
    methods = {"plain": plain, "ours": ours}
    outputs = {name: fn(data, geometry) for name, fn in methods.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in methods}
    for i in range(repeats):
        for name in list(methods)[:: 1 if i % 2 == 0 else -1]:  # alternate the order too
            start = time.perf_counter()
            methods[name](data, geometry)
            times[name].append(time.perf_counter() - start)
    a, b = (np.asarray(outputs[k], dtype=np.int16) for k in methods)
    assert a.shape == b.shape, (a.shape, b.shape)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    return {
        "out_size": "x".join(map(str, outputs["ours"].size)),
        "repeats": repeats,
        **{f"{name}_ms": round(v, 3) for name, v in ms.items()},
        **{f"{name}_per_s": round(1000 / v, 1) for name, v in ms.items()},
        "speedup": round(ms["plain"] / ms["ours"], 2),
        "mad": round(float(np.abs(a - b).mean()), 3),
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per method for >= 1 MP inputs (x10 below)")
    parser.add_argument("--budgets", default="qwen,224", help=f"comma-separated, of {sorted(BUDGETS)}")
    parser.add_argument("--inputs", default=",".join(INPUTS), help="comma-separated input names")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args()

    machine = f"Pillow {PIL.__version__}, Python {platform.python_version()}, {cpu_model()}"
    print(f"Machine: {machine}\n")
    rows = []
    for name in args.inputs.split(","):
        width, height, fmt, options = INPUTS[name]
        buffer = BytesIO()
        make_image(width, height).save(buffer, fmt, **options)
        data = buffer.getvalue()
        repeats = args.repeats if width * height >= 1_000_000 else 10 * args.repeats
        for budget in args.budgets.split(","):
            geometry = Geometry(factor=28, min_pixels=3136, max_pixels=BUDGETS[budget])
            rows.append({"input": name, "bytes": len(data), "budget": budget, **bench(data, geometry, repeats)})

    print("| input | KiB | budget | output | plain ms | ours ms | plain img/s | ours img/s | speedup | MAD |")
    print("|---|--:|---|---|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(
            f"| {r['input']} | {r['bytes'] // 1024} | {r['budget']} | {r['out_size']} | {r['plain_ms']:.2f} | "
            f"{r['ours_ms']:.2f} | {r['plain_per_s']:.1f} | {r['ours_per_s']:.1f} | {r['speedup']:.2f}x | {r['mad']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
