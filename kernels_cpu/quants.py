"""Dequantization of ggml tensor rows (GGUF weights) to float32, as Numba kernels.

A tensor with `ne = [row_len, n_rows]` is stored as n_rows rows of raw bytes; blocks never cross
rows. Each type has one row kernel `(src: uint8[row_bytes], out: float32[row_len])`, registered
by its type id in `_TYPES` (with its block size and bytes per block, the facts of the format).
Results are bit-exact to `gguf.quants.dequantize`: every float operation is done in float32 in
the oracle's order (no fastmath, so no fused multiply-add changes a rounding).

Arrays reach the kernels read-only and C-contiguous, whatever the caller passed (a memmap, a
writable array), so each compiled kernel has exactly one signature and the on-disk cache hits.
Numba's cache is keyed on this file alone: after editing f16.py, touch this file too, or the
cached kernels keep the old decoder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import get_num_threads, njit, prange

from .f16 import bf16_bits_to_f32, read_f16

# ggml type ids (the GGUF format's numbering).
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, BF16 = 10, 11, 12, 13, 14, 20, 30

QK_K = 256  # elements per K-quant super-block

# Non-linear 4-bit code book of IQ4_NL.
_IQ4_NL_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8
)

# Below this many output elements a parallel launch costs more than it saves.
_PARALLEL_MIN_ELEMENTS = 1 << 16


# ----------------------------------------------------------------------------------------------
# Plain float rows


@njit(cache=True)
def _row_f32(src: np.ndarray, out: np.ndarray) -> None:
    for i in range(out.shape[0]):
        o = 4 * i
        bits = np.uint32(
            np.uint32(src[o])
            | (np.uint32(src[o + 1]) << np.uint32(8))
            | (np.uint32(src[o + 2]) << np.uint32(16))
            | (np.uint32(src[o + 3]) << np.uint32(24))
        )
        out[i] = bits.view(np.float32)


@njit(cache=True)
def _row_f16(src: np.ndarray, out: np.ndarray) -> None:
    for i in range(out.shape[0]):
        out[i] = read_f16(src, 2 * i)


@njit(cache=True)
def _row_bf16(src: np.ndarray, out: np.ndarray) -> None:
    for i in range(out.shape[0]):
        out[i] = bf16_bits_to_f32(np.uint32(src[2 * i]) | (np.uint32(src[2 * i + 1]) << 8))


# ----------------------------------------------------------------------------------------------
# 32-element blocks: element e < 16 is the low nibble of qs[e], e >= 16 the high nibble of qs[e-16]
#
# Inner loops run to `_span(k, room)` (always k on whole rows) rather than a literal k: a loop of
# constant length is fully unrolled into scalar code, one of runtime length gets vectorized
# (2-4x faster here).


@njit(cache=True)
def _span(k: int, room: int) -> int:
    return min(k, room)


@njit(cache=True)
def _row_q4_0(src: np.ndarray, out: np.ndarray) -> None:
    n = out.shape[0]
    for b in range(n // 32):
        s, o = 18 * b, 32 * b
        d = read_f16(src, s)
        for l in range(_span(16, n - o)):
            q = np.int32(src[s + 2 + l])
            out[o + l] = d * np.float32((q & 15) - 8)
            out[o + l + 16] = d * np.float32((q >> 4) - 8)


@njit(cache=True)
def _row_q4_1(src: np.ndarray, out: np.ndarray) -> None:
    n = out.shape[0]
    for b in range(n // 32):
        s, o = 20 * b, 32 * b
        d = read_f16(src, s)
        m = read_f16(src, s + 2)
        for l in range(_span(16, n - o)):
            q = np.int32(src[s + 4 + l])
            out[o + l] = d * np.float32(q & 15) + m
            out[o + l + 16] = d * np.float32(q >> 4) + m


@njit(cache=True)
def _read_u32(src: np.ndarray, s: int) -> np.uint32:
    return np.uint32(
        np.uint32(src[s])
        | (np.uint32(src[s + 1]) << np.uint32(8))
        | (np.uint32(src[s + 2]) << np.uint32(16))
        | (np.uint32(src[s + 3]) << np.uint32(24))
    )


@njit(cache=True)
def _row_q5_0(src: np.ndarray, out: np.ndarray) -> None:
    n = out.shape[0]
    for b in range(n // 32):
        s, o = 22 * b, 32 * b
        d = read_f16(src, s)
        qh = np.int64(_read_u32(src, s + 2))
        for l in range(_span(16, n - o)):
            q = np.int32(src[s + 6 + l])
            lo = (q & 15) | np.int32(((qh >> l) & 1) << 4)
            hi = (q >> 4) | np.int32(((qh >> (l + 16)) & 1) << 4)
            out[o + l] = d * np.float32(lo - 16)
            out[o + l + 16] = d * np.float32(hi - 16)


@njit(cache=True)
def _row_q5_1(src: np.ndarray, out: np.ndarray) -> None:
    n = out.shape[0]
    for b in range(n // 32):
        s, o = 24 * b, 32 * b
        d = read_f16(src, s)
        m = read_f16(src, s + 2)
        qh = np.int64(_read_u32(src, s + 4))
        for l in range(_span(16, n - o)):
            q = np.int32(src[s + 8 + l])
            lo = (q & 15) | np.int32(((qh >> l) & 1) << 4)
            hi = (q >> 4) | np.int32(((qh >> (l + 16)) & 1) << 4)
            out[o + l] = d * np.float32(lo) + m
            out[o + l + 16] = d * np.float32(hi) + m


@njit(cache=True)
def _row_q8_0(src: np.ndarray, out: np.ndarray) -> None:
    n = out.shape[0]
    for b in range(n // 32):
        s, o = 34 * b, 32 * b
        d = read_f16(src, s)
        for l in range(_span(32, n - o)):
            out[o + l] = np.float32(np.int8(src[s + 2 + l])) * d


@njit(cache=True)
def _row_iq4_nl(src: np.ndarray, out: np.ndarray) -> None:
    n = out.shape[0]
    for b in range(n // 32):
        s, o = 18 * b, 32 * b
        d = read_f16(src, s)
        for l in range(_span(16, n - o)):
            q = np.int32(src[s + 2 + l])
            out[o + l] = d * np.float32(_IQ4_NL_VALUES[q & 15])
            out[o + l + 16] = d * np.float32(_IQ4_NL_VALUES[q >> 4])


# ----------------------------------------------------------------------------------------------
# 256-element super-blocks. Q2_K, Q3_K and Q6_K give each 16 elements their own scale; they are
# walked in 32-element groups g (half h = g // 4, group j = g % 4 of that half) whose two scales
# are picked per lane: one vectorized loop of 32 beats two of 16 here.


@njit(cache=True)
def _row_q2_k(src: np.ndarray, out: np.ndarray) -> None:
    # Layout: scales[16] (low nibble scale, high nibble min), qs[64], d, dmin.
    for b in range(out.shape[0] // QK_K):
        blk = src[84 * b : 84 * b + 84]
        dst = out[QK_K * b : QK_K * b + QK_K]
        d = read_f16(blk, 80)
        dmin = read_f16(blk, 82)
        for g in range(8):
            h, j = g // 4, g % 4
            qs = blk[16 + 32 * h :]
            dg = dst[32 * g :]
            s0, s1 = np.int32(blk[2 * g]), np.int32(blk[2 * g + 1])
            dl0, ml0 = d * np.float32(s0 & 15), dmin * np.float32(s0 >> 4)
            dl1, ml1 = d * np.float32(s1 & 15), dmin * np.float32(s1 >> 4)
            for l in range(_span(32, dg.shape[0])):
                q = np.float32((np.int32(qs[l]) >> (2 * j)) & 3)
                dg[l] = (dl0 * q - ml0) if l < 16 else (dl1 * q - ml1)


@njit(cache=True)
def _q3_k_scale(src: np.ndarray, s: int, i: int) -> np.int32:
    """Signed 6-bit scale i (0..15) of the Q3_K block whose 12 scale bytes start at s."""
    low4 = np.int32(src[s + i] & 15) if i < 8 else np.int32(src[s + i - 8] >> 4)
    high2 = np.int32(src[s + 8 + i % 4] >> (2 * (i // 4))) & 3
    return (low4 | (high2 << 4)) - 32


@njit(cache=True)
def _row_q3_k(src: np.ndarray, out: np.ndarray) -> None:
    # Layout: hmask[32], qs[64], scales[12], d. Bit g of hmask[l] set means no -4 offset.
    for b in range(out.shape[0] // QK_K):
        blk = src[110 * b : 110 * b + 110]
        dst = out[QK_K * b : QK_K * b + QK_K]
        d = read_f16(blk, 108)
        for g in range(8):
            h, j = g // 4, g % 4
            qs = blk[32 + 32 * h :]
            dg = dst[32 * g :]
            dl0 = d * np.float32(_q3_k_scale(blk, 96, 2 * g))
            dl1 = d * np.float32(_q3_k_scale(blk, 96, 2 * g + 1))
            for l in range(_span(32, dg.shape[0])):
                low = (np.int32(qs[l]) >> (2 * j)) & 3
                no_offset = (np.int32(blk[l]) >> g) & 1
                q = np.float32(low - ((no_offset ^ 1) << 2))
                dg[l] = (dl0 if l < 16 else dl1) * q


@njit(cache=True)
def _k_scale_min(src: np.ndarray, s: int, j: int) -> tuple[np.int32, np.int32]:
    """6-bit (scale, min) of sub-block j (0..7) from the 12 packed bytes at s (Q4_K, Q5_K)."""
    if j < 4:
        return np.int32(src[s + j] & 63), np.int32(src[s + j + 4] & 63)
    sc = (src[s + j + 4] & 15) | ((src[s + j - 4] >> 6) << 4)
    m = (src[s + j + 4] >> 4) | ((src[s + j] >> 6) << 4)
    return np.int32(sc), np.int32(m)


@njit(cache=True)
def _row_q4_k(src: np.ndarray, out: np.ndarray) -> None:
    # Layout: d, dmin, scales[12], qs[128]; 32-element sub-block j uses qs[32*(j//2):][:32],
    # low nibbles for even j, high for odd j.
    n = out.shape[0]
    for b in range(n // QK_K):
        s, o = 144 * b, QK_K * b
        d = read_f16(src, s)
        dmin = read_f16(src, s + 2)
        for j in range(8):
            sc, m = _k_scale_min(src, s + 4, j)
            dl = d * np.float32(sc)
            ml = dmin * np.float32(m)
            qs, shift, oj = s + 16 + 32 * (j // 2), 4 * (j % 2), o + 32 * j
            for l in range(_span(32, n - oj)):
                q = (np.int32(src[qs + l]) >> shift) & 15
                out[oj + l] = dl * np.float32(q) - ml


@njit(cache=True)
def _row_q5_k(src: np.ndarray, out: np.ndarray) -> None:
    # Layout: d, dmin, scales[12], qh[32], qs[128]; bit j of qh[l] is bit 4 of sub-block j.
    n = out.shape[0]
    for b in range(n // QK_K):
        s, o = 176 * b, QK_K * b
        d = read_f16(src, s)
        dmin = read_f16(src, s + 2)
        for j in range(8):
            sc, m = _k_scale_min(src, s + 4, j)
            dl = d * np.float32(sc)
            ml = dmin * np.float32(m)
            qs, shift, oj = s + 48 + 32 * (j // 2), 4 * (j % 2), o + 32 * j
            for l in range(_span(32, n - oj)):
                low4 = (np.int32(src[qs + l]) >> shift) & 15
                high = (np.int32(src[s + 16 + l]) >> j) & 1
                out[oj + l] = dl * np.float32(low4 | (high << 4)) - ml


@njit(cache=True)
def _row_q6_k(src: np.ndarray, out: np.ndarray) -> None:
    # Layout: ql[128], qh[64], scales:i8[16], d. Group j of half h takes the low (j < 2) or high
    # nibble of ql[64h + 32(j % 2) + l] and bits 2j..2j+1 of qh[32h + l].
    for b in range(out.shape[0] // QK_K):
        blk = src[210 * b : 210 * b + 210]
        dst = out[QK_K * b : QK_K * b + QK_K]
        d = read_f16(blk, 208)
        for g in range(8):
            h, j = g // 4, g % 4
            ql = blk[64 * h + 32 * (j % 2) :]
            qh = blk[128 + 32 * h :]
            dg = dst[32 * g :]
            nib_shift = 4 * (j // 2)
            dl0 = d * np.float32(np.int8(blk[192 + 2 * g]))
            dl1 = d * np.float32(np.int8(blk[193 + 2 * g]))
            for l in range(_span(32, dg.shape[0])):
                low4 = (np.int32(ql[l]) >> nib_shift) & 15
                hi2 = (np.int32(qh[l]) >> (2 * j)) & 3
                q = np.float32((low4 | (hi2 << 4)) - 32)
                dg[l] = (dl0 if l < 16 else dl1) * q


# ----------------------------------------------------------------------------------------------
# The table: one row per type id


@dataclass(frozen=True)
class QuantType:
    type_id: int
    name: str
    block_size: int  # elements per block
    type_size: int  # bytes per block
    row_kernel: Any  # Numba dispatcher (src: uint8[row_bytes], out: float32[row_len]) -> None


_TYPES: dict[int, QuantType] = {
    t.type_id: t
    for t in (
        QuantType(F32, "F32", 1, 4, _row_f32),
        QuantType(F16, "F16", 1, 2, _row_f16),
        QuantType(BF16, "BF16", 1, 2, _row_bf16),
        QuantType(Q4_0, "Q4_0", 32, 18, _row_q4_0),
        QuantType(Q4_1, "Q4_1", 32, 20, _row_q4_1),
        QuantType(Q5_0, "Q5_0", 32, 22, _row_q5_0),
        QuantType(Q5_1, "Q5_1", 32, 24, _row_q5_1),
        QuantType(Q8_0, "Q8_0", 32, 34, _row_q8_0),
        QuantType(IQ4_NL, "IQ4_NL", 32, 18, _row_iq4_nl),
        QuantType(Q2_K, "Q2_K", QK_K, 84, _row_q2_k),
        QuantType(Q3_K, "Q3_K", QK_K, 110, _row_q3_k),
        QuantType(Q4_K, "Q4_K", QK_K, 144, _row_q4_k),
        QuantType(Q5_K, "Q5_K", QK_K, 176, _row_q5_k),
        QuantType(Q6_K, "Q6_K", QK_K, 210, _row_q6_k),
    )
}


@njit(cache=True)
def _dequant_row(type_id: int, src: np.ndarray, out: np.ndarray) -> None:
    """Route one row to its type's kernel inside compiled code (the table above, by id).

    Numba cannot cache a function that takes another compiled function as an argument, so
    the multi-row drivers branch on the id here instead of receiving the kernel.
    """
    if type_id == Q4_K:
        _row_q4_k(src, out)
    elif type_id == Q6_K:
        _row_q6_k(src, out)
    elif type_id == Q8_0:
        _row_q8_0(src, out)
    elif type_id == Q5_0:
        _row_q5_0(src, out)
    elif type_id == Q4_0:
        _row_q4_0(src, out)
    elif type_id == Q4_1:
        _row_q4_1(src, out)
    elif type_id == Q5_1:
        _row_q5_1(src, out)
    elif type_id == IQ4_NL:
        _row_iq4_nl(src, out)
    elif type_id == Q2_K:
        _row_q2_k(src, out)
    elif type_id == Q3_K:
        _row_q3_k(src, out)
    elif type_id == Q5_K:
        _row_q5_k(src, out)
    elif type_id == F32:
        _row_f32(src, out)
    elif type_id == F16:
        _row_f16(src, out)
    elif type_id == BF16:
        _row_bf16(src, out)


@njit(cache=True)
def _dequant_rows_serial(type_id: int, data: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    for i in range(rows.shape[0]):
        _dequant_row(type_id, data[rows[i]], out[i])


@njit(cache=True, parallel=True)
def _dequant_rows_parallel(
    type_id: int, data: np.ndarray, rows: np.ndarray, out: np.ndarray
) -> None:
    for i in prange(rows.shape[0]):
        _dequant_row(type_id, data[rows[i]], out[i])


# ----------------------------------------------------------------------------------------------
# Public API


def supported_types() -> tuple[int, ...]:
    """ggml type ids this module dequantizes."""
    return tuple(sorted(_TYPES))


def block_traits(ggml_type: int) -> tuple[int, int]:
    """(elements per block, bytes per block) of a type id."""
    t = _lookup(ggml_type)
    return t.block_size, t.type_size


def row_nbytes(ggml_type: int, row_len: int) -> int:
    """Bytes of one row of row_len elements (row_len a positive multiple of the block size)."""
    t = _lookup(ggml_type)
    if row_len <= 0 or row_len % t.block_size:
        raise ValueError(f"row length {row_len} is not a positive multiple of {t.block_size}")
    return row_len // t.block_size * t.type_size


def dequantize(
    data: np.ndarray, ggml_type: int, row_len: int, *, parallel: bool | None = None
) -> np.ndarray:
    """All rows of a tensor: raw bytes of whole rows -> float32 [n_rows, row_len].

    data: uint8 [n_rows, row_bytes] or 1-D bytes (any dtype is taken as its bytes). parallel:
    None uses Numba's threads (numba.set_num_threads) only when the tensor is big enough to
    pay for the launch; with the omp layer, a busy core makes a 2-thread call spin for
    milliseconds unless OMP_WAIT_POLICY=PASSIVE, so callers that share cores pass False.
    """
    rows2d = np.ascontiguousarray(_as_rows(data, ggml_type, row_len))
    rows = np.arange(rows2d.shape[0], dtype=np.int64)
    return _run(ggml_type, _read_only(rows2d), rows, row_len, parallel)


def dequantize_rows(
    data: np.ndarray,
    ggml_type: int,
    row_len: int,
    rows: np.ndarray,
    *,
    parallel: bool | None = None,
) -> np.ndarray:
    """Only the given rows (an embedding lookup) -> float32 [len(rows), row_len].

    Other rows of `data` are never read, so a memory-mapped tensor stays on disk.
    """
    rows2d = _as_rows(data, ggml_type, row_len)
    n_rows = rows2d.shape[0]
    idx = np.array(rows, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < -n_rows or idx.max() >= n_rows):
        raise IndexError(f"row index out of range for a tensor of {n_rows} rows")
    idx[idx < 0] += n_rows
    if not rows2d.flags.c_contiguous:
        # Gather just the wanted rows into a contiguous block rather than copying the tensor.
        rows2d = rows2d[idx]
        idx = np.arange(idx.shape[0], dtype=np.int64)
    return _run(ggml_type, _read_only(rows2d), idx, row_len, parallel)


def dequantize_row_into(
    data: np.ndarray, ggml_type: int, row_len: int, row: int, out: np.ndarray
) -> None:
    """Dequantize one row into `out` (float32, C-contiguous, writable, shape (row_len,))."""
    rows2d = _as_rows(data, ggml_type, row_len)
    n_rows = rows2d.shape[0]
    if not -n_rows <= row < n_rows:
        raise IndexError(f"row {row} out of range for a tensor of {n_rows} rows")
    if out.dtype != np.float32 or out.shape != (row_len,) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape ({row_len},)")
    if not out.flags.writeable:
        raise ValueError("out is read-only")
    src = _read_only(np.ascontiguousarray(rows2d[row]))
    _TYPES[int(ggml_type)].row_kernel(src, np.asarray(out))


# ----------------------------------------------------------------------------------------------
# Helpers


def _lookup(ggml_type: int) -> QuantType:
    try:
        return _TYPES[int(ggml_type)]
    except KeyError:
        raise ValueError(f"cannot dequantize ggml type {ggml_type}") from None


def _as_rows(data: np.ndarray, ggml_type: int, row_len: int) -> np.ndarray:
    """Raw bytes as uint8 [n_rows, row_bytes], a view wherever the layout allows one (so the
    pages of a memory map are not touched here)."""
    nbytes = row_nbytes(ggml_type, row_len)
    arr = np.asarray(data)  # drops ndarray subclasses such as np.memmap
    if arr.dtype != np.uint8:
        # Float tensors (as the gguf reader hands F32/F16) are the same bytes seen as uint8.
        if arr.ndim == 0 or arr.strides[-1] != arr.itemsize:
            arr = np.ascontiguousarray(arr)
        arr = arr.reshape(1) if arr.ndim == 0 else arr
        arr = arr.view(np.uint8)
    if arr.ndim != 2 or arr.shape[1] != nbytes:
        if arr.size % nbytes:
            raise ValueError(f"{arr.size} bytes are not whole rows of {nbytes} bytes")
        arr = arr.reshape(-1, nbytes)  # copies only when the layout forbids a view
    return arr


def _read_only(arr: np.ndarray) -> np.ndarray:
    """A read-only view: memmaps are read-only, so every caller's array gets that one Numba
    type (one compiled and cached specialization instead of two)."""
    view = arr.view()
    view.flags.writeable = False
    return view


def _run(
    ggml_type: int, rows2d: np.ndarray, rows: np.ndarray, row_len: int, parallel: bool | None
) -> np.ndarray:
    out = np.empty((rows.shape[0], row_len), dtype=np.float32)
    if rows.shape[0] == 0:
        return out
    if parallel is None:
        big = rows.shape[0] > 1 and out.size >= _PARALLEL_MIN_ELEMENTS
        parallel = big and get_num_threads() > 1
    kernel = _dequant_rows_parallel if parallel else _dequant_rows_serial
    kernel(int(ggml_type), rows2d, rows, out)
    return out
