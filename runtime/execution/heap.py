"""The C heap's policy for a process that loads a model and generates (glibc only)."""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any


def return_large_allocations() -> None:
    """Make the C heap hand allocations of 1 MiB and more straight to the system and back.

    For a process that loads one model and generates (`llmapp run`, `chat`, `serve`): the
    imports, the kernels' cache and the packing leave glibc's heap fragmented with their
    temporaries, ~25 MB of a small model's peak RSS (Gemma 3 270M: 534 -> 509 MB). Until the
    model is loaded (settle_after_load). glibc only; elsewhere nothing."""
    global _returning
    lib = _libc()
    if lib is not None:
        lib.mallopt(_M_MMAP_THRESHOLD, 1 << 20)
        _returning = True


def settle_after_load() -> None:
    """Once a model is loaded: give back what the heap holds free, and let buffers up to 32 MiB
    come from the heap again (a prompt's activations; mapping them fresh at every step cost
    prefill ~14%). Does nothing unless return_large_allocations() was called."""
    lib = _libc()
    if lib is not None and _returning:
        lib.malloc_trim(0)
        lib.mallopt(_M_MMAP_THRESHOLD, 32 << 20)


_M_MMAP_THRESHOLD = -3
_returning = False


@functools.cache
def _libc() -> Any:
    if sys.platform != "linux":
        return None
    try:
        lib = ctypes.CDLL(None)
        lib.mallopt, lib.malloc_trim  # noqa: B018 (glibc has both; musl has neither)
    except (OSError, AttributeError):
        return None
    return lib
