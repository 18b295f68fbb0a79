"""The /proc helpers (qwen_server/procs.py) on real processes: threads, CPU affinity, nice, and
multiprocessing's resource tracker."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from qwen_server import procs


def test_thread_cpus_pinned_cpus_and_restrict_cpus_on_a_real_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        mine = os.sched_getaffinity(0)
        assert procs.pinned_cpus(child.pid) == (mine if len(mine) == 1 else set())  # inherited, unpinned
        one = {min(mine)}
        procs.restrict_cpus(child.pid, one)
        assert procs.thread_cpus(child.pid) == [one]
        assert procs.pinned_cpus(child.pid) == one
    finally:
        child.kill()
        child.wait()
    # Gone: nothing, no error.
    assert procs.threads(child.pid) == []
    assert procs.thread_cpus(child.pid) == []
    assert procs.pinned_cpus(child.pid) == set()
    procs.restrict_cpus(child.pid, one)


def test_renice_sets_every_thread_of_a_real_process() -> None:
    code = (
        "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); "
        "print(flush=True); time.sleep(60)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        child.stdout.readline()  # its second thread runs
        tids = procs.threads(child.pid)
        assert len(tids) == 2
        assert procs.renice(child.pid, 7) == 2
        assert [os.getpriority(os.PRIO_PROCESS, t) for t in tids] == [7, 7]
    finally:
        child.kill()
        child.wait()
    assert procs.renice(child.pid, 7) == 0  # gone: nothing, no error


_TRACKER_SCRIPT = """
import json, os, sys
from multiprocessing import shared_memory
from qwen_server import procs

shm = shared_memory.SharedMemory(create=True, size=4096)  # registered with a new resource tracker
shm.close()  # mapped no more, never unlinked: what a SIGKILLed vLLM EngineCore leaves
path = "/dev/shm/" + shm.name.lstrip("/")
tracker = procs.resource_tracker_pid()
procs.terminate_children(os.getpid(), grace=1.0)
survived = tracker is not None and procs.alive(tracker)
left_before = os.path.exists(path)
finished = procs.stop_resource_tracker(grace=10.0)
print(json.dumps([tracker is not None, survived, left_before, finished, procs.alive(tracker), os.path.exists(path)]))
"""


def test_the_resource_tracker_survives_terminate_children_then_removes_what_was_left() -> None:
    """The launcher ends its children with terminate_children; multiprocessing's resource tracker
    ignores that SIGTERM and, SIGKILLed after the grace, would leak what it tracks. It is spared,
    and stop_resource_tracker lets it unlink the leftover segment and exit."""
    done = subprocess.run([sys.executable, "-c", _TRACKER_SCRIPT], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    started, survived, left_before, finished, alive_after, left_after = json.loads(done.stdout)
    assert started and survived and left_before  # the setup is what it claims
    assert finished and not alive_after
    assert not left_after
    assert "leaked shared_memory" in done.stderr  # the tracker's own report of its clean-up


_TRACKED_SLEEPER = """
import sys, time
from multiprocessing import shared_memory
from qwen_server import procs

shm = shared_memory.SharedMemory(create=True, size=4096)
shm.close()
print(procs.resource_tracker_pid(), "/dev/shm/" + shm.name.lstrip("/"), flush=True)
time.sleep(60)
"""


def test_terminate_ends_a_process_then_lets_its_resource_tracker_clean_up_and_exit() -> None:
    """What the launcher's orphan reaper and its final clean-up do to a dead worker's tree: the
    process gets SIGTERM; its tracker, which ignores SIGTERM, is not killed but waited for, and removes
    the shared memory the process left."""
    proc = subprocess.Popen([sys.executable, "-c", _TRACKED_SLEEPER], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        tracker_s, path = proc.stdout.readline().split()
        tracker = int(tracker_s)
        assert procs.is_resource_tracker(tracker) and not procs.is_resource_tracker(proc.pid)
        assert os.path.exists(path)
        killed = procs.terminate([tracker, proc.pid], grace=10.0)
        proc.wait(10)
    finally:
        proc.kill()
    assert killed == []  # the process went on SIGTERM, the tracker by itself
    assert not procs.alive(tracker)
    assert not os.path.exists(path)
