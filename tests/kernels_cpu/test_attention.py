"""Paged attention against a numpy reference on random block tables, for each cache type
(the reference reads the same stored values: float16-rounded, or q8_0 dequantized)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmapp.kernels_cpu import attention as at

BLOCK = 4


def build_batch(
    rng: np.random.Generator,
    seq_lens: list[int],
    new_tokens: list[int],
    n_head: int,
    n_kv: int,
    head_dim: int,
    cache_type: str = "f32",
) -> dict[str, Any]:
    """Sequences whose last new_tokens[s] keys are this step's queries; blocks scattered.
    Unused slots hold NaN (a q8_0 cache: NaN scales), so reading one shows in the result."""
    need = [-(-n // BLOCK) for n in seq_lens]
    num_blocks = sum(need) + 3
    perm = rng.permutation(num_blocks)
    tables = np.full((len(seq_lens), max(need)), -1, np.int32)
    used = 0
    for s, n in enumerate(need):
        tables[s, :n] = perm[used : used + n]
        used += n
    caches = at.alloc_kv(num_blocks, BLOCK, n_kv, head_dim, cache_type)
    for a in caches:
        if a.dtype != np.int8:
            a[...] = np.nan
    pairs = zip(seq_lens, new_tokens, strict=True)
    old = [(s, j) for s, (n, t) in enumerate(pairs) for j in range(n - t)]  # history rows
    old_slots = np.array([tables[s, j // BLOCK] * BLOCK + j % BLOCK for s, j in old], np.int64)
    history = rng.standard_normal((2, len(old), n_kv, head_dim)).astype(np.float32)
    at.write_kv(caches[0], caches[1], history[0], history[1], old_slots, *caches[2:])
    positions = np.concatenate(
        [np.arange(n - t, n) for n, t in zip(seq_lens, new_tokens, strict=True)]
    )
    rows_seq = np.repeat(np.arange(len(seq_lens)), new_tokens)
    slots = tables[rows_seq, positions // BLOCK].astype(np.int64) * BLOCK + positions % BLOCK
    n_rows = len(positions)
    return {
        "q": rng.standard_normal((n_rows, n_head, head_dim)).astype(np.float32),
        "k": rng.standard_normal((n_rows, n_kv, head_dim)).astype(np.float32),
        "v": rng.standard_normal((n_rows, n_kv, head_dim)).astype(np.float32),
        "k_cache": caches[0],
        "v_cache": caches[1],
        "scales": dict(zip(("k_scale", "v_scale"), caches[2:], strict=False)),
        "tables": tables,
        "seq_lens": np.array(seq_lens, np.int32),
        "start": np.concatenate([[0], np.cumsum(new_tokens)]).astype(np.int32),
        "positions": positions.astype(np.int32),
        "slots": slots,
    }


def run_both(b: dict[str, Any], window: int) -> tuple[np.ndarray, np.ndarray]:
    scales = b["scales"]
    at.write_kv(b["k_cache"], b["v_cache"], b["k"], b["v"], b["slots"], **scales)
    args = (b["q"], b["k_cache"], b["v_cache"], b["tables"], b["seq_lens"], b["start"])
    scale = 1.0 / np.sqrt(b["q"].shape[2])
    got = at.paged_attention(*args, b["positions"], scale, window, **scales)
    want = at.paged_attention_ref(*args, b["positions"], scale, window, **scales)
    return got, want


def test_write_kv_places_rows_and_skips_padding() -> None:
    k_cache = np.zeros((3, BLOCK, 2, 8), np.float32)
    v_cache = np.zeros_like(k_cache)
    k = np.arange(3 * 2 * 8, dtype=np.float32).reshape(3, 2, 8)
    at.write_kv(k_cache, v_cache, k, -k, np.array([9, -1, 2]))
    np.testing.assert_array_equal(k_cache[2, 1], k[0])
    np.testing.assert_array_equal(v_cache[0, 2], -k[2])
    assert np.count_nonzero(k_cache) == 2 * 2 * 8 - 1  # k[0] holds one zero


TYPES = pytest.mark.parametrize("cache_type", at.CACHE_TYPES)


def dim(head_dim: int, cache_type: str) -> int:
    """A head size the cache type takes (q8_0: whole blocks of 32)."""
    return max(head_dim, at.Q8_BLOCK) if cache_type == "q8_0" else head_dim


@TYPES
def test_mixed_prefill_and_decode_gqa(cache_type: str) -> None:
    rng = np.random.default_rng(0)
    b = build_batch(
        rng, [13, 1, 7, 20], [13, 1, 1, 5], n_head=6, n_kv=2, head_dim=dim(16, cache_type),
        cache_type=cache_type,
    )  # fmt: skip
    got, want = run_both(b, window=0)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


@TYPES
@pytest.mark.parametrize("window", [1, 3, 5, 64])
def test_sliding_window(window: int, cache_type: str) -> None:
    rng = np.random.default_rng(window)
    b = build_batch(rng, [17, 9], [6, 1], 4, 1, dim(8, cache_type), cache_type)
    got, want = run_both(b, window)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


@TYPES
def test_window_skips_dropped_blocks(cache_type: str) -> None:
    # Blocks that left the window may be freed (-1 in the table); they must not be read.
    rng = np.random.default_rng(7)
    d = dim(8, cache_type)
    b = build_batch(rng, [16], [1], n_head=2, n_kv=1, head_dim=d, cache_type=cache_type)
    got, want = run_both(b, window=4)
    b["tables"][0, :3] = -1
    args = (b["q"], b["k_cache"], b["v_cache"], b["tables"], b["seq_lens"], b["start"])
    got2 = at.paged_attention(*args, b["positions"], 1 / np.sqrt(d), 4, **b["scales"])
    np.testing.assert_array_equal(got, got2)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


@TYPES
def test_large_logits_are_stable(cache_type: str) -> None:
    rng = np.random.default_rng(3)
    b = build_batch(rng, [10], [10], 2, 2, dim(8, cache_type), cache_type)
    b["q"] *= 300.0
    b["k"] *= 10.0
    got, want = run_both(b, window=0)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-3)


def test_rejects_mismatched_heads() -> None:
    rng = np.random.default_rng(1)
    b = build_batch(rng, [4], [4], n_head=3, n_kv=2, head_dim=8)
    with pytest.raises(ValueError):
        run_both(b, 0)


def test_write_kv_f16_rounds_like_numpy() -> None:
    rng = np.random.default_rng(11)
    k_cache, v_cache = at.alloc_kv(2, BLOCK, 2, 8, "f16")
    k = (rng.standard_normal((3, 2, 8)) * np.logspace(-9, 4.5, 8)).astype(np.float32)
    at.write_kv(k_cache, v_cache, k, -k, np.array([5, -1, 0]))
    np.testing.assert_array_equal(
        k_cache[1, 1].view(np.uint16), k[0].astype(np.float16).view(np.uint16)
    )
    np.testing.assert_array_equal(v_cache[0, 0], (-k[2]).astype(np.float16))
    assert not k_cache[0, 1:].any() and not k_cache[1, 0].any()


def test_write_kv_q8_0_matches_reference() -> None:
    rng = np.random.default_rng(12)
    caches = at.alloc_kv(2, BLOCK, 2, 64, "q8_0")
    k = (rng.standard_normal((3, 2, 64)) * rng.uniform(0.01, 50, (3, 2, 64))).astype(np.float32)
    k[1, 0, :32] = 0.0  # an all-zero block: scale 0, values 0
    at.write_kv(caches[0], caches[1], k, -k, np.array([5, 1, 2]), caches[2], caches[3])
    qs, d = at.quantize_q8_0_ref(k)
    nqs, nd = at.quantize_q8_0_ref(-k)
    for t, (b, o) in enumerate([(1, 1), (0, 1), (0, 2)]):
        np.testing.assert_array_equal(caches[0][b, o], qs[t])
        np.testing.assert_array_equal(caches[2][b, o].view(np.uint16), d[t].view(np.uint16))
        np.testing.assert_array_equal(caches[1][b, o], nqs[t])
        np.testing.assert_array_equal(caches[3][b, o], nd[t])
    back = at.dequantize_kv_ref(qs, d)
    assert np.abs(back - k).max() <= np.abs(k).max() / 127 * 0.51 + 1e-3


def test_q8_0_rounds_half_away_from_zero() -> None:
    x = np.zeros((1, 1, 32), np.float32)
    x[0, 0, :3] = 127.0, 2.5, -2.5  # scale 1: 2.5 -> 3, -2.5 -> -3
    qs, d = at.quantize_q8_0_ref(x)
    assert d[0, 0, 0] == 1.0 and list(qs[0, 0, :3]) == [127, 3, -3]
    caches = at.alloc_kv(1, BLOCK, 1, 32, "q8_0")
    at.write_kv(caches[0], caches[1], x, x, np.array([0]), caches[2], caches[3])
    np.testing.assert_array_equal(caches[0][0, 0], qs[0])


def test_stored_types_track_float32() -> None:
    # The same step under each cache type: f16 within ~1e-3 of f32, q8_0 within ~1e-2.
    outs = {}
    for cache_type in at.CACHE_TYPES:
        b = build_batch(np.random.default_rng(5), [40, 9], [3, 9], 4, 2, 64, cache_type)
        outs[cache_type], _ = run_both(b, window=0)
    np.testing.assert_allclose(outs["f16"], outs["f32"], atol=3e-3)
    np.testing.assert_allclose(outs["q8_0"], outs["f32"], atol=3e-2)


def test_alloc_kv_types_and_sizes() -> None:
    sizes = {t: sum(a.nbytes for a in at.alloc_kv(3, BLOCK, 2, 64, t)) for t in at.CACHE_TYPES}
    n = 2 * 3 * BLOCK * 2 * 64
    assert sizes == {"f32": 4 * n, "f16": 2 * n, "q8_0": n * 34 // 32}
    with pytest.raises(ValueError, match="q8_0"):
        at.alloc_kv(3, BLOCK, 2, 48, "q8_0")
    with pytest.raises(ValueError, match="unknown"):
        at.alloc_kv(3, BLOCK, 2, 64, "q4_0")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_batches(data: st.DataObject) -> None:
    n_seq = data.draw(st.integers(1, 4))
    seq_lens = data.draw(st.lists(st.integers(1, 23), min_size=n_seq, max_size=n_seq))
    new = [data.draw(st.integers(1, n)) for n in seq_lens]
    n_kv = data.draw(st.sampled_from([1, 2]))
    n_head = n_kv * data.draw(st.sampled_from([1, 3]))
    window = data.draw(st.sampled_from([0, 0, 2, 6]))
    cache_type = data.draw(st.sampled_from(at.CACHE_TYPES))
    head_dim = dim(data.draw(st.sampled_from([4, 16])), cache_type)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    b = build_batch(rng, seq_lens, new, n_head, n_kv, head_dim, cache_type)
    got, want = run_both(b, window)
    np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-4)
