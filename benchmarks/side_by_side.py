"""qwen_server against vLLM's own OpenAI server, same checkpoint, same engine settings, one run.

Starts vLLM's server, measures its time to ready (launch to the first answered image chat), drives
every scenario with `loadgen.py`, stops it; then the same for qwen_server (the launcher). That is one
pass; the next pass runs qwen_server first (`--passes`, default 2: the order alternates so neither
server always runs second). Each scenario's runs from every pass are pooled and the median-throughput
run stands for it. Then the offline engine (`LLM.generate` on pre-decoded images, at most as many
sequences per step as the row's concurrency) runs as the ceiling: "ratio bound" = ceiling / vLLM is the
highest qwen/vLLM ratio any server could reach in that row. Prints one table with each metric and the
ratio qwen/vLLM, and writes JSON and Markdown to `benchmarks/results/`; each run also records the load
average before it and the CPU share the hypervisor stole during it.

    .venv/bin/python -m benchmarks.side_by_side            # the full matrix, 2 passes (about 50 min here)
    .venv/bin/python -m benchmarks.side_by_side --quick    # 224/1024 px, c16, 16 tokens, streaming
    .venv/bin/python -m benchmarks.side_by_side --targets --repeat 3 --no-sweep  # target rows, median of 2x3
    (plus an open-loop rate sweep and `latency_vs_load.png`; --no-sweep skips it; needs the `bench` extra)

Loopback ports only. The machine's other load hits both servers alike only if nothing else runs:
keep it quiet while this runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks import loadgen
from qwen_server import procs
from qwen_server.testing.servers import free_port

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

MODEL_NAME = "tiny"
ENGINE: dict[str, Any] = {"max_model_len": 4096, "max_num_seqs": 64, "limit_mm_per_prompt": '{"image": 4}'}


def engine_flags() -> list[str]:
    return [
        "--max-model-len",
        str(ENGINE["max_model_len"]),
        "--max-num-seqs",
        str(ENGINE["max_num_seqs"]),
        "--limit-mm-per-prompt",
        ENGINE["limit_mm_per_prompt"],
        "--enforce-eager",
        "--served-model-name",
        MODEL_NAME,
    ]


def scenarios(kind: str, clients: list[str]) -> list[dict]:
    """The cases of `kind`, each sent by every client of `clients`. "full": the whole matrix; "quick":
    c16 streaming; "targets": the rows the issue sets targets on (1 image, c16 and c64, 16 tokens),
    with twice the requests, meant for --repeat; "clients": 1 image, 16 tokens, streaming and not,
    224 px at c1/c16/c64 and 1024 px at c16. vllm-bench streams only. Each row has its own seed:
    images are distinct across rows too, so no row is served from a cache an earlier row filled."""
    grid: list[tuple[int, int, int, int, bool]]
    if kind == "quick":
        grid = list(itertools.product([224, 1024], [1], [16], [16], [True]))
    elif kind == "targets":
        grid = list(itertools.product([224, 1024], [1], [16, 64], [16], [True, False]))
    elif kind == "clients":  # 224 px at c1/c16/c64, 1024 px at c16 (the slow rows once)
        grid = [(224, 1, c, 16, st) for c in (1, 16, 64) for st in (True, False)]
        grid += [(1024, 1, 16, 16, st) for st in (True, False)]
    else:
        grid = list(itertools.product([224, 1024], [1, 4], [1, 16, 64], [16, 128], [True, False]))
    scale = 2 if kind == "targets" else 1
    out: list[dict] = []
    for (size, images, conc, tokens, stream), client in itertools.product(grid, clients):
        if client == "vllm-bench" and not stream:
            continue
        requests = scale * min(320, max(32, 8 * conc)) // (2 if tokens > 16 else 1)
        out.append(
            {
                "image_size": size,
                "images": images,
                "concurrency": conc,
                "max_tokens": tokens,
                "stream": stream,
                "requests": requests,
                "client": client,
                "seed": 1000 + len(out),
            }
        )
    return out


CLIENTS = [*loadgen.CLIENTS, "vllm-bench"]


def vllm_bench(case: dict, server: Server, out: Path) -> dict:
    """vLLM's own load generator (`vllm bench serve`, from Python: the CPU build's `vllm` script does not
    start) on `case`: its random-mm dataset, one random image of the case's size per request, random
    prompt tokens, the openai-chat backend (streaming), closed loop at the case's concurrency. Its
    figures in loadgen's shape; the server's tree sampled as loadgen samples it."""
    from benchmarks.proctree import TreeSampler

    size = case["image_size"]
    name = f"vllm-bench-{server.name}-{case['seed']}-{server.port}"  # the port: one per server start
    argv = [
        sys.executable,
        "-c",
        "import sys; from vllm.benchmarks.serve import add_cli_args, main; "
        "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
        "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))",
        "--backend",
        "openai-chat",
        "--endpoint",
        "/v1/chat/completions",
        "--base-url",
        server.url,
        "--model",
        MODEL_NAME,
        "--tokenizer",
        server.model,
        "--dataset-name",
        "random-mm",
        "--num-prompts",
        str(case["requests"]),
        "--max-concurrency",
        str(case["concurrency"]),
        "--request-rate",
        "inf",
        "--random-input-len",
        "16",
        "--random-output-len",
        str(case["max_tokens"]),
        "--random-range-ratio",
        "0",
        "--random-mm-base-items-per-request",
        str(case["images"]),
        "--random-mm-num-mm-items-range-ratio",
        "0",
        "--random-mm-limit-mm-per-prompt",
        json.dumps({"image": case["images"], "video": 0}),
        "--random-mm-bucket-config",
        repr({(size, size, 1): 1.0}),
        "--ignore-eos",
        "--seed",
        str(case["seed"]),
        "--num-warmups",
        str(min(case["concurrency"], 8)),
        "--percentile-metrics",
        "ttft,itl,e2el",
        "--metric-percentiles",
        "50,90,99",
        "--save-result",
        "--result-dir",
        str(out),
        "--result-filename",
        f"{name}.json",
    ]
    sampler = TreeSampler(server.proc.pid)
    sampler.start()
    with open(out / f"{name}.log", "wb") as log:
        done = subprocess.run(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    tree = sampler.stop()
    if done.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed ({done.returncode}); see {out / f'{name}.log'}")
    got = json.loads((out / f"{name}.json").read_text())
    errors = [e for e in got.get("errors", []) if e]

    def pct(metric: str) -> dict:
        return {f"p{p}": got.get(f"p{p}_{metric}_ms", 0) / 1000 for p in (50, 90, 99)}

    return {
        "requests": case["requests"],
        "errors": case["requests"] - got["completed"],
        "first_error": errors[0][:200] if errors else None,
        "elapsed_s": got["duration"],
        "requests_per_s": got["request_throughput"],
        "output_tokens_per_s": got["output_throughput"],
        "ttft_s": pct("ttft"),
        "itl_s": pct("itl"),
        "e2e_s": pct("e2el"),
        **tree,
        "scenario": case,
    }


def video_cases() -> list[dict]:
    """One distinct 4 s 640x360 H.264 clip per request (sampled at 2 fps: 8 frames), c4, streaming."""
    return [
        {
            "image_size": 224,
            "images": 0,
            "video_seconds": 4.0,
            "video_size": "640x360",
            "video_codec": "h264",
            "concurrency": 4,
            "max_tokens": 16,
            "stream": stream,
            "requests": 48,
            # Clips distinct across the rows too: a repeated clip is a cache hit (ours keeps decoded
            # frames by content, and both servers keep processed items), not a decode.
            "seed": 1 + row,
        }
        for row, stream in enumerate((True, False))
    ]


# vLLM's server samples a video's frames by its media IO options (32 frames by default), the model's
# own rate otherwise: asked for 2 fps, as qwen_server samples by the model's processor (2 fps).
VLLM_VIDEO_FLAGS = ["--media-io-kwargs", '{"video": {"num_frames": -1, "fps": 2}}']
VIDEO_LIMIT = '{"image": 4, "video": 1}'


SWEEP_RATES = (10, 20, 30, 45, 60, 80)


def sweep_cases() -> list[dict]:
    """Open loop (Poisson arrivals) at rising rates: latency against offered load, 224 px, streaming."""
    return [
        {
            "image_size": 224,
            "images": 1,
            "max_tokens": 16,
            "stream": True,
            "rate": rate,
            "requests": int(rate * 8),
            "concurrency": 0,
        }
        for rate in SWEEP_RATES
    ]


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, style in (("vllm", "o--"), ("qwen", "s-")):
        rows = report[name]["sweep"]
        rates = [r.get("offered_requests_per_s") or r["scenario"]["rate"] for r in rows]
        ax.plot(rates, [1000 * r["ttft_s"]["p99"] for r in rows], style, label=f"{name} TTFT p99")
        ax.plot(rates, [1000 * r["ttft_s"]["p50"] for r in rows], style, alpha=0.4, label=f"{name} TTFT p50")
    ax.set_xlabel("offered load (requests/s the client sent, Poisson), 224 px image, 16 tokens, streaming")
    ax.set_ylabel("time to first token (ms)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def image_chat(seed: int) -> dict:
    """A one-token chat with one seeded 224 px JPEG: what "serving" means when a server is probed."""
    return {
        "model": MODEL_NAME,
        "max_tokens": 1,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": loadgen.make_images(1, 224, seed=seed)[0]}},
                    {"type": "text", "text": "hi"},
                ],
            }
        ],
    }


class Server:
    def __init__(self, name: str, args: list[str], port: int, log: Path) -> None:
        self.name, self.port, self.url = name, port, f"http://127.0.0.1:{port}"
        self.model = args[args.index("--model") + 1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("QWEN_SERVER_")}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        self._log = open(log, "wb")  # noqa: SIM115 - held open for the server's life, closed by stop()
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 600) -> float:
        """Seconds from launch to the first answered chat with an image."""
        body = image_chat(seed=99)
        while time.monotonic() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see its log")
            try:
                if httpx.post(self.url + "/v1/chat/completions", json=body, timeout=10).status_code == 200:
                    return time.monotonic() - self.t0
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} not ready after {timeout} s")

    def stop(self) -> None:
        tree = [self.proc.pid, *procs.descendants(self.proc.pid)]
        self.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(90)
        procs.terminate([p for p in tree if procs.alive(p)], grace=2.0)
        self._log.close()


def _cpu_times() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def _box_during(run):
    """Run `run()` and note what else the machine did: the 1-minute load average before it and the
    share of CPU time stolen by the hypervisor during it (this box is shared)."""
    load1 = float(Path("/proc/loadavg").read_text().split()[0])
    before = _cpu_times()
    result = run()
    delta = [b - a for a, b in zip(before, _cpu_times(), strict=True)]
    steal = delta[7] if len(delta) > 7 else 0
    result["box"] = {"load1_before": load1, "steal_pct": round(100 * steal / max(1, sum(delta)), 1)}
    return result


# Uncounted, after every start: the first few hundred requests a fresh server answers cost it more
# CPU than later ones (on both servers; 2026-12-03: 12.2 against 8.9 ms per request for vLLM's front
# end, 14.3 against 8.6 for ours, with 136 minor page faults per request against 1-2), and without
# this the first row of each pass carried that cost. Its own seed: no later row's images.
WARM_UP = {"image_size": 224, "images": 1, "concurrency": 16, "max_tokens": 16, "stream": True, "requests": 320}


def warm_up(server: Server) -> dict:
    """The warm-up load, run and summed up (throughput and front-end CPU, to show it was dearer)."""
    ns = loadgen.parser().parse_args([])
    vars(ns).update({"rate": None, **WARM_UP}, url=server.url, model=MODEL_NAME, server_pid=server.proc.pid, seed=1)
    result = loadgen.measure(ns)
    keys = ("requests_per_s", "errors", "server_cpu_s_by_role")
    return {k: result[k] for k in keys if k in result}


def run_server(
    name: str,
    args: list[str],
    port: int,
    cases: list[dict],
    sweep: list[dict],
    out_dir: Path,
    repeat: int = 1,
    label: str = "",
) -> dict:
    """One server started, every case run `repeat` times (the sweep once), stopped. Returns every run."""
    print(f"== {name}{label}: starting", file=sys.stderr)
    server = Server(name, args, port, out_dir / f"{name}{label}.log")
    try:
        ready = server.wait_ready()
        print(f"== {name}{label}: ready in {ready:.1f} s", file=sys.stderr)
        runs: dict[str, Any] = {"results": [], "sweep": []}
        video = next((c for c in cases if c.get("video_seconds")), None)
        if video is None:
            runs["warmup"] = warm_up(server)
        else:
            # The same clip to both servers: equal prompt tokens mean the same frames at the same size.
            ns = loadgen.parser().parse_args([])
            vars(ns).update({**video, "requests": 1, "stream": False, "seed": 12345}, model=MODEL_NAME, warmup=0)
            (body,) = loadgen.build_bodies(ns)
            answer = httpx.post(
                server.url + "/v1/chat/completions",
                content=body,
                headers={"content-type": "application/json"},
                timeout=300,
            )
            runs["video_prompt_tokens"] = (
                answer.json()["usage"]["prompt_tokens"] if answer.status_code == 200 else answer.text[:300]
            )
        for key, group in (("results", cases), ("sweep", sweep)):
            for case in group:
                tries = []
                for _ in range(repeat if key == "results" else 1):
                    print(f"   {name}{label} {case}", file=sys.stderr)
                    if case.get("client") == "vllm-bench":
                        tries.append(_box_during(lambda case=case: vllm_bench(case, server, out_dir)))
                        continue
                    ns = loadgen.parser().parse_args([])
                    vars(ns).update(
                        {"rate": None, **case}, url=server.url, model=MODEL_NAME, server_pid=server.proc.pid
                    )
                    tries.append(_box_during(lambda ns=ns: loadgen.measure(ns)))
                runs[key].append(tries)
        return {"ready_s": ready, **runs}
    finally:
        server.stop()


def _pool(passes: list[dict]) -> dict:
    """Every pass's runs of a scenario together; the run with the median throughput stands for it
    (on a noisy box one run of a few seconds can be off by 2x), every run's rate kept beside it."""
    out: dict = {
        "ready_s": statistics.median(p["ready_s"] for p in passes),
        "ready_s_runs": [round(p["ready_s"], 1) for p in passes],
        "warmups": [p["warmup"] for p in passes if "warmup" in p],
    }
    for key in ("results", "sweep"):
        out[key] = []
        for tries in zip(*(p[key] for p in passes), strict=True):
            pooled = sorted((run for group in tries for run in group), key=lambda r: r["requests_per_s"])
            chosen = dict(pooled[len(pooled) // 2])
            chosen["runs_requests_per_s"] = [round(r["requests_per_s"], 1) for r in pooled]
            chosen["runs_box"] = [r["box"] for r in pooled]
            chosen["runs_requests_per_s_by_pass"] = [[round(r["requests_per_s"], 1) for r in group] for group in tries]
            out[key].append(chosen)
    return out


def offline(model: str, cases: list[dict], out_dir: Path) -> dict:
    """The engine alone, per distinct (size, images, tokens) and concurrency, in a fresh process per
    concurrency: `max_num_seqs` = the concurrency, since N clients never have more than N requests in
    the engine. That is the most any server can do at that concurrency (a server at c16 is bounded by
    the engine's 16-sequence batches, not by its 64-sequence ones). Keys "size/images/tokens/cN"."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    out: dict = {}
    for conc in sorted({c["concurrency"] for c in cases}):
        shapes = sorted({(c["image_size"], c["images"], c["max_tokens"]) for c in cases if c["concurrency"] == conc})
        seqs = min(conc, ENGINE["max_num_seqs"])
        path = out_dir / f"offline-c{conc}.json"
        args = [
            sys.executable,
            "-m",
            "benchmarks.offline",
            "--model",
            model,
            "--shapes",
            json.dumps(shapes),
            "--max-model-len",
            str(ENGINE["max_model_len"]),
            "--max-num-seqs",
            str(seqs),
            "--out",
            str(path),
        ]
        print(f"== offline engine, max_num_seqs {seqs}", file=sys.stderr)
        with open(out_dir / f"offline-c{conc}.log", "wb") as log:
            subprocess.run(args, cwd=ROOT, env=env, stdout=log, stderr=log, check=True)
        out.update({f"{shape}/c{conc}": got for shape, got in json.loads(path.read_text()).items()})
    return out


def _ms(x: float | None) -> str:
    return f"{1000 * x:.1f}" if x is not None else "-"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def _front_ms(result: dict) -> str:
    """CPU of the serving layer (everything but EngineCore and the model worker) per request."""
    front = result.get("server_cpu_s_by_role", {}).get("front_end")
    return f"{front * 1000 / result['requests']:.0f}" if front is not None and result.get("requests") else "-"


def _size_label(case: dict) -> str:
    """The size column: the image side, or the clip's length and size."""
    if case.get("video_seconds"):
        return f"video {case['video_seconds']:g} s {case['video_size']}"
    return str(case["image_size"])


def table(cases: list[dict], vllm: dict, qwen: dict, ceiling: dict) -> str:
    cols = [
        "client",
        "size",
        "img",
        "conc",
        "tok",
        "stream",
        "vLLM req/s",
        "qwen req/s",
        "ratio",
        "vLLM TTFT p99 ms",
        "qwen TTFT p99 ms",
        "ratio",
        "vLLM e2e p99 ms",
        "qwen e2e p99 ms",
        "qwen ITL p50 ms",
        "ceiling req/s",
        "of ceiling v/q",
        "ratio bound",
        "errors v/q",
        "CPU s v/q",
        "front-end CPU ms/req v/q",
        "peak RSS MB v/q",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for case, v, q in zip(cases, vllm["results"], qwen["results"], strict=True):
        key = f"{case['image_size']}/{case['images']}/{case['max_tokens']}/c{case['concurrency']}"
        ceil = ceiling.get(key, {}).get("requests_per_s")
        row = [
            case.get("client", "aiohttp"),
            _size_label(case),
            case["images"],
            case["concurrency"],
            case["max_tokens"],
            "yes" if case["stream"] else "no",
            f"{v['requests_per_s']:.1f}",
            f"{q['requests_per_s']:.1f}",
            _ratio(q["requests_per_s"], v["requests_per_s"]),
            _ms(v["ttft_s"]["p99"]),
            _ms(q["ttft_s"]["p99"]),
            _ratio(q["ttft_s"]["p99"], v["ttft_s"]["p99"]),
            _ms(v["e2e_s"]["p99"]),
            _ms(q["e2e_s"]["p99"]),
            _ms(q["itl_s"]["p50"]),
            f"{ceil:.1f}" if ceil else "-",
            f"{v['requests_per_s'] / ceil:.0%}/{q['requests_per_s'] / ceil:.0%}" if ceil else "-",
            _ratio(ceil, v["requests_per_s"]),  # the highest ratio any server could reach in this row
            f"{v['errors']}/{q['errors']}",
            f"{v.get('server_cpu_s')}/{q.get('server_cpu_s')}",
            f"{_front_ms(v)}/{_front_ms(q)}",
            f"{v.get('server_peak_rss_mb')}/{q.get('server_peak_rss_mb')}",
        ]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="224/1024 px, c16, 16 tokens, streaming")
    ap.add_argument(
        "--targets", action="store_true", help="only the rows the targets are set on (1 image, c16/c64, 16 tokens)"
    )
    ap.add_argument(
        "--repeat", type=int, default=1, help="runs per scenario and pass; the median-throughput run is reported"
    )
    ap.add_argument(
        "--passes",
        type=int,
        default=2,
        help="server starts each, order alternating (vLLM first, then qwen first, ...); runs pooled",
    )
    ap.add_argument(
        "--clients",
        default="aiohttp",
        help=f"who sends each row, comma-separated, of {','.join(CLIENTS)} (every row once per client)",
    )
    ap.add_argument(
        "--matrix",
        action="store_true",
        help="the clients matrix: 224 px c1/c16/c64 and 1024 px c16, streaming and not, 16 tokens (with --clients)",
    )
    ap.add_argument("--model", default=None, help="checkpoint path (default: the built-in tiny demo model)")
    ap.add_argument("--only", choices=["vllm", "qwen"], default=None, help="run one server (no ratios)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the open-loop rate sweep and its plot")
    ap.add_argument(
        "--video",
        action="store_true",
        help="only the video rows (one H.264 clip per request, c4; no sweep, no ceiling)",
    )
    args = ap.parse_args()
    # SIGTERM ends the run like Ctrl+C: the server being measured is stopped (`finally`), not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.model is None:
        from qwen_server.demo.model import demo_model_path

        args.model = str(demo_model_path())
    clients = args.clients.split(",")
    if unknown := set(clients) - set(CLIENTS):
        ap.error(f"unknown clients {sorted(unknown)}; choose from {CLIENTS}")
    kind = "quick" if args.quick else "targets" if args.targets else "clients" if args.matrix else "full"
    cases = video_cases() if args.video else scenarios(kind, clients)
    sweep = [] if args.no_sweep or args.video else sweep_cases()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_dir = HERE / "results" / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    flags = engine_flags()
    if args.video:
        flags[flags.index("--limit-mm-per-prompt") + 1] = VIDEO_LIMIT
    vllm_args = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        args.model,
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        *flags,
        *(VLLM_VIDEO_FLAGS if args.video else []),
    ]
    qwen_args = [sys.executable, str(ROOT / "launcher.py"), "--model", args.model, "--port", "{port}", *flags]
    report: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "engine": ENGINE,
        "cases": cases,
    }
    # Passes alternate the order (vLLM, qwen; qwen, vLLM; ...) so that neither server always runs
    # second, on a machine warmed, cached or loaded by the first; each pass starts a fresh server.
    servers = [(n, a) for n, a in (("vllm", vllm_args), ("qwen", qwen_args)) if not args.only or n == args.only]
    orders = [servers if i % 2 == 0 else servers[::-1] for i in range(args.passes)]
    passes: dict[str, list] = {name: [] for name, _ in servers}
    for i, order in enumerate(orders):
        for name, argv in order:
            port = free_port()
            passes[name].append(
                run_server(
                    name,
                    [a.replace("{port}", str(port)) for a in argv],
                    port,
                    cases,
                    sweep,
                    out_dir,
                    args.repeat,
                    label=f"-pass{i + 1}",
                )
            )
            report["passes"] = passes
            (out_dir / "result.json").write_text(json.dumps(report, indent=2))  # kept if a later step fails
    for name, runs_of in passes.items():
        report[name] = _pool(runs_of)
    if not args.video:
        del report["passes"]
    report["order"] = [[name for name, _ in order] for order in orders]
    report["offline"] = offline(args.model, cases, out_dir) if not args.only and not args.video else {}
    (out_dir / "result.json").write_text(json.dumps(report, indent=2))
    if args.only:
        print(json.dumps(report[args.only], indent=2))
        return
    runs = args.repeat * args.passes
    text = (
        f"Machine: {report['machine']}; engine {ENGINE}{' (video: ' + VIDEO_LIMIT + ')' if args.video else ''}, "
        "enforce_eager; time to ready: "
        f"vLLM {report['vllm']['ready_s']:.1f} s, qwen {report['qwen']['ready_s']:.1f} s"
        + f" (medians of {args.passes} starts: vLLM {report['vllm']['ready_s_runs']}, qwen {report['qwen']['ready_s_runs']})"
        + f"; order per pass {report['order']}; each row the median-throughput run of {runs}\n\n"
        + table(cases, report["vllm"], report["qwen"], report["offline"])
    )
    if args.video:
        tokens = {name: [p.get("video_prompt_tokens") for p in runs_of] for name, runs_of in passes.items()}
        text += f"\n\nThe same clip's prompt tokens per pass: {tokens}; vLLM with {' '.join(VLLM_VIDEO_FLAGS)}\n"
    if runs > 1:
        text += (
            "\n\nEvery run's req/s (sorted), and the most CPU stolen by the hypervisor during any of them\n\n"
            "| client | size | img | conc | tok | stream | vLLM | qwen | max steal % v/q |\n|---|---|---|---|---|---|---|---|---|\n"
        )
        for case, v, q in zip(cases, report["vllm"]["results"], report["qwen"]["results"], strict=True):
            steal = "/".join(str(max(b["steal_pct"] for b in r["runs_box"])) for r in (v, q))
            text += (
                f"| {case.get('client', 'aiohttp')} | {_size_label(case)} | {case['images']} | {case['concurrency']} | {case['max_tokens']} | "
                f"{'yes' if case['stream'] else 'no'} | {v['runs_requests_per_s']} | {q['runs_requests_per_s']} | {steal} |\n"
            )
    if sweep:
        text += (
            "\n\nOpen loop, 224 px, 16 tokens, streaming: target rate, the rate the client really offered "
            "(v/q: its loop lags on a busy machine), achieved req/s, TTFT p50/p99 ms\n\n"
        )
        text += (
            "| target | offered v/q | vLLM req/s | qwen req/s | vLLM TTFT p50/p99 | qwen TTFT p50/p99 | front-end CPU ms/req v/q |\n"
            "|---|---|---|---|---|---|---|\n"
        )
        for v, q in zip(report["vllm"]["sweep"], report["qwen"]["sweep"], strict=True):
            offered = "/".join(f"{r['offered_requests_per_s']:.1f}" for r in (v, q))
            text += (
                f"| {v['scenario']['rate']} | {offered} | {v['requests_per_s']:.1f} | {q['requests_per_s']:.1f} | "
                f"{_ms(v['ttft_s']['p50'])}/{_ms(v['ttft_s']['p99'])} | "
                f"{_ms(q['ttft_s']['p50'])}/{_ms(q['ttft_s']['p99'])} | {_front_ms(v)}/{_front_ms(q)} |\n"
            )
        plot(report, out_dir / "latency_vs_load.png")
    (out_dir / "table.md").write_text(text + "\n")
    print(text)
    print(f"\nwritten to {out_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
