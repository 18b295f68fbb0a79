"""Time to serving again after a code change: qwen_server `--reload` against a restart of vLLM's server.

A developer saves a file and waits. vLLM's OpenAI server has no reload: the change takes a restart
(SIGTERM, wait for the exit, start, load the model). qwen_server runs under `--reload` from a
temporary copy of the package; the benchmark edits a route there (`/live`'s body) and measures from
the write to the first image chat answered by a worker that serves the changed route. Three ways:

- `vllm`: vLLM's server restarted (from SIGTERM to the first answered image chat);
- `qwen-shared`: the launcher with `--shared-engine --reload` (the workers re-fork and re-attach; the
  engine stays loaded);
- `qwen-embedded`: the launcher with `--reload` and one engine per worker (every reload loads the model).

Each server is started once per pass and changed `--edits` times; passes alternate the order.
Same checkpoint (the tiny demo model) and engine settings as side_by_side.py. Loopback only.

    .venv/bin/python -m benchmarks.reload                    # 3 edits per server, 2 passes
    .venv/bin/python -m benchmarks.reload --edits 5 --passes 1 --only vllm,qwen-shared
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.side_by_side import ROOT, Server, engine_flags, image_chat
from qwen_server.demo.model import demo_model_path
from qwen_server.testing.servers import free_port

WAYS = ("vllm", "qwen-shared", "qwen-embedded")


def _serves_change(url: str, marker: str, body: dict) -> bool:
    """On ONE connection (one worker): /live shows `marker`, and an image chat is answered."""
    try:
        with httpx.Client(base_url=url, limits=httpx.Limits(max_connections=1), timeout=10) as client:
            if client.get("/live").json().get("status") != marker:
                return False
            return client.post("/v1/chat/completions", json=body).status_code == 200
    except (httpx.HTTPError, ValueError):
        return False


def qwen_reloads(model: Path, edits: int, shared: bool, work: Path) -> dict:
    copy = work / ("shared" if shared else "embedded")
    shutil.copytree(ROOT / "qwen_server", copy / "qwen_server", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "launcher.py", copy / "launcher.py")
    probes = copy / "qwen_server" / "http" / "probes.py"
    original = probes.read_text()
    assert original.count('{"status": "alive"}') == 1, "the benchmark edits /live's body; it moved"
    port = free_port()
    args = [sys.executable, str(copy / "launcher.py"), "--port", str(port), "--model", str(model), "--reload"]
    args += ["--shared-engine"] if shared else []
    srv = Server("qwen-shared" if shared else "qwen-embedded", [*args, *engine_flags()], port, work / f"{port}.log")
    body = image_chat(seed=7)
    times: list[float] = []
    try:
        ready = srv.wait_ready()
        for i in range(edits):
            marker = f"alive-edit-{i}"
            t0 = time.monotonic()
            probes.write_text(original.replace('{"status": "alive"}', f'{{"status": "{marker}"}}'))
            while not _serves_change(srv.url, marker, body):
                if time.monotonic() - t0 > 600:
                    raise RuntimeError(f"{srv.name}: edit {i} not served after 600 s; see {work}/{port}.log")
                time.sleep(0.05)
            times.append(time.monotonic() - t0)
            print(f"{srv.name}: edit {i}: serving the change {times[-1]:.2f} s after the write", flush=True)
            time.sleep(2)  # let the old workers finish exiting before the next edit
    finally:
        srv.stop()
        probes.write_text(original)
    return {"ready_s": ready, "serving_again_s": times}


def vllm_restarts(model: Path, edits: int, work: Path) -> dict:
    port = free_port()
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port)]
    args += ["--host", "127.0.0.1", *engine_flags()]
    times: list[float] = []
    srv = Server("vllm", args, port, work / f"vllm-{port}-0.log")
    ready = srv.wait_ready()
    try:
        for i in range(edits):
            t0 = time.monotonic()
            srv.stop()  # SIGTERM, then wait for the exit
            srv = Server("vllm", args, port, work / f"vllm-{port}-{i + 1}.log")
            srv.wait_ready()
            times.append(time.monotonic() - t0)
            print(f"vllm: restart {i}: serving again {times[-1]:.2f} s after SIGTERM", flush=True)
    finally:
        srv.stop()
    return {"ready_s": ready, "serving_again_s": times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=3, help="code changes (vLLM: restarts) per server start")
    parser.add_argument("--passes", type=int, default=2, help="passes; the order of the servers alternates")
    parser.add_argument("--only", default=",".join(WAYS), help=f"comma-separated subset of {WAYS}")
    parser.add_argument("--json", type=Path, help="write the results here")
    opts = parser.parse_args()
    ways = [w for w in WAYS if w in opts.only.split(",")]
    model = demo_model_path()
    results: dict[str, list[dict]] = {w: [] for w in ways}
    with tempfile.TemporaryDirectory(prefix="qwen-reload-bench-") as tmp:
        for p in range(opts.passes):
            order = ways if p % 2 == 0 else list(reversed(ways))
            for way in order:
                work = Path(tmp) / f"pass{p}-{way}"
                work.mkdir()
                if way == "vllm":
                    results[way].append(vllm_restarts(model, opts.edits, work))
                else:
                    results[way].append(qwen_reloads(model, opts.edits, way == "qwen-shared", work))
    medians = {w: statistics.median(t for r in runs for t in r["serving_again_s"]) for w, runs in results.items()}
    print("\n| way | first ready s | serving again after a change, s (median; all) | vLLM restart / this |")
    print("|---|--:|---|--:|")
    for way, runs in results.items():
        every = ", ".join(f"{t:.2f}" for r in runs for t in r["serving_again_s"])
        ready = ", ".join(f"{r['ready_s']:.1f}" for r in runs)
        ratio = f"{medians['vllm'] / medians[way]:.2f}x" if "vllm" in medians and way != "vllm" else ""
        print(f"| {way} | {ready} | {medians[way]:.2f} ({every}) | {ratio} |")
    if opts.json:
        stamp = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        opts.json.write_text(json.dumps({"when": stamp, "edits": opts.edits, "results": results}, indent=2))


if __name__ == "__main__":
    main()
