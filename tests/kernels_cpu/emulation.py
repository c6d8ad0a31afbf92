"""Marks for tests that cannot work under qemu user-mode emulation (.ci/aarch64), and the
CPU names that stand for a plain CPU of each architecture.

Under qemu-aarch64 without binfmt_misc the kernel cannot exec an aarch64 interpreter, so a
test that starts a child Python fails at once; qemu also accepts madvise and does nothing, so
a test of its effect on page faults sees read-ahead. Both are skipped there, not deleted: on
real hardware (or with binfmt_misc registered, for children) they run.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from functools import cache

import pytest

EMULATION = os.environ.get("LLMAPP_EMULATION", "")
"""Set by .ci/aarch64 (e.g. "qemu-aarch64"): this process runs under user-mode emulation."""

PLAIN_CPU = {"x86_64": "x86-64-v3", "aarch64": "cortex-a72", "arm64": "cortex-a72"}
"""Per architecture, an LLVM CPU name for a common CPU without the instructions that the
kernels use where the host has them: x86-64-v3 (AVX2 and FMA, no AVX-512: most laptops),
cortex-a72 (NEON without dotprod: Raspberry Pi 4). LLVM rejects another architecture's names
(on aarch64, x86-64-v3 aborts compilation)."""


def _cpuinfo_is_foreign() -> bool:
    # qemu user mode passes the host's /proc/cpuinfo through: an x86 one on an aarch64 process.
    if platform.machine() not in ("aarch64", "arm64") or sys.platform != "linux":
        return False
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "vendor_id" in text and "CPU implementer" not in text


def emulated() -> bool:
    """Whether this process runs under user-mode emulation (qemu), as far as it can tell."""
    return bool(EMULATION) or _cpuinfo_is_foreign()


@cache
def can_start_child() -> bool:
    """Whether a child interpreter starts (not under qemu user mode without binfmt_misc)."""
    try:
        done = subprocess.run([sys.executable, "-c", "pass"], capture_output=True, timeout=120)
    except OSError:  # ENOEXEC: the kernel cannot run this interpreter's binary by itself
        return False
    return done.returncode == 0


needs_child_interpreter = pytest.mark.skipif(
    not can_start_child(),
    reason="starts a child interpreter, which cannot start here (qemu user mode without "
    "binfmt_misc)",
)
"""For tests that run Python in a child process."""

needs_real_madvise = pytest.mark.skipif(
    emulated(), reason="depends on madvise's effect, which qemu user mode ignores"
)
"""For tests of what madvise does to page faults."""
