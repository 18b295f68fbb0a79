"""Is the engine or the server the bottleneck? Samples a running server's engine with py-spy.

    .venv/bin/python -m benchmarks.engine_profile --pid SERVER_PID --seconds 10 [--out DIR]

Run it while a load runs (`loadgen.py`). Finds vLLM's EngineCore and model worker below SERVER_PID
by their process titles and samples them (and the front end: the process that holds the HTTP
socket; `--front-pid` to name it) with `py-spy record --nonblocking --idle` (no pausing, idle
samples kept). Then reports where the engine's two loops spent their time:

- EngineCore's main loop: "no request" (blocked on its input queue: nothing to schedule, every
  request is somewhere in the server), "taking requests in", "waiting for the model" (a step is
  running), or the rest (scheduling, output handling).
- the model worker's loop: "running a step" or "waiting for one" (vLLM's CPU engine spins on a
  shared-memory queue, so its CPU time says nothing about this; the stack does).

A server that keeps the engine fed shows little "no request". The front end's busiest frames come
last. Needs py-spy (the `bench` extra); raw profiles are kept in DIR.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import proctree
from qwen_server import procs

# vLLM 0.32's frame names; a release that renames them shows up as "other" (the totals say so).
_ENGINE_LOOP = "run_busy_loop"
_ENGINE_IDLE = "_process_input_queue"
_ENGINE_WAITS_MODEL = ("_wait_for_response", "collective_rpc")
_WORKER_LOOP = "worker_busy_loop"
_WORKER_STEP = ("execute_model", "sample_tokens")


def _stacks(path: Path) -> list[tuple[list[str], int]]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            stack, count = line.rsplit(" ", 1)
            out.append((stack.split(";"), int(count)))
    return out


def _shares(stacks: list[tuple[list[str], int]], loop: str, classify) -> dict[str, float]:
    """Fractions of the samples of the thread that runs `loop`, by classify(stack)."""
    counts: collections.Counter[str] = collections.Counter()
    for stack, n in stacks:
        if any(loop in f for f in stack):
            counts[classify(stack)] += n
    total = sum(counts.values())
    return {k: round(v / total, 3) for k, v in counts.most_common()} | {"samples": total} if total else {}


def _engine_state(stack: list[str]) -> str:
    if any(_ENGINE_IDLE in f for f in stack):
        return "no request" if any("Queue.get" in f for f in stack) else "taking requests in"
    if any(m in f for f in stack for m in _ENGINE_WAITS_MODEL):
        return "waiting for the model"
    return "other (scheduling, outputs)"


def _worker_state(stack: list[str]) -> str:
    return "running a step" if any(m in f for f in stack for m in _WORKER_STEP) else "waiting for one"


def _top_frames(stacks: list[tuple[list[str], int]], n: int = 15) -> list[tuple[str, float]]:
    """Busiest leaf frames (file:line kept short), as fractions of all samples."""
    counts: collections.Counter[str] = collections.Counter()
    for stack, k in stacks:
        counts[re.sub(r" \(.*?([^/]+:\d+)\)", r" \1", stack[-1])] += k
    total = sum(counts.values()) or 1
    return [(frame, round(k / total, 3)) for frame, k in counts.most_common(n)]


def _engine_pids(root: int) -> dict[str, int]:
    """EngineCore and the (first) model worker below `root`, by the roles loadgen's CPU accounting uses."""
    found: dict[str, int] = {}
    for pid in procs.descendants(root):
        found.setdefault(proctree.role(pid), pid)
    return {r: found[r] for r in ("engine_core", "model_worker") if r in found}


def profile(pid: int, seconds: int, out: Path, front_pid: int | None = None, rate: int = 50) -> dict:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    targets = {**_engine_pids(pid), "front_end": front_pid or pid}
    with contextlib.ExitStack() as logs:
        running = []
        for role, target in targets.items():
            idle = [] if role == "front_end" else ["--idle"]  # the front end: where its CPU goes
            running.append(
                subprocess.Popen(
                    [
                        spy,
                        "record",
                        "--nonblocking",
                        *idle,
                        "-r",
                        str(rate),
                        "-d",
                        str(seconds),
                        "-f",
                        "raw",
                        "-o",
                        str(out / f"{role}.txt"),
                        "-p",
                        str(target),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=logs.enter_context(open(out / f"{role}.py-spy.log", "wb")),
                )
            )
        for proc in running:
            proc.wait()
    report: dict = {"pids": targets}
    if (out / "engine_core.txt").exists():
        report["engine_core_loop"] = _shares(_stacks(out / "engine_core.txt"), _ENGINE_LOOP, _engine_state)
    if (out / "model_worker.txt").exists():
        report["model_worker_loop"] = _shares(_stacks(out / "model_worker.txt"), _WORKER_LOOP, _worker_state)
    if (out / "front_end.txt").exists():
        report["front_end_top_frames"] = _top_frames(_stacks(out / "front_end.txt"))
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pid", type=int, required=True, help="the server's root process")
    ap.add_argument("--front-pid", type=int, default=None, help="the HTTP process, if not --pid (qwen: a worker)")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument(
        "--rate",
        type=int,
        default=50,
        help="samples/s per process; the samplers take CPU from the server on a small box",
    )
    ap.add_argument("--out", default=None, help="keep the raw profiles here (default: a temporary directory)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="engine-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    report = profile(args.pid, args.seconds, out, args.front_pid, args.rate)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
