"""Quantizers: float32 rows -> ggml blocks, as Numba kernels.

Each type follows the algorithm llama.cpp uses to write model files when no importance matrix is
given (its "reference" row quantizers): the 32-element types scale by the block's extreme value;
the K-quants search, per sub-block, for the scale (and min) that minimise a weighted error, then
quantize the sub-block scales themselves to 4, 6 or 8 bits and re-round every value against the
scales actually stored. Every float operation is done in float32, in the same order, with the
same tie rules (round half to even via the float32 magic-number add; `roundf` half away from zero
for Q8_0; truncation for Q4_0/Q5_0), so blocks come out bit-identical in all ordinary cases.

Deliberate differences, only where llama.cpp's own output would be unusable: an f16 scale that
overflows saturates at +-65504 instead of becoming inf (llama.cpp's validation then rejects the
file), a NaN scale (from float32 overflow of x*x on values beyond ~1e19) is stored as 0, and every
float-to-int conversion is clamped, so no input ever yields inf or NaN blocks.

Division follows IEEE rules as in C (x/0 is inf, 0/0 NaN: numba's "numpy" error model), which
the searches rely on for degenerate sub-blocks.

A tensor of `n_rows` rows of `row_len` floats becomes `n_rows` rows of `row_len / block * size`
bytes; blocks never cross rows, so the kernels run over the flattened data block by block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit, prange

# the threading layer and wait policy are set before any parallel kernel runs
from . import threads as _threads  # noqa: F401
from .blocks import (
    F16,
    F32,
    IQ4_NL,
    IQ4_NL_VALUES,
    Q2_K,
    Q3_K,
    Q4_0,
    Q4_1,
    Q4_K,
    Q5_0,
    Q5_1,
    Q5_K,
    Q6_K,
    Q8_0,
    QK_K,
)
from .f16 import f16_bits_to_f32

_ZERO = np.float32(0.0)
_ONE = np.float32(1.0)
_HALF = np.float32(0.5)
_GROUP_MAX_EPS = np.float32(1e-15)  # below this a group counts as all zero
_ROUND_MAGIC = np.float32(12582912.0)  # 1.5 * 2^23: adding it rounds a float32 to an integer
_FLT_MAX = np.float32(3.4028234663852886e38)

# Non-linear 4-bit code book of IQ4_NL, and the sums of neighbours its nearest-level search uses.
_IQ4_NL_VALUES = IQ4_NL_VALUES.astype(np.int32)
_IQ4_NL_PAIR_SUMS = np.array(
    [0] + [int(_IQ4_NL_VALUES[j - 1] + _IQ4_NL_VALUES[j]) for j in range(1, 16)],
    dtype=np.float32,
)

# Integer scratch per task: levels of a super-block, the search's trial levels, 6-bit scales.
_SCRATCH_LS = QK_K + 32
_SCRATCH_INTS = QK_K + 48

# Blocks handed to one parallel task: large enough that a task outweighs its launch.
_BLOCKS_PER_TASK = 64


# ----------------------------------------------------------------------------------------------
# Scalar helpers


@njit(cache=True, error_model="numpy")
def _nearest_int(v: np.float32) -> int:
    """Round to nearest (ties to even) exactly as the magic-number trick does in float32."""
    t = np.float32(v + _ROUND_MAGIC)
    bits = np.int64(t.view(np.int32))
    return int((bits & 0x007FFFFF) - 0x00400000)


@njit(cache=True, error_model="numpy")
def _clamp(v: int, lo: int, hi: int) -> int:
    return lo if v < lo else (hi if v > hi else v)


@njit(cache=True, error_model="numpy")
def _trunc_clamp(v: np.float32, lo: int, hi: int) -> int:
    """C's float-to-int truncation, clamped first (an out-of-range cast is undefined in C)."""
    if not v == v:
        return _clamp(0, lo, hi)
    if v <= np.float32(lo):
        return lo
    if v >= np.float32(hi):
        return hi
    return int(v)


@njit(cache=True, error_model="numpy")
def _roundf_clamp(v: np.float32, lo: int, hi: int) -> int:
    """C's roundf (half away from zero), clamped to [lo, hi]."""
    if not v == v:
        return 0
    if v <= np.float32(lo):
        return lo
    if v >= np.float32(hi):
        return hi
    t = np.trunc(v)
    if abs(v - t) >= _HALF:  # exact: v - trunc(v) has no rounding error below 2^23
        t += np.float32(1.0) if v > 0 else np.float32(-1.0)
    return int(t)


@njit(cache=True, error_model="numpy")
def _f16_bits(v: np.float32) -> int | np.int64:
    """IEEE half bits of a float32, rounded to nearest even; saturating, NaN -> 0."""
    bits = np.int64(np.float32(v).view(np.uint32))
    sign = (bits >> 16) & 0x8000
    a = bits & 0x7FFFFFFF
    if a > 0x7F800000:
        return 0
    if a >= 0x477FF000:  # 65520 and above round to inf: keep the largest finite half instead
        return sign | 0x7BFF
    if a >= 0x38800000:  # normal half: rebias the exponent, round off 13 mantissa bits
        h = (((a >> 23) - 112) << 10) | ((a >> 13) & 0x3FF)
        rem = a & 0x1FFF
        if rem > 0x1000 or (rem == 0x1000 and (h & 1) == 1):
            h += 1
        return sign | h
    if a <= 0x33000000:  # at most half the smallest subnormal: rounds (ties even) to zero
        return sign
    shift = 126 - (a >> 23)  # subnormal half: units of 2^-24
    m = (a & 0x7FFFFF) | 0x800000
    h = m >> shift
    rem = m & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    if rem > half or (rem == half and (h & 1) == 1):
        h += 1
    return sign | h


@njit(cache=True, error_model="numpy")
def _put_f16(out: np.ndarray, pos: int, v: np.float32) -> np.float32:
    """Store v as a little-endian half at out[pos]; return the value actually stored."""
    h = _f16_bits(v)
    out[pos] = h & 0xFF
    out[pos + 1] = h >> 8
    return f16_bits_to_f32(h)


@njit(cache=True, error_model="numpy")
def _put_u32(out: np.ndarray, pos: int, v: int) -> None:
    for k in range(4):
        out[pos + k] = (v >> (8 * k)) & 0xFF


@njit(cache=True, error_model="numpy")
def _all_finite(x: np.ndarray) -> bool:
    for i in range(x.shape[0]):
        if not np.isfinite(x[i]):
            return False
    return True


# ----------------------------------------------------------------------------------------------
# 32-element blocks with one scale (and, for _1 types, a min)


@njit(cache=True, error_model="numpy")
def _signed_absmax(xb: np.ndarray) -> np.float32:
    """The value of largest magnitude (the first one on ties), sign kept."""
    amax = _ZERO
    vmax = _ZERO
    for v in xb:
        if amax < abs(v):
            amax = abs(v)
            vmax = v
    return vmax


@njit(cache=True, error_model="numpy")
def _min_max(xb: np.ndarray) -> tuple[np.float32, np.float32]:
    mn = _FLT_MAX
    mx = -_FLT_MAX
    for v in xb:
        if v < mn:
            mn = v
        if v > mx:
            mx = v
    return mn, mx


@njit(cache=True, error_model="numpy")
def _inverse(d: np.float32) -> np.float32:
    return _ONE / d if d != _ZERO else _ZERO


@njit(cache=True, error_model="numpy")
def _block_q8_0(xb: np.ndarray, ob: np.ndarray) -> None:
    amax = _ZERO
    for v in xb:
        amax = amax if amax > abs(v) else abs(v)
    d = amax / np.float32(127.0)
    inv = _inverse(d)
    _put_f16(ob, 0, d)
    for j in range(32):
        ob[2 + j] = _roundf_clamp(xb[j] * inv, -128, 127) & 0xFF


@njit(cache=True, error_model="numpy")
def _block_q4_0(xb: np.ndarray, ob: np.ndarray) -> None:
    d = _signed_absmax(xb) / np.float32(-8.0)  # the extreme value maps to level -8 exactly
    inv = _inverse(d)
    _put_f16(ob, 0, d)
    for j in range(16):
        lo = _trunc_clamp(xb[j] * inv + np.float32(8.5), 0, 15)
        hi = _trunc_clamp(xb[j + 16] * inv + np.float32(8.5), 0, 15)
        ob[2 + j] = lo | (hi << 4)


@njit(cache=True, error_model="numpy")
def _block_q5_0(xb: np.ndarray, ob: np.ndarray) -> None:
    d = _signed_absmax(xb) / np.float32(-16.0)
    inv = _inverse(d)
    _put_f16(ob, 0, d)
    qh = 0
    for j in range(16):
        lo = _trunc_clamp(xb[j] * inv + np.float32(16.5), 0, 31)
        hi = _trunc_clamp(xb[j + 16] * inv + np.float32(16.5), 0, 31)
        ob[6 + j] = (lo & 15) | ((hi & 15) << 4)
        qh |= ((lo >> 4) << j) | ((hi >> 4) << (j + 16))
    _put_u32(ob, 2, qh)


@njit(cache=True, error_model="numpy")
def _block_q4_1(xb: np.ndarray, ob: np.ndarray) -> None:
    mn, mx = _min_max(xb)
    d = (mx - mn) / np.float32(15.0)
    inv = _inverse(d)
    _put_f16(ob, 0, d)
    _put_f16(ob, 2, mn)
    for j in range(16):
        lo = _trunc_clamp((xb[j] - mn) * inv + _HALF, 0, 15)
        hi = _trunc_clamp((xb[j + 16] - mn) * inv + _HALF, 0, 15)
        ob[4 + j] = lo | (hi << 4)


@njit(cache=True, error_model="numpy")
def _block_q5_1(xb: np.ndarray, ob: np.ndarray) -> None:
    mn, mx = _min_max(xb)
    d = (mx - mn) / np.float32(31.0)
    inv = _inverse(d)
    _put_f16(ob, 0, d)
    _put_f16(ob, 2, mn)
    qh = 0
    for j in range(16):
        lo = _trunc_clamp((xb[j] - mn) * inv + _HALF, 0, 31)
        hi = _trunc_clamp((xb[j + 16] - mn) * inv + _HALF, 0, 31)
        ob[8 + j] = (lo & 15) | ((hi & 15) << 4)
        qh |= ((lo >> 4) << j) | ((hi >> 4) << (j + 16))
    _put_u32(ob, 4, qh)


@njit(cache=True, error_model="numpy")
def _iq4_nl_index(v: np.float32) -> int:
    """Nearest code-book level: level i wins from the midpoint of levels i-1 and i upward."""
    v2 = v + v
    idx = 0
    step = 8
    while step > 0:
        j = idx + step
        if v2 >= _IQ4_NL_PAIR_SUMS[j]:
            idx = j
        step >>= 1
    return idx


@njit(cache=True, error_model="numpy")
def _iq4_nl_fit(xb: np.ndarray, inv: np.float32) -> tuple[np.float32, np.float32]:
    """Weighted (x^2) least-squares sums of the block against its levels at scale 1/inv."""
    sumqx = _ZERO
    sumq2 = _ZERO
    for j in range(32):
        q = np.float32(_IQ4_NL_VALUES[_iq4_nl_index(inv * xb[j])])
        w = xb[j] * xb[j]
        sumqx += w * q * xb[j]
        sumq2 += w * q * q
    return sumqx, sumq2


@njit(cache=True, error_model="numpy")
def _block_iq4_nl(xb: np.ndarray, ob: np.ndarray) -> None:
    # Scale search of llama.cpp's IQ4_NL quantizer as used for model files (7 tries each side).
    vmax = _signed_absmax(xb)
    d = _ZERO
    if abs(vmax) >= _GROUP_MAX_EPS:
        sumqx, sumq2 = _iq4_nl_fit(xb, _ONE / (vmax / np.float32(127.0)))
        d = sumqx / sumq2 if sumq2 > _ZERO else _ZERO
        best = d * sumqx
        for itry in range(-7, 8):
            sumqx, sumq2 = _iq4_nl_fit(xb, (np.float32(itry) - np.float32(127.0)) / vmax)
            if sumq2 > _ZERO and sumqx * sumqx > best * sumq2:
                d = sumqx / sumq2
                best = d * sumqx
    _put_f16(ob, 0, d)
    inv = _inverse(d)
    for j in range(16):
        ob[2 + j] = _iq4_nl_index(inv * xb[j]) | (_iq4_nl_index(inv * xb[j + 16]) << 4)


# ----------------------------------------------------------------------------------------------
# Searches for sub-block scales (K-quants)


@njit(cache=True, error_model="numpy")
def _make_qkx2_quants(
    x: np.ndarray,
    weights: np.ndarray,
    L: np.ndarray,
    Laux: np.ndarray,
    nmax: int,
    rmin: np.float32,
    rdelta: np.float32,
    nstep: int,
    use_mad: bool,
) -> tuple[np.float32, np.float32]:
    """Scale and min (returned as a positive offset) of an asymmetric sub-block.

    Starts from min/max rounding, then tries nstep+1 stretched scales, refitting scale and min
    by weighted least squares on each candidate rounding, keeping the lowest weighted error.
    """
    n = x.shape[0]
    mn, mx, sum_w, sum_x = x[0], x[0], weights[0], weights[0] * x[0]
    for i in range(1, n):
        mn = x[i] if x[i] < mn else mn
        mx = x[i] if x[i] > mx else mx
        sum_w += weights[i]
        sum_x += weights[i] * x[i]
    if mn > _ZERO:
        mn = _ZERO
    if mx == mn:
        L[:n] = 0
        return _ZERO, -mn
    fmax = np.float32(nmax)
    iscale = fmax / (mx - mn)
    scale = _ONE / iscale
    best_error = _ZERO
    for i in range(n):
        L[i] = _clamp(_nearest_int(iscale * (x[i] - mn)), 0, nmax)
        diff = scale * np.float32(L[i]) + mn - x[i]
        best_error += weights[i] * (abs(diff) if use_mad else diff * diff)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(step) + fmax) / (mx - mn)
        fit = _refit_scale_min(x, weights, Laux, nmax, iscale, mn, sum_w, sum_x, use_mad)
        if fit[0] and fit[3] < best_error:
            L[:n] = Laux[:n]
            best_error, scale, mn = fit[3], fit[1], fit[2]
    return scale, -mn


@njit(cache=True, error_model="numpy")
def _refit_scale_min(
    x: np.ndarray,
    weights: np.ndarray,
    Laux: np.ndarray,
    nmax: int,
    iscale: np.float32,
    mn: np.float32,
    sum_w: np.float32,
    sum_x: np.float32,
    use_mad: bool,
) -> tuple[bool, np.float32, np.float32, np.float32]:
    """Round at iscale, then least-squares scale and min; (valid, scale, min, weighted error)."""
    n = x.shape[0]
    sum_l = _ZERO
    sum_l2 = _ZERO
    sum_xl = _ZERO
    for i in range(n):
        l = _clamp(_nearest_int(iscale * (x[i] - mn)), 0, nmax)
        Laux[i] = l
        wl = weights[i] * np.float32(l)
        sum_l += wl
        sum_l2 += wl * np.float32(l)
        sum_xl += wl * x[i]
    det = sum_w * sum_l2 - sum_l * sum_l
    if not det > _ZERO:
        return False, _ZERO, _ZERO, _ZERO
    this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
    this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
    if this_min > _ZERO:  # the min is an offset subtracted later: it may not be positive
        this_min = _ZERO
        this_scale = sum_xl / sum_l2
    err = _ZERO
    for i in range(n):
        diff = this_scale * np.float32(Laux[i]) + this_min - x[i]
        err += weights[i] * (abs(diff) if use_mad else diff * diff)
    return True, this_scale, this_min, err


@njit(cache=True, error_model="numpy")
def _signed_absmax_n(x: np.ndarray) -> tuple[np.float32, np.float32]:
    amax = _ZERO
    vmax = _ZERO
    for v in x:
        if abs(v) > amax:
            amax = abs(v)
            vmax = v
    return amax, vmax


@njit(cache=True, error_model="numpy")
def _qx_sums(x: np.ndarray, iscale: np.float32, nmax: int) -> tuple[np.float32, np.float32]:
    """x^2-weighted sums (sum w*x*l, sum w*l*l) of the symmetric rounding at iscale."""
    sumlx = _ZERO
    suml2 = _ZERO
    for i in range(x.shape[0]):
        l = np.float32(_clamp(_nearest_int(iscale * x[i]), -nmax, nmax - 1))
        w = x[i] * x[i]
        sumlx += w * x[i] * l
        suml2 += w * l * l
    return sumlx, suml2


@njit(cache=True, error_model="numpy")
def _qx_levels(x: np.ndarray, L: np.ndarray, iscale: np.float32, nmax: int) -> None:
    for i in range(x.shape[0]):
        L[i] = nmax + _clamp(_nearest_int(iscale * x[i]), -nmax, nmax - 1)


@njit(cache=True, error_model="numpy")
def _make_qx_quants(x: np.ndarray, L: np.ndarray, nmax: int) -> np.float32:
    """Signed scale of a symmetric sub-block (levels -nmax..nmax-1, stored +nmax in L).

    Weights are x^2. Tries 19 scales around nmax/max and keeps the one whose least-squares
    refit explains the most weighted energy (largest sumlx^2 / suml2).
    """
    amax, vmax = _signed_absmax_n(x)
    if amax < _GROUP_MAX_EPS:
        L[: x.shape[0]] = 0
        return _ZERO
    iscale = np.float32(-nmax) / vmax
    _qx_levels(x, L, iscale, nmax)
    sumlx, suml2 = _qx_sums(x, iscale, nmax)
    scale = sumlx / suml2 if suml2 != _ZERO else _ZERO
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(np.float32(nmax) + np.float32(0.1) * np.float32(step)) / vmax
        sumlx, suml2 = _qx_sums(x, iscale, nmax)
        if suml2 > _ZERO and sumlx * sumlx > best * suml2:
            _qx_levels(x, L, iscale, nmax)
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True, error_model="numpy")
def _make_q3_quants(x: np.ndarray, L: np.ndarray, nmax: int) -> np.float32:
    """Signed scale of a 3-bit sub-block: round at nmax/max, then move single values to better
    levels while the x^2-weighted fit improves (at most 5 passes). L gets level + nmax."""
    n = x.shape[0]
    amax, vmax = _signed_absmax_n(x)
    if amax < _GROUP_MAX_EPS:
        L[:n] = 0
        return _ZERO
    iscale = np.float32(-nmax) / vmax
    sumlx = _ZERO
    suml2 = _ZERO
    for i in range(n):
        l = _clamp(_nearest_int(iscale * x[i]), -nmax, nmax - 1)
        L[i] = l
        w = x[i] * x[i]
        sumlx += w * x[i] * np.float32(l)
        suml2 += w * np.float32(l) * np.float32(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            li = np.float32(L[i])
            slx = sumlx - w * x[i] * li
            if slx > _ZERO:
                sl2 = suml2 - w * li * li
                new_l = _clamp(_nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1)
                if new_l != L[i]:
                    slx += w * x[i] * np.float32(new_l)
                    sl2 += w * np.float32(new_l) * np.float32(new_l)
                    if sl2 > _ZERO and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > _ZERO else _ZERO


# ----------------------------------------------------------------------------------------------
# 256-element super-blocks


@njit(cache=True, error_model="numpy")
def _pack_2bit(L: np.ndarray, ob: np.ndarray, pos: int) -> None:
    # Byte l of each 32-byte group holds elements l, l+32, l+64, l+96 of its 128-element half.
    for j in range(0, QK_K, 128):
        for l in range(32):
            ob[pos + j // 4 + l] = (
                L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6)
            )


@njit(cache=True, error_model="numpy")
def _block_q2_k(xb: np.ndarray, ob: np.ndarray, L: np.ndarray, work: np.ndarray) -> None:
    # ob: scales[16] (scale | min << 4), qs[64], d, dmin.  work: float32[48], L: int32[256+16].
    weights, scales, mins = work[0:16], work[16:32], work[32:48]
    Laux = L[QK_K : QK_K + 16]
    max_scale = _ZERO
    max_min = _ZERO
    for j in range(16):
        xs = xb[16 * j : 16 * j + 16]
        for l in range(16):
            weights[l] = abs(xs[l])
        sc, mn = _make_qkx2_quants(
            xs, weights, L[16 * j :], Laux, 3, np.float32(-0.5), np.float32(0.1), 15, True
        )
        scales[j], mins[j] = sc, mn
        max_scale = sc if sc > max_scale else max_scale
        max_min = mn if mn > max_min else max_min
    d = dmin = _ZERO
    ob[0:16] = 0
    if max_scale > _ZERO:
        iscale = np.float32(15.0) / max_scale
        for j in range(16):
            ob[j] = _nearest_int(iscale * scales[j]) & 0xFF
        d = _put_f16(ob, 80, max_scale / np.float32(15.0))
    else:
        _put_f16(ob, 80, _ZERO)
    if max_min > _ZERO:
        iscale = np.float32(15.0) / max_min
        for j in range(16):
            ob[j] = (np.int64(ob[j]) | (_nearest_int(iscale * mins[j]) << 4)) & 0xFF
        dmin = _put_f16(ob, 82, max_min / np.float32(15.0))
    else:
        _put_f16(ob, 82, _ZERO)
    for j in range(16):
        dl = d * np.float32(np.int64(ob[j]) & 0xF)
        if dl == _ZERO:
            continue  # keeps the levels of the search
        ml = dmin * np.float32(np.int64(ob[j]) >> 4)
        for ii in range(16):
            L[16 * j + ii] = _clamp(_nearest_int((xb[16 * j + ii] + ml) / dl), 0, 3)
    _pack_2bit(L, ob, 16)


@njit(cache=True, error_model="numpy")
def _q3_k_scale(sc: np.ndarray, j: int) -> np.int64:
    low4 = (np.int64(sc[j]) & 0xF) if j < 8 else (np.int64(sc[j - 8]) >> 4)
    high2 = (np.int64(sc[8 + j % 4]) >> (2 * (j // 4))) & 3
    return (low4 | (high2 << 4)) - 32


@njit(cache=True, error_model="numpy")
def _q3_k_pack_scales(sc: np.ndarray, scales: np.ndarray, iscale: np.float32) -> None:
    # 16 six-bit scales (stored +32): low nibbles in bytes 0..7, top two bits in bytes 8..11.
    sc[:] = 0
    for j in range(16):
        l = _nearest_int(iscale * scales[j])
        l = ((l + 128) & 0xFF) - 128  # the C code holds it in an int8 first
        l = _clamp(l, -32, 31) + 32
        if j < 8:
            sc[j] = l & 0xF
        else:
            sc[j - 8] |= (l & 0xF) << 4
        sc[8 + j % 4] |= (l >> 4) << (2 * (j // 4))


@njit(cache=True, error_model="numpy")
def _block_q3_k(xb: np.ndarray, ob: np.ndarray, L: np.ndarray, work: np.ndarray) -> None:
    # ob: hmask[32], qs[64], scales[12], d.  work: float32[16].
    scales = work[0:16]
    amax = _ZERO
    max_scale = _ZERO
    for j in range(16):
        scales[j] = _make_q3_quants(xb[16 * j : 16 * j + 16], L[16 * j :], 4)
        if abs(scales[j]) > amax:
            amax = abs(scales[j])
            max_scale = scales[j]
    sc = ob[96:108]
    sc[:] = 0
    d = _ZERO
    if max_scale != _ZERO:
        iscale = np.float32(-32.0) / max_scale
        _q3_k_pack_scales(sc, scales, iscale)
        d = _put_f16(ob, 108, _ONE / iscale)
    else:
        _put_f16(ob, 108, _ZERO)
    for j in range(16):
        dl = d * np.float32(_q3_k_scale(sc, j))
        if dl == _ZERO:
            continue
        for ii in range(16):
            L[16 * j + ii] = _clamp(_nearest_int(xb[16 * j + ii] / dl), -4, 3) + 4
    # High bit of element j goes to bit j // 32 of hmask[j % 32]; the low two bits to qs.
    ob[0:32] = 0
    for j in range(QK_K):
        if L[j] > 3:
            ob[j % 32] |= 1 << (j // 32)
            L[j] -= 4
    _pack_2bit(L, ob, 32)


@njit(cache=True, error_model="numpy")
def _pack_k4_scales(sc: np.ndarray, ls: np.ndarray, lm: np.ndarray) -> None:
    # Eight 6-bit (scale, min) pairs in 12 bytes: pairs 0..3 whole in bytes 0..7; pairs 4..7
    # split into low nibbles (bytes 8..11) and top two bits (bits 6..7 of bytes 0..7).
    for j in range(8):
        if j < 4:
            sc[j] = ls[j]
            sc[j + 4] = lm[j]
        else:
            sc[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            sc[j - 4] |= (ls[j] >> 4) << 6
            sc[j] |= (lm[j] >> 4) << 6


@njit(cache=True, error_model="numpy")
def _k4_scale_min(sc: np.ndarray, j: int) -> tuple[np.int64, np.int64]:
    if j < 4:
        return np.int64(sc[j]) & 63, np.int64(sc[j + 4]) & 63
    a, b, c = np.int64(sc[j + 4]), np.int64(sc[j - 4]), np.int64(sc[j])
    return (a & 0xF) | ((b >> 6) << 4), (a >> 4) | ((c >> 6) << 4)


@njit(cache=True, error_model="numpy")
def _k_scales_mins(
    xb: np.ndarray, L: np.ndarray, work: np.ndarray, nmax: int, rmin: np.float32, nstep: int
) -> tuple[np.float32, np.float32]:
    """Per 32-element sub-block search of Q4_K/Q5_K; returns the largest scale and min."""
    weights, scales, mins = work[0:32], work[32:40], work[40:48]
    Laux = L[QK_K : QK_K + 32]
    max_scale = _ZERO
    max_min = _ZERO
    for j in range(8):
        xs = xb[32 * j : 32 * j + 32]
        sum_x2 = _ZERO
        for l in range(32):
            sum_x2 += xs[l] * xs[l]
        av_x = np.float32(np.sqrt(sum_x2 / np.float32(32.0)))
        for l in range(32):
            weights[l] = av_x + abs(xs[l])
        sc, mn = _make_qkx2_quants(
            xs, weights, L[32 * j :], Laux, nmax, rmin, np.float32(0.1), nstep, False
        )
        scales[j], mins[j] = sc, mn
        max_scale = sc if sc > max_scale else max_scale
        max_min = mn if mn > max_min else max_min
    return max_scale, max_min


@njit(cache=True, error_model="numpy")
def _k_store_scales(
    ob: np.ndarray, L: np.ndarray, work: np.ndarray, max_scale: np.float32, max_min: np.float32
) -> tuple[np.float32, np.float32]:
    """Quantize the 8 scales and mins to 6 bits; store d, dmin (bytes 0..3) and the 12 scale
    bytes (4..15). Returns the stored d and dmin."""
    scales, mins = work[32:40], work[40:48]
    ls, lm = L[_SCRATCH_LS : _SCRATCH_LS + 8], L[_SCRATCH_LS + 8 : _SCRATCH_LS + 16]
    inv_scale = np.float32(63.0) / max_scale if max_scale > _ZERO else _ZERO
    inv_min = np.float32(63.0) / max_min if max_min > _ZERO else _ZERO
    for j in range(8):
        ls[j] = min(63, _nearest_int(inv_scale * scales[j]) & 0xFF)
        lm[j] = min(63, _nearest_int(inv_min * mins[j]) & 0xFF)
    _pack_k4_scales(ob[4:16], ls, lm)
    d = _put_f16(ob, 0, max_scale / np.float32(63.0))
    dmin = _put_f16(ob, 2, max_min / np.float32(63.0))
    return d, dmin


@njit(cache=True, error_model="numpy")
def _k_requantize(
    xb: np.ndarray, ob: np.ndarray, L: np.ndarray, d: np.float32, dmin: np.float32, nmax: int
) -> None:
    """Re-round every value against the scales and mins as stored."""
    sc = ob[4:16]
    for j in range(8):
        s, m = _k4_scale_min(sc, j)
        dl = d * np.float32(s)
        if dl == _ZERO:
            continue
        ml = dmin * np.float32(m)
        for ii in range(32):
            L[32 * j + ii] = _clamp(_nearest_int((xb[32 * j + ii] + ml) / dl), 0, nmax)


@njit(cache=True, error_model="numpy")
def _block_q4_k(xb: np.ndarray, ob: np.ndarray, L: np.ndarray, work: np.ndarray) -> None:
    # ob: d, dmin, scales[12], qs[128].  work: float32[48], L: int32[256+32].
    max_scale, max_min = _k_scales_mins(xb, L, work, 15, np.float32(-1.0), 20)
    d, dmin = _k_store_scales(ob, L, work, max_scale, max_min)
    _k_requantize(xb, ob, L, d, dmin, 15)
    for j in range(0, QK_K, 64):  # 32 bytes per 64 elements: low nibble j+l, high j+l+32
        for l in range(32):
            ob[16 + j // 2 + l] = L[j + l] | (L[j + l + 32] << 4)


@njit(cache=True, error_model="numpy")
def _block_q5_k(xb: np.ndarray, ob: np.ndarray, L: np.ndarray, work: np.ndarray) -> None:
    # ob: d, dmin, scales[12], qh[32], qs[128].
    max_scale, max_min = _k_scales_mins(xb, L, work, 31, np.float32(-0.5), 15)
    d, dmin = _k_store_scales(ob, L, work, max_scale, max_min)
    _k_requantize(xb, ob, L, d, dmin, 31)
    ob[16:48] = 0
    for n in range(0, QK_K, 64):
        m1 = 1 << (n // 32)
        for j in range(32):
            l1 = L[n + j]
            l2 = L[n + j + 32]
            if l1 > 15:
                l1 -= 16
                ob[16 + j] |= m1
            if l2 > 15:
                l2 -= 16
                ob[16 + j] |= m1 << 1
            ob[48 + n // 2 + j] = l1 | (l2 << 4)


@njit(cache=True, error_model="numpy")
def _block_q6_k(xb: np.ndarray, ob: np.ndarray, L: np.ndarray, work: np.ndarray) -> None:
    # ob: ql[128], qh[64], scales int8[16], d.  work: float32[16].
    scales = work[0:16]
    max_abs = _ZERO
    max_scale = _ZERO
    for ib in range(16):
        scales[ib] = _make_qx_quants(xb[16 * ib : 16 * ib + 16], L[16 * ib :], 32)
        if abs(scales[ib]) > max_abs:
            max_abs = abs(scales[ib])
            max_scale = scales[ib]
    if max_abs < _GROUP_MAX_EPS:
        ob[:] = 0
        return
    iscale = np.float32(-128.0) / max_scale
    d = _put_f16(ob, 208, _ONE / iscale)
    for ib in range(16):
        ob[192 + ib] = min(127, _nearest_int(iscale * scales[ib])) & 0xFF
    for j in range(16):
        s = np.int64(ob[192 + j])
        dl = d * np.float32(s - 256 if s > 127 else s)
        if dl == _ZERO:
            continue
        for ii in range(16):
            L[16 * j + ii] = _clamp(_nearest_int(xb[16 * j + ii] / dl), -32, 31) + 32
    _pack_q6_k(L, ob)


@njit(cache=True, error_model="numpy")
def _pack_q6_k(L: np.ndarray, ob: np.ndarray) -> None:
    # Per 128 elements: ql holds low nibbles (l | l+64 << 4, l+32 | l+96 << 4), qh the top 2 bits.
    for h in range(2):
        j, ql, qh = 128 * h, 64 * h, 128 + 32 * h
        for l in range(32):
            q1, q2, q3, q4 = L[j + l], L[j + l + 32], L[j + l + 64], L[j + l + 96]
            ob[ql + l] = (q1 & 0xF) | ((q3 & 0xF) << 4)
            ob[ql + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4)
            ob[qh + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)


# ----------------------------------------------------------------------------------------------
# Drivers: one per type, blocks split across threads in fixed-size tasks


@njit(cache=True, error_model="numpy")
def _run_block(type_id: int, xb: np.ndarray, ob: np.ndarray, L: np.ndarray, work: np.ndarray):
    if type_id == Q8_0:
        _block_q8_0(xb, ob)
    elif type_id == Q4_0:
        _block_q4_0(xb, ob)
    elif type_id == Q5_0:
        _block_q5_0(xb, ob)
    elif type_id == Q4_1:
        _block_q4_1(xb, ob)
    elif type_id == Q5_1:
        _block_q5_1(xb, ob)
    elif type_id == IQ4_NL:
        _block_iq4_nl(xb, ob)
    elif type_id == Q2_K:
        _block_q2_k(xb, ob, L, work)
    elif type_id == Q3_K:
        _block_q3_k(xb, ob, L, work)
    elif type_id == Q4_K:
        _block_q4_k(xb, ob, L, work)
    elif type_id == Q5_K:
        _block_q5_k(xb, ob, L, work)
    elif type_id == Q6_K:
        _block_q6_k(xb, ob, L, work)


@njit(cache=True, error_model="numpy")
def _run_task(type_id: int, qk: int, size: int, x: np.ndarray, out: np.ndarray, b0: int, b1: int):
    L = np.zeros(_SCRATCH_INTS, np.int32)
    work = np.zeros(48, np.float32)
    for b in range(b0, b1):
        _run_block(type_id, x[b * qk : (b + 1) * qk], out[b * size : (b + 1) * size], L, work)


@njit(cache=True, parallel=True, error_model="numpy")
def _quantize_parallel(type_id: int, qk: int, size: int, x: np.ndarray, out: np.ndarray) -> None:
    n_blocks = x.shape[0] // qk
    n_tasks = (n_blocks + _BLOCKS_PER_TASK - 1) // _BLOCKS_PER_TASK
    for t in prange(n_tasks):
        b0 = t * _BLOCKS_PER_TASK
        _run_task(type_id, qk, size, x, out, b0, min(n_blocks, b0 + _BLOCKS_PER_TASK))


# ----------------------------------------------------------------------------------------------
# Public face


@dataclass(frozen=True)
class QuantSpec:
    block_size: int  # elements per block
    type_size: int  # bytes per block


_SPECS: dict[int, QuantSpec] = {
    Q4_0: QuantSpec(32, 18),
    Q4_1: QuantSpec(32, 20),
    Q5_0: QuantSpec(32, 22),
    Q5_1: QuantSpec(32, 24),
    Q8_0: QuantSpec(32, 34),
    IQ4_NL: QuantSpec(32, 18),
    Q2_K: QuantSpec(QK_K, 84),
    Q3_K: QuantSpec(QK_K, 110),
    Q4_K: QuantSpec(QK_K, 144),
    Q5_K: QuantSpec(QK_K, 176),
    Q6_K: QuantSpec(QK_K, 210),
}

# Plain float targets (a shape that fits no block falls back to F16); numpy rounds to nearest even.
_FLOAT_TYPES: dict[int, Any] = {F32: np.float32, F16: np.float16}


def quantizable_types() -> tuple[int, ...]:
    """ggml type ids `quantize` can produce as blocks (plain F32/F16 are accepted too)."""
    return tuple(sorted(_SPECS))


def quantized_row_bytes(ggml_type: int, row_len: int) -> int:
    """Bytes of one quantized row of row_len elements (row_len a multiple of the block)."""
    if ggml_type in _FLOAT_TYPES:
        return row_len * np.dtype(_FLOAT_TYPES[ggml_type]).itemsize
    spec = _spec(ggml_type)
    return row_len // spec.block_size * spec.type_size


def quantize(x: np.ndarray, ggml_type: int) -> np.ndarray:
    """Quantize float32 rows [n_rows, row_len] to uint8 rows [n_rows, row_bytes] of ggml_type.

    Raises ValueError for an unknown type, a row length that is not a multiple of the type's
    block, or non-finite input (llama.cpp would write blocks its own validation rejects).
    """
    rows = np.ascontiguousarray(x, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError(f"expected a 2-D array of rows, got shape {rows.shape}")
    n_rows, row_len = rows.shape
    flat = rows.reshape(-1)
    if not _all_finite(flat):
        raise ValueError("cannot quantize non-finite values (inf or NaN)")
    if ggml_type in _FLOAT_TYPES:
        return rows.astype(_FLOAT_TYPES[ggml_type]).view(np.uint8).reshape(n_rows, -1)
    spec = _spec(ggml_type)
    if row_len % spec.block_size:
        raise ValueError(f"row length {row_len} is not a multiple of {spec.block_size}")
    out = np.empty((n_rows, quantized_row_bytes(ggml_type, row_len)), dtype=np.uint8)
    if flat.size:
        _quantize_parallel(int(ggml_type), spec.block_size, spec.type_size, flat, out.reshape(-1))
    return out


def _spec(ggml_type: int) -> QuantSpec:
    spec = _SPECS.get(int(ggml_type))
    if spec is None:
        raise ValueError(f"no quantizer for ggml type {ggml_type}")
    return spec
