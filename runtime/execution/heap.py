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
    temporaries, ~25 MB of a small model's peak RSS (Gemma 3 270M: 534 -> 509 MB). The cost is
    a page fault per 4 KB of each such buffer a step allocates: a decode step's logits (1 MB
    for a 262k vocabulary), a prompt chunk's activations. glibc only; elsewhere nothing."""
    lib = _libc()
    if lib is not None:
        m_mmap_threshold = -3
        lib.mallopt(m_mmap_threshold, 1 << 20)


@functools.cache
def _libc() -> Any:
    if sys.platform != "linux":
        return None
    try:
        lib = ctypes.CDLL(None)
        lib.mallopt  # noqa: B018 (glibc has it; musl does not)
    except (OSError, AttributeError):
        return None
    return lib
