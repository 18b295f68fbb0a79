"""Each worker's share of the CPUs (cpushare.py), claimed by real processes on the CPU list vLLM
reads (vLLM's own cpu_resource_utils: imported here, so not a unit test). The split itself:
tests/unit/engine/test_cpushare.py."""

from __future__ import annotations

import multiprocessing
import os

import pytest

from qwen_server.engine import cpushare
from qwen_server.settings import Settings
from qwen_server.testing.servers import free_port


def _claimant(port: int, report, release) -> None:
    lock = cpushare.claim(Settings(workers=2, port=port))
    report.send((lock is not None, sorted(os.sched_getaffinity(0))))
    release.wait(30)  # hold the claim (as a worker does while it lives) until the test lets go


def test_two_workers_claim_different_shares_and_a_freed_share_is_taken_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    # Shares of one core, so that two fit on a 2-core machine: the locks and affinity are what is
    # tested here, the two-core minimum in tests/unit/engine/test_cpushare.py.
    monkeypatch.setattr(cpushare, "_MIN_CORES", 1)
    if not cpushare.split(get_allowed_cpu_list(), 2):
        pytest.skip("one physical core: nothing to split (the unit tests of the split cover the rule)")
    ctx = multiprocessing.get_context("fork")  # vLLM is imported once, here, not in every claimant
    port = free_port()
    releases: list = []

    def start() -> tuple[multiprocessing.Process, tuple[bool, list[int]]]:
        ours, theirs = ctx.Pipe()
        release = ctx.Event()
        releases.append(release)
        child = ctx.Process(target=_claimant, args=(port, theirs, release))
        child.start()
        assert ours.poll(60), "no claim reported"
        return child, ours.recv()

    first, (claimed_a, cpus_a) = start()
    second, (claimed_b, cpus_b) = start()
    try:
        assert claimed_a and claimed_b
        assert cpus_a and cpus_b and not set(cpus_a) & set(cpus_b)
        assert set(cpus_a) | set(cpus_b) == os.sched_getaffinity(0)
        releases[0].set()  # the first worker ends: its share is free again
        first.join(30)
        third, (claimed_c, cpus_c) = start()
        assert claimed_c and cpus_c == cpus_a
        releases[2].set()
        third.join(30)
    finally:
        for release in releases:
            release.set()
        for child in (first, second):
            child.join(30)
