"""Each worker's share of the CPUs (cpushare.py): the split. Claims by real processes, on the CPU list
vLLM reads: tests/integration/test_cpushare.py."""

from __future__ import annotations

from types import SimpleNamespace

from qwen_server.engine import cpushare


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
