"""Graceful drain on SIGTERM, between the launcher and its workers.

Granian stops a worker by closing its listener and waiting for open requests with no time bound,
so a worker cannot answer "draining" on /health, nor end its slow requests cleanly, once Granian's
own stop has begun. The drain therefore happens first: the launcher (Granian's master) receives
SIGTERM, sends `DRAIN_SIGNAL` to every worker that has armed its handler, waits until each reports
drained (bounded), and only then lets Granian stop the workers. A worker, on `DRAIN_SIGNAL`:
/health turns 503 `draining`, new inference requests get 503, running ones finish up to the drain
timeout and the rest are cut with a clean error (see http/admission.py). Markers in a run directory the
launcher creates carry "armed" and "drained"; without the launcher (plain `granian`), sending
`DRAIN_SIGNAL` to a worker by hand drains it the same way before a SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from qwen_server import procs

if TYPE_CHECKING:
    import asyncio

DRAIN_SIGNAL = signal.SIGUSR1
RUN_DIR_ENV = "QWEN_LAUNCHER_RUN_DIR"  # not QWEN_SERVER_*: settings refuse unknown names there


def _marker(run_dir: str, state: str, pid: int) -> Path:
    return Path(run_dir) / f"{state}.{pid}"


# --- worker side ---


def arm(loop: asyncio.AbstractEventLoop, on_drain: Callable[[], None]) -> None:
    """Handle DRAIN_SIGNAL on `loop` from now on, and tell the launcher this worker can drain."""
    loop.add_signal_handler(DRAIN_SIGNAL, on_drain)
    run_dir = os.environ.get(RUN_DIR_ENV)
    if run_dir:
        _marker(run_dir, "armed", os.getpid()).touch()


def report_drained() -> None:
    run_dir = os.environ.get(RUN_DIR_ENV)
    if run_dir:
        _marker(run_dir, "drained", os.getpid()).touch()


# --- launcher side ---


def drain_workers(run_dir: str, pids: Iterable[int], timeout: float) -> list[int]:
    """Signal the armed workers among `pids` and wait up to `timeout` s for each to report drained.
    Returns the PIDs that did not report in time. A worker that is not armed yet (still starting)
    is not signalled: the default action of SIGUSR1 would kill it."""
    armed = [pid for pid in pids if _marker(run_dir, "armed", pid).exists()]
    for pid in armed:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, DRAIN_SIGNAL)
    deadline = time.monotonic() + timeout
    waiting = set(armed)
    while waiting and time.monotonic() < deadline:
        waiting = {pid for pid in waiting if not _marker(run_dir, "drained", pid).exists() and procs.alive(pid)}
        time.sleep(0.05)
    return sorted(waiting)
