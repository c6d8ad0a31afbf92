"""kernels_gpu's matmul paths against the float32 dequantize + matmul, on torch's CPU device.

The half-precision GEMM path runs exactly the code CUDA runs, with the dtype forced; the fused
dequantize-GEMV Triton kernel runs through Triton's interpreter (skipped without triton).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

# before torch: the CPU kernels' OpenMP settings must be in the environment when torch loads
import llmapp.kernels_cpu.threads  # noqa: F401, I001

torch = pytest.importorskip("torch")

import gguf_blocks  # noqa: E402

from llmapp.kernels_gpu import ops, quants  # noqa: E402

CPU = torch.device("cpu")
# unit roundoff of each GEMM input dtype
ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def packed(
    ggml_type: int, n_rows: int, row_len: int, seed: int, scale: float = 0.01
) -> ops.PackedWeight:
    raw = gguf_blocks.random_rows(ggml_type, np.random.default_rng(seed), n_rows, row_len, scale)
    return ops.pack(torch.from_numpy(raw), ggml_type, row_len)


def activations(m: int, k: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32) * scale)


def float32_reference(x: torch.Tensor, w: ops.PackedWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """x @ W^T in float64 from the bit-exact decoded W, and sum_k |x||W| (the error scale)."""
    dense = quants.dequantize(w.data, w.ggml_type, w.row_len).to(torch.float64)
    x64 = x.to(torch.float64)
    return x64 @ dense.T, x64.abs() @ dense.abs().T


def assert_within(got: torch.Tensor, x: torch.Tensor, w: ops.PackedWeight, roundoff: float) -> None:
    """Each input rounded once (relative roundoff u), the output once: |err| <= 4u sum|x||W|."""
    want, magnitude = float32_reference(x, w)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(got).all()
    excess = (got.to(torch.float64) - want).abs() - (4 * roundoff * magnitude + 1e-30)
    assert (excess <= 0).all(), f"worst excess {float(excess.max())}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "ggml_type",
    [
        quants.Q4_0,
        quants.Q5_1,
        quants.Q8_0,
        quants.Q4_K,
        quants.Q6_K,
        quants.F16,
        quants.BF16,
        quants.F32,
    ],
)
def test_half_gemm_matches_float32(
    ggml_type: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = packed(ggml_type, 12, 256, seed=ggml_type)
    x = activations(10, 256, seed=1)
    monkeypatch.setattr(ops, "CPU_TILE_ELEMENTS", 5 * 256)  # tiles of 5, 5 and 2 rows
    monkeypatch.setitem(ops.GEMM_DTYPES, "cpu", dtype)
    assert ops.matmul_path(10, w, CPU, dtype) == f"{str(dtype)[6:]}-gemm"
    assert_within(ops.matmul(x, w), x, w, ROUNDOFF[dtype])


@pytest.mark.parametrize("ggml_type", [quants.Q8_0, quants.F32])
def test_float16_gemm_has_no_range_limit(ggml_type: int) -> None:
    """Weights of d = 655 (Q8_0 values to 83000) and activations of 1e5: past float16's 65504."""
    w = packed(ggml_type, 8, 64, seed=3, scale=300.0)
    dense = quants.dequantize(w.data, ggml_type, 64)
    assert float(dense.abs().max()) > 65504
    x = activations(3, 64, seed=4, scale=5e4)
    assert float(x.abs().max()) > 65504
    assert_within(ops.matmul(x, w, torch.float16), x, w, ROUNDOFF[torch.float16])


def test_row_scales_are_powers_of_two() -> None:
    a = torch.tensor([[0.0, 0.0], [3.0, -1.0], [-0.5, 0.25], [1e6, 1.0]])
    scales = ops.row_scales(a)
    assert scales.flatten().tolist() == [1.0, 4.0, 1.0, 2.0**20]
    scaled = (a / scales).abs().amax(dim=1)
    assert bool((scaled < 1).all())


def test_default_paths_on_the_cpu_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without TRITON_INTERPRET the CPU device computes in float32, bit for bit the tiles'."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w = packed(quants.Q4_K, 6, 256, seed=5)
    assert ops.gemm_dtype(CPU) == torch.float32
    assert not ops.fused_usable(CPU)
    assert ops.matmul_path(1, w, CPU, torch.float32) == "float32-gemm"
    x = activations(1, 256, seed=6)
    ops.path_counts.clear()
    got = ops.matmul(x, w)
    assert ops.path_counts == {("float32-gemm", "decode"): 1}
    assert torch.equal(got, x @ quants.dequantize(w.data, quants.Q4_K, 256).T)


def test_without_triton_decode_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ops, "fused_module", lambda: None)
    w = packed(quants.Q4_0, 6, 64, seed=7)
    assert ops.matmul_path(1, w, CPU, torch.float32) == "float32-gemm"


@pytest.fixture(scope="module")
def interpreted_triton() -> ModuleType:
    """kernels_gpu.fused_gemv with triton imported for its interpreter (TRITON_INTERPRET=1 when
    triton is first imported); the variable is set only around that import."""
    first_import = "triton" not in sys.modules
    if first_import:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        pytest.importorskip("triton")
        module = ops.fused_module()
    finally:
        if first_import:
            del os.environ["TRITON_INTERPRET"]
    if module is None or not module.INTERPRETED:
        pytest.skip("triton was imported for a GPU, not its interpreter, earlier in this run")
    return module


FUSED_CASES = [(ggml_type, m) for ggml_type in sorted(ops.FUSED_TYPES) for m in (1, 3, 8)]


@pytest.mark.parametrize("ggml_type,m", FUSED_CASES)
def test_fused_gemv_matches_dequantize_matmul(
    ggml_type: int, m: int, interpreted_triton: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """37 weight rows (not a multiple of the kernel's 16), K not a multiple of its K step."""
    k = 544 if quants.TRAITS[ggml_type][0] == 32 else 768
    w = packed(ggml_type, 37, k, seed=10 + ggml_type)
    x = activations(m, k, seed=m)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ops.path_counts.clear()
    got = ops.matmul(x, w)
    assert ops.path_counts == {("fused-gemv", "decode"): 1}
    want, magnitude = float32_reference(x, w)
    # float32 sums in another order: a few units of float32 rounding of sum |x||W|
    excess = (got.to(torch.float64) - want).abs() - 1e-6 * magnitude
    assert (excess <= 0).all(), f"worst excess {float(excess.max())}"


def test_fused_selection(interpreted_triton: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """More rows than decode's, or a type the kernel does not decode: dequantize + GEMM."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q4 = packed(quants.Q4_0, 6, 64, seed=8)
    q5_1 = packed(quants.Q5_1, 6, 64, seed=9)
    assert ops.matmul_path(ops.DECODE_MAX_ROWS, q4, CPU, torch.float32) == "fused-gemv"
    assert ops.matmul_path(ops.DECODE_MAX_ROWS + 1, q4, CPU, torch.float32) == "float32-gemm"
    assert ops.matmul_path(1, q5_1, CPU, torch.float32) == "float32-gemm"
    with pytest.raises(ValueError):
        interpreted_triton.gemv(activations(9, 64, seed=0), q4.data, quants.Q4_0, 64)


def test_fused_kernel_compiles_for_a_gpu() -> None:
    """The kernel lowers to an sm_90 binary (no GPU needed); a subprocess, as this one's triton
    may be the interpreter's (nor is triton imported here: the interpreter tests need it first)."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("fused_compile.py")
    result = subprocess.run(
        [sys.executable, str(script), "1", "8"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("sm_90 cubin") == 2 * len(ops.FUSED_TYPES)


def test_a_failing_fused_kernel_falls_back(
    interpreted_triton: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel that cannot build (Triton without a C compiler, say): a warning, then the
    dequantize + GEMM path for the rest of the run on that device type."""

    def broken(*args: object) -> None:
        raise RuntimeError("no C compiler")

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(interpreted_triton, "gemv", broken)
    monkeypatch.setattr(ops, "fused_failed", set())
    w = packed(quants.Q8_0, 6, 64, seed=11)
    x = activations(2, 64, seed=12)
    ops.path_counts.clear()
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        got = ops.matmul(x, w)
    assert ops.fused_failed == {"cpu"}
    assert ops.path_counts == {("float32-gemm", "decode"): 1}
    torch.testing.assert_close(got, x @ quants.dequantize(w.data, quants.Q8_0, 64).T)
    assert ops.matmul_path(2, w, CPU, torch.float32) == "float32-gemm"
