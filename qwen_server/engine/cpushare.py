"""Each worker's own share of the CPUs when several workers run vLLM's CPU engine.

vLLM binds a CPU engine's model threads to the cores its process may use, one thread per
physical core, leaving one core for the rest. Granian's workers are copies of one another, so
with `--workers N` every engine pinned its threads to the same cores while the others idled.
Before its engine starts, a worker claims one of N shares (whole physical cores, in NUMA order)
and confines itself to it; the engine processes inherit that affinity and vLLM's binding stays
inside it. Claims are lock files, released when the worker (and any engine process that inherited
the lock) is gone: a respawned worker waits for its predecessor's share to come free. Shares need
2 cores each; below that the workers keep vLLM's layout (see _MIN_CORES).
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

from qwen_server import procs
from qwen_server.engine import vllm_compat
from qwen_server.settings import Settings

log = logging.getLogger("qwen_server")

_CLAIM_WAIT = 30.0  # seconds a worker waits for a share held by a dead predecessor's engine
# A share needs a core for the model threads and one that vLLM reserves for the rest (EngineCore, which
# busy-waits, and this worker's HTTP work). Shares of one core each ran 2 workers on 2 cores at 1/4
# of the throughput of both engines pinning core 0 (224 px c16, 16 tokens: 14.6-16.7 vs 65.1 req/s).
_MIN_CORES = 2


def physical_cores(cpus: Sequence[Any]) -> list[set[int]]:
    """The logical CPU ids of each physical core (hyperthreads together), in (NUMA node, core) order.
    `cpus`: vLLM's LogicalCPUInfo (id, physical_core, numa_node)."""
    cores: dict[tuple[int, int], set[int]] = {}
    for cpu in cpus:
        cores.setdefault((cpu.numa_node, cpu.physical_core), set()).add(cpu.id)
    return [cores[key] for key in sorted(cores)]


def split(cpus: Sequence[Any], n: int) -> list[set[int]]:
    """`n` shares of whole physical cores, contiguous in (NUMA node, core) order, sizes within one
    core of each other. Empty when a share would get fewer than _MIN_CORES cores."""
    ordered = physical_cores(cpus)
    if n < 1 or len(ordered) < n * _MIN_CORES:
        return []
    size, extra = divmod(len(ordered), n)
    shares, start = [], 0
    for k in range(n):
        end = start + size + (k < extra)
        shares.append(set().union(*ordered[start:end]))
        start = end
    return shares


def claim(settings: Settings) -> IO[str] | None:
    """Confine this worker to a free share when it is one of several on a CPU engine that vLLM binds
    automatically. Returns the held lock (keep it open for the worker's life), or None when nothing
    was done. vLLM must be importable (the engine is about to start)."""
    if settings.workers < 2 or os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto":
        return None
    if not vllm_compat.platform_is_cpu():
        return None
    cpus = vllm_compat.allowed_cpu_list()
    shares = split(cpus, settings.workers)
    if not shares:
        log.warning(
            "%d workers on %d physical cores: too few for a share of %d cores each (the model's, and one "
            "for EngineCore and HTTP work), so the workers' engines bind the same cores",
            settings.workers,
            len(physical_cores(cpus)),
            _MIN_CORES,
        )
        return None
    deadline = time.monotonic() + _CLAIM_WAIT
    while True:
        for k, share in enumerate(shares):
            lock = _try_lock(_lock_path(settings, k, len(shares)))
            if lock is not None:
                procs.restrict_cpus(os.getpid(), share)
                log.info(
                    "CPU share %d of %d: this worker and its engine run on CPUs %s", k + 1, len(shares), sorted(share)
                )
                return lock
        if time.monotonic() > deadline:
            log.warning(
                "no free CPU share of %d after %.0f s: this engine binds the cores vLLM picks", len(shares), _CLAIM_WAIT
            )
            return None
        time.sleep(0.5)


def _lock_path(settings: Settings, k: int, n: int) -> Path:
    host = settings.host.replace(":", "_").replace("/", "_")
    return Path(tempfile.gettempdir()) / f"qwen-server-{host}-{settings.port}-cpu-share-{k + 1}-of-{n}.lock"


def _try_lock(path: Path) -> IO[str] | None:
    f = open(path, "a")  # noqa: SIM115 - held open for the worker's life
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f
