"""Norms, RoPE and activations against their numpy references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmapp.kernels_cpu import ops


def randn(*shape: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


def test_rms_norm_matches_reference_and_runs_in_place() -> None:
    x, w = randn(5, 896), randn(896, seed=1)
    want = ops.rms_norm_ref(x, w, 1e-6)
    np.testing.assert_allclose(ops.rms_norm(x, w, 1e-6), want, rtol=1e-5, atol=1e-6)
    y = x.copy()
    assert ops.rms_norm(y, w, 1e-6, out=y) is y
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_rms_norm_of_zeros_is_zero() -> None:
    out = ops.rms_norm(np.zeros((1, 8), np.float32), np.ones(8, np.float32), 1e-6)
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("normed_delta", [False, True])
def test_add_rms_norm_updates_residual(normed_delta: bool) -> None:
    res, delta, w = randn(3, 64), randn(3, 64, seed=2), randn(64, seed=3)
    delta_w = randn(64, seed=4) if normed_delta else None
    want_res = res + (delta if delta_w is None else ops.rms_norm_ref(delta, delta_w, 1e-5))
    res_ref = res.copy()
    want = ops.add_rms_norm_ref(res_ref, delta, w, 1e-5, delta_w)
    np.testing.assert_allclose(res_ref, want_res, rtol=1e-6)
    np.testing.assert_allclose(want, ops.rms_norm_ref(want_res, w, 1e-5), rtol=1e-6)
    res2 = res.copy()
    out = ops.add_rms_norm(res2, delta, w, 1e-5, delta_w)
    np.testing.assert_allclose(res2, want_res, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_rms_norm_heads_on_strided_view() -> None:
    qkv = randn(4, 6 * 32)
    q = qkv[:, : 4 * 32].reshape(4, 4, 32)  # a view into a fused projection output
    w = randn(32, seed=4)
    want = ops.rms_norm_ref(q, w, 1e-6)
    ops.rms_norm_heads(q, w, 1e-6, out=q)
    np.testing.assert_allclose(qkv[:, : 4 * 32].reshape(4, 4, 32), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("n_rot", [64, 32])
def test_rope(neox: bool, n_rot: int) -> None:
    x = randn(6, 5, 64)
    pos = np.array([0, 1, 2, 100, 4095, 32000])
    want = ops.rope_ref(x, pos, 10000.0, n_rot, neox)
    got = ops.rope(x.copy(), pos, 10000.0, n_rot, neox)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    np.testing.assert_array_equal(got[0], x[0])  # position 0 rotates by nothing
    np.testing.assert_array_equal(got[..., n_rot:], x[..., n_rot:])


@pytest.mark.parametrize("neox", [False, True])
def test_rope_rotates_q_and_k_together(neox: bool) -> None:
    q, k = randn(4, 6, 64), randn(4, 2, 64, seed=1)
    pos = np.array([0, 7, 300, 9000], np.int32)
    want_q = ops.rope_ref(q, pos, 10000.0, 32, neox)
    want_k = ops.rope_ref(k, pos, 10000.0, 32, neox)
    assert ops.rope(q, pos, 10000.0, 32, neox, k=k) is q
    np.testing.assert_allclose(q, want_q, rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(k, want_k, rtol=1e-5, atol=2e-6)


def test_rope_pairs_follow_the_mode() -> None:
    # One pair set to (1, 0): after rotating by theta it reads (cos, sin) in the pair's slots.
    x = np.zeros((1, 1, 8), np.float32)
    x[0, 0, 0] = 1.0
    theta = 3.0  # position 3, i = 0 -> base^0 = 1
    normal = ops.rope(x.copy(), np.array([3]), 10000.0, 8, neox=False)
    neox = ops.rope(x.copy(), np.array([3]), 10000.0, 8, neox=True)
    np.testing.assert_allclose(normal[0, 0, :2], [np.cos(theta), np.sin(theta)], atol=1e-6)
    np.testing.assert_allclose(neox[0, 0, [0, 4]], [np.cos(theta), np.sin(theta)], atol=1e-6)


def test_rope_freq_factors_and_scale() -> None:
    x = randn(3, 2, 16)
    pos = np.array([5, 50, 500])
    ff = np.linspace(1.0, 8.0, 8).astype(np.float32)
    want = ops.rope_ref(x, pos, 500000.0, 16, True, freq_scale=0.5, freq_factors=ff)
    got = ops.rope(x.copy(), pos, 500000.0, 16, True, freq_scale=0.5, freq_factors=ff)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


def test_rope_rejects_bad_n_rot() -> None:
    with pytest.raises(ValueError):
        ops.rope(randn(1, 1, 8), np.array([0]), 10000.0, 10, True)


@pytest.mark.parametrize("kind", ["silu", "gelu"])
def test_gated_activations(kind: str) -> None:
    fast = ops.swiglu if kind == "silu" else ops.gelu_tanh_mul
    ref = ops.swiglu_ref if kind == "silu" else ops.gelu_tanh_mul_ref
    gate, up = randn(3, 4864, scale=4.0), randn(3, 4864, seed=1)
    gate[0, :6] = [-90.0, -30.0, -1e-4, 0.0, 30.0, 90.0]
    want = ref(gate, up)
    np.testing.assert_allclose(fast(gate, up), want, rtol=2e-6, atol=1e-6)
    fused = np.hstack([gate, up])  # gate|up halves of one matmul output, used in place
    fast(fused[:, :4864], fused[:, 4864:], out=fused[:, :4864])
    np.testing.assert_allclose(fused[:, :4864], want, rtol=2e-6, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.floats(-80.0, 80.0, width=32))
def test_exp_parts_accuracy(z: float) -> None:
    zz = np.array([z], np.float32)
    mant = np.empty(1, np.float32)
    bits = np.empty(1, np.int32)
    ops._exp_parts(zz, mant, bits)
    got = float(mant[0]) * float(bits.view(np.float32)[0])
    assert abs(got - np.exp(np.float64(z))) <= 4e-7 * np.exp(np.float64(z))


def test_in_place_helpers() -> None:
    a, b, bias = randn(2, 5), randn(2, 5, seed=1), randn(5, seed=2)
    want = (a + b + bias) * 3.0
    x = a.copy()
    ops.add_(x, b)
    assert ops.add_(x, bias) is x  # a bias row, added to every row
    assert ops.scale_(x, 3.0) is x
    np.testing.assert_allclose(x, want, rtol=1e-6)
