"""Running Granian on the launcher's socket, so that no process outlives its supervisor.

Three guarantees, each for a way things die:
- the launcher's socket (plain bind, listening) is what the workers serve on: Granian 2.8 has no
  public option for that, so granian_compat.py replaces the one private method that creates the
  shared socket (version-fenced; a test fails loudly if that changes);
- a worker whose supervisor disappears (even by SIGKILL) kills its own process tree (vLLM's
  EngineCore included) and exits: a watchdog thread notices the parent change within 0.25 s;
- the launcher is a child subreaper: processes orphaned by a dead worker (an EngineCore whose
  worker was SIGKILLed) are re-parented to it and ended, while it runs and when it exits.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from qwen_server import drain, procs
from qwen_server.launcher import granian_compat
from qwen_server.launcher.ports import SERVER_MARKERS
from qwen_server.settings import PROMETHEUS_MULTIPROC_ENV

log = logging.getLogger("qwen_server.launcher")

_PR_SET_CHILD_SUBREAPER = 36


class _Drain:
    """SIGTERM: drain the workers first (drain.py), then Granian's own graceful stop. SIGINT (Ctrl+C
    reaches every process of the terminal at once) and a second SIGTERM stop now."""

    def __init__(self, run_dir: str, drain_timeout: float) -> None:
        self.run_dir = run_dir
        self.drain_timeout = drain_timeout
        self.started = False

    def on_interrupt(self, server: granian_compat.HandedSocketServer, signum: int | None) -> bool:
        if signum != signal.SIGTERM or self.started:
            return False
        self.started = True
        threading.Thread(target=self._drain_then_stop, args=(server,), name="qwen-server-drain", daemon=True).start()
        return True

    def _drain_then_stop(self, server: granian_compat.HandedSocketServer) -> None:
        pids = server.worker_pids()
        log.info("SIGTERM: draining %d worker(s) for up to %.0f s", len(pids), self.drain_timeout)
        late = drain.drain_workers(self.run_dir, pids, self.drain_timeout + 10)
        if late:
            log.warning("worker(s) %s did not report drained in time; stopping anyway", late)
        server.stop(signal.SIGTERM)


class EngineHost(Protocol):
    """What the supervisor needs of the launcher's engine host (--shared-engine, engine/host.py)."""

    def owns(self, pid: int) -> bool:
        """Whether the launcher's child `pid` is the engine's (not Granian's, and it stays)."""

    def stop(self) -> None:
        """Stop the engine (the workers are gone)."""


def load_app_in_worker(target: str) -> Any:
    """Granian's target loader, run in each worker: arm the orphan watchdog, then import the app."""
    _start_watchdog(os.getppid())
    return granian_compat.load_target(target)


def _start_watchdog(supervisor: int) -> None:
    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(0.25)
        # The supervisor is gone: nothing will stop us, so stop everything below us, then ourselves.
        tree = procs.descendants(os.getpid())
        for pid in tree:
            procs.signal_quietly(pid, signal.SIGKILL)
        os._exit(1)

    if supervisor <= 1:
        os._exit(1)
    threading.Thread(target=watch, name="qwen-server-orphan-watchdog", daemon=True).start()


def make_run_dir() -> str:
    """The directory the workers share (drain markers; Prometheus files unless the caller chose a
    PROMETHEUS_MULTIPROC_DIR), named in the environment. Made before anything imports
    prometheus_client in this process (vLLM does, so before the --shared-engine host starts):
    prometheus_client picks its value store at import, and forked workers inherit it as picked."""
    run_dir = tempfile.mkdtemp(prefix="qwen-server-")
    os.environ[drain.RUN_DIR_ENV] = run_dir
    if not os.environ.get(PROMETHEUS_MULTIPROC_ENV):
        os.mkdir(os.path.join(run_dir, "metrics"))
        os.environ[PROMETHEUS_MULTIPROC_ENV] = os.path.join(run_dir, "metrics")
    return run_dir


def run_granian(
    sock: socket.socket,
    granian_kwargs: dict[str, Any],
    drain_timeout: float = 30.0,
    engine_host: EngineHost | None = None,
    run_dir: str | None = None,
) -> int:
    """Run Granian on `sock` until it stops; return the exit code. Leaves no process behind.
    The workers share `run_dir` (make_run_dir's; made here if None), removed at the end.
    `engine_host`'s processes are left running while Granian does, and the host is stopped once the
    workers are gone."""
    granian_compat.check_granian_version()
    # Granian starts its workers with multiprocessing's start method. Forked, they inherit what this
    # process imported (with --shared-engine: torch, vLLM, the engine's config and listeners); spawned
    # (Python 3.14's default is forkserver, which Granian turns into spawn) they would import it all again.
    multiprocessing.set_start_method("fork", force=True)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    if run_dir is None:
        run_dir = make_run_dir()
    # Granian forks its workers from this process, also while the reaper thread runs. A fork while
    # that thread is importing hands the child a module import lock that no thread of its own will
    # release; importing the app then hangs. So what the threads use is imported here, before any fork, and after
    # PROMETHEUS_MULTIPROC_DIR is set: prometheus_client picks its value store at import, and the
    # workers inherit the module as imported here.
    from prometheus_client import multiprocess  # noqa: F401 - imported for _forget_worker_metrics

    server = granian_compat.server_on_socket(sock, granian_kwargs, _Drain(run_dir, drain_timeout).on_interrupt)
    stop = threading.Event()
    # The engine host's children (EngineCore, also once restarted; multiprocessing's resource tracker)
    # are not orphans.
    started_before = set(procs.children(os.getpid())) if engine_host is not None else set()

    def keep(pid: int) -> bool:
        return pid in started_before or (engine_host is not None and engine_host.owns(pid))

    reaper = threading.Thread(target=_reap_orphans, args=(server, stop, keep), name="qwen-server-reaper", daemon=True)
    reaper.start()
    code = 0
    try:
        server.serve(target_loader=load_app_in_worker)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        stop.set()
        sock.close()
        if engine_host is not None:
            engine_host.stop()
        procs.terminate_children(os.getpid(), grace=5.0)
        if not procs.stop_resource_tracker(grace=5.0):
            log.warning("multiprocessing's resource tracker did not finish in 5 s; killed it")
        shutil.rmtree(run_dir, ignore_errors=True)
    return code


def _reap_orphans(
    server: granian_compat.HandedSocketServer, stop: threading.Event, keep: Callable[[int], bool]
) -> None:
    """End children that are not Granian's workers (nor the engine host's `keep`): orphans re-parented
    to us by a dead worker.
    Also drop the live gauges of workers that are gone: one killed outright never drops its own,
    and /metrics would report its last values (requests running, ...) for good."""
    me = os.getpid()
    known_workers: set[int] = set()
    trackers: set[int] = set()  # orphaned resource trackers: left to exit by themselves, then reaped
    while not stop.wait(1.0):
        workers = set(server.worker_pids())
        known_workers |= workers
        for pid in [p for p in known_workers if not procs.alive(p)]:
            known_workers.discard(pid)
            _forget_worker_metrics(pid)
        # Engine processes orphaned to us that exited (a killed EngineCore's model workers) are reaped
        # here; Granian's own workers are left to Granian, which waits for them itself.
        for pid, name in procs.zombie_children(me):
            if (name.startswith("VLLM") or pid in trackers) and pid not in workers and not keep(pid):
                trackers.discard(pid)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
        for pid in procs.children(me):
            if pid in workers or keep(pid) or pid in trackers:
                continue
            if procs.is_resource_tracker(pid):
                # A dead worker's: it exits once that worker's engine (ended here too) is gone, after
                # removing the engine's shared memory; killed, it would leave that in /dev/shm.
                trackers.add(pid)
                continue
            # A child we did not start directly: give it a moment (Granian may be spawning it).
            time.sleep(0.5)
            if pid in server.worker_pids() or keep(pid):
                continue
            info = procs.info(pid)
            if info is not None and info.ppid == me:
                log.warning("ending orphaned process %d (%s) left by a dead worker", pid, info.short)
                procs.terminate([pid, *procs.descendants(pid)], grace=3.0)


def _forget_worker_metrics(pid: int) -> None:
    path = os.environ.get(PROMETHEUS_MULTIPROC_ENV)
    if path:
        # Runs in the reaper thread: serve() imported this before Granian's first fork (a first
        # import here could hand a forked worker a held import lock), so this is a lookup.
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]  # unannotated in prometheus_client


# --- replacing a running server (launcher --replace) ---


def _is_server_proc(pid: int) -> bool:
    info = procs.info(pid)
    return info is not None and any(m in info.cmdline for m in SERVER_MARKERS)


def tree_root(pid: int) -> int:
    """The top-most qwen_server process above `pid` (the launcher, or an orphaned worker itself)."""
    root = pid
    while True:
        info = procs.info(root)
        if info is None or info.ppid <= 1 or not _is_server_proc(info.ppid):
            return root
        root = info.ppid


def stop_trees(roots: list[int], timeout: float) -> None:
    """SIGTERM each qwen_server root (graceful: drain, engine shutdown), SIGKILL what is left after
    `timeout`. Only processes of those trees are ever signalled."""
    members = {root: [root, *procs.descendants(root)] for root in roots if _is_server_proc(root)}
    for root in members:
        procs.signal_quietly(root, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    everyone = [pid for tree in members.values() for pid in tree]
    while time.monotonic() < deadline and any(procs.alive(p) for p in everyone):
        time.sleep(0.1)
    leftovers = [p for p in everyone if procs.alive(p)]
    if leftovers:
        log.warning("killing %d process(es) that did not stop within %.0f s", len(leftovers), timeout)
        procs.terminate(leftovers, grace=0.0)
