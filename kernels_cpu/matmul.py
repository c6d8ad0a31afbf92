"""Matrix multiplication against quantized weights: out[m, n] = sum_k x[m, k] * W[n, k].

One packed layout serves every type and both paths. Weights are repacked once at load into
tiles of TILE (32) output rows with the rows in the SIMD lanes and 4 columns per lane:

    qs      uint8   [T, K * TILE]       qs[t, (k//4)*128 + r*4 + k%4] = q[t*TILE + r, k] + bias
    scales  float32 [T, K // G * TILE]  one per group of G columns (G = 32; 16 for Q2_K/Q3_K/Q6_K)
    mins    float32 [T, K // G * TILE]  only for types with an offset (Q4_1 Q5_1 Q2_K Q4_K Q5_K)

so that W[n, k] = scales * (u - bias) - mins. bias is 0 for the types with mins (their q is
already >= 0) and 128 for the others, which makes every stored value an unsigned byte. Float
weights (F32, F16, BF16) keep float32 tiles in `wf` ([T, KP * TILE], k-major, KP = K padded).

Why this layout: VNNI's vpdpbusd multiplies 4 unsigned bytes by 4 signed bytes and sums them
into one int32 lane, 16 lanes at once; with 4 consecutive columns of a row in each lane and the
rows in the lanes, one instruction does 64 multiply-adds for 16 output rows against one
broadcast group of 4 activation bytes, with no horizontal reduction. The bias costs nothing:
sum(u * x) = sum(q * x) + bias * sum(x), and the last term is one integer per activation row
and group, the accumulator's starting value.

Paths:
- int8 (every quantized weight, any number of rows): activations quantized once per call to
  int8 blocks of 32 (float scale, per-group sums); int32 sums per group, one float multiply-add
  per group by weight scale * activation scale, one for the mins. 4 activation rows share each
  weight load (simd.py: explicit vectors in registers). Measured on 2 threads (Zen 5, Qwen2.5
  ffn_up Q5_0 4864x896): M=1 35 us, M=8 ~100 us, M=16 ~190 us, M=128 ~1.3 ms (~420 Gmac/s);
  the portable code for CPUs without VNNI (AVX-512BW: vpmaddwd) is ~2.2x slower from M=4 on and
  still ahead of the float path at every M. On aarch64 the same layout feeds usdot (i8mm:
  unsigned by signed bytes, as vpdpbusd) or sdot (dotprod: signed only, so it takes u - 128 and
  the sums start 128 * sum(x) higher); integer sums are exact, so every path gives the same
  bits. smmla/usmmla (i8mm's 2x8 by 8x2 tiles) would need 8 columns of 2 weight rows against 2
  activation rows per register: another layout, for a gain to be measured on ARM hardware.
- float (float weights; path="float"): each tile is dequantized to float once into a
  thread-local buffer and a float FMA kernel runs all rows against it, 4 rows per pass;
  ~120 Gmac/s at M=128, a third of the int8 path, but exact in the activations.
BLAS is not used: it could only serve float weights (it is ~10% faster than the float path at
M >= 128 on an idle machine, a third of the int8 path's speed), and OpenBLAS's own threads spin
after each call and fight the Numba threads for the 2 cores. The float path on quantized
weights (path="float") is kept as a check of the int8 path, exact in the activations.
Decode is bound by memory, not by these kernels: a Qwen2.5-0.5B step reads 569 MB of packed
weights (1.45x the file's matrices), so layout size is speed there.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from . import simd
from . import threads as _threads  # threading layer set before any parallel kernel
from .blocks import BF16, F16, F32, SPECS, decode_rows
from .blocks import IQ4_NL as IQ4_NL
from .blocks import Q2_K as Q2_K
from .blocks import Q3_K as Q3_K
from .blocks import Q4_0 as Q4_0
from .blocks import Q4_1 as Q4_1
from .blocks import Q4_K as Q4_K
from .blocks import Q5_0 as Q5_0
from .blocks import Q5_1 as Q5_1
from .blocks import Q5_K as Q5_K
from .blocks import Q6_K as Q6_K
from .blocks import Q8_0 as Q8_0

TILE = 32
"""Output rows per tile (SIMD lanes of the kernels)."""
QUAD_STRIDE = 4 * TILE
"""Bytes of qs per 4 columns of a tile."""
BIAS = 128
"""Added to the signed q of types without mins so every stored q is an unsigned byte."""
KC = 8
"""Columns per step of the float kernel; float tiles pad K to a multiple of it."""
SERIAL_MACS = 1 << 19
"""Below this many weight elements times 4-row passes (N * K * ceil(M / 4)) a matmul runs on
the calling thread: ~5-7 us of work, where a 2-thread launch stops paying (measured: 576x576
at M=1 7.0 us serial, 9.3 parallel; at M=8 21.6 / 17.5)."""
PATHS = ("auto", "int", "float")
"""matmul's path argument: auto is int8 for quantized weights at any M (fastest measured at
every M from 1 to 512, VNNI or not), float for float weights."""

FLOAT_TYPES = (F32, F16, BF16)

USE_VNNI = bool(simd.HOST_DOT)
"""Read at each call: the int8 kernels use the host's dot-product instruction when true
(simd.HOST_DOT: VNNI's vpdpbusd on x86, usdot or sdot on aarch64; the name is x86's). Tests set
it false to run the portable code on such a machine."""


QUANT_SPECS = SPECS
"""Per quantized type id: block, nbytes, group G (of the packed scales), has_min, halves
(blocks.py, whose decoders fill the tiles)."""
SUPPORTED_TYPES = (*FLOAT_TYPES, *QUANT_SPECS)


class PackedWeight(NamedTuple):
    """A weight [n_rows, row_len] in the tiled layout (module docstring)."""

    ggml_type: int
    n_rows: int  # N
    row_len: int  # K
    group: int  # G; 0 for float weights
    qs: np.ndarray  # uint8 [T, K*TILE], q + bias, quad-interleaved; [T, 0] for float weights
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
    def bias(self) -> int:
        """What was added to each q to make it unsigned: 0 with mins (q >= 0 there), else 128."""
        return 0 if self.has_min else BIAS

    @property
    def n_tiles(self) -> int:
        return int(self.qs.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.qs.nbytes + self.scales.nbytes + self.mins.nbytes + self.wf.nbytes)


# ---------------------------------------------------------------------------------------------
# Packing: raw GGUF rows -> tiles, a tile's rows decoded by blocks.py into q, scales and mins.


@njit(cache=True, parallel=True, nogil=True)
def _pack_tiles(kind, raw, qs, scales, mins, bias, n_workers):
    # raw uint8 [N, row_bytes] -> tiles qs [T, K*TILE], scales/mins [T, K//G*TILE] (mins may be
    # [T, 0]); rows past N (the last tile's padding) are zero.
    n_rows, n_tiles = raw.shape[0], qs.shape[0]
    row_len, ng, nm = qs.shape[1] // TILE, scales.shape[1] // TILE, mins.shape[1] // TILE
    for w in prange(n_workers):
        q = np.empty((TILE, row_len), np.int8)
        sc = np.empty(TILE * ng, np.float32)  # row r's groups at r * ng
        mn = np.empty(TILE * nm, np.float32)  # unused without mins
        rows = np.empty(TILE, np.int64)
        for t in range(w * n_tiles // n_workers, (w + 1) * n_tiles // n_workers):
            n_real = min(TILE, n_rows - t * TILE)
            for r in range(n_real):
                rows[r] = t * TILE + r
            decode_rows(kind, raw, rows[:n_real], sc, mn, q)
            q[n_real:] = 0
            sc[n_real * ng :] = 0
            mn[n_real * nm :] = 0
            for r in range(TILE):
                for k in range(row_len):
                    qs[t, (k >> 2) * QUAD_STRIDE + r * 4 + (k & 3)] = np.uint8(
                        np.int32(q[r, k]) + bias
                    )
                for g in range(ng):
                    scales[t, g * TILE + r] = sc[r * ng + g]
                for g in range(nm):
                    mins[t, g * TILE + r] = mn[r * nm + g]


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
    empty_u8 = np.zeros((n_tiles, 0), np.uint8)
    empty_f = np.zeros((n_tiles, 0), np.float32)
    wf = tiles.reshape(n_tiles, kp * TILE)
    return PackedWeight(ggml_type, n_rows, row_len, 0, empty_u8, empty_f, empty_f, wf)


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
    return pack_weights([(raw, ggml_type, row_len)])


def pack_weights(parts: list[tuple[np.ndarray, int, int]]) -> PackedWeight:
    """One weight from several (raw, ggml_type, row_len) sharing an input (q|k|v, gate|up).

    Each part is packed straight into its own tiles of one set of arrays (no copy after), so
    the parts must agree on K and on the layout (group, mins) and every part but the last must
    fill whole tiles; ValueError otherwise. A single part is pack_weight.
    """
    for raw, ggml_type, row_len in parts:
        _check_raw(raw, ggml_type, row_len)
    first_type, row_len = parts[0][1], parts[0][2]
    if len(parts) == 1 and first_type in FLOAT_TYPES:
        raw = np.ascontiguousarray(parts[0][0])
        return _pack_float(raw, first_type, raw.shape[0], row_len)
    if any(t in FLOAT_TYPES for _, t, _ in parts):
        raise ValueError("float weights are packed one at a time")
    specs = [QUANT_SPECS[t] for _, t, _ in parts]
    first = specs[0]
    for raw, _, _ in parts[:-1]:
        if raw.shape[0] % TILE:
            raise ValueError(f"a part of {raw.shape[0]} rows does not fill whole tiles")
    for (_, _, k), spec in zip(parts, specs, strict=True):
        if k != row_len:
            raise ValueError("parts differ in row length")
        if (spec.group, spec.has_min) != (first.group, first.has_min):
            raise ValueError("parts differ in layout (scale group or mins)")
    tiles = [-(-raw.shape[0] // TILE) for raw, _, _ in parts]
    n_tiles, ng = sum(tiles), row_len // first.group
    qs = np.empty((n_tiles, row_len * TILE), np.uint8)
    scales = np.empty((n_tiles, ng * TILE), np.float32)
    mins = np.empty((n_tiles, ng * TILE if first.has_min else 0), np.float32)
    bias = 0 if first.has_min else BIAS
    t0 = 0
    for (raw, ggml_type, _), n in zip(parts, tiles, strict=True):
        raw = np.ascontiguousarray(raw)
        out = (qs[t0 : t0 + n], scales[t0 : t0 + n], mins[t0 : t0 + n])
        workers = _workers(n, raw.shape[0] * row_len)
        _pack_tiles(ggml_type, raw, *out, bias, workers)
        t0 += n
    kind = first_type if all(t == first_type for _, t, _ in parts) else -1
    n_rows = sum(raw.shape[0] for raw, _, _ in parts)
    empty = np.zeros((n_tiles, 0), np.float32)
    return PackedWeight(kind, n_rows, row_len, first.group, qs, scales, mins, empty)


def unpack_weight(w: PackedWeight) -> np.ndarray:
    """float32 [N, K] from the packed tiles (tests and checks; never on a hot path)."""
    t, k, n = w.n_tiles, w.row_len, w.n_rows
    if w.is_float:
        kp = w.wf.shape[1] // TILE
        tiles = w.wf.reshape(t, kp, TILE)[:, :k, :]
        return np.ascontiguousarray(tiles.transpose(0, 2, 1).reshape(t * TILE, k)[:n])
    quads = w.qs.reshape(t, k // 4, TILE, 4).transpose(0, 2, 1, 3).reshape(t * TILE, k)[:n]
    q = quads.astype(np.float32) - np.float32(w.bias)
    ng = k // w.group

    def per_row(a: np.ndarray) -> np.ndarray:
        rows = a.reshape(t, ng, TILE).transpose(0, 2, 1).reshape(t * TILE, ng)[:n]
        return np.repeat(rows, w.group, axis=1)

    out = per_row(w.scales) * q
    if w.has_min:
        out = out - per_row(w.mins)
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Activations: int8 blocks of 32 with a float scale, plus per-group sums for the mins.


@njit(cache=True)
def _quantize_rows(x, group, with_sums, bias, xq, xs, xsum, xcorr):
    # x C-contiguous; a block of 32 is two vectors (simd.py: the plain loops ran at ~2 G elem/s,
    # up to a fifth of a prompt's ffn_down matmul). Rows of xq past x's stay zero (padding).
    per_block = 32 // group  # groups per block of 32: 1 or 2 (hoisted: an integer division)
    for m in range(x.shape[0]):
        xr, qr = x[m], xq[m]
        for b in range(x.shape[1] // 32):
            v0, v1 = simd.load_f32(xr, 32 * b), simd.load_f32(xr, 32 * b + 16)
            amax = simd.abs_max(v0, v1)
            xs[m, b] = amax / np.float32(127)
            inv = simd.f32_splat(np.float32(127) / amax if amax > 0 else np.float32(0))
            q0 = simd.round_i32(simd.mul(v0, inv))
            q1 = simd.round_i32(simd.mul(v1, inv))
            simd.store_i8(qr, 32 * b, q0)
            simd.store_i8(qr, 32 * b + 16, q1)
            s0, s1 = simd.lane_sum(q0), simd.lane_sum(q1)
            sums = (np.int32(s0 + s1), s0) if per_block == 1 else (s0, s1)
            for h in range(per_block):
                g = b * per_block + h
                xcorr[m, g] = -bias * sums[h]
                if with_sums:
                    xsum[m, g] = xs[m, b] * np.float32(sums[h])


@njit(cache=True)
def _quantize(x, group, with_sums, bias, row_block):
    # xq int8 [MP, K] (M rounded up to row_block), xs [MP, K/32], xsum [MP, K/G] (zero unless
    # with_sums), xcorr int32 [MP, K/G] = -bias * sum of the group's q (undoes the weights' bias).
    m_rows, k = x.shape
    mp = -(-m_rows // row_block) * row_block
    xq = np.zeros((mp, k), np.int8)
    xs = np.zeros((mp, k // 32), np.float32)
    xsum = np.zeros((mp, k // group), np.float32)
    xcorr = np.zeros((mp, k // group), np.int32)
    _quantize_rows(x, group, with_sums, bias, xq, xs, xsum, xcorr)
    return xq, xs, xsum, xcorr


def quantize_activations(
    x: np.ndarray, group: int = 32, with_sums: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x float32 [M, K] -> (int8 [M, K], scales float32 [M, K/32], group sums float32 [M, K/G]).

    Group sums are sum(x) over each group of the weight's G as the kernel will see it
    (scale * sum of the int8 values), for the mins of asymmetric types.
    """
    xq, xs, xsum, _ = _quantize(np.ascontiguousarray(x, dtype=np.float32), group, with_sums, 0, 1)
    return xq, xs, xsum if with_sums else xsum[:, :0]


# ---------------------------------------------------------------------------------------------
# Int8 path, any number of rows: VNNI dot products over a tile (simd.py). A tile's 32 lanes are two
# 16-lane vectors; one vpdpbusd adds 4 columns of 16 lanes (u8 weight quads times one broadcast
# quad of the activation row). Each group's int32 sums start at the row's bias correction and
# end in one float multiply-add by weight scale * activation scale (and one for the mins).
# 4 rows share each weight load (8 int32 + 8 float accumulators in registers); a row alone
# takes the 1-row kernel, with the same operations in the same order, so a row's result does
# not depend on which rows it is batched with.


@njit(cache=True, inline="always")
def _group_end(f0, f1, i0, i1, sm, xscale, xsum, has_min):
    # One row's float accumulators (lanes 0-15, 16-31) after a group: + ints * scale * xscale,
    # - mins * xsum; sm = (scales 0-15, 16-31, mins 0-15, 16-31). Vectors and scalars only: an
    # array argument here costs reference-count calls in the loop, and a call spills every vector.
    d = simd.f32_splat(xscale)
    f0 = simd.fma_int(f0, i0, simd.mul(sm[0], d))
    f1 = simd.fma_int(f1, i1, simd.mul(sm[1], d))
    if has_min:  # loop-invariant: LLVM compiles the loop twice rather than test it each time
        neg = simd.f32_splat(-xsum)
        f0 = simd.fma(sm[2], neg, f0)
        f1 = simd.fma(sm[3], neg, f1)
    return f0, f1


@njit(cache=True)
def _dot1_tile(wq, ws, wm, xq, xs, xsum, xcorr, m, group, o, vnni):
    # o[:TILE] = row m of the activations against one tile (wq uint8 [K*TILE], ws/wm [K/G*TILE]).
    x0 = xq[m]
    has_min = wm.size > 0
    mins = wm if has_min else ws  # stands in for absent mins, never used then
    f0 = f1 = simd.f32_zero()
    per = group // 4
    for g in range(x0.size // group):
        i0 = i1 = simd.i32_splat(xcorr[m, g])
        for q in range(g * per, (g + 1) * per):
            b = simd.broadcast_quad(x0, 4 * q)
            i0 = simd.dot_quads(i0, simd.load_quads(wq, q * QUAD_STRIDE), b, vnni)
            i1 = simd.dot_quads(i1, simd.load_quads(wq, q * QUAD_STRIDE + 64), b, vnni)
        s0, s1 = simd.load_f32(ws, g * TILE), simd.load_f32(ws, g * TILE + 16)
        sm = (s0, s1, simd.load_f32(mins, g * TILE), simd.load_f32(mins, g * TILE + 16))
        f0, f1 = _group_end(f0, f1, i0, i1, sm, xs[m, g * group // 32], xsum[m, g], has_min)
    simd.store_f32(o, 0, f0)
    simd.store_f32(o, 16, f1)


@njit(cache=True)
def _dot4_tile(wq, ws, wm, xq, xs, xsum, xcorr, m0, group, o, vnni):
    # o[i*TILE:(i+1)*TILE] = row m0+i against one tile, i < 4 (rows past M are zero padding).
    x0, x1, x2, x3 = xq[m0], xq[m0 + 1], xq[m0 + 2], xq[m0 + 3]
    has_min = wm.size > 0
    mins = wm if has_min else ws  # stands in for absent mins, never used then
    f00 = f01 = f10 = f11 = f20 = f21 = f30 = f31 = simd.f32_zero()
    per = group // 4
    for g in range(xq.shape[1] // group):
        i00 = i01 = simd.i32_splat(xcorr[m0, g])
        i10 = i11 = simd.i32_splat(xcorr[m0 + 1, g])
        i20 = i21 = simd.i32_splat(xcorr[m0 + 2, g])
        i30 = i31 = simd.i32_splat(xcorr[m0 + 3, g])
        for q in range(g * per, (g + 1) * per):
            w0 = simd.load_quads(wq, q * QUAD_STRIDE)
            w1 = simd.load_quads(wq, q * QUAD_STRIDE + 64)
            b = simd.broadcast_quad(x0, 4 * q)
            i00, i01 = simd.dot_quads(i00, w0, b, vnni), simd.dot_quads(i01, w1, b, vnni)
            b = simd.broadcast_quad(x1, 4 * q)
            i10, i11 = simd.dot_quads(i10, w0, b, vnni), simd.dot_quads(i11, w1, b, vnni)
            b = simd.broadcast_quad(x2, 4 * q)
            i20, i21 = simd.dot_quads(i20, w0, b, vnni), simd.dot_quads(i21, w1, b, vnni)
            b = simd.broadcast_quad(x3, 4 * q)
            i30, i31 = simd.dot_quads(i30, w0, b, vnni), simd.dot_quads(i31, w1, b, vnni)
        s0, s1 = simd.load_f32(ws, g * TILE), simd.load_f32(ws, g * TILE + 16)
        sm = (s0, s1, simd.load_f32(mins, g * TILE), simd.load_f32(mins, g * TILE + 16))
        b = g * group // 32
        f00, f01 = _group_end(f00, f01, i00, i01, sm, xs[m0, b], xsum[m0, g], has_min)
        f10, f11 = _group_end(f10, f11, i10, i11, sm, xs[m0 + 1, b], xsum[m0 + 1, g], has_min)
        f20, f21 = _group_end(f20, f21, i20, i21, sm, xs[m0 + 2, b], xsum[m0 + 2, g], has_min)
        f30, f31 = _group_end(f30, f31, i30, i31, sm, xs[m0 + 3, b], xsum[m0 + 3, g], has_min)
    for i, v in enumerate((f00, f01, f10, f11, f20, f21, f30, f31)):
        simd.store_f32(o, 16 * i, v)


@njit(cache=True)
def _int_tiles(xq, xs, xsum, xcorr, m_rows, wq, ws, wm, group, n_rows, out, t0, t1, vnni):
    o = np.empty(4 * TILE, np.float32)
    for t in range(t0, t1):
        n0 = t * TILE
        nr = min(TILE, n_rows - n0)
        wqt, wst, wmt = wq[t], ws[t], wm[t]
        for m0 in range(0, m_rows, 4):
            if m_rows - m0 == 1:
                _dot1_tile(wqt, wst, wmt, xq, xs, xsum, xcorr, m0, group, o, vnni)
            else:
                _dot4_tile(wqt, wst, wmt, xq, xs, xsum, xcorr, m0, group, o, vnni)
            for i in range(min(4, m_rows - m0)):
                out[m0 + i, n0 : n0 + nr] = o[i * TILE : i * TILE + nr]


@njit(cache=True)
def _int_serial(x, wq, ws, wm, group, bias, n_rows, out, vnni):
    # Quantizing inside the compiled call saves a dispatch and the allocations' round trips.
    xq, xs, xsum, xcorr = _quantize(x, group, wm.shape[1] > 0, bias, 4)
    args = (xq, xs, xsum, xcorr, x.shape[0], wq, ws, wm, group, n_rows, out)
    _int_tiles(*args, 0, wq.shape[0], vnni)


@njit(cache=True, parallel=True)
def _int_parallel(x, wq, ws, wm, group, bias, n_rows, out, n_workers, vnni):
    xq, xs, xsum, xcorr = _quantize(x, group, wm.shape[1] > 0, bias, 4)  # before the threads
    n_tiles = wq.shape[0]
    for w in prange(n_workers):
        t0 = w * n_tiles // n_workers
        t1 = (w + 1) * n_tiles // n_workers
        args = (xq, xs, xsum, xcorr, x.shape[0], wq, ws, wm, group, n_rows, out)
        _int_tiles(*args, t0, t1, vnni)


# ---------------------------------------------------------------------------------------------
# Float path: dequantize a tile to float once, then a float kernel over 4 activation rows at a
# time (4 independent accumulators per lane keep both FMA pipes busy). The kernel keeps a single
# output buffer: with one array per row LLVM gave up vectorizing (too many alias checks).


@njit(cache=True)
def _dequant_tile(wq, ws, wm, group, bias, wf):
    # wf float32 [K*TILE], k-major with rows in lanes, = scale * (u - bias) - min: one
    # multiply-add per 16 weights, u taken byte by byte from the quad-interleaved tile.
    k = wq.size // TILE
    per = group // 4
    neg_bias = simd.f32_splat(np.float32(-bias))
    for g in range(k // group):
        for h in range(2):
            s = simd.load_f32(ws, g * TILE + 16 * h)
            off = simd.mul(s, neg_bias)
            if wm.size:
                off = simd.fma(simd.load_f32(wm, g * TILE + 16 * h), simd.f32_splat(-1.0), off)
            for q in range(g * per, (g + 1) * per):
                u = simd.load_quads(wq, q * QUAD_STRIDE + 64 * h)
                for j in range(4):
                    v = simd.fma(simd.quad_byte(u, j), s, off)
                    simd.store_f32(wf, (4 * q + j) * TILE + 16 * h, v)


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
def _float_tiles(xp, m_rows, wq, ws, wm, wf, group, bias, n_rows, out, t0, t1):
    # xp float32 [M4, KP] (rows padded to 4, columns to KC with zeros); wf used when group == 0.
    buf = np.empty(xp.shape[1] * TILE if group else 0, np.float32)
    o = np.empty(4 * TILE, np.float32)
    for t in range(t0, t1):
        tile = wf[t] if group == 0 else buf
        if group:
            _dequant_tile(wq[t], ws[t], wm[t], group, bias, buf)
        n0 = t * TILE
        nr = min(TILE, n_rows - n0)
        for m0 in range(0, xp.shape[0], 4):
            o[:] = 0
            _gemm4_tile(xp, m0, tile, o)
            for i in range(min(4, m_rows - m0)):
                out[m0 + i, n0 : n0 + nr] = o[i * TILE : i * TILE + nr]


@njit(cache=True, parallel=True)
def _float_parallel(xp, m_rows, wq, ws, wm, wf, group, bias, n_rows, out, n_workers):
    n_tiles = max(wq.shape[0], wf.shape[0])
    for w in prange(n_workers):
        t0 = w * n_tiles // n_workers
        t1 = (w + 1) * n_tiles // n_workers
        _float_tiles(xp, m_rows, wq, ws, wm, wf, group, bias, n_rows, out, t0, t1)


# ---------------------------------------------------------------------------------------------
# Public entry points.


def _workers(n_tiles: int, work: int) -> int:
    # Static split of tiles over threads, passed in: numba.get_num_threads() inside a kernel
    # would make it uncacheable (a ctypes global). Small products run serially: a parallel
    # launch costs microseconds, more than their whole work.
    if work < SERIAL_MACS:
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

    path "auto" and "int" take the int8 path for quantized weights, "float" the dequantized
    float path (exact in the activations; benchmarks, tests). Float weights always take the
    float path.
    """
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    m_rows, k = x.shape
    if k != w.row_len:
        raise ValueError(f"x has {k} columns, weight rows have {w.row_len}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if out is None:
        out = np.empty((m_rows, w.n_rows), np.float32)
    elif out.shape != (m_rows, w.n_rows) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be C-contiguous float32 {(m_rows, w.n_rows)}")
    workers = _workers(w.n_tiles, -(-m_rows // 4) * k * w.n_rows)
    if w.is_float or path == "float":
        kp = w.wf.shape[1] // TILE if w.is_float else k
        xp = _padded_rows(x, kp)
        args_f = (xp, m_rows, w.qs, w.scales, w.mins, w.wf, w.group, w.bias, w.n_rows, out)
        if workers == 1:
            _float_tiles(*args_f, 0, w.n_tiles)
        else:
            _float_parallel(*args_f, workers)
        return out
    # The sums start at -bias * sum(x) to undo the weights' bias; sdot's path has already
    # taken DOT_OFFSET off every weight byte (simd.dot_quads), so less is left to undo.
    bias = w.bias - (simd.DOT_OFFSET if USE_VNNI else 0)
    args = (x, w.qs, w.scales, w.mins, w.group, bias, w.n_rows, out)
    if workers == 1:
        _int_serial(*args, USE_VNNI)
    else:
        _int_parallel(*args, workers, USE_VNNI)
    return out


def matmul_ref(x: np.ndarray, w_float: np.ndarray) -> np.ndarray:
    """numpy reference: float64 accumulation of x [M, K] @ w_float [N, K].T."""
    return (x.astype(np.float64) @ w_float.astype(np.float64).T).astype(np.float32)
