"""Threading setup for the Numba kernels; import this before any parallel kernel runs.

Measured on 2-vCPU Zen 5 machines (REFERENCE.md section 5): the omp layer spin-waits between
parallel regions and, with 2 threads on 2 cores, ran 4x slower than one thread until the wait
policy was PASSIVE; an empty 2-thread region then costs ~3-10 us, against ~17-60 us for the
workqueue layer (tbb ~3 us, but it is not a dependency). So: omp with OMP_WAIT_POLICY=PASSIVE,
then tbb, then workqueue where neither runtime exists. The variable only counts if it is set
before the OpenMP runtime loads, at the first parallel launch or set_num_threads call; every
kernel module imports this one first.

Compute threads must not outnumber free cores (a busy second core made a 2-thread call take
milliseconds), so the default is the number of physical cores.
"""

from __future__ import annotations

import os
from pathlib import Path

import numba

_LAYER_ORDER = ["omp", "tbb", "workqueue"]


def _configure_layer() -> None:
    # A user's explicit choice wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
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
