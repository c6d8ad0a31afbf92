"""The kernels compiled for a plain CPU of this architecture: no vpermd lookups and no dot-product
instruction (x86-64-v3: AVX2 without AVX-512; aarch64: cortex-a72, NEON without dotprod).

Most laptops lack AVX-512 and many ARM boards lack dotprod, so the portable code paths of
simd.py must give the same results as the ones this machine uses. A subprocess compiles the
decoders, the packing and the int8 matmul for that CPU into its own cache and checks them
against gguf-py.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
from emulation import PLAIN_CPU, needs_child_interpreter

from llmapp.kernels_cpu.blocks import SPECS

SCRIPT = """
import sys
import numpy as np
from gguf.quants import dequantize
import gguf
sys.path.insert(0, sys.argv[1])
from test_matmul import assert_close, make_raw, quantized_input
from llmapp.kernels_cpu import blocks, matmul as mm, quants, simd
assert not simd.HOST_AVX512 and not simd.HOST_DOT and not mm.USE_VNNI
x = np.random.default_rng(1).standard_normal((3, 512)).astype(np.float32)
for kind in blocks.SPECS:
    raw = make_raw(kind, 40, 512)
    want = dequantize(raw, gguf.GGMLQuantizationType(kind)).astype(np.float32)
    np.testing.assert_array_equal(quants.dequantize(raw, kind, 512), want)
    w = mm.pack_weight(raw, kind, 512)
    np.testing.assert_array_equal(mm.unpack_weight(w), want)
    assert_close(mm.matmul(x, w), mm.matmul_ref(quantized_input(x), want), 1e-5)
print("ok", len(blocks.SPECS))
"""


@needs_child_interpreter
def test_kernels_for_a_plain_cpu_match_gguf(tmp_path: Path) -> None:
    cpu = PLAIN_CPU.get(platform.machine())
    if cpu is None:
        pytest.skip(f"no plain CPU name known for {platform.machine()}")
    env = {
        **os.environ,
        "NUMBA_CPU_NAME": cpu,
        "NUMBA_CPU_FEATURES": "",
        "NUMBA_CACHE_DIR": str(tmp_path / "numba"),
    }
    here = str(Path(__file__).parent)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, here], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok", str(len(SPECS))]
