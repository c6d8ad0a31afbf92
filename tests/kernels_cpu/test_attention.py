"""Paged attention against a numpy reference on random block tables."""

from __future__ import annotations

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
) -> dict[str, np.ndarray]:
    """Sequences whose last new_tokens[s] keys are this step's queries; blocks scattered."""
    need = [-(-n // BLOCK) for n in seq_lens]
    num_blocks = sum(need) + 3
    perm = rng.permutation(num_blocks)
    tables = np.full((len(seq_lens), max(need)), -1, np.int32)
    used = 0
    for s, n in enumerate(need):
        tables[s, :n] = perm[used : used + n]
        used += n
    k_cache = np.full((num_blocks, BLOCK, n_kv, head_dim), np.nan, np.float32)
    v_cache = np.full_like(k_cache, np.nan)
    for s, n_keys in enumerate(seq_lens):  # history written directly, new rows via write_kv
        for j in range(n_keys - new_tokens[s]):
            b, o = tables[s, j // BLOCK], j % BLOCK
            k_cache[b, o] = rng.standard_normal((n_kv, head_dim))
            v_cache[b, o] = rng.standard_normal((n_kv, head_dim))
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
        "k_cache": k_cache,
        "v_cache": v_cache,
        "tables": tables,
        "seq_lens": np.array(seq_lens, np.int32),
        "start": np.concatenate([[0], np.cumsum(new_tokens)]).astype(np.int32),
        "positions": positions.astype(np.int32),
        "slots": slots,
    }


def run_both(b: dict[str, np.ndarray], window: int) -> tuple[np.ndarray, np.ndarray]:
    at.write_kv(b["k_cache"], b["v_cache"], b["k"], b["v"], b["slots"])
    args = (b["q"], b["k_cache"], b["v_cache"], b["tables"], b["seq_lens"], b["start"])
    scale = 1.0 / np.sqrt(b["q"].shape[2])
    got = at.paged_attention(*args, b["positions"], scale, window)
    want = at.paged_attention_ref(*args, b["positions"], scale, window)
    return got, want


def test_write_kv_places_rows_and_skips_padding() -> None:
    k_cache = np.zeros((3, BLOCK, 2, 8), np.float32)
    v_cache = np.zeros_like(k_cache)
    k = np.arange(3 * 2 * 8, dtype=np.float32).reshape(3, 2, 8)
    at.write_kv(k_cache, v_cache, k, -k, np.array([9, -1, 2]))
    np.testing.assert_array_equal(k_cache[2, 1], k[0])
    np.testing.assert_array_equal(v_cache[0, 2], -k[2])
    assert np.count_nonzero(k_cache) == 2 * 2 * 8 - 1  # k[0] holds one zero


def test_mixed_prefill_and_decode_gqa() -> None:
    rng = np.random.default_rng(0)
    b = build_batch(
        rng, seq_lens=[13, 1, 7, 20], new_tokens=[13, 1, 1, 5], n_head=6, n_kv=2, head_dim=16
    )
    got, want = run_both(b, window=0)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("window", [1, 3, 5, 64])
def test_sliding_window(window: int) -> None:
    rng = np.random.default_rng(window)
    b = build_batch(rng, [17, 9], [6, 1], n_head=4, n_kv=1, head_dim=8)
    got, want = run_both(b, window)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_window_skips_dropped_blocks() -> None:
    # Blocks that left the window may be freed (-1 in the table); they must not be read.
    rng = np.random.default_rng(7)
    b = build_batch(rng, [16], [1], n_head=2, n_kv=1, head_dim=8)
    got, want = run_both(b, window=4)
    b["tables"][0, :3] = -1
    got2 = at.paged_attention(
        b["q"],
        b["k_cache"],
        b["v_cache"],
        b["tables"],
        b["seq_lens"],
        b["start"],
        b["positions"],
        1 / np.sqrt(8),
        4,
    )
    np.testing.assert_array_equal(got, got2)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_large_logits_are_stable() -> None:
    rng = np.random.default_rng(3)
    b = build_batch(rng, [10], [10], n_head=2, n_kv=2, head_dim=8)
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


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_batches(data: st.DataObject) -> None:
    n_seq = data.draw(st.integers(1, 4))
    seq_lens = data.draw(st.lists(st.integers(1, 23), min_size=n_seq, max_size=n_seq))
    new = [data.draw(st.integers(1, n)) for n in seq_lens]
    n_kv = data.draw(st.sampled_from([1, 2]))
    n_head = n_kv * data.draw(st.sampled_from([1, 3]))
    window = data.draw(st.sampled_from([0, 0, 2, 6]))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
    b = build_batch(rng, seq_lens, new, n_head, n_kv, head_dim=data.draw(st.sampled_from([4, 16])))
    got, want = run_both(b, window)
    np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-4)
