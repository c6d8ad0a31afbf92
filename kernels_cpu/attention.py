"""Softmax attention over a paged KV cache.

Cache, per layer: k_cache and v_cache float32 [num_blocks, block_size, n_kv_head, head_dim].
A token's slot is block_id * block_size + offset; a sequence's block table lists its blocks in
order, so key j of a sequence (its position j) lives in block block_table[j // block_size] at
offset j % block_size. float32 costs n_layer * 2 * n_kv_head * head_dim * 4 bytes per token:
Qwen2.5-0.5B 24.6 KB, Gemma 3 270M 36.9 KB, SmolLM2-135M 46 KB (4096 tokens: 100-190 MB).

paged_attention handles any mix of prefill rows and decode rows: query rows of sequence s are
q[query_start_loc[s]:query_start_loc[s+1]], each with its position; key j is visible to a query
at position p iff j <= p, j < seq_lens[s] and (no window, or p - j < sliding_window). GQA: query
head h reads kv head h // (n_head // n_kv_head). Softmax is computed online per cache block
(running max and sum), in float32.
Work items are (query row, head) pairs dealt round-robin to the threads, so the long rows at
the end of a causal prompt are spread evenly.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from . import threads as _threads
from .ops import _exp_parts  # cached kernels key on this file only: touch it if that changes


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


def write_kv(
    k_cache: np.ndarray, v_cache: np.ndarray, k: np.ndarray, v: np.ndarray, slot_mapping: np.ndarray
) -> None:
    """Store k, v [T, n_kv_head, head_dim] at slot_mapping [T] (negative slots are skipped)."""
    _write_kv(k_cache, v_cache, k, v, np.ascontiguousarray(slot_mapping, dtype=np.int64))


@njit(cache=True, fastmath=True)
def _attend_one(q, k_cache, v_cache, table, kvh, lo, hi, scale, work, acc, out):
    # out[:] = softmax(scale * q . K[lo:hi+1]) @ V[lo:hi+1] for one query head; keys by position.
    # work: float32 [3, block_size] scratch (scores, exp mantissas, exp exponent bits).
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
            kv = k_cache[blk, off0 + i, kvh]
            s = np.float32(0.0)
            for d in range(q.size):
                s += q[d] * kv[d]
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
            vv = v_cache[blk, off0 + i, kvh]
            for d in range(acc.size):
                acc[d] += p * vv[d]
        j += n
    inv = np.float32(1.0) / total if total > 0 else np.float32(0.0)
    for d in range(acc.size):
        out[d] = acc[d] * inv


@njit(cache=True, parallel=True)
def _paged_attention(
    q, k_cache, v_cache, tables, seq_lens, query_start_loc, positions, scale, window, out, n_workers
):
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
        for item in range(w, n_items, n_workers):
            t = item // n_head
            h = item % n_head
            s = seq_of_row[t]
            pos = positions[t]
            hi = min(pos, seq_lens[s] - 1)
            lo = max(0, pos - window + 1) if window > 0 else 0
            table = tables[s]
            kvh = h // group
            _attend_one(q[t, h], k_cache, v_cache, table, kvh, lo, hi, scale, work, acc, out[t, h])


def _check_shapes(q: np.ndarray, k_cache: np.ndarray, query_start_loc: np.ndarray) -> None:
    # The arguments' checks, shared by the kernel and its reference.
    n_head, head_dim = q.shape[1], q.shape[2]
    if k_cache.shape[3] != head_dim or n_head % k_cache.shape[2]:
        raise ValueError(f"q heads {q.shape[1:]} do not fit the cache {k_cache.shape}")
    if query_start_loc[-1] != q.shape[0]:
        raise ValueError("query_start_loc must end at the number of query rows")


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
) -> np.ndarray:
    """Attention of q [T, n_head, D] over the cache; returns out [T, n_head, D] (module doc).

    block_tables int32 [S, max_blocks]; seq_lens int32 [S] (keys visible, this step's included);
    query_start_loc int32 [S+1]; query_positions int32 [T]; sliding_window 0 = none.
    """
    _check_shapes(q, k_cache, query_start_loc)
    if out is None:
        out = np.empty(q.shape, np.float32)
    n_items = q.shape[0] * q.shape[1]
    workers = max(1, min(n_items, _threads.get_num_threads()))
    _paged_attention(
        q,
        k_cache,
        v_cache,
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
) -> np.ndarray:
    """numpy reference: gathers each sequence's keys, masks, softmax in float64."""
    _check_shapes(q, k_cache, query_start_loc)
    n_head = q.shape[1]
    block_size, n_kv = k_cache.shape[1], k_cache.shape[2]
    out = np.zeros(q.shape, np.float32)
    for s in range(len(seq_lens)):
        n_keys = int(seq_lens[s])
        j = np.arange(n_keys)
        blocks = block_tables[s][j // block_size]
        keys = k_cache[blocks, j % block_size].astype(np.float64)  # [n_keys, n_kv, D]
        vals = v_cache[blocks, j % block_size].astype(np.float64)
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
