"""Matrix multiplication against quantized weights: out[m, n] = sum_k x[m, k] * W[n, k].

Weights are repacked once at load into compact tiles of TILE (32) output rows, about the file's
size: each type keeps its own bits (LAYOUTS), and the kernels unpack them in registers right
before the int8 dot products. A weight's integer q becomes u = q + bias >= 0 (bias per type: 8
for Q4_0, 16 Q5_0, 32 Q6_K, 4 Q3_K, 128 Q8_0 and IQ4_NL, 0 for the types with mins), split into
a low plane of lo_bits (8, 4 or 2) and a high plane of hi_bits (0, 1 or 2) per weight:

    lo, hi  uint8  [T, K*TILE*bits/8]  per 32 columns (chunk c) and plane, `bits` pairs of
                                       64-byte vectors: byte [c*128*bits + p*128 + r*4 + j]
                                       holds, at bit (i % per) * bits, the bits of u of row r,
                                       column 32c + 4i + j, quad-step i = p*per + i % per
                                       (per = 8 / bits quad-steps share a byte)
    d, dm   uint16 [T, K/block*TILE]   f16 bits of d (and m or dmin) per block and row: 32
                                       columns, or a K-quant's 256
    sub     uint8  [T, K/G*TILE]       K-quants: the sub-scale of each group of G columns (an
                                       int8 for Q3_K/Q6_K; Q2_K: scale | min << 4)
    mins    uint8  [T, K/G*TILE]       Q4_K/Q5_K: each group's sub-block min

Rows are in the SIMD lanes with 4 consecutive columns per lane, so one 64-byte load of a plane
holds lanes 0-15 (or 16-31) of `per` quad-steps: u = (lo >> shift) & mask | (hi bits) << lo_bits,
a few shifts and masks (IQ4_NL: a code book lookup) per vpdpbusd. A group's scale is
float32(d) * float32(sub) in float32 and its min dmin * float32(min) (Q4_1/Q5_1: -m), the
values blocks.py computes, so W[n, k] = scale * (u - bias) - min as before. Bits per weight
(file): Q4_0 4.5 (4.5), Q4_1 5 (5), Q5_0 5.5 (5.5), Q5_1 6 (6), Q8_0 8.5 (8.5), IQ4_NL 4.5
(4.5), Q2_K 2.625 (2.625), Q3_K 3.5625 (3.4375), Q4_K 4.625 (4.5), Q5_K 5.625 (5.5), Q6_K 6.5625
(6.5625), in bits; rows are padded to whole tiles. A Qwen2.5-0.5B decode step reads 389 MB of
packed weights, 1.003x the file's matrices (the byte-per-weight layout before: 569 MB, 1.45x).
Float weights (F32, F16, BF16) keep float32 tiles in `wf` ([T, KP * TILE], k-major, KP = K
padded); F16/BF16 matrices are rare (norms are vectors) and take 2x their file size there.

Why rows in lanes: VNNI's vpdpbusd multiplies 4 unsigned bytes by 4 signed bytes and sums them
into one int32 lane, 16 lanes at once; with 4 consecutive columns of a row in each lane and the
rows in the lanes, one instruction does 64 multiply-adds for 16 output rows against one
broadcast group of 4 activation bytes, with no horizontal reduction. The bias costs nothing:
sum(u * x) = sum(q * x) + bias * sum(x), and the last term is one integer per activation row
and group, the accumulator's starting value.

Paths:
- int8 (every quantized weight, any number of rows): activations quantized once per call to
  int8 blocks of 32 (float scale, per-group sums); int32 sums per group, one float multiply-add
  per group by weight scale * activation scale, one for the mins. 4 activation rows share each
  unpacked weight quad (simd.py: explicit vectors in registers); for a few types, from
  UNPACK_ROWS rows on, each tile is unpacked once into its byte-per-weight form (qs[(k//4)*128
  + r*4 + k%4] = u, float32 scales and mins) in a thread-local buffer and the rows run over
  that. Integer sums are exact and the float operations are the same in every variant, so a
  row's bits do not depend on the path, on its batch, or on the instruction: the portable code
  for CPUs without VNNI (AVX-512BW: vpmaddwd), and aarch64's usdot (i8mm: unsigned by signed
  bytes, as vpdpbusd) or sdot (dotprod: signed only, so it takes u - 128 and the sums start
  128 * sum(x) higher). smmla/usmmla (i8mm's 2x8 by 8x2 tiles) would need 8 columns of 2 weight
  rows against 2 activation rows per register: another layout, for a gain to be measured on
  ARM hardware.
- float (float weights; path="float"): each tile is dequantized to float once into a
  thread-local buffer and a float FMA kernel runs all rows against it, 4 rows per pass;
  ~120 Gmac/s at M=128, a third of the int8 path, but exact in the activations.
BLAS is not used: it could only serve float weights (it is ~10% faster than the float path at
M >= 128 on an idle machine, a third of the int8 path's speed), and OpenBLAS's own threads spin
after each call and fight the Numba threads for the 2 cores. The float path on quantized
weights (path="float") is kept as a check of the int8 path, exact in the activations.
Decode is bound by memory and by the unpacking: layout size is speed there. Measured on one
thread (CPU time, Zen 5; the shared machine's wall times were too noisy), against the
byte-per-weight layout before: the Qwen2.5-0.5B decode step 27.2 -> 19.5 ms (q|k|v, gate|up
fused: 25.1 -> 18.8; 8 sessions fused: 49.6 -> 45.4); ffn_up Q5_0 4864x896 / ffn_down Q4_K
896x4864: M=1 from memory 0.20 / 0.16 ms (0.26 / 0.30), M=8 0.26 / 0.25 ms (0.25 / 0.24),
M=128 5.3 / 4.2 ms (5.3 / 4.4), M=512 20.4 / 16.6 ms (19.4 / 17.8).
"""

from __future__ import annotations

import functools
import hashlib
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
from numba import njit, prange
from numba.core.caching import FunctionCache
from numba.core.dispatcher import Dispatcher

from . import simd
from . import threads as _threads  # threading layer set before any parallel kernel
from .blocks import BF16, F16, F32, IQ4_NL_VALUES, SPECS, block_fields, decode_rows
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
"""Bytes per 4 columns of a tile in the byte-per-weight form (a plane's 128-byte vector pair)."""
KC = 8
"""Columns per step of the float kernel; float tiles pad K to a multiple of it."""
SERIAL_MACS = 1 << 19
"""Below this many weight elements times 4-row passes (N * K * ceil(M / 4)) a matmul runs on
the calling thread: ~5-7 us of work, where a 2-thread launch stops paying (measured: 576x576
at M=1 7.0 us serial, 9.3 parallel; at M=8 21.6 / 17.5)."""
UNPACK_ROWS = {IQ4_NL: 8, Q2_K: 32, Q3_K: 32, Q6_K: 32, Q5_K: 64}
"""Read at each call: from this many activation rows on, the int8 path unpacks each compact
tile of the type once into the byte-per-weight form and runs over that; below it (and for types
not here, at any M) it unpacks in registers for each 4 rows. Measured per type (one thread,
896x4864): in registers was as fast or faster at every M up to 512 for the others; these gain
4-45% at M=128 from unpacking (IQ4_NL's code book lookups, the 2-, 3- and 6-bit planes' shifts).
Tests change it to run both ways."""
PATHS = ("auto", "int", "float")
"""matmul's path argument: auto is int8 for quantized weights at any M (fastest measured at
every M from 1 to 512, VNNI or not), float for float weights."""

FLOAT_TYPES = (F32, F16, BF16)

USE_VNNI = bool(simd.HOST_DOT)
"""Read at each call: the int8 kernels use the host's dot-product instruction when true
(simd.HOST_DOT: VNNI's vpdpbusd on x86, usdot or sdot on aarch64; the name is x86's). Tests set
it false to run the portable code on such a machine."""


QUANT_SPECS = SPECS
"""Per quantized type id: block, nbytes, group G (of the scales), has_min, halves (blocks.py)."""
SUPPORTED_TYPES = (*FLOAT_TYPES, *QUANT_SPECS)

SUB_NONE, SUB_SIGNED, SUB_SCALE_MIN, SUB_NIBBLES = 0, 1, 2, 3
"""How a group's scale comes from d: it is d (32-element blocks), d * the signed sub-scale
byte (Q3_K, Q6_K), d * the scale byte with dmin * a min byte (Q4_K, Q5_K), or d * the low and
dmin * the high nibble of one byte (Q2_K)."""


class Layout(NamedTuple):
    """A quantized type's compact tile: u = q + bias split into a low and a high bit plane."""

    bias: int  # u = q + bias >= 0: what the kernels take back through the activation sums
    lo_bits: int  # 8, 4 or 2: u's low bits, the low plane
    hi_bits: int  # 0, 1 or 2: u's bits above lo_bits, the high plane
    block: int  # columns per d (and dm): 32, or 256 for the K-quants
    sub: int  # SUB_*
    lookup: bool  # IQ4_NL: the low plane holds code book indices, u = code book + 128


LAYOUTS: dict[int, Layout] = {
    Q4_0: Layout(8, 4, 0, 32, SUB_NONE, False),
    Q4_1: Layout(0, 4, 0, 32, SUB_NONE, False),
    Q5_0: Layout(16, 4, 1, 32, SUB_NONE, False),
    Q5_1: Layout(0, 4, 1, 32, SUB_NONE, False),
    Q8_0: Layout(128, 8, 0, 32, SUB_NONE, False),
    IQ4_NL: Layout(128, 4, 0, 32, SUB_NONE, True),
    Q2_K: Layout(0, 2, 0, 256, SUB_NIBBLES, False),
    Q3_K: Layout(4, 2, 1, 256, SUB_SIGNED, False),
    Q4_K: Layout(0, 4, 0, 256, SUB_SCALE_MIN, False),
    Q5_K: Layout(0, 4, 1, 256, SUB_SCALE_MIN, False),
    Q6_K: Layout(32, 4, 2, 256, SUB_SIGNED, False),
}
"""The compact tile of every quantized type, by type id."""

_IQ4_U = (IQ4_NL_VALUES.astype(np.int32) + 128).astype(np.uint8)  # the code book as u
_IQ4_INDEX = np.zeros(256, np.uint8)
_IQ4_INDEX[IQ4_NL_VALUES.view(np.uint8)] = np.arange(16, dtype=np.uint8)  # q's bits -> index


class PackedWeight(NamedTuple):
    """A weight [n_rows, row_len] in compact tiles (module docstring); T tiles of TILE rows."""

    ggml_type: int  # -1: parts of several types (`parts`)
    n_rows: int  # N
    row_len: int  # K
    group: int  # G; 0 for float weights and for a weight of parts
    lo: np.ndarray  # uint8 [T, K*TILE*lo_bits/8], u's low plane
    hi: np.ndarray  # uint8 [T, K*TILE*hi_bits/8], u's high plane ([T, 0] without)
    d: np.ndarray  # uint16 [T, K/block*TILE]: f16 bits of d per block and row
    dm: np.ndarray  # uint16 [T, K/block*TILE]: f16 bits of m or dmin ([T, 0] without mins)
    sub: np.ndarray  # uint8 [T, K/G*TILE]: K-quant sub-scale bytes ([T, 0] for 32-blocks)
    mins: np.ndarray  # uint8 [T, K/G*TILE]: Q4_K/Q5_K sub-block mins ([T, 0] for the others)
    wf: np.ndarray  # float32 [T, KP*TILE] for float weights (KP = K padded to KC); [T, 0] otherwise
    parts: tuple[PackedWeight, ...] = ()  # a fused weight of several types: one per run of a type

    @property
    def is_float(self) -> bool:
        return self.ggml_type in FLOAT_TYPES

    @property
    def has_min(self) -> bool:
        return self.ggml_type in SPECS and SPECS[self.ggml_type].has_min

    @property
    def bias(self) -> int:
        """What was added to each q to make it u >= 0 (LAYOUTS); 0 for float weights."""
        return LAYOUTS[self.ggml_type].bias if self.ggml_type in LAYOUTS else 0

    @property
    def n_tiles(self) -> int:
        if self.parts:
            return sum(p.n_tiles for p in self.parts)
        return int(max(self.lo.shape[0], self.wf.shape[0]))

    @property
    def nbytes(self) -> int:
        arrays = (self.lo, self.hi, self.d, self.dm, self.sub, self.mins, self.wf)
        return sum(int(a.nbytes) for a in arrays) + sum(p.nbytes for p in self.parts)


# ---------------------------------------------------------------------------------------------
# Packing: raw GGUF rows -> compact tiles. blocks.py decodes the integers (q) and reads the
# scale fields as stored; numpy interleaves them into the planes.

PACK_ROWS = 64 * TILE
"""Rows packed per step: bounds the temporaries (a few bytes per weight) for a big matrix."""


def _plane(u: np.ndarray, bits: int, shift: int) -> np.ndarray:
    # u uint8 [t*TILE, K] -> uint8 [t, K*TILE*bits/8]: bits shift..shift+bits of each u, the
    # 8 quad-steps i of a 32-column chunk c in `bits` vector pairs of 128 bytes, quad-step i in
    # bits (i % per) * bits of pair i // per (per = 8 // bits): byte
    # [c*128*bits + (i // per)*128 + r*4 + j] holds column 32c + 4i + j of row r.
    t, k, per = u.shape[0] // TILE, u.shape[1], 8 // bits
    f = ((u >> shift) & ((1 << bits) - 1)).reshape(t, TILE, k // 32, bits, per, 4)
    packed = f[:, :, :, :, 0, :].copy()
    for p in range(1, per):
        packed |= f[:, :, :, :, p, :] << (bits * p)
    return packed.transpose(0, 2, 3, 1, 4).reshape(t, -1)  # [t, c, pair, r, j]


def _tile_fields(a: np.ndarray, n_tiles: int) -> np.ndarray:
    # [n, F] per row -> [n_tiles, F*TILE], field f of tile row r at f*TILE + r (padding zero)
    n, f = a.shape
    rows = np.zeros((n_tiles * TILE, f), a.dtype)
    rows[:n] = a
    return rows.reshape(n_tiles, TILE, f).transpose(0, 2, 1).reshape(n_tiles, f * TILE)


def _empty_quant(kind: int, n_tiles: int, row_len: int) -> dict[str, np.ndarray]:
    lay, spec = LAYOUTS[kind], SPECS[kind]
    kt, ng, nd = row_len * TILE, row_len // spec.group * TILE, row_len // lay.block * TILE
    k_quant = lay.sub != SUB_NONE
    return {
        "lo": np.empty((n_tiles, kt * lay.lo_bits // 8), np.uint8),
        "hi": np.empty((n_tiles, kt * lay.hi_bits // 8), np.uint8),
        "d": np.empty((n_tiles, nd), np.uint16),
        "dm": np.empty((n_tiles, nd if spec.has_min else 0), np.uint16),
        "sub": np.empty((n_tiles, ng if k_quant else 0), np.uint8),
        "mins": np.empty((n_tiles, ng if lay.sub == SUB_SCALE_MIN else 0), np.uint8),
    }


def _pack_rows(raw: np.ndarray, kind: int, row_len: int, dst: dict[str, np.ndarray]) -> None:
    # raw uint8 [n, row_bytes] (n <= PACK_ROWS) into dst's tiles (arrays [ceil(n/TILE), ...])
    lay = LAYOUTS[kind]
    n, n_tiles = raw.shape[0], dst["lo"].shape[0]
    q = np.zeros((n_tiles * TILE, row_len), np.int8)  # padding rows: q = 0
    decode_rows(kind, raw, np.arange(n, dtype=np.int64), None, None, q)
    if lay.lookup:
        u = _IQ4_INDEX[q.view(np.uint8)]
    else:
        u = q.view(np.uint8) + np.uint8(lay.bias)  # q + bias, in 0..255
    dst["lo"][:] = _plane(u, lay.lo_bits, 0)
    if lay.hi_bits:
        dst["hi"][:] = _plane(u, lay.hi_bits, lay.lo_bits)
    fields = block_fields(kind, raw)
    for name, a in zip(("d", "dm", "sub", "mins"), fields, strict=True):
        if a is not None:
            dst[name][:] = _tile_fields(a, n_tiles)


def _pack_quant(parts: list[tuple[np.ndarray, int, int]]) -> PackedWeight:
    # Parts of one quantized type, each but the last filling whole tiles, into one set of tiles.
    kind, row_len = parts[0][1], parts[0][2]
    n_tiles = sum(-(-raw.shape[0] // TILE) for raw, _, _ in parts)
    arrays = _empty_quant(kind, n_tiles, row_len)
    jobs, t0 = [], 0
    for raw, _, _ in parts:
        for r0 in range(0, raw.shape[0], PACK_ROWS):
            rows = raw[r0 : r0 + PACK_ROWS]
            n = -(-rows.shape[0] // TILE)
            jobs.append((rows, {k: a[t0 : t0 + n] for k, a in arrays.items()}))
            t0 += n

    def pack(job: tuple[np.ndarray, dict[str, np.ndarray]]) -> None:
        _pack_rows(np.ascontiguousarray(job[0]), kind, row_len, job[1])

    # Steps on threads (decode_rows and numpy's big operations release the GIL): a matrix's
    # steps write disjoint tiles.
    workers = min(len(jobs), _threads.get_num_threads())
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(pack, jobs))
    else:
        for job in jobs:
            pack(job)
    n_rows = sum(raw.shape[0] for raw, _, _ in parts)
    wf = np.zeros((n_tiles, 0), np.float32)
    return PackedWeight(kind, n_rows, row_len, SPECS[kind].group, *_planes(arrays), wf)


def _float_rows(raw: np.ndarray, ggml_type: int, n_rows: int, row_len: int) -> np.ndarray:
    if ggml_type == F32:
        return raw.view(np.float32).reshape(n_rows, row_len)
    if ggml_type == F16:
        return raw.view(np.float16).reshape(n_rows, row_len).astype(np.float32)
    bits = raw.view(np.uint16).reshape(n_rows, row_len).astype(np.uint32) << 16
    return bits.view(np.float32)


_Planes = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _planes(a: dict[str, np.ndarray]) -> _Planes:
    """PackedWeight's plane fields (lo, hi, d, dm, sub, mins) from a dict of them, in order."""
    return a["lo"], a["hi"], a["d"], a["dm"], a["sub"], a["mins"]


def _no_planes(n_tiles: int) -> dict[str, np.ndarray]:
    u8, u16 = np.zeros((n_tiles, 0), np.uint8), np.zeros((n_tiles, 0), np.uint16)
    return {"lo": u8, "hi": u8, "d": u16, "dm": u16, "sub": u8, "mins": u8}


def _pack_float(raw: np.ndarray, ggml_type: int, n_rows: int, row_len: int) -> PackedWeight:
    w = _float_rows(raw, ggml_type, n_rows, row_len)
    n_tiles = -(-n_rows // TILE)
    kp = -(-row_len // KC) * KC
    tiles = np.zeros((n_tiles, kp, TILE), np.float32)  # k-major, rows in lanes
    for t in range(n_tiles):
        rows = w[t * TILE : (t + 1) * TILE]
        tiles[t, :row_len, : rows.shape[0]] = rows.T
    wf = tiles.reshape(n_tiles, kp * TILE)
    return PackedWeight(ggml_type, n_rows, row_len, 0, *_planes(_no_planes(n_tiles)), wf)


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

    The parts must agree on K, every part but the last must fill whole tiles, and float
    weights are packed alone; ValueError otherwise. Consecutive parts of one type share one
    set of tiles (one kernel call); a weight of several types keeps one such sub-weight per
    run of a type in `parts` (ggml_type -1), each its own kernel call into its columns of the
    one output. A single part is pack_weight.
    """
    for raw, ggml_type, row_len in parts:
        _check_raw(raw, ggml_type, row_len)
    first_type, row_len = parts[0][1], parts[0][2]
    if len(parts) == 1 and first_type in FLOAT_TYPES:
        raw = np.ascontiguousarray(parts[0][0])
        return _pack_float(raw, first_type, raw.shape[0], row_len)
    if any(t in FLOAT_TYPES for _, t, _ in parts):
        raise ValueError("float weights are packed one at a time")
    for raw, _, _ in parts[:-1]:
        if raw.shape[0] % TILE:
            raise ValueError(f"a part of {raw.shape[0]} rows does not fill whole tiles")
    if any(k != row_len for _, _, k in parts):
        raise ValueError("parts differ in row length")
    runs: list[list[tuple[np.ndarray, int, int]]] = []
    for part in parts:
        if runs and runs[-1][0][1] == part[1]:
            runs[-1].append(part)
        else:
            runs.append([part])
    subs = tuple(_pack_quant(run) for run in runs)
    if len(subs) == 1:
        return subs[0]
    n_rows = sum(s.n_rows for s in subs)
    wf = np.zeros((0, 0), np.float32)
    return PackedWeight(-1, n_rows, row_len, 0, **_no_planes(0), wf=wf, parts=subs)


def unpack_weight(w: PackedWeight) -> np.ndarray:
    """float32 [N, K] from the packed tiles (tests and checks; never on a hot path)."""
    t, k, n = w.n_tiles, w.row_len, w.n_rows
    if w.parts:
        return np.vstack([unpack_weight(p) for p in w.parts])
    if w.is_float:
        kp = w.wf.shape[1] // TILE
        tiles = w.wf.reshape(t, kp, TILE)[:, :k, :]
        return np.ascontiguousarray(tiles.transpose(0, 2, 1).reshape(t * TILE, k)[:n])
    qs, scales, mins = _byte_tiles(w)
    quads = qs.reshape(t, k // 4, TILE, 4).transpose(0, 2, 1, 3).reshape(t * TILE, k)[:n]
    q = quads.astype(np.float32) - np.float32(w.bias)
    ng = k // w.group

    def per_row(a: np.ndarray) -> np.ndarray:
        rows = a.reshape(t, ng, TILE).transpose(0, 2, 1).reshape(t * TILE, ng)[:n]
        return np.repeat(rows, w.group, axis=1)

    out = per_row(scales) * q
    if w.has_min:
        out = out - per_row(mins)
    return out.astype(np.float32)


def _byte_tiles(w: PackedWeight) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The byte-per-weight form of every tile (qs uint8 [T, K*TILE], scales and mins float32
    [T, K/G*TILE]; module docstring) as the kernels unpack it."""
    t, k, ng = w.n_tiles, w.row_len, w.row_len // w.group
    qs = np.empty((t, k * TILE), np.uint8)
    scales = np.empty((t, ng * TILE), np.float32)
    mins = np.empty((t, ng * TILE if w.has_min else 0), np.float32)
    _kernels(w.ggml_type).unpack_all(w.lo, w.hi, w.d, w.dm, w.sub, w.mins, qs, scales, mins)
    return qs, scales, mins


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
# Int8 path on the byte-per-weight form of a tile (what the compact tiles unpack to: module
# docstring). A tile's 32 lanes are two 16-lane vectors; one vpdpbusd adds 4 columns of 16
# lanes (u8 weight quads times one broadcast quad of the activation row). Each group's int32
# sums start at the row's bias correction and end in one float multiply-add by weight scale *
# activation scale (and one for the mins). 4 rows share each weight load (8 int32 + 8 float
# accumulators in registers); a row alone takes a 1-row kernel, with the same operations in the
# same order, so a row's result does not depend on which rows it is batched with.


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


# ---------------------------------------------------------------------------------------------
# Compact tiles in registers: per quantized type, kernels compiled with its layout's numbers as
# constants (closure variables are constants to Numba, and its cache keys on their values), so
# every shift and mask is an immediate and no branch on the type is left in a loop.


@njit(cache=True)
def _aligned_bytes(n):
    # uint8 [n] from a 64-byte boundary: Numba's np.empty gives 32, and a 64-byte vector load
    # from such a buffer straddles two cache lines every time (measured: up to 2x slower).
    raw = np.empty(n + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off : off + n]


@njit(cache=True)
def _aligned_f32(n):
    return _aligned_bytes(4 * n).view(np.float32)


def _stable(value: object) -> object:
    """A closure cell's value as something whose repr is the same in every process."""
    if isinstance(value, Dispatcher):  # a compiled kernel: by its code and its own cells
        f = value.py_func
        cells = tuple(_stable(c.cell_contents) for c in f.__closure__ or ())
        return ("kernel", f.__module__, f.__qualname__, f.__code__.co_code, cells)
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, tuple):
        return tuple(_stable(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str, bytes, np.generic)):
        return value
    raise TypeError(f"no stable cache key for a closure cell of type {type(value).__name__}")


class _ClosureCache(FunctionCache):
    """Numba's on-disk cache for the per-type kernels below. Numba keys a closure on a pickle
    of its cells, and a compiled kernel in a cell pickles differently in every process, so
    each process compiled every per-type kernel again (~30 s); this key hashes the cells'
    stable form instead. As with any cached kernel, editing this file invalidates the entries
    (Numba checks the source file's stamp)."""

    def _index_key(self, sig: object, codegen: object) -> object:
        f = self._py_func
        cells = repr(tuple(_stable(c.cell_contents) for c in f.__closure__ or ()))
        code = hashlib.sha256(f.__code__.co_code).hexdigest()
        return (sig, codegen.magic_tuple(), (code, hashlib.sha256(cells.encode()).hexdigest()))  # type: ignore[attr-defined]


def _per_type(kernel: Dispatcher) -> Dispatcher:
    """Cache a per-type kernel (a closure) under _ClosureCache's stable key."""
    kernel._cache = _ClosureCache(kernel.py_func)  # type: ignore[attr-defined]
    return kernel


@functools.cache
def _kernels(kind: int, vnni: bool = False) -> SimpleNamespace:
    """The compiled kernels of one quantized type's compact tiles, with the host's dot-product
    instruction or the portable code (USE_VNNI): a constant, so no branch on it is left in the
    loops, which LLVM then unrolls (a quad-step's shifts become immediates)."""
    lay, spec = LAYOUTS[kind], SPECS[kind]
    lo_bits, hi_bits, sub, lookup, bias = lay.lo_bits, lay.hi_bits, lay.sub, lay.lookup, lay.bias
    group, has_min = spec.group, spec.has_min
    lo_per, lo_chunk, lo_mask = 8 // lo_bits, 128 * lo_bits, ((1 << lo_bits) - 1) * 0x01010101
    hi_per = 8 // hi_bits if hi_bits else 1
    hi_chunk, hi_mask = 128 * hi_bits, ((1 << hi_bits) - 1) * 0x01010101
    per_chunk, steps = 32 // group, group // 4  # groups per 32 columns, quad-steps per group
    per_block = lay.block // group  # groups per d
    table = _IQ4_U

    @_per_type
    @njit(cache=True, inline="always")
    def quad(lo, hi, c, i, h):
        # u of quad-step i (0..7) of 32-column chunk c, lanes 16h..16h+15: 4 bytes a lane
        v = simd.load_quads(lo, c * lo_chunk + (i // lo_per) * QUAD_STRIDE + 64 * h)
        if lo_bits < 8:
            v = (v >> (lo_bits * (i % lo_per))) & lo_mask
        if lookup:  # a byte at a time: lookup16 takes an int32 lane's low 4 bits
            cb = simd.load_bytes(table, 0)
            v = (
                simd.lookup16(cb, v)
                | (simd.lookup16(cb, v >> 8) << 8)
                | (simd.lookup16(cb, v >> 16) << 16)
                | (simd.lookup16(cb, v >> 24) << 24)
            )
        if hi_bits:
            w = simd.load_quads(hi, c * hi_chunk + (i // hi_per) * QUAD_STRIDE + 64 * h)
            v = v | (((w >> (hi_bits * (i % hi_per))) & hi_mask) << lo_bits)
        return v

    @_per_type
    @njit(cache=True, inline="always")
    def scales(d, dm, sb, mn, g, h):
        # (scale, min) of group g, lanes 16h..16h+15, the float32 values blocks.py computes
        at = g * TILE + 16 * h
        if sub == SUB_NONE:
            s = simd.load_f16(d, at)
            low = simd.mul(simd.load_f16(dm, at), simd.f32_splat(np.float32(-1))) if has_min else s
            return s, low
        top = (g // per_block) * TILE + 16 * h
        v = simd.load_bytes(sb, at)
        if sub == SUB_SIGNED:
            v = (v ^ 128) - 128
        if sub == SUB_NIBBLES:
            mv = v >> 4
            v = v & 15
        elif sub == SUB_SCALE_MIN:
            mv = simd.load_bytes(mn, at)
        else:
            mv = v
        s = simd.mul_exact(simd.load_f16(d, top), simd.to_f32(v))
        low = simd.mul_exact(simd.load_f16(dm, top), simd.to_f32(mv)) if has_min else s
        return s, low

    @_per_type
    @njit(cache=True)
    def dot1(lo, hi, d, dm, sb, mn, xq, xs, xsum, xcorr, m, o):
        # o[:TILE] = row m of the activations against one tile, its planes unpacked in
        # registers: the operations of _dot1_tile in the same order, so the same bits.
        x0 = xq[m]
        f0 = f1 = simd.f32_zero()
        for c in range(x0.size // 32):
            for gg in range(per_chunk):
                g = c * per_chunk + gg
                i0 = i1 = simd.i32_splat(xcorr[m, g])
                for ii in range(steps):
                    i = gg * steps + ii
                    b = simd.broadcast_quad(x0, 32 * c + 4 * i)
                    i0 = simd.dot_quads(i0, quad(lo, hi, c, i, 0), b, vnni)
                    i1 = simd.dot_quads(i1, quad(lo, hi, c, i, 1), b, vnni)
                s0, m0 = scales(d, dm, sb, mn, g, 0)
                s1, m1 = scales(d, dm, sb, mn, g, 1)
                sm = (s0, s1, m0, m1)
                f0, f1 = _group_end(f0, f1, i0, i1, sm, xs[m, c], xsum[m, g], has_min)
        simd.store_f32(o, 0, f0)
        simd.store_f32(o, 16, f1)

    @_per_type
    @njit(cache=True)
    def dot4(lo, hi, d, dm, sb, mn, xq, xs, xsum, xcorr, m0, o):
        # o[i*TILE:(i+1)*TILE] = row m0+i against one tile, i < 4: _dot4_tile's operations,
        # each quad of weights unpacked once for the 4 rows.
        x0, x1, x2, x3 = xq[m0], xq[m0 + 1], xq[m0 + 2], xq[m0 + 3]
        f00 = f01 = f10 = f11 = f20 = f21 = f30 = f31 = simd.f32_zero()
        for c in range(x0.size // 32):
            for gg in range(per_chunk):
                g = c * per_chunk + gg
                i00 = i01 = simd.i32_splat(xcorr[m0, g])
                i10 = i11 = simd.i32_splat(xcorr[m0 + 1, g])
                i20 = i21 = simd.i32_splat(xcorr[m0 + 2, g])
                i30 = i31 = simd.i32_splat(xcorr[m0 + 3, g])
                for ii in range(steps):
                    i = gg * steps + ii
                    w0, w1 = quad(lo, hi, c, i, 0), quad(lo, hi, c, i, 1)
                    at = 32 * c + 4 * i
                    b = simd.broadcast_quad(x0, at)
                    i00, i01 = simd.dot_quads(i00, w0, b, vnni), simd.dot_quads(i01, w1, b, vnni)
                    b = simd.broadcast_quad(x1, at)
                    i10, i11 = simd.dot_quads(i10, w0, b, vnni), simd.dot_quads(i11, w1, b, vnni)
                    b = simd.broadcast_quad(x2, at)
                    i20, i21 = simd.dot_quads(i20, w0, b, vnni), simd.dot_quads(i21, w1, b, vnni)
                    b = simd.broadcast_quad(x3, at)
                    i30, i31 = simd.dot_quads(i30, w0, b, vnni), simd.dot_quads(i31, w1, b, vnni)
                s0, n0 = scales(d, dm, sb, mn, g, 0)
                s1, n1 = scales(d, dm, sb, mn, g, 1)
                sm = (s0, s1, n0, n1)
                a = xsum[m0, g], xsum[m0 + 1, g], xsum[m0 + 2, g], xsum[m0 + 3, g]
                f00, f01 = _group_end(f00, f01, i00, i01, sm, xs[m0, c], a[0], has_min)
                f10, f11 = _group_end(f10, f11, i10, i11, sm, xs[m0 + 1, c], a[1], has_min)
                f20, f21 = _group_end(f20, f21, i20, i21, sm, xs[m0 + 2, c], a[2], has_min)
                f30, f31 = _group_end(f30, f31, i30, i31, sm, xs[m0 + 3, c], a[3], has_min)
        for r, v in enumerate((f00, f01, f10, f11, f20, f21, f30, f31)):
            simd.store_f32(o, 16 * r, v)

    @_per_type
    @njit(cache=True)
    def unpack(lo, hi, d, dm, sb, mn, bq, bs, bm):
        # One tile into the byte-per-weight form: bq uint8 [K*TILE], bs/bm float32 [K/G*TILE]
        # (bm only with mins).
        k = bq.size // TILE
        for c in range(k // 32):
            for i in range(8):
                for h in range(2):
                    simd.store_quads(bq, (8 * c + i) * QUAD_STRIDE + 64 * h, quad(lo, hi, c, i, h))
        for g in range(k // group):
            for h in range(2):
                s, low = scales(d, dm, sb, mn, g, h)
                simd.store_f32(bs, g * TILE + 16 * h, s)
                if has_min:
                    simd.store_f32(bm, g * TILE + 16 * h, low)

    @_per_type
    @njit(cache=True)
    def unpack_all(lo, hi, d, dm, sb, mn, qs, ws, wm):
        for t in range(qs.shape[0]):
            unpack(lo[t], hi[t], d[t], dm[t], sb[t], mn[t], qs[t], ws[t], wm[t])

    @_per_type
    @njit(cache=True)
    def int_tiles(xq, xs, xsum, xcorr, m_rows, planes, n_rows, out, col0, t0, t1, unpack_rows):
        # Below unpack_rows rows: straight from the planes, 4 rows per pass. From there on:
        # each tile unpacked once into a buffer, then 4 rows per pass over it.
        lo, hi, d, dm, sb, mn = planes
        k, direct = xq.shape[1], m_rows < unpack_rows
        o = _aligned_f32(4 * TILE)
        bq = _aligned_bytes(0 if direct else k * TILE)
        bs = _aligned_f32(0 if direct else k // group * TILE)
        bm = _aligned_f32(k // group * TILE if not direct and has_min else 0)
        for t in range(t0, t1):
            n0 = t * TILE
            nr = min(TILE, n_rows - n0)
            tile = (lo[t], hi[t], d[t], dm[t], sb[t], mn[t])
            if not direct:
                unpack(*tile, bq, bs, bm)
            for m0 in range(0, m_rows, 4):
                if direct and m_rows - m0 == 1:
                    dot1(*tile, xq, xs, xsum, xcorr, m0, o)
                elif direct:
                    dot4(*tile, xq, xs, xsum, xcorr, m0, o)
                elif m_rows - m0 == 1:
                    _dot1_tile(bq, bs, bm, xq, xs, xsum, xcorr, m0, group, o, vnni)
                else:
                    _dot4_tile(bq, bs, bm, xq, xs, xsum, xcorr, m0, group, o, vnni)
                for r in range(min(4, m_rows - m0)):
                    out[m0 + r, col0 + n0 : col0 + n0 + nr] = o[r * TILE : r * TILE + nr]

    @_per_type
    @njit(cache=True)
    def int_serial(x, planes, qbias, n_rows, out, col0, unpack_rows):
        # Quantizing inside the compiled call saves a dispatch and the allocations' round trips.
        xq, xs, xsum, xcorr = _quantize(x, group, has_min, qbias, 4)
        n_tiles = planes[0].shape[0]
        args = (xq, xs, xsum, xcorr, x.shape[0], planes, n_rows, out, col0)
        int_tiles(*args, 0, n_tiles, unpack_rows)

    @_per_type
    @njit(cache=True, parallel=True)
    def int_parallel(x, planes, qbias, n_rows, out, col0, n_workers, unpack_rows):
        xq, xs, xsum, xcorr = _quantize(x, group, has_min, qbias, 4)  # before the threads
        n_tiles = planes[0].shape[0]
        for w in prange(n_workers):
            t0 = w * n_tiles // n_workers
            t1 = (w + 1) * n_tiles // n_workers
            args = (xq, xs, xsum, xcorr, x.shape[0], planes, n_rows, out, col0)
            int_tiles(*args, t0, t1, unpack_rows)

    @_per_type
    @njit(cache=True)
    def float_tiles(xp, m_rows, planes, n_rows, out, col0, t0, t1):
        # xp float32 [M4, K] (rows padded to 4): each tile unpacked, dequantized, then the
        # float kernel over it.
        lo, hi, d, dm, sb, mn = planes
        k = xp.shape[1]
        bq = _aligned_bytes(k * TILE)
        bs = _aligned_f32(k // group * TILE)
        bm = _aligned_f32(k // group * TILE if has_min else 0)
        buf = _aligned_f32(k * TILE)
        o = _aligned_f32(4 * TILE)
        for t in range(t0, t1):
            unpack(lo[t], hi[t], d[t], dm[t], sb[t], mn[t], bq, bs, bm)
            _dequant_tile(bq, bs, bm, group, bias, buf)
            _gemm4_rows(xp, m_rows, buf, n_rows, out, col0, t, o)

    @_per_type
    @njit(cache=True, parallel=True)
    def float_parallel(xp, m_rows, planes, n_rows, out, col0, n_workers):
        n_tiles = planes[0].shape[0]
        for w in prange(n_workers):
            t0 = w * n_tiles // n_workers
            t1 = (w + 1) * n_tiles // n_workers
            float_tiles(xp, m_rows, planes, n_rows, out, col0, t0, t1)

    return SimpleNamespace(
        unpack_all=unpack_all,
        int_serial=int_serial,
        int_parallel=int_parallel,
        float_tiles=float_tiles,
        float_parallel=float_parallel,
    )


@njit(cache=True)
def _gemm4_rows(xp, m_rows, tile, n_rows, out, col0, t, o):
    # out's columns of tile t, every row, from a float tile (4 rows per pass of _gemm4_tile)
    n0 = t * TILE
    nr = min(TILE, n_rows - n0)
    for m0 in range(0, xp.shape[0], 4):
        o[:] = 0
        _gemm4_tile(xp, m0, tile, o)
        for i in range(min(4, m_rows - m0)):
            out[m0 + i, col0 + n0 : col0 + n0 + nr] = o[i * TILE : i * TILE + nr]


@njit(cache=True)
def _wf_tiles(xp, m_rows, wf, n_rows, out, t0, t1):
    # Float weights: xp float32 [M4, KP] (rows padded to 4, columns to KC with zeros).
    o = np.empty(4 * TILE, np.float32)
    for t in range(t0, t1):
        _gemm4_rows(xp, m_rows, wf[t], n_rows, out, 0, t, o)


@njit(cache=True, parallel=True)
def _wf_parallel(xp, m_rows, wf, n_rows, out, n_workers):
    n_tiles = wf.shape[0]
    for w in prange(n_workers):
        t0 = w * n_tiles // n_workers
        t1 = (w + 1) * n_tiles // n_workers
        _wf_tiles(xp, m_rows, wf, n_rows, out, t0, t1)


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
    if w.is_float:
        xp = _padded_rows(x, w.wf.shape[1] // TILE)
        workers = _workers(w.n_tiles, -(-m_rows // 4) * k * w.n_rows)
        if workers == 1:
            _wf_tiles(xp, m_rows, w.wf, w.n_rows, out, 0, w.n_tiles)
        else:
            _wf_parallel(xp, m_rows, w.wf, w.n_rows, out, workers)
        return out
    col0 = 0
    for part in w.parts or (w,):
        _quant_matmul(x, part, out, col0, path == "float")
        col0 += part.n_rows
    return out


def _quant_matmul(x: np.ndarray, w: PackedWeight, out: np.ndarray, col0: int, fl: bool) -> None:
    # out[:, col0:col0 + N] of one quantized weight (one type's tiles)
    kernels = _kernels(w.ggml_type, USE_VNNI and not fl)
    planes = (w.lo, w.hi, w.d, w.dm, w.sub, w.mins)
    m_rows = x.shape[0]
    workers = _workers(w.n_tiles, -(-m_rows // 4) * x.shape[1] * w.n_rows)
    if fl:
        xp = _padded_rows(x, x.shape[1])
        if workers == 1:
            kernels.float_tiles(xp, m_rows, planes, w.n_rows, out, col0, 0, w.n_tiles)
        else:
            kernels.float_parallel(xp, m_rows, planes, w.n_rows, out, col0, workers)
        return
    # The sums start at -bias * sum(x) to undo the weights' bias; sdot's path has already
    # taken DOT_OFFSET off every weight byte (simd.dot_quads), so less is left to undo.
    qbias = w.bias - (simd.DOT_OFFSET if USE_VNNI else 0)
    unpack_rows = UNPACK_ROWS.get(w.ggml_type, 1 << 62)
    if workers == 1:
        kernels.int_serial(x, planes, qbias, w.n_rows, out, col0, unpack_rows)
    else:
        args = (x, planes, qbias, w.n_rows, out, col0, workers)
        kernels.int_parallel(*args, unpack_rows)


def matmul_ref(x: np.ndarray, w_float: np.ndarray) -> np.ndarray:
    """numpy reference: float64 accumulation of x [M, K] @ w_float [N, K].T."""
    return (x.astype(np.float64) @ w_float.astype(np.float64).T).astype(np.float32)
