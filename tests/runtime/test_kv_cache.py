"""Block pool and prefix cache bookkeeping: unit cases and a stateful property test.

The stateful machine simulates what the K/V arrays would hold (the token at each slot) so it
can check the property that matters: a prefix match only ever hands back blocks whose contents
are exactly the prompt's tokens at the same positions, and no block is written while shared.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from llmapp.runtime.core.kv_cache import (
    BlockPool,
    KVCacheManager,
    OutOfBlocksError,
    SequenceBlocks,
    chain_key,
)

# ---- unit cases ------------------------------------------------------------------------------


def test_release_of_a_free_block_raises() -> None:
    pool = BlockPool(4, 2)
    b = pool.allocate()
    pool.release(b)
    with pytest.raises(RuntimeError):
        pool.release(b)
    assert pool.ref_count[b] == 0
    assert pool.num_free == 4


def test_allocate_is_all_or_nothing() -> None:
    kv = KVCacheManager(3, 4)
    seq = SequenceBlocks()
    with pytest.raises(OutOfBlocksError):
        kv.allocate(seq, 13)  # needs 4 blocks
    assert seq.block_table == [] and kv.pool.num_free == 3
    kv.allocate(seq, 12)
    assert len(seq.block_table) == 3 and kv.pool.num_free == 0
    with pytest.raises(OutOfBlocksError):
        kv.pool.allocate()


def _computed_seq(kv: KVCacheManager, tokens: list[int]) -> SequenceBlocks:
    seq = SequenceBlocks()
    kv.allocate(seq, len(tokens))
    kv.publish_full_blocks(seq, tokens, len(tokens))
    return seq


def test_prefix_match_reuses_published_blocks_and_leaves_one_token() -> None:
    kv = KVCacheManager(8, 4)
    tokens = list(range(12))
    first = _computed_seq(kv, tokens)
    assert len(kv.pool.cached) == 3
    again = SequenceBlocks()
    # The whole prompt is cached, but its last token must be computed for its logits.
    assert kv.match_prefix(again, tokens) == 8
    assert again.block_table == first.block_table[:2]
    assert [kv.pool.ref_count[b] for b in first.block_table] == [2, 2, 1]
    longer = SequenceBlocks()
    assert kv.match_prefix(longer, [*tokens, 99]) == 12
    other = SequenceBlocks()
    assert kv.match_prefix(other, [0, 1, 2, 3, 5, 5, 6, 7, 8]) == 4  # diverges in block 2


def test_freed_cached_blocks_survive_until_reallocated_lru() -> None:
    kv = KVCacheManager(4, 2)
    a = _computed_seq(kv, [1, 2, 3, 4])
    b = _computed_seq(kv, [5, 6, 7, 8])
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    kv.free(a)
    kv.free(b)
    assert kv.pool.num_used == 0 and len(kv.pool.cached) == 4
    # Least recently freed goes first; within a sequence its tail before its prefix.
    assert kv.pool.allocate() == a_blocks[1]
    hit = SequenceBlocks()
    assert kv.match_prefix(hit, [1, 2, 3, 4, 0]) == 2  # a's first block is still cached
    kv.free(hit)  # ... and now the most recently freed
    assert kv.pool.allocate() == b_blocks[1]
    assert kv.match_prefix(SequenceBlocks(), [5, 6, 7, 8, 0]) == 2
    assert kv.match_prefix(SequenceBlocks(), [1, 2, 9]) == 2
    assert kv.pool.num_free == 0


def test_disabled_prefix_cache_never_matches() -> None:
    kv = KVCacheManager(8, 2, enable_prefix_cache=False)
    _computed_seq(kv, [1, 2, 3, 4])
    assert kv.pool.cached == {}
    assert kv.match_prefix(SequenceBlocks(), [1, 2, 3, 4, 5]) == 0


def test_first_writer_wins_for_duplicate_blocks() -> None:
    kv = KVCacheManager(8, 2)
    a = _computed_seq(kv, [1, 2, 3])
    b = _computed_seq(kv, [1, 2, 4])  # computed concurrently: same first block content
    assert kv.pool.lookup(chain_key(None, [1, 2])) == a.block_table[0]
    assert kv.pool.block_key[b.block_table[0]] is None
    kv.free(a)
    kv.free(b)
    assert kv.pool.num_used == 0


@given(
    st.lists(st.integers(0, 3), min_size=1, max_size=12),
    st.lists(st.integers(0, 3), min_size=1, max_size=12),
    st.integers(1, 4),
)
def test_chain_keys_equal_iff_prefixes_equal(a: list[int], b: list[int], bs: int) -> None:
    def keys(tokens: list[int]) -> list[bytes]:
        out: list[bytes] = []
        for i in range(len(tokens) // bs):
            out.append(chain_key(out[-1] if out else None, tokens[i * bs : (i + 1) * bs]))
        return out

    for i, (ka, kb) in enumerate(zip(keys(a), keys(b), strict=False)):
        assert (ka == kb) == (a[: (i + 1) * bs] == b[: (i + 1) * bs])
    assert keys(a) == keys(list(a))


# ---- stateful property test -----------------------------------------------------------------


class _Seq:
    def __init__(self, tokens: list[int]) -> None:
        self.tokens = tokens
        self.blocks = SequenceBlocks()
        self.num_computed = 0


class KVCacheMachine(RuleBasedStateMachine):
    """Random sequences of match / allocate+compute / publish / generate / free."""

    @initialize(num_blocks=st.integers(2, 12), block_size=st.sampled_from([1, 2, 3, 4]))
    def setup(self, num_blocks: int, block_size: int) -> None:
        self.kv = KVCacheManager(num_blocks, block_size)
        self.bs = block_size
        self.seqs: list[_Seq] = []
        # What the K/V arrays would hold: block -> {offset: (position, token)}.
        self.content: dict[int, dict[int, tuple[int, int]]] = {}
        self.key_prefix: dict[bytes, tuple[int, ...]] = {}

    @precondition(lambda self: bool(self.seqs))
    @rule(data=st.data(), extra=st.lists(st.integers(0, 2), max_size=6))
    def fork(self, data: st.DataObject, extra: list[int]) -> None:
        """A new request resending part of another one's tokens (a chat history)."""
        base = data.draw(st.sampled_from(self.seqs)).tokens
        cut = data.draw(st.integers(0, len(base)))
        if base[:cut] + extra:
            self.new_sequence(base[:cut] + extra)

    @rule(tokens=st.lists(st.integers(0, 2), min_size=1, max_size=24))
    def new_sequence(self, tokens: list[int]) -> None:
        seq = _Seq(tokens)
        cached = self.kv.match_prefix(seq.blocks, tokens)
        assert cached % self.bs == 0 and cached <= len(tokens) - 1
        assert cached == len(seq.blocks.block_table) * self.bs
        for i, block in enumerate(seq.blocks.block_table):
            want = {o: (i * self.bs + o, tokens[i * self.bs + o]) for o in range(self.bs)}
            assert self.content[block] == want, "a matched block holds other tokens"
        seq.num_computed = cached
        self.seqs.append(seq)

    @precondition(lambda self: any(s.num_computed < len(s.tokens) for s in self.seqs))
    @rule(data=st.data())
    def compute(self, data: st.DataObject) -> None:
        pending = [s for s in self.seqs if s.num_computed < len(s.tokens)]
        seq = data.draw(st.sampled_from(pending))
        n = data.draw(st.integers(1, len(seq.tokens) - seq.num_computed))
        end = seq.num_computed + n
        free_before = self.kv.pool.num_free
        table_before = list(seq.blocks.block_table)
        need = self.kv.blocks_needed(seq.blocks, end)
        if need > free_before:
            with pytest.raises(OutOfBlocksError):
                self.kv.allocate(seq.blocks, end)
            assert seq.blocks.block_table == table_before
            assert self.kv.pool.num_free == free_before
            return
        self.kv.allocate(seq.blocks, end)
        assert len(seq.blocks.block_table) == len(table_before) + need
        for pos in range(seq.num_computed, end):
            block = seq.blocks.block_table[pos // self.bs]
            # Writing into a shared or published block would corrupt another sequence's cache.
            assert self.kv.pool.ref_count[block] == 1
            assert self.kv.pool.block_key[block] is None
            if pos % self.bs == 0:
                self.content[block] = {}
            self.content[block][pos % self.bs] = (pos, seq.tokens[pos])
        seq.num_computed = end
        self.kv.publish_full_blocks(seq.blocks, seq.tokens, end)
        for i, key in enumerate(seq.blocks.keys):
            self.key_prefix.setdefault(key, tuple(seq.tokens[: (i + 1) * self.bs]))
            assert self.key_prefix[key] == tuple(seq.tokens[: (i + 1) * self.bs])

    @precondition(lambda self: any(s.num_computed == len(s.tokens) for s in self.seqs))
    @rule(data=st.data(), token=st.integers(0, 2))
    def generate(self, data: st.DataObject, token: int) -> None:
        done = [s for s in self.seqs if s.num_computed == len(s.tokens)]
        data.draw(st.sampled_from(done)).tokens.append(token)

    @precondition(lambda self: bool(self.seqs))
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        seq = data.draw(st.sampled_from(self.seqs))
        self.seqs.remove(seq)
        self.kv.free(seq.blocks)
        assert seq.blocks.block_table == []

    @invariant()
    def ref_counts_match_tables(self) -> None:
        pool = self.kv.pool
        held = Counter(b for s in self.seqs for b in s.blocks.block_table)
        for block in range(pool.num_blocks):
            assert pool.ref_count[block] >= 0
            assert pool.ref_count[block] == held[block]
            assert (block in pool.free_queue) == (held[block] == 0)
        assert pool.num_free + pool.num_used == pool.num_blocks
        assert pool.num_used == len(held)

    @invariant()
    def no_block_twice_in_one_table(self) -> None:
        for s in self.seqs:
            assert len(set(s.blocks.block_table)) == len(s.blocks.block_table)

    @invariant()
    def shared_blocks_are_published(self) -> None:
        pool = self.kv.pool
        for block, count in enumerate(pool.ref_count):
            if count > 1:
                assert pool.block_key[block] is not None

    @invariant()
    def cached_keys_point_at_matching_contents(self) -> None:
        pool = self.kv.pool
        for key, block in pool.cached.items():
            assert pool.block_key[block] == key
            prefix = self.key_prefix[key]
            start = len(prefix) - self.bs
            want = {o: (start + o, prefix[start + o]) for o in range(self.bs)}
            assert self.content[block] == want
        assert sum(k is not None for k in pool.block_key) == len(pool.cached)


KVCacheMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_kv_cache_machine = KVCacheMachine.TestCase
