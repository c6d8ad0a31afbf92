"""The vector intrinsics against numpy, on the instruction path and the portable one."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from llmapp.kernels_cpu import simd


@njit(cache=True)
def _dot_rows(wu, xq, out, vnni):
    # out[:16] = per lane sum over k of wu (16 lanes x 4 bytes per quad) * xq (int8 [K])
    acc = simd.i32_splat(np.int32(-7))
    for q in range(xq.size // 4):
        acc = simd.dot_quads(acc, simd.load_quads(wu, 64 * q), simd.broadcast_quad(xq, 4 * q), vnni)
    simd.store_f32(out, 0, simd.fma_int(simd.f32_zero(), acc, simd.f32_splat(np.float32(1))))


@njit(cache=True)
def _bytes_as_float(wu, j, out):
    v = simd.quad_byte(simd.load_quads(wu, 0), j)
    simd.store_f32(out, 0, simd.fma(v, simd.f32_splat(np.float32(2)), simd.load_f32(out, 0)))


@pytest.mark.parametrize("vnni", [True, False])
def test_dot_quads_extremes(vnni: bool) -> None:
    rng = np.random.default_rng(0)
    k = 64
    w = rng.integers(0, 256, (16, k)).astype(np.uint8)
    w[0] = 255  # largest products: no saturation
    x = rng.integers(-128, 128, k).astype(np.int8)
    x[:8] = -128
    wu = np.ascontiguousarray(w.reshape(16, k // 4, 4).transpose(1, 0, 2)).ravel()
    out = np.zeros(16, np.float32)
    _dot_rows(wu, x, out, vnni)
    want = w.astype(np.int64) @ x.astype(np.int64) - 7
    np.testing.assert_array_equal(out, want.astype(np.float32))


def test_quad_byte() -> None:
    wu = np.arange(64, dtype=np.uint8) * 4 + 1  # byte j of lane r: wu[4 * r + j]
    for j in range(4):
        out = np.ones(16, np.float32)
        _bytes_as_float(wu, j, out)
        np.testing.assert_array_equal(out, wu[j::4].astype(np.float32) * 2 + 1)


def test_host_features_from_an_explicit_target(monkeypatch: pytest.MonkeyPatch) -> None:
    # With NUMBA_CPU_FEATURES set, a feature counts only when named whole in the list.
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2,+avx512fp16,+fma")
    assert simd._host_has("avx2") and simd._host_has("avx512fp16")
    assert not simd._host_has("avx512f") and not simd._host_has("avx512vnni")
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "")
    assert not simd._host_has("avx2")
