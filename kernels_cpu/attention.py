"""Softmax attention over a paged KV cache.

Cache, per layer: k_cache and v_cache [num_blocks, block_size, n_kv_head, head_dim] in one of
three cache types (CACHE_TYPES):
  f16   float16, the default (llama.cpp's too); rounded to nearest even when written.
  f32   float32.
  q8_0  int8, with one float16 scale per 32 values of a head row in k_scale / v_scale
        [num_blocks, block_size, n_kv_head, head_dim // 32]: value = scale * int8 (ggml's Q8_0:
        scale = max|x| / 127, int8 = x / scale rounded half away from zero).
Bytes per token: n_layer * 2 * n_kv_head * head_dim * (4 | 2 | 34/32). With f16, Qwen2.5-0.5B
takes 12.3 KB, Gemma 3 270M 18.4 KB, SmolLM2-135M 23 KB (4096 tokens: 50-95 MB).
A token's slot is block_id * block_size + offset; a sequence's block table lists its blocks in
order, so key j of a sequence (its position j) lives in block block_table[j // block_size] at
offset j % block_size.

paged_attention handles any mix of prefill rows and decode rows: query rows of sequence s are
q[query_start_loc[s]:query_start_loc[s+1]], each with its position; key j is visible to a query
at position p iff j <= p, j < seq_lens[s] and (no window, or p - j < sliding_window). GQA: query
head h reads kv head h // (n_head // n_kv_head). Stored values are widened to float32 as they
are read (one conversion instruction for float16 where the CPU has it); softmax is computed
online per cache block (running max and sum), in float32.
Work items are (query row, head) pairs dealt round-robin to the threads, so the long rows at
the end of a causal prompt are spread evenly.
"""

from __future__ import annotations

import math
import os
import platform
from typing import Any

import numpy as np
from llvmlite import binding as llb
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from . import threads as _threads
from .ops import _exp_parts  # cached kernels key on this file only: touch it if that changes

CACHE_TYPES = ("f16", "f32", "q8_0")
Q8_BLOCK = 32  # values sharing one q8_0 scale
_STORAGE = {"f16": np.float16, "f32": np.float32, "q8_0": np.int8}


def _native_half() -> bool:
    """Whether LLVM converts float16 <-> float32 in one instruction on the target Numba compiles
    for (every aarch64; x86 with F16C). Elsewhere it would call a runtime helper that Numba's
    JIT cannot resolve, so the portable versions below are used."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    features = os.environ.get("NUMBA_CPU_FEATURES")
    if features is not None or os.environ.get("NUMBA_CPU_NAME", "host") != "host":
        return "+f16c" in (features or "").split(",")
    try:
        return bool(llb.get_host_cpu_features().get("f16c", False))
    except RuntimeError:
        return False


NATIVE_HALF = _native_half()


@intrinsic
def _half_to_float_native(typingctx: Any, bits: Any) -> Any:
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _float_to_half_native(typingctx: Any, value: Any) -> Any:
    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@njit(cache=True)
def half_to_float_portable(bits):  # type: ignore[no-untyped-def]
    """float16 bits (uint16) -> float32, without a conversion instruction."""
    h = np.int32(bits)
    exp = (h >> 10) & 0x1F
    man = h & 0x3FF
    if exp == 0:
        value = man * 2.0**-24
    elif exp == 31:
        value = math.inf if man == 0 else math.nan
    else:
        value = (1024 + man) * 2.0 ** (exp - 25)
    return np.float32(-value if h & 0x8000 else value)


@njit(cache=True)
def float_to_half_portable(value):  # type: ignore[no-untyped-def]
    """float32 -> float16 bits (uint16), rounded to nearest even, without a conversion
    instruction (the float32 is exact in float64, so the one rounding is np.rint's)."""
    x = np.float64(value)
    if math.isnan(x):
        return np.uint16(0x7E00)
    sign = 0x8000 if math.copysign(1.0, x) < 0 else 0
    a = abs(x)
    if a >= 65520.0:  # rounds to infinity
        return np.uint16(sign | 0x7C00)
    if a < 2.0**-14:  # subnormal: units of 2**-24 (1024 of them is the smallest normal)
        return np.uint16(sign | int(np.rint(a * 2.0**24)))
    _, e = math.frexp(a)  # a = m * 2**e, m in [0.5, 1)
    exp = e - 1
    man = int(np.rint(a * 2.0 ** (10 - exp))) - 1024  # may carry into the exponent: still right
    return np.uint16(sign | (((exp + 15) << 10) + man))


_half_to_float: Any = _half_to_float_native if NATIVE_HALF else half_to_float_portable
_float_to_half: Any = _float_to_half_native if NATIVE_HALF else float_to_half_portable


def _widen(x):  # type: ignore[no-untyped-def]
    """A stored cache value as float32 (Numba: float16 bits, int8 or float32)."""
    raise NotImplementedError  # only called from compiled code


@overload(_widen)
def _widen_impl(x):  # type: ignore[no-untyped-def]
    if x == types.uint16:
        return lambda x: _half_to_float(x)
    return lambda x: np.float32(x)


_NO_SCALE = np.zeros((1, 1, 1, 1), np.uint16)  # stands in for f16/f32 caches' absent scales


def alloc_kv(
    num_blocks: int, block_size: int, n_kv: int, head_dim: int, cache_type: str = "f16"
) -> tuple[np.ndarray, ...]:
    """Zeroed K and V blocks: (k_cache, v_cache), and for q8_0 (k, v, k_scale, v_scale)."""
    if cache_type not in _STORAGE:
        raise ValueError(f"unknown KV cache type {cache_type!r} ({', '.join(CACHE_TYPES)})")
    if cache_type == "q8_0" and head_dim % Q8_BLOCK:
        raise ValueError(f"a q8_0 KV cache needs head_dim a multiple of 32, not {head_dim}")
    shape = (num_blocks, block_size, n_kv, head_dim)
    arrays = [np.zeros(shape, _STORAGE[cache_type]) for _ in range(2)]
    if cache_type == "q8_0":
        scales = shape[:3] + (head_dim // Q8_BLOCK,)
        arrays += [np.zeros(scales, np.float16) for _ in range(2)]
    return tuple(arrays)


@njit(cache=True)
def _write_kv(k_cache, v_cache, k, v, slot_mapping):
    block_size = k_cache.shape[1]
    for t in range(k.shape[0]):
        slot = slot_mapping[t]
        if slot < 0:  # padding row: nothing to store
            continue
        b = slot // block_size
        o = slot % block_size
        k_cache[b, o] = k[t]
        v_cache[b, o] = v[t]


@njit(cache=True)
def _write_kv_f16(k_cache, v_cache, k, v, slot_mapping):
    # The caches as uint16 (float16 bits); each value rounded to the nearest float16.
    block_size = k_cache.shape[1]
    for t in range(k.shape[0]):
        slot = slot_mapping[t]
        if slot < 0:
            continue
        b = slot // block_size
        o = slot % block_size
        for h in range(k.shape[1]):
            for d in range(k.shape[2]):
                k_cache[b, o, h, d] = _float_to_half(np.float32(k[t, h, d]))
                v_cache[b, o, h, d] = _float_to_half(np.float32(v[t, h, d]))


@njit(cache=True)
def _quantize_row_q8(x, qs, scales):
    # x float [D] -> qs int8 [D], scales float16 bits [D // 32]; no fastmath: the rounding must
    # be the reference's.
    for g in range(scales.size):
        amax = np.float32(0.0)
        for d in range(g * 32, g * 32 + 32):
            amax = max(amax, abs(np.float32(x[d])))
        step = amax / np.float32(127.0)
        inv = np.float32(1.0) / step if step > 0 else np.float32(0.0)
        for d in range(g * 32, g * 32 + 32):
            r = np.float64(np.float32(x[d]) * inv)  # exact, so adding 0.5 rounds only once
            qs[d] = np.int8(math.trunc(r + math.copysign(0.5, r)))
        scales[g] = _float_to_half(step)


@njit(cache=True)
def _write_kv_q8(k_cache, v_cache, k_scale, v_scale, k, v, slot_mapping):
    block_size = k_cache.shape[1]
    for t in range(k.shape[0]):
        slot = slot_mapping[t]
        if slot < 0:
            continue
        b = slot // block_size
        o = slot % block_size
        for h in range(k.shape[1]):
            _quantize_row_q8(k[t, h], k_cache[b, o, h], k_scale[b, o, h])
            _quantize_row_q8(v[t, h], v_cache[b, o, h], v_scale[b, o, h])


def write_kv(
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    slot_mapping: np.ndarray,
    k_scale: np.ndarray | None = None,
    v_scale: np.ndarray | None = None,
) -> None:
    """Store k, v [T, n_kv_head, head_dim] at slot_mapping [T] (negative slots are skipped),
    converted to the cache's type (a q8_0 cache, int8, also takes its k_scale and v_scale)."""
    slots = np.ascontiguousarray(slot_mapping, dtype=np.int64)
    if k_cache.dtype == np.float16:
        _write_kv_f16(k_cache.view(np.uint16), v_cache.view(np.uint16), k, v, slots)
    elif k_cache.dtype == np.int8:
        if k_scale is None or v_scale is None:
            raise ValueError("a q8_0 KV cache needs its k_scale and v_scale")
        ks, vs = k_scale.view(np.uint16), v_scale.view(np.uint16)
        _write_kv_q8(k_cache, v_cache, ks, vs, k, v, slots)
    else:
        _write_kv(k_cache, v_cache, k, v, slots)


@njit(cache=True, fastmath=True, inline="always")
def _score_q8(q, krow, kscale, scl):
    # q . k for one int8 key row with its float16 scales (bits). The scales are widened into
    # scl first so that one flat loop (d >> 5 picks a value's scale) vectorizes: a loop per
    # 32-value block ran ~5x slower.
    s = np.float32(0.0)
    for g in range(kscale.size):
        scl[g] = _widen(kscale[g])
    for d in range(q.size):
        s += q[d] * np.float32(krow[d]) * scl[d >> 5]
    return s


@njit(cache=True, fastmath=True, inline="always")
def _accumulate_q8(acc, p, vrow, vscale, scl):
    # acc += p * v for one int8 value row.
    for g in range(vscale.size):
        scl[g] = p * _widen(vscale[g])
    for d in range(acc.size):
        acc[d] += scl[d >> 5] * np.float32(vrow[d])


def _attend_one(q, caches, table, kvh, lo, hi, scale, work, scl, acc, out):  # type: ignore[no-untyped-def]
    """out[:] = softmax(scale * q . K[lo:hi+1]) @ V[lo:hi+1] for one query head; keys by
    position. caches: (k, v, k_scale, v_scale, quantized); work: float32 [3, block_size]
    scratch (scores, exp mantissas, exp exponent bits); scl: float32 [head_dim // 32] q8_0
    scales. Compiled per cache type (the overload below)."""
    raise NotImplementedError  # only called from compiled code


def _make_attend(quantized: bool) -> Any:
    # One body, `quantized` a constant of each compiled copy: the float caches' loops stay the
    # plain vectorized ones with no test of the type inside (a runtime flag there cost 2-3x).
    def attend(q, caches, table, kvh, lo, hi, scale, work, scl, acc, out):  # type: ignore[no-untyped-def]
        k_cache, v_cache, k_scale, v_scale = caches[0], caches[1], caches[2], caches[3]
        block_size = k_cache.shape[1]
        scores = work[0]
        mant = work[1]
        bits = work[2].view(np.int32)
        pow2 = work[2]
        m = np.float32(-np.inf)
        total = np.float32(0.0)
        acc[:] = 0.0
        j = lo
        while j <= hi:
            blk = table[j // block_size]
            off0 = j % block_size
            n = min(block_size - off0, hi - j + 1)
            best = np.float32(-np.inf)
            for i in range(n):
                krow = k_cache[blk, off0 + i, kvh]
                if quantized:
                    s = _score_q8(q, krow, k_scale[blk, off0 + i, kvh], scl)
                else:
                    s = np.float32(0.0)
                    for d in range(q.size):
                        s += q[d] * _widen(krow[d])
                scores[i] = s * scale
                best = max(best, scores[i])
            if best > m:  # rescale what was accumulated under the old maximum
                alpha = np.float32(math.exp(m - best)) if m > -np.inf else np.float32(0.0)
                total *= alpha
                for d in range(acc.size):
                    acc[d] *= alpha
                m = best
            for i in range(n):
                scores[i] -= m
            _exp_parts(scores[:n], mant[:n], bits[:n])  # vectorized exp (ops.py)
            for i in range(n):
                p = mant[i] * pow2[i]
                total += p
                vrow = v_cache[blk, off0 + i, kvh]
                if quantized:
                    _accumulate_q8(acc, p, vrow, v_scale[blk, off0 + i, kvh], scl)
                else:
                    for d in range(acc.size):
                        acc[d] += p * _widen(vrow[d])
            j += n
        inv = np.float32(1.0) / total if total > 0 else np.float32(0.0)
        for d in range(acc.size):
            out[d] = acc[d] * inv

    return attend


_ATTEND = {False: _make_attend(False), True: _make_attend(True)}


@overload(_attend_one, jit_options={"fastmath": True})
def _attend_one_impl(q, caches, table, kvh, lo, hi, scale, work, scl, acc, out):  # type: ignore[no-untyped-def]
    return _ATTEND[caches.types[0].dtype == types.int8]


@njit(cache=True, parallel=True)
def _paged_attention(
    q, caches, tables, seq_lens, query_start_loc, positions, scale, window, out, n_workers
):
    k_cache = caches[0]
    n_rows, n_head, head_dim = q.shape
    group = n_head // k_cache.shape[2]
    seq_of_row = np.empty(n_rows, np.int64)
    for s in range(seq_lens.size):
        for t in range(query_start_loc[s], query_start_loc[s + 1]):
            seq_of_row[t] = s
    n_items = n_rows * n_head
    for w in prange(n_workers):
        work = np.empty((3, k_cache.shape[1]), np.float32)
        acc = np.empty(head_dim, np.float32)
        scl = np.empty(head_dim // 32 + 1, np.float32)
        for item in range(w, n_items, n_workers):
            t = item // n_head
            h = item % n_head
            s = seq_of_row[t]
            pos = positions[t]
            hi = min(pos, seq_lens[s] - 1)
            lo = max(0, pos - window + 1) if window > 0 else 0
            table = tables[s]
            kvh = h // group
            _attend_one(q[t, h], caches, table, kvh, lo, hi, scale, work, scl, acc, out[t, h])


def _kernel_caches(
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    k_scale: np.ndarray | None,
    v_scale: np.ndarray | None,
) -> tuple[Any, ...]:
    """(k, v, k_scale, v_scale, quantized) as the kernel reads them: float16 as its bits."""
    if k_cache.dtype == np.int8:
        assert k_scale is not None and v_scale is not None
        return (k_cache, v_cache, k_scale.view(np.uint16), v_scale.view(np.uint16), True)
    if k_cache.dtype == np.float16:
        k_cache, v_cache = k_cache.view(np.uint16), v_cache.view(np.uint16)
    return (k_cache, v_cache, _NO_SCALE, _NO_SCALE, False)


def _check_shapes(
    q: np.ndarray,
    k_cache: np.ndarray,
    query_start_loc: np.ndarray,
    k_scale: np.ndarray | None,
    v_scale: np.ndarray | None,
) -> None:
    # The arguments' checks, shared by the kernel and its reference.
    n_head, head_dim = q.shape[1], q.shape[2]
    if k_cache.shape[3] != head_dim or n_head % k_cache.shape[2]:
        raise ValueError(f"q heads {q.shape[1:]} do not fit the cache {k_cache.shape}")
    if query_start_loc[-1] != q.shape[0]:
        raise ValueError("query_start_loc must end at the number of query rows")
    if k_cache.dtype == np.int8:
        want = k_cache.shape[:3] + (head_dim // Q8_BLOCK,)
        for s in (k_scale, v_scale):
            if head_dim % Q8_BLOCK or s is None or s.shape != want or s.dtype != np.float16:
                raise ValueError(f"a q8_0 cache {k_cache.shape} needs float16 scales {want}")
    elif k_cache.dtype not in (np.float16, np.float32):
        raise ValueError(f"no KV cache type stores {k_cache.dtype}")


def paged_attention(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    block_tables: np.ndarray,
    seq_lens: np.ndarray,
    query_start_loc: np.ndarray,
    query_positions: np.ndarray,
    scale: float,
    sliding_window: int = 0,
    out: np.ndarray | None = None,
    k_scale: np.ndarray | None = None,
    v_scale: np.ndarray | None = None,
) -> np.ndarray:
    """Attention of q [T, n_head, D] over the cache; returns out [T, n_head, D] (module doc).

    block_tables int32 [S, max_blocks]; seq_lens int32 [S] (keys visible, this step's included);
    query_start_loc int32 [S+1]; query_positions int32 [T]; sliding_window 0 = none;
    k_scale, v_scale: a q8_0 cache's scales.
    """
    _check_shapes(q, k_cache, query_start_loc, k_scale, v_scale)
    if out is None:
        out = np.empty(q.shape, np.float32)
    n_items = q.shape[0] * q.shape[1]
    workers = max(1, min(n_items, _threads.get_num_threads()))
    _paged_attention(
        q,
        _kernel_caches(k_cache, v_cache, k_scale, v_scale),
        np.ascontiguousarray(block_tables, dtype=np.int32),
        np.ascontiguousarray(seq_lens, dtype=np.int32),
        np.ascontiguousarray(query_start_loc, dtype=np.int32),
        np.ascontiguousarray(query_positions, dtype=np.int32),
        np.float32(scale),
        int(sliding_window),
        out,
        workers,
    )
    return out


def quantize_q8_0_ref(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy reference of q8_0 storage: x [..., D] -> (int8 [..., D], float16 [..., D // 32])."""
    blocks = x.astype(np.float32).reshape(*x.shape[:-1], -1, Q8_BLOCK)
    step = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127.0)
    with np.errstate(divide="ignore"):
        inv = np.where(step > 0, np.float32(1.0) / step, np.float32(0.0)).astype(np.float32)
    r = (blocks * inv).astype(np.float64)
    qs = np.trunc(r + np.copysign(0.5, r)).astype(np.int8)  # half away from zero
    return qs.reshape(x.shape), step[..., 0].astype(np.float16)


def dequantize_kv_ref(cache: np.ndarray, scales: np.ndarray | None = None) -> np.ndarray:
    """Stored K or V values [..., D] as float64 (q8_0: int8 times its block's scale)."""
    if scales is None:
        return cache.astype(np.float64)
    blocks = cache.reshape(*cache.shape[:-1], -1, Q8_BLOCK).astype(np.float64)
    return (blocks * scales.astype(np.float64)[..., None]).reshape(cache.shape)


def paged_attention_ref(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    block_tables: np.ndarray,
    seq_lens: np.ndarray,
    query_start_loc: np.ndarray,
    query_positions: np.ndarray,
    scale: float,
    sliding_window: int = 0,
    k_scale: np.ndarray | None = None,
    v_scale: np.ndarray | None = None,
) -> np.ndarray:
    """numpy reference: gathers each sequence's stored keys, masks, softmax in float64."""
    _check_shapes(q, k_cache, query_start_loc, k_scale, v_scale)
    n_head = q.shape[1]
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    if k_cache.dtype != np.int8:
        k_scale = v_scale = None
    out = np.zeros(q.shape, np.float32)
    for s in range(len(seq_lens)):
        n_keys = int(seq_lens[s])
        j = np.arange(n_keys)
        at = (block_tables[s][j // block_size], j % block_size)
        # [n_keys, n_kv, D], as stored (float16-rounded, or q8_0 dequantized)
        keys = dequantize_kv_ref(k_cache[at], None if k_scale is None else k_scale[at])
        vals = dequantize_kv_ref(v_cache[at], None if v_scale is None else v_scale[at])
        for t in range(query_start_loc[s], query_start_loc[s + 1]):
            pos = int(query_positions[t])
            visible = j <= pos
            if sliding_window > 0:
                visible &= pos - j < sliding_window
            for h in range(n_head):
                kvh = h // (n_head // n_kv)
                logits = keys[visible, kvh] @ q[t, h].astype(np.float64) * scale
                p = np.exp(logits - logits.max())
                out[t, h] = (p / p.sum()) @ vals[visible, kvh]
    return out
