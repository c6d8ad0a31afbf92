"""kernels_gpu dequantization against gguf-py's, bit for bit, for every type the CPU path runs."""

from __future__ import annotations

import numpy as np
import pytest

# before torch: the CPU kernels' OpenMP settings must be in the environment when torch loads
import llmapp.kernels_cpu.threads  # noqa: F401, I001

torch = pytest.importorskip("torch")

import gguf  # noqa: E402
import gguf_blocks  # noqa: E402
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402

from llmapp.kernels_gpu import ops, quants  # noqa: E402

ROW_LEN = 512
N_ROWS = 6


def random_rows(ggml_type: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [N_ROWS, row_bytes] of random blocks with sane scales."""
    return gguf_blocks.random_rows(ggml_type, rng, N_ROWS, ROW_LEN)


@pytest.mark.parametrize("ggml_type", sorted(quants.TRAITS))
def test_dequantize_is_bit_exact(ggml_type: int) -> None:
    raw = random_rows(ggml_type, np.random.default_rng(ggml_type))
    want = gguf_dequantize(raw, gguf.GGMLQuantizationType(ggml_type))
    got = quants.dequantize(torch.from_numpy(raw), ggml_type, ROW_LEN).numpy()
    assert got.shape == (N_ROWS, ROW_LEN)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_every_cpu_type_is_covered() -> None:
    from llmapp.kernels_cpu import quants as cpu_quants

    assert set(cpu_quants.supported_types()) <= set(quants.supported_types())


@pytest.mark.parametrize("ggml_type", [quants.Q4_K, quants.Q8_0, quants.F16])
def test_matmul_tiles_match_one_gemm(ggml_type: int, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = random_rows(ggml_type, np.random.default_rng(1))
    w = ops.pack(torch.from_numpy(raw), ggml_type, ROW_LEN)
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((3, ROW_LEN)).astype(np.float32))
    dense = quants.dequantize(w.data, ggml_type, ROW_LEN)
    monkeypatch.setattr(ops, "CPU_TILE_ELEMENTS", 1 << 20)
    whole = ops.matmul(x, w)
    monkeypatch.setattr(ops, "CPU_TILE_ELEMENTS", 2 * ROW_LEN)  # two rows per tile
    tiled = ops.matmul(x, w)
    assert whole.shape == (3, N_ROWS)
    # a different GEMM shape may sum in another order: float32 rounding apart
    torch.testing.assert_close(whole, x @ dense.T, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-4)
