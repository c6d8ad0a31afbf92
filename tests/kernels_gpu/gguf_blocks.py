"""Random GGUF rows for kernels_gpu's tests: any byte pattern, with finite, sane f16 scales.

A module of its own (not conftest.py) so the test files of this folder share it by import.
"""

from __future__ import annotations

import numpy as np

from llmapp.kernels_gpu import quants

# byte ranges of each block's f16 scale fields: filled with finite values so comparisons
# never meet NaN payloads
F16_FIELDS = {
    quants.Q4_0: [(0, 2)],
    quants.Q4_1: [(0, 4)],
    quants.Q5_0: [(0, 2)],
    quants.Q5_1: [(0, 4)],
    quants.Q8_0: [(0, 2)],
    quants.IQ4_NL: [(0, 2)],
    quants.Q2_K: [(80, 84)],
    quants.Q3_K: [(108, 110)],
    quants.Q4_K: [(0, 4)],
    quants.Q5_K: [(0, 4)],
    quants.Q6_K: [(208, 210)],
}


def random_rows(
    ggml_type: int,
    rng: np.random.Generator,
    n_rows: int,
    row_len: int,
    scale: float = 0.01,
) -> np.ndarray:
    """uint8 [n_rows, row_bytes]; `scale` sizes the blocks' f16 scales (float types: values)."""
    values = rng.standard_normal((n_rows, row_len)).astype(np.float32) * (scale * 100)
    if ggml_type == quants.F32:
        return values.view(np.uint8)
    if ggml_type == quants.F16:
        return values.astype(np.float16).view(np.uint8)
    if ggml_type == quants.BF16:
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    block, nbytes = quants.TRAITS[ggml_type]
    raw = rng.integers(0, 256, (n_rows, row_len // block, nbytes), dtype=np.uint8)
    for lo, hi in F16_FIELDS[ggml_type]:
        scales = rng.standard_normal((n_rows, row_len // block, (hi - lo) // 2)) * scale
        raw[:, :, lo:hi] = scales.astype(np.float16).view(np.uint8)
    return raw.reshape(n_rows, -1)
