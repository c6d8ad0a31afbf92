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

import os
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


def _sibling_sets(cpus: set[int]) -> set[str]:
    sets = set()
    for cpu in cpus:
        path = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            sets.add(path.read_text().strip())
        except OSError:
            sets.add(str(cpu))
    return sets


def physical_cores() -> int:
    """Physical cores this process may run on (hyperthread siblings counted once)."""
    try:
        cpus = set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return max(1, (os.cpu_count() or 2) // 2)
    return max(1, len(_sibling_sets(cpus)))


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
