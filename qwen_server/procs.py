"""Process facts read from /proc (Linux): parents, children, command lines; and ending a tree."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from typing import Any


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
    """SIGTERM each process, wait up to `grace` seconds, SIGKILL the rest; return the killed ones.
    multiprocessing resource trackers among them go last: they ignore SIGTERM and exit once the
    processes they served are gone, after removing what those left (see `stop_resource_tracker`);
    they get `grace` seconds for that after the others have ended."""
    trackers = [p for p in pids if is_resource_tracker(p)]
    others = [p for p in pids if p not in trackers]
    killed = _terminate(others, signal.SIGTERM, grace)
    return killed + _terminate(trackers, None, grace)


def _terminate(pids: list[int], first: int | None, grace: float) -> list[int]:
    if first is not None:
        for pid in pids:
            signal_quietly(pid, first)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    killed = [p for p in pids if alive(p)]
    for pid in killed:
        signal_quietly(pid, signal.SIGKILL)
    return killed


_RESOURCE_TRACKER_MAIN = "from multiprocessing.resource_tracker import main"  # its spawn command line


def is_resource_tracker(pid: int) -> bool:
    """Whether `pid` is a multiprocessing resource tracker (of any process: vLLM's EngineCore and the
    workers of a --no-shared-engine server each start one)."""
    found = info(pid)
    return found is not None and _RESOURCE_TRACKER_MAIN in found.cmdline


def terminate_children(pid: int, grace: float) -> None:
    """End every process below `pid` (children first get SIGTERM, then SIGKILL), except this
    process's multiprocessing resource tracker (see `stop_resource_tracker`)."""
    tracker = resource_tracker_pid() if pid == os.getpid() else None
    tree = [p for p in descendants(pid) if p != tracker]
    if tree:
        terminate(tree, grace)


def resource_tracker_pid() -> int | None:
    """The pid of this process's multiprocessing resource tracker, if it started one (the stdlib keeps
    it in private state: `resource_tracker._resource_tracker._pid`)."""
    from multiprocessing import resource_tracker

    pid = getattr(resource_tracker._resource_tracker, "_pid", None)
    return pid if isinstance(pid, int) else None


def stop_resource_tracker(grace: float) -> bool:
    """Let this process's multiprocessing resource tracker finish its work and exit; True if it did
    within `grace` seconds (else it is killed).

    The tracker ignores SIGTERM and SIGINT. It exits when the last holder of its pipe closes it,
    after unlinking what the processes it served left registered: the shared-memory ring buffers
    (160 MiB each in /dev/shm) of a vLLM EngineCore killed before it removed them, which is how vLLM
    stops its engine by default. SIGKILLing the tracker instead leaks those segments for good.
    The stdlib's own `_stop()` closes the pipe, then waits for the tracker with no time limit."""
    from multiprocessing import resource_tracker

    tracker: Any = resource_tracker._resource_tracker
    fd, pid = getattr(tracker, "_fd", None), resource_tracker_pid()
    if fd is None or pid is None:
        return True
    tracker._fd = None
    with contextlib.suppress(OSError):
        os.close(fd)
    deadline = time.monotonic() + grace
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # already reaped
            done = pid
        if done == pid:
            tracker._pid = None
            return True
        if time.monotonic() > deadline:
            signal_quietly(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            tracker._pid = None
            return False
        time.sleep(0.02)


def signal_quietly(pid: int, sig: int) -> None:
    """Send `sig`; a process that is already gone (or not ours) is not an error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
