"""The engine's lifecycle details that the HTTP tests cannot see (engine.py), and the /proc helpers they use."""

from __future__ import annotations

import gc
import os
import re
import shutil
import subprocess
import sys

import pytest

from qwen_server import procs
from qwen_server.engine.lifecycle import _freeze_heap
from tests.helpers.serverproc import ServerProcess


def test_freeze_heap_moves_live_objects_out_of_gc() -> None:
    keep = [{"n": i} for i in range(10_000)]
    # Other threads of this process (the image server's poll loop) free objects that may just have
    # been frozen, which lowers the count; a long switch interval keeps them off the GIL until it is read.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(60)
    try:
        frozen = _freeze_heap()
        count = gc.get_freeze_count()
    finally:
        sys.setswitchinterval(interval)
    try:
        assert frozen == count
        assert frozen >= len(keep)
        in_reach = {id(o) for o in gc.get_objects()}  # the collector's generations, without the frozen
        assert not any(id(d) in in_reach for d in keep)
    finally:
        gc.unfreeze()


def test_real_worker_froze_its_startup_heap(server: ServerProcess) -> None:
    # torch + transformers + vLLM leave ~700k objects; the worker reports how many it froze.
    found = re.search(r"(\d+) startup objects frozen out of GC", server.log())
    assert found, server.log()[-2000:]
    assert int(found.group(1)) > 100_000


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


_UNPRIVILEGED_WORKER = """
import logging, os, subprocess, sys
from qwen_server.engine.lifecycle import _renice_engine
logging.basicConfig(level=logging.INFO, format="%(message)s")
os.nice(5)  # a server started with `nice -n 5`, say
engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # inherits it
try:
    _renice_engine(os.getpriority(os.PRIO_PROCESS, 0) - 3)  # --engine-nice below the worker's own
    print(os.getpriority(os.PRIO_PROCESS, engine.pid) - os.getpriority(os.PRIO_PROCESS, 0))
finally:
    engine.kill()
"""


def test_engine_nice_that_would_raise_priority_is_skipped_with_a_warning_when_unprivileged() -> None:
    # A real unprivileged process: root drops CAP_SYS_NICE (util-linux's setpriv) so that raising a
    # priority fails with EACCES, as it does for any other user.
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("root without setpriv: cannot drop CAP_SYS_NICE")
        prefix = ["setpriv", "--bounding-set", "-sys_nice"]
    run = subprocess.run([*prefix, sys.executable, "-c", _UNPRIVILEGED_WORKER],
                         check=False, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "0"  # the engine keeps the worker's nice
    assert re.search(r"engine processes left at this worker's nice \d+: \d+ would raise their priority", run.stderr)


def test_real_engine_core_runs_below_the_front_end(server: ServerProcess) -> None:
    # The session server runs with the default --engine-nice 10 on vLLM's CPU engine: EngineCore (it
    # floats) at 10; the model worker, whose model thread vLLM pinned, and this worker at the run's nice.
    tree = procs.descendants(server.proc.pid)
    worker = next(pid for pid in tree if (i := procs.info(pid)) and i.cmdline.endswith("worker-1"))

    def nice_of(title: str) -> set[int]:
        pids = [pid for pid in procs.descendants(worker) if (i := procs.info(pid)) and i.cmdline.startswith(title)]
        assert pids, title
        return {os.getpriority(os.PRIO_PROCESS, t) for pid in pids for t in procs.threads(pid)}

    mine = os.getpriority(os.PRIO_PROCESS, 0)  # the server inherits the test run's
    assert nice_of("VLLM::EngineCore") == {10}
    pinned = any(len(c) == 1 for pid in procs.descendants(worker) for c in procs.thread_cpus(pid))
    assert nice_of("VLLM::Worker") == ({mine} if pinned else {10})
    assert {os.getpriority(os.PRIO_PROCESS, t) for t in procs.threads(worker)} == {mine}
    assert re.search(r"engine processes not pinned to cores run at nice 10 \(\d+ threads\)", server.log())


def test_real_worker_stays_off_the_cores_vllm_pinned(server: ServerProcess) -> None:
    tree = procs.descendants(server.proc.pid)
    worker = next(pid for pid in tree if (i := procs.info(pid)) and i.cmdline.endswith("worker-1"))
    pinned = set()
    for pid in procs.descendants(worker):
        pinned |= set().union(*(c for c in procs.thread_cpus(pid) if len(c) == 1))
    if not pinned or pinned >= os.sched_getaffinity(0):
        pytest.skip(f"vLLM pinned {sorted(pinned)} of {sorted(os.sched_getaffinity(0))}: no other core to move to")
    worker_cpus = procs.thread_cpus(worker)
    assert worker_cpus, "no threads read"
    assert all(not (cpus & pinned) for cpus in worker_cpus), (pinned, worker_cpus)
    assert "front end kept off the engine's pinned cores" in server.log()
