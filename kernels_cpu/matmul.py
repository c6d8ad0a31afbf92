"""Matrix multiplication against quantized weights: out[m, n] = sum_k x[m, k] * W[n, k].

One packed layout serves every type and both paths. Weights are repacked once at load into
tiles of TILE (32) output rows with the rows in the SIMD lanes:

    qs      int8    [T, K * TILE]       qs[t, k*TILE + r] = q of row t*TILE + r, column k
    scales  float32 [T, K // G * TILE]  one per group of G columns (G = 32; 16 for Q2_K/Q3_K/Q6_K)
    mins    float32 [T, K // G * TILE]  only for types with an offset (Q4_1 Q5_1 Q2_K Q4_K Q5_K)

so that W[n, k] = scales * q - mins. Float weights (F32, F16, BF16) keep float32 tiles in `wf`.

Why rows in lanes: the inner loop then runs over 32 output rows with one broadcast activation,
so one group needs no horizontal reduction and no per-group slice; Numba/LLVM vectorize it fully.
Measured here (Zen 5, one thread, Qwen2.5 shapes in cache): ~50 Gmac/s, against ~15 for a
row-major layout taking 4 rows per pass with per-group reductions (the layout of REFERENCE.md
section 5) and ~2 for a loop over a constant 32 on plain indices.

Paths (both use the tiles):
- few rows (decode): activations quantized once per call to int8 blocks of 32 (float scale and
  per-group sums for the mins), int32 accumulators, one float multiply-add per group.
- many rows (prompts, batches): each tile is dequantized to float once into a thread-local
  buffer and a float FMA kernel runs all rows against it, 4 rows per pass.
BLAS is not used: it is ~10% faster at M >= 128 on an idle machine, but OpenBLAS's own threads
spin after each call and fight the Numba threads for the 2 cores (with the second core busy a
BLAS call here took 24-130 ms instead of 0.5-5).
Decode is bound by memory, not by these kernels: a Qwen2.5-0.5B step reads 569 MB of packed
weights (1.45x the file's matrices), so layout size is speed there.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from . import threads as _threads  # threading layer set before any parallel kernel

TILE = 32
"""Output rows per tile (SIMD lanes of the kernels)."""
KC = 8
"""Columns per step of the float kernel; float tiles pad K to a multiple of it."""
SERIAL_MACS = 1 << 18
"""Below this many multiply-adds a matmul runs on the calling thread (~5 us of work)."""
MANY_ROWS = 64
"""From this many activation rows on, the float (dequantize-tile) path is used: measured on one
thread, the int8 path holds ~50 Gmac/s per row at any M, the float path overtakes it at M ~48-64
(~65 Gmac/s at M=128)."""

# ggml type ids (the GGUF format's numbers; kernels do not import the runtime's table).
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = 0, 1, 2, 3, 6, 7, 8
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, BF16 = 10, 11, 12, 13, 14, 20, 30

FLOAT_TYPES = (F32, F16, BF16)


class _QuantSpec(NamedTuple):
    block: int  # elements per block
    nbytes: int  # bytes per block
    group: int  # elements per scale in the packed layout
    has_min: bool
    halves: tuple[int, ...]  # byte offsets of the f16 fields (d, then dmin/m) in a block


QUANT_SPECS: dict[int, _QuantSpec] = {
    Q4_0: _QuantSpec(32, 18, 32, False, (0,)),
    Q4_1: _QuantSpec(32, 20, 32, True, (0, 2)),
    Q5_0: _QuantSpec(32, 22, 32, False, (0,)),
    Q5_1: _QuantSpec(32, 24, 32, True, (0, 2)),
    Q8_0: _QuantSpec(32, 34, 32, False, (0,)),
    IQ4_NL: _QuantSpec(32, 18, 32, False, (0,)),
    Q2_K: _QuantSpec(256, 84, 16, True, (80, 82)),
    Q3_K: _QuantSpec(256, 110, 16, False, (108,)),
    Q4_K: _QuantSpec(256, 144, 32, True, (0, 2)),
    Q5_K: _QuantSpec(256, 176, 32, True, (0, 2)),
    Q6_K: _QuantSpec(256, 210, 16, False, (208,)),
}
SUPPORTED_TYPES = (*FLOAT_TYPES, *QUANT_SPECS)

_IQ4_NL_VALUES = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8
)


class PackedWeight(NamedTuple):
    """A weight [n_rows, row_len] in the tiled layout (module docstring)."""

    ggml_type: int
    n_rows: int  # N
    row_len: int  # K
    group: int  # G; 0 for float weights
    qs: np.ndarray  # int8 [T, K*TILE]; [T, 0] for float weights
    scales: np.ndarray  # float32 [T, K//G*TILE]
    mins: np.ndarray  # float32 [T, K//G*TILE], or [T, 0] without offsets
    wf: np.ndarray  # float32 [T, KP*TILE] for float weights (KP = K padded to KC); [T, 0] otherwise

    @property
    def is_float(self) -> bool:
        return self.group == 0

    @property
    def has_min(self) -> bool:
        return self.mins.shape[1] > 0

    @property
    def n_tiles(self) -> int:
        return int(self.qs.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.qs.nbytes + self.scales.nbytes + self.mins.nbytes + self.wf.nbytes)


# ---------------------------------------------------------------------------------------------
# Packing: raw GGUF rows -> tiles. One row decoder per type (REFERENCE.md section 2 layouts).
# d and dmin arrive already converted from f16 (float32 [n_blocks]); Numba has no float16.


@njit(cache=True)
def _row_q4(b, d, m, q, sc, mn, bs, off, bias, table, use_table):
    # Q4_0 (bs 18, off 2, bias 8), Q4_1 (20, 4, 0; mins), IQ4_NL (18, 2, table).
    for i in range(d.size):
        o = i * bs + off
        for lo in range(16):
            v = np.int32(b[o + lo])
            a = v & 15
            h = v >> 4
            if use_table:
                q[i * 32 + lo] = table[a]
                q[i * 32 + 16 + lo] = table[h]
            else:
                q[i * 32 + lo] = np.int8(a - bias)
                q[i * 32 + 16 + lo] = np.int8(h - bias)
        sc[i] = d[i]
        if mn.size:
            mn[i] = -m[i]


@njit(cache=True)
def _row_q5(b, d, m, q, sc, mn, bs, off, bias):
    # Q5_0 (bs 22, qh at 2, bias 16), Q5_1 (bs 24, qh at 4, bias 0; mins).
    for i in range(d.size):
        o = i * bs + off
        qh = np.int64(b[o]) | np.int64(b[o + 1]) << 8 | np.int64(b[o + 2]) << 16
        qh |= np.int64(b[o + 3]) << 24
        for lo in range(16):
            v = np.int64(b[o + 4 + lo])
            a = (v & 15) | ((qh >> lo) & 1) << 4
            h = (v >> 4) | ((qh >> (lo + 16)) & 1) << 4
            q[i * 32 + lo] = np.int8(a - bias)
            q[i * 32 + 16 + lo] = np.int8(h - bias)
        sc[i] = d[i]
        if mn.size:
            mn[i] = -m[i]


@njit(cache=True)
def _row_q8_0(b, d, q, sc):
    for i in range(d.size):
        o = i * 34 + 2
        for e in range(32):
            v = np.int32(b[o + e])
            q[i * 32 + e] = np.int8(v - 256 if v > 127 else v)
        sc[i] = d[i]


@njit(cache=True)
def _row_q2_k(b, d, m, q, sc, mn):
    for i in range(d.size):
        o = i * 84
        for s in range(16):
            v = np.int32(b[o + s])
            sc[i * 16 + s] = d[i] * np.float32(v & 15)
            mn[i * 16 + s] = m[i] * np.float32(v >> 4)
        for e in range(256):
            h, j, lo = e // 128, (e % 128) // 32, e % 32
            q[i * 256 + e] = np.int8((np.int32(b[o + 16 + 32 * h + lo]) >> (2 * j)) & 3)


@njit(cache=True)
def _row_q3_k(b, d, q, sc):
    for i in range(d.size):
        o = i * 110
        for s in range(16):
            low4 = np.int32(b[o + 96 + s]) & 15 if s < 8 else np.int32(b[o + 96 + s - 8]) >> 4
            high2 = (np.int32(b[o + 104 + s % 4]) >> (2 * (s // 4))) & 3
            sc[i * 16 + s] = d[i] * np.float32((low4 | high2 << 4) - 32)
        for e in range(256):
            h, j, lo = e // 128, (e % 128) // 32, e % 32
            low = (np.int32(b[o + 32 + 32 * h + lo]) >> (2 * j)) & 3
            hbit = (np.int32(b[o + lo]) >> (4 * h + j)) & 1
            q[i * 256 + e] = np.int8(low - (0 if hbit else 4))


@njit(cache=True)
def _k_scale_min(b, o, j):
    # 6-bit (scale, min) of sub-block j from the 12 packed bytes at b[o:o+12] (Q4_K, Q5_K).
    if j < 4:
        return np.int32(b[o + j]) & 63, np.int32(b[o + j + 4]) & 63
    sc = (np.int32(b[o + j + 4]) & 15) | ((np.int32(b[o + j - 4]) >> 6) << 4)
    mn = (np.int32(b[o + j + 4]) >> 4) | ((np.int32(b[o + j]) >> 6) << 4)
    return sc, mn


@njit(cache=True)
def _row_q45_k(b, d, m, q, sc, mn, bs, qh_off, qs_off):
    # Q4_K (bs 144, no qh, qs at 16) and Q5_K (bs 176, qh at 16, qs at 48).
    for i in range(d.size):
        o = i * bs
        for j in range(8):
            s, mm = _k_scale_min(b, o + 4, j)
            sc[i * 8 + j] = d[i] * np.float32(s)
            mn[i * 8 + j] = m[i] * np.float32(mm)
        for e in range(256):
            c, half, lo = e // 64, (e % 64) // 32, e % 32
            v = np.int32(b[o + qs_off + 32 * c + lo])
            nib = (v >> 4) if half else (v & 15)
            if qh_off:
                nib |= ((np.int32(b[o + qh_off + lo]) >> (e // 32)) & 1) << 4
            q[i * 256 + e] = np.int8(nib)


@njit(cache=True)
def _row_q6_k(b, d, q, sc):
    for i in range(d.size):
        o = i * 210
        for s in range(16):
            v = np.int32(b[o + 192 + s])
            sc[i * 16 + s] = d[i] * np.float32(v - 256 if v > 127 else v)
        for e in range(256):
            h, r = e // 128, e % 128
            g, lo = r // 32, r % 32
            v = np.int32(b[o + 64 * h + lo + 32 * (g & 1)])
            low4 = (v & 15) if g < 2 else (v >> 4)
            hi2 = (np.int32(b[o + 128 + 32 * h + lo]) >> (2 * g)) & 3
            q[i * 256 + e] = np.int8((low4 | hi2 << 4) - 32)


@njit(cache=True)
def _decode_row(kind, b, d, m, q, sc, mn, table):
    if kind == Q4_0:
        _row_q4(b, d, m, q, sc, mn, 18, 2, 8, table, False)
    elif kind == Q4_1:
        _row_q4(b, d, m, q, sc, mn, 20, 4, 0, table, False)
    elif kind == IQ4_NL:
        _row_q4(b, d, m, q, sc, mn, 18, 2, 0, table, True)
    elif kind == Q5_0:
        _row_q5(b, d, m, q, sc, mn, 22, 2, 16)
    elif kind == Q5_1:
        _row_q5(b, d, m, q, sc, mn, 24, 4, 0)
    elif kind == Q8_0:
        _row_q8_0(b, d, q, sc)
    elif kind == Q2_K:
        _row_q2_k(b, d, m, q, sc, mn)
    elif kind == Q3_K:
        _row_q3_k(b, d, q, sc)
    elif kind == Q4_K:
        _row_q45_k(b, d, m, q, sc, mn, 144, 0, 16)
    elif kind == Q5_K:
        _row_q45_k(b, d, m, q, sc, mn, 176, 16, 48)
    elif kind == Q6_K:
        _row_q6_k(b, d, q, sc)


@njit(cache=True, parallel=True)
def _pack_tiles(kind, raw, d, m, n_rows, row_len, qs, scales, mins, table, n_workers):
    # raw uint8 [N, row_bytes]; d, m float32 [N, n_blocks] (m may be [N, 0]).
    n_tiles = qs.shape[0]
    ng = scales.shape[1] // TILE
    for w in prange(n_workers):
        q = np.empty(row_len, np.int8)
        sc = np.empty(ng, np.float32)
        mn = np.empty(ng if mins.shape[1] else 0, np.float32)
        for t in range(w * n_tiles // n_workers, (w + 1) * n_tiles // n_workers):
            for r in range(TILE):
                n = t * TILE + r
                if n >= n_rows:
                    q[:] = 0
                    sc[:] = 0
                    mn[:] = 0
                else:
                    _decode_row(kind, raw[n], d[n], m[n], q, sc, mn, table)
                for k in range(row_len):
                    qs[t, k * TILE + r] = q[k]
                for g in range(ng):
                    scales[t, g * TILE + r] = sc[g]
                for g in range(mn.size):
                    mins[t, g * TILE + r] = mn[g]


def _half_field(blocks: np.ndarray, offset: int) -> np.ndarray:
    """float32 [N, n_blocks]: the f16 at `offset` of each block of blocks [N, n_blocks, bytes]."""
    pair = np.ascontiguousarray(blocks[:, :, offset : offset + 2])
    return pair.view(np.float16)[:, :, 0].astype(np.float32)


def _float_rows(raw: np.ndarray, ggml_type: int, n_rows: int, row_len: int) -> np.ndarray:
    if ggml_type == F32:
        return raw.view(np.float32).reshape(n_rows, row_len)
    if ggml_type == F16:
        return raw.view(np.float16).reshape(n_rows, row_len).astype(np.float32)
    bits = raw.view(np.uint16).reshape(n_rows, row_len).astype(np.uint32) << 16
    return bits.view(np.float32)


def _pack_float(raw: np.ndarray, ggml_type: int, n_rows: int, row_len: int) -> PackedWeight:
    w = _float_rows(raw, ggml_type, n_rows, row_len)
    n_tiles = -(-n_rows // TILE)
    kp = -(-row_len // KC) * KC
    tiles = np.zeros((n_tiles, kp, TILE), np.float32)  # k-major, rows in lanes
    for t in range(n_tiles):
        rows = w[t * TILE : (t + 1) * TILE]
        tiles[t, :row_len, : rows.shape[0]] = rows.T
    empty_i8 = np.zeros((n_tiles, 0), np.int8)
    empty_f = np.zeros((n_tiles, 0), np.float32)
    wf = tiles.reshape(n_tiles, kp * TILE)
    return PackedWeight(ggml_type, n_rows, row_len, 0, empty_i8, empty_f, empty_f, wf)


def _check_raw(raw: np.ndarray, ggml_type: int, row_len: int) -> tuple[int, int]:
    if ggml_type not in SUPPORTED_TYPES:
        raise ValueError(f"no kernel for ggml type {ggml_type}")
    if ggml_type in FLOAT_TYPES:
        block, nbytes = 1, (4 if ggml_type == F32 else 2)
    else:
        block, nbytes = QUANT_SPECS[ggml_type].block, QUANT_SPECS[ggml_type].nbytes
    if row_len <= 0 or row_len % block:
        raise ValueError(f"row length {row_len} is not a multiple of the block size {block}")
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != row_len // block * nbytes:
        raise ValueError(f"raw must be uint8 [rows, {row_len // block * nbytes}], got {raw.shape}")
    return block, nbytes


def pack_weight(raw: np.ndarray, ggml_type: int, row_len: int) -> PackedWeight:
    """Repack raw GGUF rows (uint8 [N, row_bytes]) of any supported type into tiles."""
    block, nbytes = _check_raw(raw, ggml_type, row_len)
    n_rows = raw.shape[0]
    if ggml_type in FLOAT_TYPES:
        return _pack_float(np.ascontiguousarray(raw), ggml_type, n_rows, row_len)
    spec = QUANT_SPECS[ggml_type]
    raw = np.ascontiguousarray(raw)
    blocks = raw.reshape(n_rows, row_len // block, nbytes)
    d = _half_field(blocks, spec.halves[0])
    m = _half_field(blocks, spec.halves[1]) if len(spec.halves) > 1 else d[:, :0]
    n_tiles = -(-n_rows // TILE)
    ng = row_len // spec.group
    qs = np.empty((n_tiles, row_len * TILE), np.int8)
    scales = np.empty((n_tiles, ng * TILE), np.float32)
    mins = np.empty((n_tiles, ng * TILE if spec.has_min else 0), np.float32)
    m = np.ascontiguousarray(m)
    workers = _workers(n_tiles, n_rows * row_len)
    _pack_tiles(ggml_type, raw, d, m, n_rows, row_len, qs, scales, mins, _IQ4_NL_VALUES, workers)
    empty = np.zeros((n_tiles, 0), np.float32)
    return PackedWeight(ggml_type, n_rows, row_len, spec.group, qs, scales, mins, empty)


def unpack_weight(w: PackedWeight) -> np.ndarray:
    """float32 [N, K] from the packed tiles (tests and checks; never on a hot path)."""
    t, k, n = w.n_tiles, w.row_len, w.n_rows
    if w.is_float:
        kp = w.wf.shape[1] // TILE
        tiles = w.wf.reshape(t, kp, TILE)[:, :k, :]
        return np.ascontiguousarray(tiles.transpose(0, 2, 1).reshape(t * TILE, k)[:n])
    q = w.qs.reshape(t, k, TILE).transpose(0, 2, 1).reshape(t * TILE, k)[:n]
    ng = k // w.group

    def per_row(a: np.ndarray) -> np.ndarray:
        rows = a.reshape(t, ng, TILE).transpose(0, 2, 1).reshape(t * TILE, ng)[:n]
        return np.repeat(rows, w.group, axis=1)

    out = per_row(w.scales) * q.astype(np.float32)
    if w.has_min:
        out = out - per_row(w.mins)
    return out.astype(np.float32)


def concat_packed(parts: list[PackedWeight]) -> PackedWeight:
    """One weight from several with the same K and layout (e.g. Q, K, V): one launch, not three.

    Each part's row count must be a multiple of TILE so tiles do not straddle parts.
    """
    first = parts[0]
    for p in parts:
        same = (p.row_len, p.group, p.has_min) == (first.row_len, first.group, first.has_min)
        if not same or p.n_rows % TILE:
            raise ValueError("parts differ in row length or layout, or rows are not tile-aligned")
    kind = first.ggml_type if all(p.ggml_type == first.ggml_type for p in parts) else -1

    def cat(name: str) -> np.ndarray:
        return np.concatenate([getattr(p, name) for p in parts], axis=0)

    n_rows = sum(p.n_rows for p in parts)
    fields = (cat("qs"), cat("scales"), cat("mins"), cat("wf"))
    return PackedWeight(kind, n_rows, first.row_len, first.group, *fields)


# ---------------------------------------------------------------------------------------------
# Activations: int8 blocks of 32 with a float scale, plus per-group sums for the mins.


@njit(cache=True, fastmath=True)
def _quantize_rows(x, group, xq, xs, xsum):
    m_rows, k = x.shape
    for m in range(m_rows):
        for b in range(k // 32):
            xb = x[m, b * 32 : (b + 1) * 32]
            amax = np.float32(0)
            for j in range(xb.size):
                amax = max(amax, abs(xb[j]))
            inv = np.float32(127) / amax if amax > 0 else np.float32(0)
            xs[m, b] = amax / np.float32(127)
            qb = xq[m, b * 32 : (b + 1) * 32]
            for j in range(xb.size):
                qb[j] = np.int8(np.rint(xb[j] * inv))
        for g in range(xsum.shape[1]):
            qg = xq[m, g * group : (g + 1) * group]
            s = np.int32(0)
            for j in range(qg.size):
                s = np.int32(s + np.int32(qg[j]))
            xsum[m, g] = xs[m, g * group // 32] * np.float32(s)


@njit(cache=True)
def _quantize(x, group, with_sums):
    m_rows, k = x.shape
    xq = np.empty((m_rows, k), np.int8)
    xs = np.empty((m_rows, k // 32), np.float32)
    xsum = np.empty((m_rows, k // group if with_sums else 0), np.float32)
    _quantize_rows(x, group, xq, xs, xsum)
    return xq, xs, xsum


def quantize_activations(
    x: np.ndarray, group: int = 32, with_sums: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x float32 [M, K] -> (int8 [M, K], scales float32 [M, K/32], group sums float32 [M, K/G]).

    Group sums are sum(x) over each group of the weight's G as the kernel will see it
    (scale * sum of the int8 values), for the mins of asymmetric types.
    """
    xq, xs, xsum = _quantize(np.ascontiguousarray(x, dtype=np.float32), group, with_sums)
    return xq, xs, xsum


# ---------------------------------------------------------------------------------------------
# Few rows: integer dot products over a tile. The inner j loop has a constant trip count and is
# unrolled, leaving the loop over the TILE lanes innermost, which LLVM vectorizes (inspect_asm:
# vpbroadcastb + vpmovsxbd + vpmulld + vpaddd on zmm; Numba's IR never yields vpmaddwd or
# vpdpbusd here). Accumulators are truncated to int32 at every step: Numba types int products
# as int64, which would halve the lanes.


@njit(cache=True, fastmath=True)
def _dot_tile_g32(wq, ws, xq, xs, o):
    # wq int8 [K*TILE], ws float32 [K/32*TILE], xq int8 [K], xs float32 [K/32], o float32 [TILE]
    for r in range(TILE):
        o[r] = 0
    for g in range(xq.size // 32):
        wg = wq[g * 32 * TILE : (g + 1) * 32 * TILE]
        xg = xq[g * 32 : (g + 1) * 32]
        sg = ws[g * TILE : (g + 1) * TILE]
        xsg = xs[g]
        for r in range(TILE):
            acc = np.int32(0)
            for j in range(32):
                acc = np.int32(acc + np.int32(xg[j]) * np.int32(wg[j * TILE + r]))
            o[r] += sg[r] * xsg * np.float32(acc)


@njit(cache=True, fastmath=True)
def _dot_tile_g16(wq, ws, xq, xs, o):
    # As _dot_tile_g32 with one weight scale per 16 columns (ws float32 [K/16*TILE]).
    for r in range(TILE):
        o[r] = 0
    for g in range(xq.size // 16):
        wg = wq[g * 16 * TILE : (g + 1) * 16 * TILE]
        xg = xq[g * 16 : (g + 1) * 16]
        sg = ws[g * TILE : (g + 1) * TILE]
        xsg = xs[g // 2]
        for r in range(TILE):
            acc = np.int32(0)
            for j in range(16):
                acc = np.int32(acc + np.int32(xg[j]) * np.int32(wg[j * TILE + r]))
            o[r] += sg[r] * xsg * np.float32(acc)


@njit(cache=True, fastmath=True)
def _sub_mins(wm, xsum, o):
    # o[r] -= sum_g mins[g, r] * sum(x over group g); runtime-length lane loop (_dequant_tile).
    for g in range(xsum.size):
        mg = wm[g * TILE : (g + 1) * TILE]
        s = xsum[g]
        for r in range(o.size):
            o[r] -= mg[r] * s


@njit(cache=True)
def _int_tiles(xq, xs, xsum, wq, ws, wm, group, n_rows, out, t0, t1):
    o = np.empty(TILE, np.float32)
    for t in range(t0, t1):
        n0 = t * TILE
        nr = min(TILE, n_rows - n0)
        for m in range(xq.shape[0]):
            if group == 32:
                _dot_tile_g32(wq[t], ws[t], xq[m], xs[m], o)
            else:
                _dot_tile_g16(wq[t], ws[t], xq[m], xs[m], o)
            if wm.shape[1]:
                _sub_mins(wm[t], xsum[m], o)
            out[m, n0 : n0 + nr] = o[:nr]


@njit(cache=True)
def _int_serial(x, wq, ws, wm, group, n_rows, out):
    # Quantizing inside the compiled call saves a dispatch and three allocations per matmul.
    xq, xs, xsum = _quantize(x, group, wm.shape[1] > 0)
    _int_tiles(xq, xs, xsum, wq, ws, wm, group, n_rows, out, 0, wq.shape[0])


@njit(cache=True, parallel=True)
def _int_parallel(x, wq, ws, wm, group, n_rows, out, n_workers):
    xq, xs, xsum = _quantize(x, group, wm.shape[1] > 0)  # once, before the threads start
    n_tiles = wq.shape[0]
    for w in prange(n_workers):
        t0 = w * n_tiles // n_workers
        t1 = (w + 1) * n_tiles // n_workers
        _int_tiles(xq, xs, xsum, wq, ws, wm, group, n_rows, out, t0, t1)


# ---------------------------------------------------------------------------------------------
# Many rows: dequantize a tile to float once, then a float kernel over 4 activation rows at a
# time (4 independent accumulators per lane keep both FMA pipes busy). The kernel keeps a single
# output buffer: with one array per row LLVM gave up vectorizing (too many alias checks).


@njit(cache=True, fastmath=True)
def _dequant_tile(wq, ws, wm, group, wf):
    # wf float32 [K*TILE] = scale * q - min, same k-major lane layout as wq. The lane loops run
    # to a runtime length (slice size): with the constant TILE LLVM unrolls them and, unable to
    # rule out aliasing without runtime checks, leaves them scalar.
    k = wq.size // TILE
    for g in range(k // group):
        sg = ws[g * TILE : (g + 1) * TILE]
        mg = wm[g * TILE : (g + 1) * TILE] if wm.size else ws[0:0]
        for j in range(group):
            base = (g * group + j) * TILE
            src = wq[base : base + TILE]
            dst = wf[base : base + TILE]
            if mg.size:
                for r in range(dst.size):
                    dst[r] = sg[r] * np.float32(src[r]) - mg[r]
            else:
                for r in range(dst.size):
                    dst[r] = sg[r] * np.float32(src[r])


@njit(cache=True, fastmath=True)
def _gemm4_tile(x, m0, wf, o):
    # o float32 [4*TILE] += x[m0:m0+4, :] @ tile; wf float32 [KP*TILE], x [M4, KP]
    for kc in range(0, x.shape[1], KC):
        wk = wf[kc * TILE : (kc + KC) * TILE]
        x0 = x[m0, kc : kc + KC]
        x1 = x[m0 + 1, kc : kc + KC]
        x2 = x[m0 + 2, kc : kc + KC]
        x3 = x[m0 + 3, kc : kc + KC]
        for r in range(TILE):
            a0 = o[r]
            a1 = o[TILE + r]
            a2 = o[2 * TILE + r]
            a3 = o[3 * TILE + r]
            for j in range(KC):
                w = wk[j * TILE + r]
                a0 += x0[j] * w
                a1 += x1[j] * w
                a2 += x2[j] * w
                a3 += x3[j] * w
            o[r] = a0
            o[TILE + r] = a1
            o[2 * TILE + r] = a2
            o[3 * TILE + r] = a3


@njit(cache=True)
def _float_tiles(xp, m_rows, wq, ws, wm, wf, group, n_rows, out, t0, t1):
    # xp float32 [M4, KP] (rows padded to 4, columns to KC with zeros); wf used when group == 0.
    buf = np.empty(xp.shape[1] * TILE if group else 0, np.float32)
    o = np.empty(4 * TILE, np.float32)
    for t in range(t0, t1):
        tile = wf[t] if group == 0 else buf
        if group:
            _dequant_tile(wq[t], ws[t], wm[t], group, buf)
        n0 = t * TILE
        nr = min(TILE, n_rows - n0)
        for m0 in range(0, xp.shape[0], 4):
            o[:] = 0
            _gemm4_tile(xp, m0, tile, o)
            for i in range(min(4, m_rows - m0)):
                out[m0 + i, n0 : n0 + nr] = o[i * TILE : i * TILE + nr]


@njit(cache=True, parallel=True)
def _float_parallel(xp, m_rows, wq, ws, wm, wf, group, n_rows, out, n_workers):
    n_tiles = max(wq.shape[0], wf.shape[0])
    for w in prange(n_workers):
        t0 = w * n_tiles // n_workers
        t1 = (w + 1) * n_tiles // n_workers
        _float_tiles(xp, m_rows, wq, ws, wm, wf, group, n_rows, out, t0, t1)


# ---------------------------------------------------------------------------------------------
# Public entry points.


def _workers(n_tiles: int, macs: int) -> int:
    # Static split of tiles over threads, passed in: numba.get_num_threads() inside a kernel
    # would make it uncacheable (a ctypes global). Small products run serially: a parallel
    # launch costs microseconds, more than their whole work.
    if macs < SERIAL_MACS:
        return 1
    return max(1, min(n_tiles, _threads.get_num_threads()))


def _padded_rows(x: np.ndarray, kp: int) -> np.ndarray:
    m_rows, k = x.shape
    m4 = -(-m_rows // 4) * 4
    if m4 == m_rows and kp == k:
        return x
    xp = np.zeros((m4, kp), np.float32)
    xp[:m_rows, :k] = x
    return xp


def matmul(
    x: np.ndarray, w: PackedWeight, out: np.ndarray | None = None, path: str = "auto"
) -> np.ndarray:
    """out float32 [M, N] = x float32 [M, K] @ W.T.

    path "auto" takes the int8 path below MANY_ROWS rows and the float path from there on;
    "int" and "float" force one (benchmarks, tests). Float weights always take the float path.
    """
    m_rows, k = x.shape
    if k != w.row_len:
        raise ValueError(f"x has {k} columns, weight rows have {w.row_len}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if out is None:
        out = np.empty((m_rows, w.n_rows), np.float32)
    elif out.shape != (m_rows, w.n_rows) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 {(m_rows, w.n_rows)}")
    workers = _workers(w.n_tiles, m_rows * k * w.n_rows)
    use_float = path == "float" or (path == "auto" and m_rows >= MANY_ROWS)
    if w.is_float or use_float:
        kp = w.wf.shape[1] // TILE if w.is_float else k
        xp = _padded_rows(x, kp)
        args_f = (xp, m_rows, w.qs, w.scales, w.mins, w.wf, w.group, w.n_rows, out)
        if workers == 1:
            _float_tiles(*args_f, 0, w.n_tiles)
        else:
            _float_parallel(*args_f, workers)
        return out
    if workers == 1:
        _int_serial(x, w.qs, w.scales, w.mins, w.group, w.n_rows, out)
    else:
        _int_parallel(x, w.qs, w.scales, w.mins, w.group, w.n_rows, out, workers)
    return out


def matmul_ref(x: np.ndarray, w_float: np.ndarray) -> np.ndarray:
    """numpy reference: float64 accumulation of x [M, K] @ w_float [N, K].T."""
    return (x.astype(np.float64) @ w_float.astype(np.float64).T).astype(np.float32)
