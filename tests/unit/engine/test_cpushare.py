"""Each worker's share of the CPUs (cpushare.py): the split, and claims by real processes."""

from __future__ import annotations

import multiprocessing
import os
from types import SimpleNamespace

import pytest

from qwen_server.engine import cpushare
from qwen_server.settings import Settings
from qwen_server.testing.servers import free_port


def cpu(id: int, core: int, node: int = 0) -> SimpleNamespace:
    return SimpleNamespace(id=id, physical_core=core, numa_node=node)


def test_split_keeps_hyperthreads_together_and_nodes_apart() -> None:
    # 2 nodes x 4 cores x 2 threads, Linux's usual numbering (siblings n and n+8).
    cpus = [cpu(i, i % 8, (i % 8) // 4) for i in range(16)]
    assert cpushare.split(cpus, 2) == [{0, 1, 2, 3, 8, 9, 10, 11}, {4, 5, 6, 7, 12, 13, 14, 15}]
    assert cpushare.split(cpus, 4) == [{0, 1, 8, 9}, {2, 3, 10, 11}, {4, 5, 12, 13}, {6, 7, 14, 15}]


def test_physical_cores_groups_hyperthreads_in_node_order() -> None:
    cpus = [cpu(3, 1, 1), cpu(0, 0), cpu(2, 0, 1), cpu(1, 0)]  # listed out of order
    assert cpushare.physical_cores(cpus) == [{0, 1}, {2}, {3}]


def test_split_spreads_a_remainder_and_gives_no_share_under_two_cores() -> None:
    cpus = [cpu(i, i) for i in range(5)]
    assert cpushare.split(cpus, 2) == [{0, 1, 2}, {3, 4}]
    assert cpushare.split(cpus, 3) == []  # a core for the model and one for the rest, per share
    assert cpushare.split([cpu(0, 0), cpu(1, 1)], 2) == []


def _claimant(port: int, report, release) -> None:
    lock = cpushare.claim(Settings(workers=2, port=port))
    report.send((lock is not None, sorted(os.sched_getaffinity(0))))
    release.wait(30)  # hold the claim (as a worker does while it lives) until the test lets go


def test_two_workers_claim_different_shares_and_a_freed_share_is_taken_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "auto")
    # Shares of one core, so that two fit on a 2-core machine: the locks and affinity are what is
    # tested here, the two-core minimum above.
    monkeypatch.setattr(cpushare, "_MIN_CORES", 1)
    if not cpushare.split(get_allowed_cpu_list(), 2):
        pytest.skip("one physical core: nothing to split (the split tests above cover the rule)")
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
