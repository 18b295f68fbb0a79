"""The /proc helpers (qwen_server/procs.py) on real processes: threads, CPU affinity, nice."""

from __future__ import annotations

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
