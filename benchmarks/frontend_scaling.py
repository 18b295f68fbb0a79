"""Front-end scaling over ONE engine: `--shared-engine` with 1 worker against 2 workers, same load.

With one shared engine, more HTTP workers spread the front end's work (JSON, image decode, the HF
processor, templating, detokenization) over more processes while the model stays loaded once. This
starts the launcher with `--shared-engine --workers 1`, then `--workers 2` (the order alternates
over `--passes`), drives each with loadgen.py (aiohttp, closed loop, distinct seeded JPEG data URLs,
ignore_eos, temperature 0) and reports requests/s, TTFT and the CPU each part of the server used:
the front end (the workers and the launcher, which also hosts the engine's client slots), EngineCore
and the model worker, per request, and the cores each used on average during the run. On a machine
with few cores the gain is bounded by the cores the engine leaves free: read the "cores" columns.

    .venv/bin/python -m benchmarks.frontend_scaling                       # 1024 px c16 streaming, 2 passes
    .venv/bin/python -m benchmarks.frontend_scaling --image-size 224 --no-stream --requests 200

Same checkpoint (the tiny demo model) and engine settings as side_by_side.py. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks import side_by_side
from qwen_server.demo.model import demo_model_path
from qwen_server.testing.servers import free_port


def _row(workers: int, run: dict) -> str:
    cpu = run.get("server_cpu_s_by_role", {})
    seconds = run.get("elapsed_s") or 0
    parts = []
    for role in ("front_end", "engine_core", "model_worker"):
        used = cpu.get(role)
        per_req = f"{used * 1000 / run['requests']:.1f}" if used is not None and run.get("requests") else "-"
        cores = f"{used / seconds:.2f}" if used is not None and seconds else "-"
        parts += [per_req, cores]
    ttft = run.get("ttft_s", {}).get("p50")
    return (
        f"| {workers} | {run.get('requests_per_s', 0):.1f} | {ttft * 1000 if ttft else float('nan'):.0f} | "
        + " | ".join(parts)
        + " |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--no-stream", action="store_true")
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--json", type=Path)
    opts = ap.parse_args()
    case = {
        "image_size": opts.image_size,
        "images": 1,
        "concurrency": opts.concurrency,
        "max_tokens": opts.max_tokens,
        "stream": not opts.no_stream,
        "requests": opts.requests,
    }
    model = str(demo_model_path())
    runs: dict[int, list[dict]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="qwen-scaling-bench-") as tmp:
        for p in range(opts.passes):
            for workers in (1, 2) if p % 2 == 0 else (2, 1):
                port = free_port()
                args = [sys.executable, str(side_by_side.ROOT / "launcher.py"), "--port", str(port)]
                args += ["--model", model, "--shared-engine", "--workers", str(workers), *side_by_side.engine_flags()]
                result = side_by_side.run_server(
                    "qwen", args, port, [case], [], Path(tmp), label=f"-w{workers}-pass{p}"
                )
                runs[workers].append(result["results"][0][0])
    print(f"\n{case}")
    print(
        "| workers | req/s | TTFT p50 ms | front end ms/req | front end cores | EngineCore ms/req | EngineCore cores "
        "| model worker ms/req | model worker cores |"
    )
    print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for workers, results in runs.items():
        for run in results:
            print(_row(workers, run))
    medians = {w: statistics.median(r.get("requests_per_s", 0) for r in results) for w, results in runs.items()}
    print(f"\nmedian req/s: 1 worker {medians[1]:.1f}, 2 workers {medians[2]:.1f} -> {medians[2] / medians[1]:.2f}x")
    if opts.json:
        opts.json.write_text(json.dumps({"case": case, "runs": runs}, indent=2, default=str))


if __name__ == "__main__":
    main()
