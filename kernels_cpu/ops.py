"""Element-wise and normalization kernels of the forward pass, each with a numpy reference.

All kernels are serial @njit functions: for a decode step their whole work takes microseconds, less
than a parallel launch costs (REFERENCE.md section 5); for a prompt they stay a few percent of the
matmul time. Activations are float32 [M, K] (M rows of tokens); heads are [M, H, D].

exp: Numba calls libm's scalar exp (no vector math library here), ~2 ns per element; SwiGLU and
GELU use a vectorizable exp instead (range reduction to 2^n * e^r, degree-7 polynomial, the 2^n
built from exponent bits): ~1e-7 relative error, several times faster on 4864-wide rows.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numba import njit

from . import threads as _threads  # noqa: F401  (threading layer set before any kernel)

_F = np.float32
_LOG2E = _F(1.4426950408889634)
_LN2_HI = _F(0.693359375)  # ln 2 split so n * _LN2_HI is exact for |n| < 2^9
_LN2_LO = _F(-2.12194440e-4)
_EXP_LO = _F(-87.0)
_EXP_HI = _F(88.0)
_C2, _C3, _C4 = _F(1 / 2), _F(1 / 6), _F(1 / 24)
_C5, _C6, _C7 = _F(1 / 120), _F(1 / 720), _F(1 / 5040)
_ONE = _F(1.0)
_HALF = _F(0.5)
_GELU_A = _F(0.044715)
_GELU_2C = _F(2.0 * math.sqrt(2.0 / math.pi))  # gelu_tanh(x) = x * sigmoid(2c(x + a x^3))


# ---------------------------------------------------------------------------------------------
# RMSNorm. Sum of squares in float64 (as llama.cpp does), then (x * scale) * w.


@njit(cache=True, fastmath=True)
def _rms_norm_row(x, w, eps, out):
    s = 0.0
    for k in range(x.size):
        s += np.float64(x[k] * x[k])
    scale = np.float32(1.0 / math.sqrt(s / x.size + eps))
    for k in range(x.size):
        out[k] = (x[k] * scale) * w[k]


@njit(cache=True, fastmath=True)
def _rms_norm_rows(x, w, eps, out):
    for m in range(x.shape[0]):
        _rms_norm_row(x[m], w, eps, out[m])


@njit(cache=True, fastmath=True)
def _add_rms_norm_rows(residual, delta, w, eps, out):
    for m in range(residual.shape[0]):
        r = residual[m]
        d = delta[m]
        for k in range(r.size):
            r[k] += d[k]
        _rms_norm_row(r, w, eps, out[m])


@njit(cache=True, fastmath=True)
def _add_normed_rms_norm_rows(residual, delta, delta_w, w, eps, out):
    # residual += rms_norm(delta) * delta_w, then out = rms_norm(residual) * w (Gemma's
    # post-norms): the normed delta goes through `out` (a row of scratch) on its way.
    for m in range(residual.shape[0]):
        r = residual[m]
        o = out[m]
        _rms_norm_row(delta[m], delta_w, eps, o)
        for k in range(r.size):
            r[k] += o[k]
        _rms_norm_row(r, w, eps, o)


@njit(cache=True, fastmath=True)
def _rms_norm_heads(x, w, eps, out):
    for m in range(x.shape[0]):
        for h in range(x.shape[1]):
            _rms_norm_row(x[m, h], w, eps, out[m, h])


def _out_like(x: np.ndarray, out: np.ndarray | None) -> np.ndarray:
    return np.empty(x.shape, np.float32) if out is None else out


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """x [M, K] -> x / rms(x) * w (w [K]); out may be x itself."""
    res = _out_like(x, out)
    _rms_norm_rows(x, w, eps, res)
    return res


def add_rms_norm(
    residual: np.ndarray,
    delta: np.ndarray,
    w: np.ndarray,
    eps: float,
    delta_w: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """residual += delta (in place), then return rms_norm(residual) * w (the next block's
    input). With delta_w the delta is normed first: residual += rms_norm(delta) * delta_w.
    out must not alias residual or delta."""
    res = _out_like(residual, out)
    if delta_w is None:
        _add_rms_norm_rows(residual, delta, w, eps, res)
    else:
        _add_normed_rms_norm_rows(residual, delta, delta_w, w, eps, res)
    return res


def add_rms_norm_ref(
    residual: np.ndarray,
    delta: np.ndarray,
    w: np.ndarray,
    eps: float,
    delta_w: np.ndarray | None = None,
) -> np.ndarray:
    """numpy reference of add_rms_norm (updates residual in place too)."""
    residual += delta if delta_w is None else rms_norm_ref(delta, delta_w, eps)
    return rms_norm_ref(residual, w, eps)


def rms_norm_heads(
    x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray | None = None
) -> np.ndarray:
    """Per-head RMSNorm (Gemma 3 q/k norm): x [M, H, D], w [D]; out may be x itself."""
    res = _out_like(x, out)
    _rms_norm_heads(x, w, eps, res)
    return res


def rms_norm_ref(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """numpy reference over the last axis, float64."""
    x64 = x.astype(np.float64)
    scale = 1.0 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)
    return (x64 * scale * w).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# RoPE, in place. theta_i = pos * base^(-2i/n_rot) [/ freq_factor_i] * freq_scale, in float64.
# normal: rotate (x[2i], x[2i+1]); neox: rotate (x[i], x[i + n_rot/2]); dims >= n_rot untouched.


@njit(cache=True, fastmath=True)
def _rope_rows(x, positions, inv_freq, neox, cos_buf, sin_buf):
    half = inv_freq.size
    for m in range(x.shape[0]):
        p = np.float64(positions[m])
        for i in range(half):
            theta = p * inv_freq[i]
            cos_buf[i] = math.cos(theta)
            sin_buf[i] = math.sin(theta)
        for h in range(x.shape[1]):
            v = x[m, h]
            for i in range(half):
                a_idx = i if neox else 2 * i
                b_idx = i + half if neox else 2 * i + 1
                a = v[a_idx]
                b = v[b_idx]
                v[a_idx] = a * cos_buf[i] - b * sin_buf[i]
                v[b_idx] = a * sin_buf[i] + b * cos_buf[i]


@njit(cache=True, fastmath=True)
def _rope_rows_qk(q, k, positions, inv_freq, neox, cos_buf, sin_buf):
    # One call for a layer's queries and keys (the per-call cost is the point).
    _rope_rows(q, positions, inv_freq, neox, cos_buf, sin_buf)
    _rope_rows(k, positions, inv_freq, neox, cos_buf, sin_buf)


@functools.lru_cache(maxsize=64)
def _inv_freq(base: float, n_rot: int, freq_scale: float) -> np.ndarray:
    i = np.arange(n_rot // 2, dtype=np.float64)
    res = base ** (-2.0 * i / n_rot) * freq_scale
    res.setflags(write=False)
    return res


def rope_frequencies(
    base: float, n_rot: int, freq_scale: float = 1.0, freq_factors: np.ndarray | None = None
) -> np.ndarray:
    """float64 [n_rot/2]: angle per position of each rotated pair (freq_factors divide, as
    llama.cpp's rope_freqs tensor does for Llama 3 scaling)."""
    inv = _inv_freq(float(base), int(n_rot), float(freq_scale))
    if freq_factors is not None:
        inv = inv / freq_factors.astype(np.float64)
    return inv


def rope(
    x: np.ndarray,
    positions: np.ndarray,
    base: float,
    n_rot: int,
    neox: bool,
    freq_scale: float = 1.0,
    freq_factors: np.ndarray | None = None,
    k: np.ndarray | None = None,
) -> np.ndarray:
    """Rotate x [M, H, D] in place by positions [M] (any int dtype); returns x.

    With k [M, Hk, D] (a layer's keys beside its queries) both rotate in one call."""
    _check_n_rot(x, n_rot)
    inv = rope_frequencies(base, n_rot, freq_scale, freq_factors)
    if positions.dtype not in (np.int32, np.int64):
        positions = positions.astype(np.int64)
    bufs = np.empty((2, n_rot // 2), np.float32)  # cos, sin of one row's angles
    if k is None:
        _rope_rows(x, positions, inv, neox, bufs[0], bufs[1])
    else:
        _check_n_rot(k, n_rot)
        _rope_rows_qk(x, k, positions, inv, neox, bufs[0], bufs[1])
    return x


def _check_n_rot(x: np.ndarray, n_rot: int) -> None:
    if n_rot % 2 or n_rot > x.shape[2]:
        raise ValueError(f"n_rot {n_rot} must be even and at most the head size {x.shape[2]}")


def rope_ref(
    x: np.ndarray,
    positions: np.ndarray,
    base: float,
    n_rot: int,
    neox: bool,
    freq_scale: float = 1.0,
    freq_factors: np.ndarray | None = None,
) -> np.ndarray:
    """numpy reference (returns a new array)."""
    inv = rope_frequencies(base, n_rot, freq_scale, freq_factors)
    theta = positions.astype(np.float64)[:, None, None] * inv[None, None, :]
    c, s = np.cos(theta), np.sin(theta)
    y = x.astype(np.float64).copy()
    half = n_rot // 2
    if neox:
        a, b = y[..., :half].copy(), y[..., half:n_rot].copy()
        y[..., :half], y[..., half:n_rot] = a * c - b * s, a * s + b * c
    else:
        a, b = y[..., 0:n_rot:2].copy(), y[..., 1:n_rot:2].copy()
        y[..., 0:n_rot:2], y[..., 1:n_rot:2] = a * c - b * s, a * s + b * c
    return y.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Gated activations: out = act(gate) * up, with a vectorizable exp (module docstring).


@njit(cache=True, fastmath=True)
def _exp_parts(z, mant, bits):
    # exp(z[i]) == mant[i] * (float32 with bits[i]); z clamped to [-87, 88].
    for i in range(z.size):
        v = min(max(z[i], _EXP_LO), _EXP_HI)
        n = np.floor(v * _LOG2E + _HALF)
        r = v - n * _LN2_HI - n * _LN2_LO
        p = _C7 * r + _C6
        p = p * r + _C5
        p = p * r + _C4
        p = p * r + _C3
        p = p * r + _C2
        p = p * r + _ONE
        mant[i] = p * r + _ONE
        bits[i] = (np.int32(n) + np.int32(127)) << np.int32(23)


@njit(cache=True, fastmath=True)
def _gated_rows(gate, up, out, gelu):
    # out = gate * sigmoid(z) * up with z = gate (silu) or 2c(g + a g^3) (gelu_tanh).
    f = gate.shape[1]
    z = np.empty(f, np.float32)
    mant = np.empty(f, np.float32)
    bits = np.empty(f, np.int32)
    pow2 = bits.view(np.float32)
    for m in range(gate.shape[0]):
        g = gate[m]
        if gelu:
            for i in range(f):
                z[i] = -_GELU_2C * (g[i] + _GELU_A * g[i] * g[i] * g[i])
        else:
            for i in range(f):
                z[i] = -g[i]
        _exp_parts(z, mant, bits)
        u = up[m]
        o = out[m]
        for i in range(f):
            o[i] = g[i] * u[i] / (_ONE + mant[i] * pow2[i])


def swiglu(gate: np.ndarray, up: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """silu(gate) * up for [M, F] (views of a fused gate|up output are fine); out may alias."""
    res = _out_like(gate, out)
    _gated_rows(gate, up, res, False)
    return res


def gelu_tanh_mul(gate: np.ndarray, up: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """gelu_tanh(gate) * up for [M, F] (Gemma's FFN)."""
    res = _out_like(gate, out)
    _gated_rows(gate, up, res, True)
    return res


def swiglu_ref(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    g = gate.astype(np.float64)
    return (g / (1.0 + np.exp(-g)) * up).astype(np.float32)


def gelu_tanh_mul_ref(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    g = gate.astype(np.float64)
    inner = math.sqrt(2.0 / math.pi) * (g + 0.044715 * g**3)
    return (0.5 * g * (1.0 + np.tanh(inner)) * up).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Small in-place helpers (one compiled call each instead of numpy temporaries).


@njit(cache=True, fastmath=True)
def _add_rows(a, b):
    # a[m, :] += b[m, :]; a 1-D b (a bias) is added to every row. b.ndim is a constant when
    # Numba compiles, so each of the two versions keeps only its own branch.
    for m in range(a.shape[0]):
        ar = a[m]
        br = b if b.ndim == 1 else b[m]
        for k in range(ar.size):
            ar[k] += br[k]


@njit(cache=True, fastmath=True)
def _scale_rows(x, s):
    for m in range(x.shape[0]):
        xr = x[m]
        for k in range(xr.size):
            xr[k] *= s


def add_(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a += b for a [M, K] and b [M, K] (a residual add) or b [K] (a bias, added to every
    row: Qwen2's q/k/v biases); returns a."""
    _add_rows(a, b)
    return a


def scale_(x: np.ndarray, s: float) -> np.ndarray:
    """x *= s (Gemma's sqrt(n_embd) embedding scale); returns x."""
    _scale_rows(x, np.float32(s))
    return x
