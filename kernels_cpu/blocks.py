"""GGUF quantized blocks decoded to integers and group scales: the one decoder of each type.

A row of a quantized ggml tensor is a run of blocks (32 elements, or 256 for the K-quants);
blocks never cross rows. `decode_rows` turns the bytes of a row (uint8 [row_bytes]) of K
elements into

    q   int8    [K]       the integer of each element
    sc  float32 [K // G]  the scale of each group of G consecutive elements
    mn  float32 [K // G]  the min of each group (types with an offset; none for the others)

such that the element is  sc[k // G] * q[k] - mn[k // G]  (without mins: sc[k // G] * q[k]).
matmul.py packs q into its tiles' bit planes and, rather than sc and mn, the fields they come
from as the file stores them (`block_fields`: f16 d and dmin, the K-quants' sub-scale bytes),
multiplying them out in its kernels as here. Given a float32 destination instead of an int8
one, the same decoder writes each element's float32 value rather than q (quants.py's
dequantization, which wants no sc and mn), as the lanes are decoded, so the integers never go
through memory. The float order is gguf's dequantizer's, so the floats are bit-exact to it:
the K-quants' scales are multiplied out first in float32 as ggml does (d * 6-bit scale,
dmin * 6-bit min), then times q, then less the min. Q4_1 and Q5_1 store their min as an added
offset m, kept here as mn = -m (x - (-m) is x + m exactly in IEEE arithmetic); types without
mins subtract 0.0, which changes no float (-0.0 - 0.0 is -0.0). G and whether a type has mins
are in SPECS.

The elements are decoded 16 at a time as vector lanes (simd.py): a block's loops are short, and
LLVM's own vectorization of them paid more in run-time checks per block than the work itself.
Numba's cache keys each compiled function on its own file: after editing this file, simd.py
or f16.py, clear kernels_cpu/__pycache__ (the kernels that call them keep the old code).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from . import simd
from .f16 import read_f16

# ggml type ids (the GGUF format's numbering; kernels do not import the runtime's table).
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, BF16 = 10, 11, 12, 13, 14, 20, 30

QK_K = 256  # elements per K-quant super-block


class BlockSpec(NamedTuple):
    """Facts of one quantized type's format and of its decoded form."""

    block: int  # elements per block
    nbytes: int  # bytes per block
    group: int  # G: elements per scale (and min) in the decoded form
    has_min: bool
    halves: tuple[int, ...]  # byte offsets of the f16 fields (d, then dmin/m) in a block


SPECS: dict[int, BlockSpec] = {
    Q4_0: BlockSpec(32, 18, 32, False, (0,)),
    Q4_1: BlockSpec(32, 20, 32, True, (0, 2)),
    Q5_0: BlockSpec(32, 22, 32, False, (0,)),
    Q5_1: BlockSpec(32, 24, 32, True, (0, 2)),
    Q8_0: BlockSpec(32, 34, 32, False, (0,)),
    IQ4_NL: BlockSpec(32, 18, 32, False, (0,)),
    Q2_K: BlockSpec(QK_K, 84, 16, True, (80, 82)),
    Q3_K: BlockSpec(QK_K, 110, 16, False, (108,)),
    Q4_K: BlockSpec(QK_K, 144, 32, True, (0, 2)),
    Q5_K: BlockSpec(QK_K, 176, 32, True, (0, 2)),
    Q6_K: BlockSpec(QK_K, 210, 16, False, (208,)),
}
"""Every quantized type decode_rows knows, by type id."""

IQ4_NL_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8
)
"""Non-linear 4-bit code book of IQ4_NL."""


# ----------------------------------------------------------------------------------------------
# Decoders: each takes src (the rows' bytes, flat), sc, mn and dst (decode_rows), the rows to
# decode (their numbers in src, of row_bytes each) and the blocks per row nb; block t of the
# call is elements block * t.. of dst (indexed flat) and groups block / G * t.. of sc and mn.
# Each has its own loop over rows and blocks, kept per type for speed: a call per row costs
# reference counts on its arrays (~50 ns, a row's work), one flat loop over blocks a division
# per block (4x slower).
#
# 32-element blocks: element e < 16 is the low nibble of qs[e], e >= 16 the high nibble of
# qs[e-16]. One scale per block (G = 32).


@njit(cache=True)
def _rows_4bit(src, sc, mn, dst, rows, row_bytes, nb, nbytes, qs_off, bias, has_min):
    # Q4_0 (18 bytes: d, qs; q = nibble - 8) and Q4_1 (20: d, m, qs; q = nibble, min -m).
    for r in range(rows.shape[0]):
        start = rows[r] * row_bytes
        for b in range(nb):
            t = r * nb + b
            s, o = start + nbytes * b, 32 * t
            d = read_f16(src, s)
            m = -read_f16(src, s + 2) if has_min else np.float32(0)
            if sc is not None:
                sc[t] = d
                if has_min:
                    mn[t] = m
            scale, low = simd.f32_splat(d), simd.f32_splat(m)
            v = simd.load_bytes(src, s + qs_off)
            simd.put_lanes(dst, o, (v & 15) - bias, scale, low)
            simd.put_lanes(dst, o + 16, (v >> 4) - bias, scale, low)


@njit(cache=True)
def _rows_iq4_nl(src, sc, dst, rows, row_bytes, nb):
    # 18 bytes: d, qs; q = IQ4_NL_VALUES[nibble].
    table = simd.load_bytes(IQ4_NL_VALUES, 0)
    zero = simd.f32_splat(np.float32(0))
    for r in range(rows.shape[0]):
        start = rows[r] * row_bytes
        for b in range(nb):
            t = r * nb + b
            s, o = start + 18 * b, 32 * t
            d = read_f16(src, s)
            if sc is not None:
                sc[t] = d
            v = simd.load_bytes(src, s + 2)
            scale = simd.f32_splat(d)
            simd.put_lanes(dst, o, simd.lookup16(table, v & 15), scale, zero)
            simd.put_lanes(dst, o + 16, simd.lookup16(table, v >> 4), scale, zero)


@njit(cache=True)
def _rows_5bit(src, sc, mn, dst, rows, row_bytes, nb, nbytes, qh_off, bias, has_min):
    # Q5_0 (22 bytes: d, qh[4], qs; q = 5 bits - 16) and Q5_1 (24: d, m, qh[4], qs; min -m).
    # Bit e of the little-endian u32 qh is bit 4 of element e.
    lane_lo = simd.lane_index()
    lane_hi = lane_lo + 16
    for r in range(rows.shape[0]):
        start = rows[r] * row_bytes
        for b in range(nb):
            t = r * nb + b
            s, o = start + nbytes * b, 32 * t
            d = read_f16(src, s)
            m = -read_f16(src, s + 2) if has_min else np.float32(0)
            if sc is not None:
                sc[t] = d
                if has_min:
                    mn[t] = m
            scale, low = simd.f32_splat(d), simd.f32_splat(m)
            qh = simd.broadcast_quad(src, s + qh_off)  # the u32 in every lane
            v = simd.load_bytes(src, s + qh_off + 4)
            high_lo = ((qh >> lane_lo) & 1) << 4
            high_hi = ((qh >> lane_hi) & 1) << 4
            simd.put_lanes(dst, o, ((v & 15) | high_lo) - bias, scale, low)
            simd.put_lanes(dst, o + 16, ((v >> 4) | high_hi) - bias, scale, low)


@njit(cache=True)
def _rows_q8_0(src, sc, dst, rows, row_bytes, nb):
    # 34 bytes: d, qs int8[32]; (u ^ 128) - 128 reads the unsigned byte u as signed.
    zero = simd.f32_splat(np.float32(0))
    for r in range(rows.shape[0]):
        start = rows[r] * row_bytes
        for b in range(nb):
            t = r * nb + b
            s, o = start + 34 * b, 32 * t
            d = read_f16(src, s)
            if sc is not None:
                sc[t] = d
            scale = simd.f32_splat(d)
            simd.put_lanes(dst, o, (simd.load_bytes(src, s + 2) ^ 128) - 128, scale, zero)
            simd.put_lanes(dst, o + 16, (simd.load_bytes(src, s + 18) ^ 128) - 128, scale, zero)


# ----------------------------------------------------------------------------------------------
# 256-element super-blocks, walked in 32-element groups g (half h = g // 4, group j = g % 4 of
# that half), each two vectors of 16 lanes (u = 0, 1: the group's elements 16u..16u+15, from
# bytes 16u.. of its 32). Q2_K, Q3_K and Q6_K have a scale per 16 elements (G = 16: scale i of
# a block covers its elements 16i..16i+15), Q4_K and Q5_K per 32.


@njit(cache=True)
def _rows_q2_k(src, sc, mn, dst, rows, row_bytes, nb):
    # 84 bytes: scales[16] (low nibble scale, high nibble min), qs[64], d, dmin. Group j of half
    # h is bits 2j..2j+1 of qs[32h + l].
    for r in range(rows.shape[0]):
        start = rows[r] * row_bytes
        for b in range(nb):
            t = r * nb + b
            s, o = start + 84 * b, QK_K * t
            d = read_f16(src, s + 80)
            dmin = read_f16(src, s + 82)
            for h in range(2):
                qs = (
                    simd.load_bytes(src, s + 16 + 32 * h),
                    simd.load_bytes(src, s + 32 + 32 * h),
                )
                for j in range(4):
                    for u in range(2):
                        i = 8 * h + 2 * j + u
                        v = np.int32(src[s + i])
                        scale, low = d * np.float32(v & 15), dmin * np.float32(v >> 4)
                        if sc is not None:
                            sc[16 * t + i] = scale
                            mn[16 * t + i] = low
                        lanes = (qs[u] >> (2 * j)) & 3
                        simd.put_lanes(
                            dst, o + 16 * i, lanes, simd.f32_splat(scale), simd.f32_splat(low)
                        )


@njit(cache=True)
def _q3_k_scale(src: np.ndarray, s: int, i: int) -> np.int32:
    """Signed 6-bit scale i (0..15) of the Q3_K block whose 12 scale bytes start at s."""
    low4 = np.int32(src[s + i] & 15) if i < 8 else np.int32(src[s + i - 8] >> 4)
    high2 = np.int32(src[s + 8 + i % 4] >> (2 * (i // 4))) & 3
    return (low4 | (high2 << 4)) - 32


@njit(cache=True)
def _rows_q3_k(src, sc, dst, rows, row_bytes, nb):
    # 110 bytes: hmask[32], qs[64], scales[12], d. Group j of half h is bits 2j..2j+1 of
    # qs[32h + l], less 4 unless bit g of hmask[l] is set.
    zero = simd.f32_splat(np.float32(0))
    for r in range(rows.shape[0]):
        start = rows[r] * row_bytes
        for b in range(nb):
            t = r * nb + b
            s, o = start + 110 * b, QK_K * t
            d = read_f16(src, s + 108)
            hmask = (simd.load_bytes(src, s), simd.load_bytes(src, s + 16))
            for h in range(2):
                qs = (
                    simd.load_bytes(src, s + 32 + 32 * h),
                    simd.load_bytes(src, s + 48 + 32 * h),
                )
                for j in range(4):
                    g = 4 * h + j
                    for u in range(2):
                        i = 2 * g + u
                        scale = d * np.float32(_q3_k_scale(src, s + 96, i))
                        if sc is not None:
                            sc[16 * t + i] = scale
                        offset = (((hmask[u] >> g) & 1) ^ 1) << 2
                        lanes = ((qs[u] >> (2 * j)) & 3) - offset
                        simd.put_lanes(dst, o + 16 * i, lanes, simd.f32_splat(scale), zero)


@njit(cache=True)
def _k_scale_min(src: np.ndarray, s: int, j: int) -> tuple[np.int32, np.int32]:
    """6-bit (scale, min) of sub-block j (0..7) from the 12 packed bytes at s (Q4_K, Q5_K)."""
    if j < 4:
        return np.int32(src[s + j] & 63), np.int32(src[s + j + 4] & 63)
    sc = (src[s + j + 4] & 15) | ((src[s + j - 4] >> 6) << 4)
    m = (src[s + j + 4] >> 4) | ((src[s + j] >> 6) << 4)
    return np.int32(sc), np.int32(m)


@njit(cache=True)
def _rows_q45_k(src, sc, mn, dst, rows, row_bytes, nb, nbytes, qh_off, qs_off):
    # Q4_K (144 bytes: d, dmin, scales[12], qs[128]) and Q5_K (176: the same with qh[32] before
    # qs). Sub-block j is the low (even j) or high (odd j) nibbles of qs[32 * (j // 2):][:32];
    # bit j of qh[l] is its bit 4.
    for r in range(rows.shape[0]):
        start = rows[r] * row_bytes
        for b in range(nb):
            t = r * nb + b
            s, o = start + nbytes * b, QK_K * t
            d = read_f16(src, s)
            dmin = read_f16(src, s + 2)
            qh = (simd.load_bytes(src, s + qh_off), simd.load_bytes(src, s + qh_off + 16))
            for c in range(4):
                qs = (
                    simd.load_bytes(src, s + qs_off + 32 * c),
                    simd.load_bytes(src, s + qs_off + 32 * c + 16),
                )
                for half in range(2):
                    j = 2 * c + half
                    scale_bits, min_bits = _k_scale_min(src, s + 4, j)
                    scale, low = d * np.float32(scale_bits), dmin * np.float32(min_bits)
                    if sc is not None:
                        sc[8 * t + j] = scale
                        mn[8 * t + j] = low
                    for u in range(2):
                        lanes = (qs[u] >> (4 * half)) & 15
                        if qh_off:  # Q5_K
                            lanes = lanes | (((qh[u] >> j) & 1) << 4)
                        simd.put_lanes(
                            dst,
                            o + 32 * j + 16 * u,
                            lanes,
                            simd.f32_splat(scale),
                            simd.f32_splat(low),
                        )


@njit(cache=True)
def _rows_q6_k(src, sc, dst, rows, row_bytes, nb):
    # 210 bytes: ql[128], qh[64], scales int8[16], d. Group j of half h takes the low (j < 2) or
    # high nibble of ql[64h + 32(j % 2) + l] and bits 2j..2j+1 of qh[32h + l], less 32.
    zero = simd.f32_splat(np.float32(0))
    for r in range(rows.shape[0]):
        start = rows[r] * row_bytes
        for b in range(nb):
            t = r * nb + b
            s, o = start + 210 * b, QK_K * t
            d = read_f16(src, s + 208)
            for h in range(2):
                qh = (
                    simd.load_bytes(src, s + 128 + 32 * h),
                    simd.load_bytes(src, s + 144 + 32 * h),
                )
                for j in range(4):
                    ql, nib_shift = s + 64 * h + 32 * (j % 2), 4 * (j // 2)
                    for u in range(2):
                        i = 8 * h + 2 * j + u
                        scale = d * np.float32(np.int8(src[s + 192 + i]))
                        if sc is not None:
                            sc[16 * t + i] = scale
                        low4 = (simd.load_bytes(src, ql + 16 * u) >> nib_shift) & 15
                        lanes = (low4 | (((qh[u] >> (2 * j)) & 3) << 4)) - 32
                        simd.put_lanes(dst, o + 16 * i, lanes, simd.f32_splat(scale), zero)


# ----------------------------------------------------------------------------------------------
# Entry point


@njit(cache=True, nogil=True)
def decode_rows(
    type_id: int,
    data: np.ndarray,
    rows: np.ndarray,
    sc: np.ndarray | None,
    mn: np.ndarray | None,
    dst: np.ndarray,
) -> None:
    """Rows rows[r] of data (uint8 [n_rows, row_bytes]) decoded, R = len(rows) of them.

    dst C-contiguous, any shape, row r's K elements at flat index r * K: int8 takes q, float32
    the elements' float32 values (module doc); the decoders are compiled once for each. sc and
    mn float32 [R * K // G] take the scales and mins, row r's groups at r * K // G, or are None
    (not wanted); mn is not touched for types without mins. Type ids not in SPECS leave the
    arrays as they are (callers check the type first). The type is dispatched once per call,
    not per row, and no array view is made per row: that reference counting was most of a
    row's time.
    """
    src, rb = data.reshape(data.size), data.shape[1]  # rb: bytes per row
    if type_id == Q4_K:
        _rows_q45_k(src, sc, mn, dst, rows, rb, rb // 144, 144, 0, 16)
    elif type_id == Q6_K:
        _rows_q6_k(src, sc, dst, rows, rb, rb // 210)
    elif type_id == Q8_0:
        _rows_q8_0(src, sc, dst, rows, rb, rb // 34)
    elif type_id == Q5_0:
        _rows_5bit(src, sc, mn, dst, rows, rb, rb // 22, 22, 2, 16, False)
    elif type_id == Q4_0:
        _rows_4bit(src, sc, mn, dst, rows, rb, rb // 18, 18, 2, 8, False)
    elif type_id == Q4_1:
        _rows_4bit(src, sc, mn, dst, rows, rb, rb // 20, 20, 4, 0, True)
    elif type_id == Q5_1:
        _rows_5bit(src, sc, mn, dst, rows, rb, rb // 24, 24, 4, 0, True)
    elif type_id == IQ4_NL:
        _rows_iq4_nl(src, sc, dst, rows, rb, rb // 18)
    elif type_id == Q2_K:
        _rows_q2_k(src, sc, mn, dst, rows, rb, rb // 84)
    elif type_id == Q3_K:
        _rows_q3_k(src, sc, dst, rows, rb, rb // 110)
    elif type_id == Q5_K:
        _rows_q45_k(src, sc, mn, dst, rows, rb, rb // 176, 176, 16, 48)


# ----------------------------------------------------------------------------------------------
# Scale fields as stored (matmul.py's compact tiles keep them, not their float products)


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    # The 8 6-bit (scale, min) pairs of Q4_K/Q5_K from their 12 bytes [..., 12] (_k_scale_min).
    p = packed.astype(np.uint8)
    low = p[..., 0:4] & 63, p[..., 4:8] & 63
    high_sc = (p[..., 8:12] & 15) | ((p[..., 0:4] >> 6) << 4)
    high_mn = (p[..., 8:12] >> 4) | ((p[..., 4:8] >> 6) << 4)
    return np.concatenate([low[0], high_sc], -1), np.concatenate([low[1], high_mn], -1)


def _q3_k_scales(packed: np.ndarray) -> np.ndarray:
    # The 16 signed 6-bit scales of Q3_K from their 12 bytes [..., 12] (_q3_k_scale), as int8.
    p = packed.astype(np.int32)
    i = np.arange(16)
    low4 = np.where(i < 8, p[..., i % 8] & 15, p[..., i % 8] >> 4)
    high2 = (p[..., 8 + i % 4] >> (2 * (i // 4))) & 3
    return ((low4 | (high2 << 4)) - 32).astype(np.int8)


def block_fields(
    type_id: int, data: np.ndarray
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """The scale fields of rows data (uint8 [N, row_bytes]) as the file stores them:

        d    uint16 [N, K // S]  f16 bits of each block's d (S: the block, 32 or 256)
        dm   uint16 [N, K // S]  f16 bits of m (Q4_1, Q5_1) or dmin (K-quants), or None
        sub  uint8  [N, K // G]  the K-quants' sub-block scale of each group (an int8's bits
                                 for Q3_K and Q6_K; Q2_K: scale | min << 4), or None
        mins uint8  [N, K // G]  Q4_K/Q5_K's sub-block min of each group, or None

    decode_rows' sc is d * float32(sub) (32-element blocks: d), its mn dmin * float32(mins)
    (Q2_K: sub >> 4; Q4_1/Q5_1: -m).
    """
    spec = SPECS[type_id]
    n = data.shape[0]
    blocks = data.reshape(n, -1, spec.nbytes)
    nb = blocks.shape[1]

    def half(off: int) -> np.ndarray:
        return np.ascontiguousarray(blocks[:, :, off : off + 2]).view(np.uint16).reshape(n, nb)

    d = half(spec.halves[0])
    dm = half(spec.halves[1]) if len(spec.halves) > 1 else None
    sub = mins = None
    if type_id in (Q4_K, Q5_K):
        sub, mins = (a.reshape(n, nb * 8) for a in _k_scales_mins(blocks[:, :, 4:16]))
    elif type_id == Q6_K:
        sub = blocks[:, :, 192:208].reshape(n, nb * 16)
    elif type_id == Q3_K:
        sub = _q3_k_scales(blocks[:, :, 96:108]).view(np.uint8).reshape(n, nb * 16)
    elif type_id == Q2_K:
        sub = blocks[:, :, 0:16].reshape(n, nb * 16)
    return d, dm, sub, mins
