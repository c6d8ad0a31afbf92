"""Dequantization of ggml tensor rows (GGUF weights) to float32, as Numba kernels.

A tensor with `ne = [row_len, n_rows]` is stored as n_rows rows of raw bytes; blocks never cross
rows. Quantized rows are decoded by blocks.py, the decoders matmul.py packs from too, which
write each element's `sc * q - mn` (its group's scale and min) as float32; float rows (F32,
F16, BF16) have their own kernels here. Results are bit-exact to `gguf.quants.dequantize`:
every float operation is done in float32 in the oracle's order (the K-quants' d * scale and
dmin * min first, then the multiply by q, then the min; no fastmath, so no fused multiply-add
changes a rounding).

Arrays reach the kernels read-only and C-contiguous, whatever the caller passed (a memmap, a
writable array), so each compiled kernel has exactly one signature and the on-disk cache hits.
Numba's cache is keyed on this file alone: after editing blocks.py, simd.py or f16.py, clear
kernels_cpu/__pycache__, or the cached kernels keep the old decoders.
"""

from __future__ import annotations

import numpy as np
from numba import get_num_threads, njit, prange

# the threading layer and wait policy are set before any parallel kernel runs
from . import threads as _threads  # noqa: F401
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
from .blocks import QK_K as QK_K
from .f16 import bf16_bits_to_f32, read_f16

# (elements per block, bytes per block) of every type, the facts of the format.
_TRAITS: dict[int, tuple[int, int]] = {
    F32: (1, 4),
    F16: (1, 2),
    BF16: (1, 2),
    **{t: (spec.block, spec.nbytes) for t, spec in SPECS.items()},
}

# Whether a type id is one blocks.decode_rows handles, for the compiled drivers.
_QUANTIZED = np.zeros(max(_TRAITS) + 1, dtype=np.bool_)
_QUANTIZED[list(SPECS)] = True

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
# All types


@njit(cache=True)
def _float_row(type_id: int, src: np.ndarray, out: np.ndarray) -> None:
    if type_id == F32:
        _row_f32(src, out)
    elif type_id == F16:
        _row_f16(src, out)
    elif type_id == BF16:
        _row_bf16(src, out)


@njit(cache=True)
def _dequant_rows(type_id, data, rows, out):
    # out[i] = row rows[i] of data; quantized rows by blocks.decode_rows, which writes their
    # float32 values straight into out.
    if _QUANTIZED[type_id]:
        decode_rows(type_id, data, rows, None, None, out)
    else:
        for i in range(rows.shape[0]):
            _float_row(type_id, data[rows[i]], out[i])


@njit(cache=True)
def _dequant_one(type_id, src, out):
    # One row: src its bytes (1-D), out float32 [K].
    if _QUANTIZED[type_id]:
        decode_rows(type_id, src.reshape((1, src.size)), np.zeros(1, np.int64), None, None, out)
    else:
        _float_row(type_id, src, out)


@njit(cache=True, parallel=True)
def _dequant_rows_parallel(type_id, data, rows, out, n_workers):
    # _dequant_rows over n_workers threads: quantized rows in one even share per thread (a
    # decode_rows call per row would cost more than a row's work), float rows row by row.
    n = rows.shape[0]
    if _QUANTIZED[type_id]:
        for w in prange(n_workers):
            r0, r1 = w * n // n_workers, (w + 1) * n // n_workers
            decode_rows(type_id, data, rows[r0:r1], None, None, out[r0:r1])
    else:
        for i in prange(n):
            _float_row(type_id, data[rows[i]], out[i])


# ----------------------------------------------------------------------------------------------
# Public API


def supported_types() -> tuple[int, ...]:
    """ggml type ids this module dequantizes."""
    return tuple(sorted(_TRAITS))


def block_traits(ggml_type: int) -> tuple[int, int]:
    """(elements per block, bytes per block) of a type id."""
    return _lookup(ggml_type)


def row_nbytes(ggml_type: int, row_len: int) -> int:
    """Bytes of one row of row_len elements (row_len a positive multiple of the block size)."""
    block_size, type_size = _lookup(ggml_type)
    if row_len <= 0 or row_len % block_size:
        raise ValueError(f"row length {row_len} is not a positive multiple of {block_size}")
    return row_len // block_size * type_size


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
    _dequant_one(int(ggml_type), src, np.asarray(out))


# ----------------------------------------------------------------------------------------------
# Helpers


def _lookup(ggml_type: int) -> tuple[int, int]:
    try:
        return _TRAITS[int(ggml_type)]
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
    if parallel:
        workers = max(1, min(rows.shape[0], get_num_threads()))
        _dequant_rows_parallel(int(ggml_type), rows2d, rows, out, workers)
    else:
        _dequant_rows(int(ggml_type), rows2d, rows, out)
    return out
