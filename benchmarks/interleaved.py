"""One request at a time to two running servers in turn, for a paired comparison at concurrency 1.

On a shared machine the same server's c1 latency drifts by 20-30% between runs minutes apart, more
than the differences between servers at c1 (benchmarks/README.md, 2026-12-07). Here each request
goes to both servers back to back, the first of the pair alternating, with a pause after each so
that neither engine is still busy-waiting from its last request (vLLM's engine processes spin for
about a second after a message) while the other serves. What the pair has in common (the machine's
state at that moment) cancels in the per-pair ratio.

    .venv/bin/python -m benchmarks.interleaved --url-a http://127.0.0.1:18002 --name-a vllm \
        --url-b http://127.0.0.1:18001 --name-b qwen --model tiny --requests 60 --max-tokens 16 --stream

Prints, per server, the p50 and mean of TTFT and end-to-end latency, and over the pairs the median
ratio b/a and how many pairs b answered faster. `--no-image` sends text only (the HTTP and engine
path without the image work); `--max-tokens 1` leaves out the decode steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx

from benchmarks.loadgen import chat_body, make_images


def body(model: str, image: str | None, max_tokens: int, stream: bool) -> bytes:
    media = [{"type": "image_url", "image_url": {"url": image}}] if image else []
    return json.dumps(chat_body(model, media, max_tokens, stream)).encode()


def one(client: httpx.Client, data: bytes, stream: bool) -> tuple[float, float]:
    """(TTFT, end-to-end) in seconds; TTFT is the first content chunk of a stream, the whole answer otherwise."""
    headers = {"content-type": "application/json"}
    start = time.perf_counter()
    if not stream:
        response = client.post("/v1/chat/completions", content=data, headers=headers)
        response.raise_for_status()
        response.json()
        end = time.perf_counter() - start
        return end, end
    ttft = None
    with client.stream("POST", "/v1/chat/completions", content=data, headers=headers) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if ttft is None and line.startswith("data: {"):
                try:
                    chunk = json.loads(line[6:])
                except ValueError:  # a frame a line reader cut at U+2028 (vLLM writes it raw)
                    continue
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - start
    end = time.perf_counter() - start
    return (ttft if ttft is not None else end), end


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url-a", required=True)
    p.add_argument("--url-b", required=True)
    p.add_argument("--name-a", default="a")
    p.add_argument("--name-b", default="b")
    p.add_argument("--model", default="tiny")
    p.add_argument("--requests", type=int, default=60, help="pairs")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--no-image", action="store_true")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--pause", type=float, default=1.2, help="seconds after each request")
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()

    # Distinct images per request and per server, the last two for the uncounted first requests: no
    # cache answers either.
    count = 2 * args.requests + 2
    images = [None] * count if args.no_image else make_images(count, args.image_size, args.seed)
    names = (args.name_a, args.name_b)
    results: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    with httpx.Client(base_url=args.url_a, timeout=60) as a, httpx.Client(base_url=args.url_b, timeout=60) as b:
        clients = {args.name_a: a, args.name_b: b}
        for k, name in enumerate(names):  # one uncounted request each: the first one pays for connecting
            one(clients[name], body(args.model, images[-1 - k], args.max_tokens, args.stream), args.stream)
            time.sleep(args.pause)
        for i in range(args.requests):
            order = names if i % 2 == 0 else names[::-1]
            for k, name in enumerate(order):
                data = body(args.model, images[2 * i + k], args.max_tokens, args.stream)
                results[name].append(one(clients[name], data, args.stream))
                time.sleep(args.pause)

    scenario = f"{'text' if args.no_image else f'{args.image_size} px'}, {args.max_tokens} tokens, {'stream' if args.stream else 'no stream'}"
    print(f"# {scenario}, {args.requests} pairs")
    for name in names:
        ttft = [r[0] * 1e3 for r in results[name]]
        e2e = [r[1] * 1e3 for r in results[name]]
        print(
            f"{name:6} TTFT p50 {statistics.median(ttft):7.1f} mean {statistics.fmean(ttft):7.1f} ms   "
            f"e2e p50 {statistics.median(e2e):7.1f} mean {statistics.fmean(e2e):7.1f} ms"
        )
    pairs = list(zip(results[args.name_a], results[args.name_b], strict=True))
    for label, k in (("TTFT", 0), ("e2e", 1)):
        ratios = [rb[k] / ra[k] for ra, rb in pairs]
        faster = sum(rb[k] < ra[k] for ra, rb in pairs)
        print(
            f"{label:4} {args.name_b}/{args.name_a}: median ratio {statistics.median(ratios):.3f}, {args.name_b} faster in {faster} of {len(pairs)} pairs"
        )


if __name__ == "__main__":
    main()
