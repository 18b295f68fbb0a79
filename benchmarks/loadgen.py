"""Load generator for OpenAI chat completions with images, against any OpenAI-compatible server.

Closed loop (`--concurrency N`: N clients, each sends its next request when the last one ends) or
open loop (`--rate R`: Poisson arrivals at R requests/s, however slow the server is), streaming or
not. Reports requests/s, output tokens/s, TTFT, inter-token latency and end-to-end latency at
p50/p90/p99, errors, and (with `--server-pid`) the CPU seconds and peak RSS of the server's whole
process tree. Prints progress while it runs; writes the result as JSON (`--json`).

    .venv/bin/python -m benchmarks.loadgen --url http://127.0.0.1:8000 --model tiny \\
        --concurrency 16 --requests 200 --image-size 224 --images 1 --max-tokens 16 --stream

Images are distinct per request (seeded noise JPEGs, encoded before the run), so no server can
answer from a cache what a real workload would make it decode.

`--client` picks who sends: `aiohttp` (one session, the default), `httpx` (one AsyncClient with as many
connections as the concurrency, reading the stream with `aiter_lines()`), or `openai` (the `openai`
SDK's AsyncOpenAI, which users run). TTFT is the first chunk carrying content, for every client.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import httpx
import msgspec
from PIL import Image

from benchmarks.proctree import TreeSampler


@dataclass
class Sample:
    ok: bool
    start: float
    end: float
    ttft: float | None = None
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str | None = None


def make_images(count: int, size: int, seed: int = 0) -> list[str]:
    """`count` distinct JPEG data URLs of `size` x `size` (noise over a gradient, quality 90)."""
    rng = random.Random(seed)
    base = Image.linear_gradient("L").resize((size, size))
    urls = []
    for _ in range(count):
        noise = Image.effect_noise((size, size), 30 + rng.random() * 40)
        shift = Image.new("L", (size, size), rng.randrange(256))
        image = Image.merge("RGB", (base, noise, shift))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90)
        urls.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def make_videos(count: int, size: str, seconds: float, codec: str, seed: int = 0) -> list[str]:
    """`count` distinct clips (seeded moving content, 30 fps) as data URLs: H.264 MP4 or MJPG AVI."""
    import tempfile
    from pathlib import Path

    from benchmarks.video_decode import write_clip

    width, height = (int(x) for x in size.split("x"))
    mime = "video/mp4" if codec == "h264" else "video/x-msvideo"
    urls = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(count):
            path = Path(tmp) / f"{i}.{'mp4' if codec == 'h264' else 'avi'}"
            data = write_clip(path, (width, height), seconds, 30.0, seed=seed * 100_003 + i, codec=codec)
            urls.append(f"data:{mime};base64," + base64.b64encode(data).decode())
    return urls


def build_bodies(args: argparse.Namespace) -> list[bytes]:
    images = make_images(args.requests * args.images, args.image_size, args.seed)
    videos = (
        make_videos(args.requests, args.video_size, args.video_seconds, args.video_codec, args.seed)
        if args.video_seconds > 0
        else []
    )
    bodies = []
    for i in range(args.requests):
        content = [{"type": "image_url", "image_url": {"url": images[i * args.images + j]}} for j in range(args.images)]
        if videos:
            content.append({"type": "video_url", "video_url": {"url": videos[i]}})
        body = chat_body(args.model, content, args.max_tokens, args.stream)
        if args.stream:
            body["stream_options"] = {"include_usage": True}
        bodies.append(json.dumps(body).encode())
    return bodies


def chat_body(model: str, media: list[dict], max_tokens: int, stream: bool) -> dict:
    """The benchmarks' chat request: `media` parts, then the same short text; greedy, `max_tokens` exactly."""
    content = [*media, {"type": "text", "text": "Describe the picture in detail."}]
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


Send = Callable[[bytes], Awaitable[Sample]]


class _Stream:
    """One streamed answer's chunks into a Sample: TTFT at the first content, then inter-token gaps."""

    def __init__(self, start: float) -> None:
        self.sample = Sample(True, start, 0.0)
        self.last: float | None = None

    def chunk(self, chunk: dict) -> None:
        if "error" in chunk:
            self.sample.ok, self.sample.error = False, str(chunk["error"])[:200]
            return
        if chunk.get("usage"):
            self.sample.output_tokens = chunk["usage"]["completion_tokens"]
        if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
            now = time.perf_counter()
            if self.last is None:
                self.sample.ttft = now - self.sample.start
            else:
                self.sample.itl.append(now - self.last)
            self.last = now

    def done(self) -> Sample:
        self.sample.end = time.perf_counter()
        return self.sample


def _answered(start: float, data: dict) -> Sample:
    end = time.perf_counter()
    return Sample(True, start, end, ttft=end - start, output_tokens=data["usage"]["completion_tokens"])


def _failed(start: float, exc: BaseException) -> Sample:
    return Sample(False, start, time.perf_counter(), error=f"{type(exc).__name__}: {exc}"[:300])


@asynccontextmanager
async def aiohttp_client(url: str, args: argparse.Namespace) -> AsyncIterator[Send]:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def send(body: bytes) -> Sample:
            start = time.perf_counter()
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                    if r.status != 200:
                        return Sample(
                            False, start, time.perf_counter(), error=f"HTTP {r.status}: {(await r.text())[:200]}"
                        )
                    if not args.stream:
                        return _answered(start, msgspec.json.decode(await r.read()))
                    stream = _Stream(start)
                    async for raw in r.content:
                        line = raw.strip()
                        if line.startswith(b"data: ") and line != b"data: [DONE]":
                            stream.chunk(msgspec.json.decode(line[6:]))  # the client's CPU is the server's loss
                    return stream.done()
            except (TimeoutError, aiohttp.ClientError, msgspec.DecodeError) as exc:
                return _failed(start, exc)

        yield send


@asynccontextmanager
async def httpx_client(url: str, args: argparse.Namespace) -> AsyncIterator[Send]:
    """A plain httpx client, as many users write one."""
    limits = httpx.Limits(max_connections=args.concurrency or 100, max_keepalive_connections=args.concurrency or 100)
    async with httpx.AsyncClient(limits=limits, timeout=args.timeout) as client:

        async def send(body: bytes) -> Sample:
            start = time.perf_counter()
            headers = {"Content-Type": "application/json"}
            try:
                if not args.stream:
                    r = await client.post(url, content=body, headers=headers)
                    if r.status_code != 200:
                        return Sample(False, start, time.perf_counter(), error=f"HTTP {r.status_code}: {r.text[:200]}")
                    return _answered(start, r.json())
                async with client.stream("POST", url, content=body, headers=headers) as r:
                    if r.status_code != 200:
                        text = (await r.aread()).decode(errors="replace")
                        return Sample(False, start, time.perf_counter(), error=f"HTTP {r.status_code}: {text[:200]}")
                    stream = _Stream(start)
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            stream.chunk(json.loads(line[6:]))
                    return stream.done()
            except (httpx.HTTPError, ValueError) as exc:
                return _failed(start, exc)

        yield send


@asynccontextmanager
async def openai_client(url: str, args: argparse.Namespace) -> AsyncIterator[Send]:
    """The openai SDK (its own httpx pool), bodies passed as the SDK's arguments, vLLM's fields in extra_body."""
    import openai

    base = url.removesuffix("/chat/completions")
    async with openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=args.timeout) as client:
        standard = {"model", "messages", "max_tokens", "temperature", "stream", "stream_options"}

        async def send(body: bytes) -> Sample:
            fields = json.loads(body)
            kwargs = {k: v for k, v in fields.items() if k in standard}
            extra = {k: v for k, v in fields.items() if k not in standard}
            start = time.perf_counter()
            try:
                if not args.stream:
                    answer = await client.chat.completions.create(**kwargs, extra_body=extra)
                    return _answered(start, answer.model_dump())
                stream = _Stream(start)
                async for chunk in await client.chat.completions.create(**kwargs, extra_body=extra):
                    stream.chunk(chunk.model_dump(exclude_none=True))
                return stream.done()
            except openai.OpenAIError as exc:
                return _failed(start, exc)

        yield send


CLIENTS = {"aiohttp": aiohttp_client, "httpx": httpx_client, "openai": openai_client}


async def run(
    args: argparse.Namespace, bodies: list[bytes], warm: Sequence[bytes] = ()
) -> tuple[list[Sample], float, float | None]:
    """The samples, the elapsed time, and (open loop) how long the sends took: on a busy machine the
    client's own loop falls behind the Poisson schedule, so the rate it really offered is lower."""
    url = args.url.rstrip("/") + "/v1/chat/completions"
    samples: list[Sample] = []
    done = 0

    async def progress() -> None:
        while True:
            await asyncio.sleep(1.0)
            errors = sum(not s.ok for s in samples)
            print(f"\r  {done}/{len(bodies)} done, {errors} errors", end="", file=sys.stderr, flush=True)

    async with CLIENTS[args.client](url, args) as send:
        # Warm-up, not counted: connections opened, first-use paths of this shape taken, in both servers.
        await asyncio.gather(*(send(body) for body in warm))
        ticker = asyncio.ensure_future(progress())
        t0 = time.perf_counter()
        sent_s = None
        if args.rate:
            rng = random.Random(args.seed)
            tasks = []
            for body in bodies:
                tasks.append(asyncio.ensure_future(send(body)))
                await asyncio.sleep(rng.expovariate(args.rate))
            sent_s = time.perf_counter() - t0
            for task in asyncio.as_completed(tasks):
                samples.append(await task)
                done += 1
        else:
            queue = list(reversed(bodies))

            async def worker() -> None:
                nonlocal done
                while queue:
                    samples.append(await send(queue.pop()))
                    done += 1

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        elapsed = time.perf_counter() - t0
        ticker.cancel()
    print(file=sys.stderr)
    return samples, elapsed, sent_s


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else [values[0]] * 99
    return {"p50": qs[49], "p90": qs[89], "p99": qs[98]}


def summarize(samples: list[Sample], elapsed: float, sent_s: float | None = None) -> dict:
    ok = [s for s in samples if s.ok]
    tokens = sum(s.output_tokens for s in ok)
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "first_error": next((s.error for s in samples if not s.ok), None),
        "elapsed_s": elapsed,
        "requests_per_s": len(ok) / elapsed if elapsed else 0.0,
        # open loop: the arrival rate the client achieved (below --rate when its own loop lagged)
        "offered_requests_per_s": len(samples) / sent_s if sent_s else None,
        "output_tokens_per_s": tokens / elapsed if elapsed else 0.0,
        "ttft_s": percentiles([s.ttft for s in ok if s.ttft is not None]),
        "itl_s": percentiles([x for s in ok for x in s.itl]),
        "e2e_s": percentiles([s.end - s.start for s in ok]),
    }


def measure(args: argparse.Namespace) -> dict:
    """Build the bodies, run the load (sampling the server's tree if asked), and summarize."""
    warmup = args.warmup if args.warmup >= 0 else min(args.concurrency if not args.rate else 4, 8)
    bodies = build_bodies(argparse.Namespace(**{**vars(args), "requests": args.requests + warmup}))
    warm, bodies = bodies[:warmup], bodies[warmup:]  # distinct images: the warm-up primes no cache
    sampler = TreeSampler(args.server_pid) if args.server_pid else None
    if sampler:
        sampler.start()
    cpu0 = time.process_time()
    samples, elapsed, sent_s = asyncio.run(run(args, bodies, warm))
    result = summarize(samples, elapsed, sent_s)
    # The client shares the machine with the server: its CPU is CPU the server did not get.
    result["client_cpu_s"] = round(time.process_time() - cpu0, 2)
    if sampler:
        result.update(sampler.stop())
    result["scenario"] = {k: v for k, v in vars(args).items() if k not in ("json", "server_pid", "url")}
    return result


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="qwen-server-demo")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, default=16, help="closed loop: clients in parallel")
    mode.add_argument("--rate", type=float, default=None, help="open loop: requests per second (Poisson)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--images", type=int, default=1, help="images per request")
    ap.add_argument(
        "--video-seconds", type=float, default=0.0, help="one distinct clip this long per request (0: none)"
    )
    ap.add_argument("--video-size", default="640x360", help="the clips' WIDTHxHEIGHT")
    ap.add_argument("--video-codec", choices=["h264", "mjpg"], default="h264")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--client", choices=sorted(CLIENTS), default="aiohttp", help="who sends (see above)")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--warmup",
        type=int,
        default=-1,
        help="requests sent (at once, not counted) before the run; default min(concurrency, 8), 4 in open loop",
    )
    ap.add_argument("--server-pid", type=int, default=None, help="sample CPU and RSS of this process tree")
    ap.add_argument("--json", default=None, help="write the result here")
    return ap


def main() -> None:
    args = parser().parse_args()
    result = measure(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
