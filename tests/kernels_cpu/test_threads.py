"""Core counting on faked macOS sysctls and Linux topologies (threads.physical_cores)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from llmapp.kernels_cpu import threads


def fake_sysctl(monkeypatch: pytest.MonkeyPatch, values: dict[str, int]) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(threads, "_sysctl_int", values.get)


def test_apple_silicon_counts_performance_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    # An M2 Pro: 8 performance and 4 efficiency cores, no SMT.
    fake_sysctl(
        monkeypatch,
        {"hw.perflevel0.physicalcpu": 8, "hw.perflevel1.physicalcpu": 4, "hw.physicalcpu": 12},
    )
    assert threads.physical_cores() == 8


def test_intel_mac_counts_physical_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before macOS 12 there is no perflevel0; hw.physicalcpu counts hyperthreaded cores once.
    fake_sysctl(monkeypatch, {"hw.physicalcpu": 6, "hw.logicalcpu": 12})
    assert threads.physical_cores() == 6


def test_mac_without_sysctl_uses_every_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_sysctl(monkeypatch, {})
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 10)
    assert threads.physical_cores() == 10


def test_sysctl_missing_reads_as_none() -> None:
    assert threads._sysctl_int("hw.no.such.value") is None


def fake_sysfs(root: Path, cores: Sequence[tuple[str, int | None]]) -> None:
    """cpuN/topology/thread_siblings_list and cpuN/cpu_capacity (None: no such file)."""
    for cpu, (siblings, capacity) in enumerate(cores):
        topology = root / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(siblings + "\n")
        if capacity is not None:
            (root / f"cpu{cpu}" / "cpu_capacity").write_text(f"{capacity}\n")


def linux_with(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cores: Sequence[tuple[str, int | None]]
) -> None:
    fake_sysfs(tmp_path / "cpu", cores)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(threads, "CPU_SYSFS", tmp_path / "cpu")
    monkeypatch.setattr(threads, "INTEL_CORE_CPUS", tmp_path / "cpu_core" / "cpus")
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: set(range(len(cores))))


def test_big_little_board_counts_big_cores(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # RK3588: four Cortex-A55 (capacity 530) and four Cortex-A76 (1024).
    cores = [(str(c), 530 if c < 4 else 1024) for c in range(8)]
    linux_with(monkeypatch, tmp_path, cores)
    assert threads.physical_cores() == 4


def test_uniform_arm_board_counts_every_core(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Raspberry Pi 5 (four Cortex-A76), and a kernel that shows no capacities at all.
    linux_with(monkeypatch, tmp_path, [(str(c), 1024) for c in range(4)])
    assert threads.physical_cores() == 4
    linux_with(monkeypatch, tmp_path / "bare", [(str(c), None) for c in range(4)])
    assert threads.physical_cores() == 4


def test_hyperthreads_count_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    linux_with(monkeypatch, tmp_path, [("0,2", None), ("1,3", None), ("0,2", None), ("1,3", None)])
    assert threads.physical_cores() == 2


def test_intel_hybrid_counts_performance_cores(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Two hyperthreaded P-cores (cpus 0-3) and four E-cores (4-7).
    cores = [("0-1", None), ("0-1", None), ("2-3", None), ("2-3", None)]
    cores += [(str(c), None) for c in range(4, 8)]
    linux_with(monkeypatch, tmp_path, cores)
    (tmp_path / "cpu_core").mkdir()
    (tmp_path / "cpu_core" / "cpus").write_text("0-3\n")
    assert threads.physical_cores() == 2
    # Pinned to E-cores only: those are the ones to use.
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {5, 6})
    assert threads.physical_cores() == 2


def test_cpu_list_format() -> None:
    assert threads._cpu_list("0-3,8,10-11\n") == {0, 1, 2, 3, 8, 10, 11}
    assert threads._cpu_list("") == set()


def test_front_ends_count_as_the_kernels() -> None:
    from llmapp.runtime.execution.backend import physical_cores

    assert physical_cores() == threads.physical_cores()
