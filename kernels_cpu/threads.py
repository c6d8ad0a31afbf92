"""Threading setup for the Numba kernels; import this before any parallel kernel runs.

Layer: omp (libgomp), else tbb, else workqueue. An empty 2-thread region costs ~1.2 us with omp
when its worker is still spinning, against ~60 us for workqueue (tbb is not a dependency).

Wait policy, measured on this 2-vCPU VM: a sleeping omp worker takes 25-50 us to wake, so with
OMP_WAIT_POLICY=PASSIVE (no spin, as REFERENCE.md section 5 suggests) every launch pays that:
the one-row ffn_up matmul took 92 us on 2 threads against 99 us on 1, and the matmuls of a
Qwen2.5-0.5B decode step 18.1 ms against 22.0 ms. A short bounded spin keeps the worker awake
between the launches of a step: with GOMP_SPINCOUNT 1000-30000 the same step took 13.8-14.2 ms
and the one-row matmul 50 us. Spinning costs when another process holds the second core (a
busy loop there): 35 ms at 3000, 93-268 ms at 30000, 23 ms passive. 3000 (~50-100 us of spin
here) covers the gaps inside a step and bounds that loss; ACTIVE would hold a core whenever
the engine idles. Set OMP_WAIT_POLICY=PASSIVE to share a busy machine.
Environment variables only count if set before libgomp loads, at the first parallel launch or
set_num_threads call; every kernel module imports this one first, and a user's own
OMP_WAIT_POLICY / GOMP_SPINCOUNT win.

Compute threads must not outnumber free cores (a busy second core made a 2-thread call take
milliseconds), so the default is the number of physical cores.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import numba

_LAYER_ORDER = ["omp", "tbb", "workqueue"]
SPIN_COUNT = "3000"


def _configure_layer() -> None:
    # A user's explicit choice wins.
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER_PRIORITY = list(_LAYER_ORDER)  # type: ignore[attr-defined]


_configure_layer()


CPU_SYSFS = Path("/sys/devices/system/cpu")
"""Linux's per-CPU topology (a parameter for tests)."""
INTEL_CORE_CPUS = Path("/sys/devices/cpu_core/cpus")
"""The performance cores of an Intel hybrid CPU under Linux (absent elsewhere)."""


def _sibling_sets(cpus: set[int]) -> set[str]:
    sets = set()
    for cpu in cpus:
        path = CPU_SYSFS / f"cpu{cpu}" / "topology" / "thread_siblings_list"
        try:
            sets.add(path.read_text().strip())
        except OSError:
            sets.add(str(cpu))
    return sets


def _cpu_list(text: str) -> set[int]:
    # Linux's cpulist format: "0-3,8,10-11"
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            first, _, last = part.partition("-")
            cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def _performance_cpus(cpus: set[int]) -> set[int]:
    """The fastest kind of the CPUs given, where Linux tells kinds apart: cpu_capacity (arm64
    big.LITTLE, e.g. RK3588's Cortex-A76 beside A55s) or Intel's cpu_core list; all of them
    otherwise, or when none of the fast ones may be used."""
    try:
        capacity = {c: int((CPU_SYSFS / f"cpu{c}" / "cpu_capacity").read_text()) for c in cpus}
    except (OSError, ValueError):
        capacity = {}
    if capacity:
        top = max(capacity.values())
        return {c for c, cap in capacity.items() if cap == top}
    try:
        fast = cpus & _cpu_list(INTEL_CORE_CPUS.read_text())
    except (OSError, ValueError):
        fast = set()
    return fast or cpus


def _sysctl_int(name: str) -> int | None:
    """An integer sysctl read by name (macOS), or None where there is no such value."""
    try:
        libc = ctypes.CDLL(None)
        sysctlbyname = libc.sysctlbyname
    except (OSError, AttributeError):  # Linux's libc has no sysctlbyname
        return None
    value = ctypes.c_int64(0)  # hw.* counts are 32-bit; zeros above them read back the same
    size = ctypes.c_size_t(ctypes.sizeof(value))
    if sysctlbyname(name.encode(), ctypes.byref(value), ctypes.byref(size), None, 0) != 0:
        return None
    return int(value.value)


def _macos_cores() -> int:
    # Apple Silicon has no SMT but two kinds of core; perflevel0 is the performance cores
    # (absent before macOS 12, where hw.physicalcpu counts each core once).
    for name in ("hw.perflevel0.physicalcpu", "hw.physicalcpu"):
        count = _sysctl_int(name)
        if count is not None and count > 0:
            return count
    return max(1, os.cpu_count() or 1)


def physical_cores() -> int:
    """The kernels' default thread count: physical cores this process may run on, hyperthread
    siblings counted once, and only the performance cores where the OS tells core kinds apart
    (macOS's perflevel0; Linux's cpu_capacity or Intel's cpu_core).

    Tiles are split evenly over the threads, so a thread on an efficiency core would hold up
    every launch: the slower cores are better left to the rest of the system.
    """
    if sys.platform == "darwin":
        return _macos_cores()
    try:
        cpus = set(os.sched_getaffinity(0))
    except AttributeError:  # neither Linux nor macOS: assume two threads per core
        return max(1, (os.cpu_count() or 2) // 2)
    return max(1, len(_sibling_sets(_performance_cpus(cpus))))


def max_threads() -> int:
    """Upper bound for set_num_threads (Numba fixes its pool size at startup)."""
    return int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]


def set_num_threads(n: int | None = None) -> int:
    """Threads used by the parallel kernels; None means the physical cores. Returns the count."""
    want = physical_cores() if n is None or n <= 0 else n
    count = max(1, min(want, max_threads()))
    numba.set_num_threads(count)
    return count


def get_num_threads() -> int:
    return int(numba.get_num_threads())


def threading_layer() -> str:
    """The layer in use; valid only after a parallel kernel has run once."""
    try:
        return str(numba.threading_layer())
    except ValueError:
        return "not started"


set_num_threads(None)
