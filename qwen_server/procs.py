"""Process facts read from /proc (Linux): parents, children, command lines; and ending a tree."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProcInfo:
    pid: int
    ppid: int
    cmdline: str

    @property
    def short(self) -> str:
        return self.cmdline if len(self.cmdline) <= 160 else self.cmdline[:157] + "..."


def info(pid: int) -> ProcInfo | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name in stat may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    if fields and fields[0] == "Z":  # a zombie holds nothing; treat it as gone
        return None
    return ProcInfo(pid=pid, ppid=int(fields[1]), cmdline=cmdline)


def zombie_children(pid: int) -> list[tuple[int, str]]:
    """(pid, command name) of the children of `pid` that have exited and wait to be reaped."""
    found = []
    for other in all_pids():
        try:
            with open(f"/proc/{other}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and fields[0] == "Z" and int(fields[1]) == pid:
            found.append((other, stat[stat.find("(") + 1 : stat.rfind(")")]))
    return found


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def children(pid: int) -> list[int]:
    result = []
    for other in all_pids():
        proc = info(other)
        if proc is not None and proc.ppid == pid:
            result.append(other)
    return result


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, parents before children."""
    parents: dict[int, list[int]] = {}
    for other in all_pids():
        proc = info(other)
        if proc is not None:
            parents.setdefault(proc.ppid, []).append(other)
    found, frontier = [], [pid]
    while frontier:
        nxt = []
        for p in frontier:
            for child in parents.get(p, []):
                found.append(child)
                nxt.append(child)
        frontier = nxt
    return found


def threads(pid: int) -> list[int]:
    """The ids of `pid`'s current threads; none once the process is gone."""
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []


def thread_cpus(pid: int) -> list[set[int]]:
    """The CPUs each thread of `pid` may run on (affinity is per thread on Linux)."""
    found = []
    for tid in threads(pid):
        try:
            found.append(os.sched_getaffinity(tid))
        except OSError:  # the thread ended meanwhile
            continue
    return found


def pinned_cpus(pid: int) -> set[int]:
    """The cores that a thread of `pid` is pinned to, one core per thread (vLLM's CPU model threads)."""
    return set().union(*(cpus for cpus in thread_cpus(pid) if len(cpus) == 1))


def restrict_cpus(pid: int, cpus: set[int]) -> None:
    """Allow every current thread of `pid` only `cpus`; threads started later inherit their creator's."""
    for tid in threads(pid):
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # the thread ended meanwhile
            continue


def renice(pid: int, nice: int) -> int:
    """Set every current thread of `pid` to `nice` (Linux keeps it per thread; threads started later
    inherit their creator's). Returns how many threads were changed. Raises PermissionError for a
    value below the current one without the privilege to raise priority."""
    changed = 0
    for tid in threads(pid):
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
            changed += 1
        except ProcessLookupError:  # the thread ended meanwhile
            continue
    return changed


def alive(pid: int) -> bool:
    return info(pid) is not None


def terminate(pids: list[int], grace: float) -> list[int]:
    """SIGTERM each process, wait up to `grace` seconds, SIGKILL the rest; return the killed ones."""
    for pid in pids:
        signal_quietly(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    killed = [p for p in pids if alive(p)]
    for pid in killed:
        signal_quietly(pid, signal.SIGKILL)
    return killed


def terminate_children(pid: int, grace: float) -> None:
    """End every process below `pid` (children first get SIGTERM, then SIGKILL)."""
    tree = descendants(pid)
    if tree:
        terminate(tree, grace)


def signal_quietly(pid: int, sig: int) -> None:
    """Send `sig`; a process that is already gone (or not ours) is not an error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
