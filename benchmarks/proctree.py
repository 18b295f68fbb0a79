"""CPU seconds and peak RSS of a process tree (a server and every process below it), from /proc."""

from __future__ import annotations

import os
import threading

from qwen_server import procs

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def role(pid: int) -> str:
    """Which part of the server a process is: vLLM names its engine processes by title."""
    info = procs.info(pid)
    cmd = info.cmdline if info else ""
    if "EngineCore" in cmd:
        return "engine_core"
    if "VLLM::Worker" in cmd:
        return "model_worker"
    return "front_end"  # HTTP, JSON, images, the HF processor, detokenization (and the launcher)


def _cpu_and_rss(pid: int) -> tuple[float, int] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/statm") as f:
            rss_pages = int(f.read().split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    # fields[11], [12]: utime, stime (the 14th and 15th fields of stat, after pid and comm).
    return (int(fields[11]) + int(fields[12])) / _TICK, rss_pages * _PAGE


def _runqueue_wait(pid: int) -> float:
    """Seconds the threads of `pid` spent runnable but not running (schedstat's second field,
    summed over the live threads): how long that process waited for a core."""
    total = 0
    for tid in procs.threads(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return total / 1e9


class TreeSampler:
    """Samples the tree every `interval` s between start() and stop(). RSS is summed over the
    processes (shared pages counted once per process: an upper bound, the same for every server)."""

    def __init__(self, root: int, interval: float = 0.2) -> None:
        self.root = root
        self.interval = interval
        self._stop = threading.Event()
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._roles: dict[int, str] = {}
        self._wait0: dict[int, float] = {}
        self.peak_rss = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        total_rss = 0
        for pid in [self.root, *procs.descendants(self.root)]:
            got = _cpu_and_rss(pid)
            if got is None:
                continue
            cpu, rss = got
            if pid not in self._first:
                self._first[pid] = cpu
                self._roles[pid] = role(pid)
            self._last[pid] = cpu
            total_rss += rss
        self.peak_rss = max(self.peak_rss, total_rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _waits(self) -> dict[int, float]:
        return {pid: _runqueue_wait(pid) for pid in [self.root, *procs.descendants(self.root)]}

    def start(self) -> None:
        self._sample()
        self._wait0 = self._waits()
        self._thread.start()

    def stop(self) -> dict[str, float | dict[str, float]]:
        self._stop.set()
        self._thread.join()
        self._sample()
        by_role: dict[str, float] = {"front_end": 0.0, "engine_core": 0.0, "model_worker": 0.0}
        for pid, last in self._last.items():
            by_role[self._roles[pid]] += last - self._first[pid]
        # Waiting for a core, by role: where the machine is oversubscribed, and who pays for it.
        wait_by_role = dict.fromkeys(by_role, 0.0)
        for pid, wait in self._waits().items():
            if pid in self._wait0 and pid in self._roles:
                wait_by_role[self._roles[pid]] += wait - self._wait0[pid]
        return {
            "server_cpu_s": round(sum(by_role.values()), 2),
            "server_cpu_s_by_role": {k: round(v, 2) for k, v in by_role.items()},
            "server_runqueue_wait_s_by_role": {k: round(v, 2) for k, v in wait_by_role.items()},
            "server_peak_rss_mb": round(self.peak_rss / 2**20, 1),
        }
