"""Paged KV cache bookkeeping: block ids, reference counts and prefix hashes.

The pool never touches tensors; the model runner owns the K/V arrays and reads them through
the block tables built here. A full block is keyed by its token ids chained to the key of the
block before it, so a new request can reuse any cached prefix. Blocks whose reference count
drops to zero stay cached (and findable by key) until they are handed out again, oldest first.

Sliding-window layers (Gemma 3): every layer keeps every block of a sequence; no block is
dropped when it leaves a sliding layer's window. So a cached prefix is reused whole, in every
layer, global or sliding, and nothing of it is recomputed: a sliding layer simply masks keys
older than its window at attention time. This is exact because a block's K/V depend only on the
tokens before it (keys are stored after RoPE at their absolute positions, and a prefix always
starts at position 0). The price is memory: sliding layers hold blocks they no longer read.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

from llmapp.runtime.errors import LlmappError

CACHE_TYPES = ("f16", "f32", "q8_0")
"""How K/V values are stored (`--cache-type`): float16 (llama.cpp's default too), float32, or
ggml's Q8_0 layout (blocks of 32 int8 with one float16 scale)."""
DEFAULT_CACHE_TYPE = "f16"
Q8_BLOCK = 32


def kv_row_bytes(head_dim: int, cache_type: str) -> int:
    """Bytes of one stored head row (head_dim values of K, or of V) in a cache type."""
    if cache_type == "f32":
        return 4 * head_dim
    if cache_type == "f16":
        return 2 * head_dim
    if cache_type == "q8_0":
        return head_dim + 2 * -(-head_dim // Q8_BLOCK)
    raise ValueError(f"unknown KV cache type {cache_type!r} ({', '.join(CACHE_TYPES)})")


def kv_bytes_per_token(n_layer: int, n_head_kv: int, head_dim: int, cache_type: str) -> int:
    """KV cache bytes one token takes across all layers (K and V)."""
    return n_layer * 2 * n_head_kv * kv_row_bytes(head_dim, cache_type)


class OutOfBlocksError(LlmappError):
    """The pool has no free block left; the scheduler preempts instead of failing."""


BlockKey = bytes
"""A 128-bit BLAKE2b digest of every token id from position 0 to the end of the block.

A cryptographic hash, not Python's hash(): a crafted prompt must not be able to collide with
another session's prefix and read its cached K/V.
"""


def chain_key(prev_key: BlockKey | None, tokens: Sequence[int]) -> BlockKey:
    """The key of a block: its tokens chained to the key of the block before it."""
    # A first block hashes 8 * block_size bytes, a later one 16 more: they cannot coincide.
    digest = hashlib.blake2b(prev_key or b"", digest_size=16)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


@dataclass
class BlockPool:
    num_blocks: int
    block_size: int
    ref_count: list[int] = field(init=False)
    block_key: list[BlockKey | None] = field(init=False)
    # Blocks with ref_count 0, least recently freed first; cached ones may still be reused.
    free_queue: OrderedDict[int, None] = field(init=False)
    cached: dict[BlockKey, int] = field(init=False)

    def __post_init__(self) -> None:
        if self.num_blocks <= 0 or self.block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.ref_count = [0] * self.num_blocks
        self.block_key = [None] * self.num_blocks
        self.free_queue = OrderedDict((i, None) for i in range(self.num_blocks))
        self.cached = {}

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_queue)

    def allocate(self) -> int:
        """A fresh block (evicting the least recently freed cached block if need be)."""
        if not self.free_queue:
            raise OutOfBlocksError("KV cache is full")
        block_id, _ = self.free_queue.popitem(last=False)
        key = self.block_key[block_id]
        if key is not None:
            del self.cached[key]
            self.block_key[block_id] = None
        self.ref_count[block_id] = 1
        return block_id

    def lookup(self, key: BlockKey) -> int | None:
        return self.cached.get(key)

    def acquire(self, block_id: int) -> None:
        """Take another reference on a (possibly free but cached) block."""
        if self.ref_count[block_id] == 0:
            del self.free_queue[block_id]
        self.ref_count[block_id] += 1

    def release(self, block_id: int) -> None:
        count = self.ref_count[block_id]
        if count <= 0:
            raise RuntimeError(f"block {block_id} released more often than acquired")
        self.ref_count[block_id] = count - 1
        if count == 1:
            self.free_queue[block_id] = None

    def publish(self, block_id: int, key: BlockKey) -> None:
        """Record that block_id now holds the full block `key` (first writer wins)."""
        if key in self.cached or self.block_key[block_id] is not None:
            return
        self.block_key[block_id] = key
        self.cached[key] = block_id


@dataclass
class SequenceBlocks:
    """The blocks one sequence owns, and the keys of its full blocks."""

    block_table: list[int] = field(default_factory=list)
    keys: list[BlockKey] = field(default_factory=list)


class KVCacheManager:
    """Hands out blocks to sequences, reuses cached prefixes, and publishes full blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True) -> None:
        self.pool = BlockPool(num_blocks, block_size)
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        # Counted once per request, by record_query, not per match_prefix call: a request that
        # waits for room is matched again every step.
        self.prefix_queries = 0
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0

    def blocks_needed(self, seq: SequenceBlocks, num_tokens: int) -> int:
        """New blocks a sequence needs to hold num_tokens tokens in total."""
        have = len(seq.block_table)
        need = -(-num_tokens // self.block_size)
        return max(0, need - have)

    def match_prefix(self, seq: SequenceBlocks, token_ids: Sequence[int]) -> int:
        """Attach the longest cached prefix of token_ids to an empty sequence.

        Returns the number of tokens whose K/V is already cached. At least one prompt token is
        always left to compute, since its logits are needed.
        """
        assert not seq.block_table
        if not self.enable_prefix_cache:
            return 0
        bs = self.block_size
        max_blocks = (len(token_ids) - 1) // bs
        key: BlockKey | None = None
        for i in range(max_blocks):
            key = chain_key(key, token_ids[i * bs : (i + 1) * bs])
            block_id = self.pool.lookup(key)
            if block_id is None:
                break
            self.pool.acquire(block_id)
            seq.block_table.append(block_id)
            seq.keys.append(key)
        return len(seq.block_table) * bs

    def record_query(self, num_tokens: int, num_hit: int) -> None:
        """Count one request's prefix lookup (prompt tokens asked, tokens found cached)."""
        self.prefix_queries += 1
        self.prefix_query_tokens += num_tokens
        self.prefix_hit_tokens += num_hit

    def prefix_stats(self) -> dict[str, int]:
        return {
            "queries": self.prefix_queries,
            "query_tokens": self.prefix_query_tokens,
            "hit_tokens": self.prefix_hit_tokens,
            "cached_blocks": len(self.pool.cached),
        }

    def allocate(self, seq: SequenceBlocks, num_tokens: int) -> None:
        """Grow the sequence's table to hold num_tokens; all or nothing."""
        need = self.blocks_needed(seq, num_tokens)
        if need > self.pool.num_free:
            raise OutOfBlocksError(f"need {need} blocks, {self.pool.num_free} free")
        for _ in range(need):
            seq.block_table.append(self.pool.allocate())

    def publish_full_blocks(
        self, seq: SequenceBlocks, token_ids: Sequence[int], num_computed: int
    ) -> None:
        """Key every block whose tokens are all computed, so later requests can reuse it."""
        if not self.enable_prefix_cache:
            return
        bs = self.block_size
        full = min(num_computed // bs, len(seq.block_table))
        while len(seq.keys) < full:
            i = len(seq.keys)
            prev = seq.keys[-1] if seq.keys else None
            key = chain_key(prev, token_ids[i * bs : (i + 1) * bs])
            seq.keys.append(key)
            self.pool.publish(seq.block_table[i], key)

    def free(self, seq: SequenceBlocks) -> None:
        # Release tail first so the LRU order evicts a sequence's last blocks before its prefix.
        for block_id in reversed(seq.block_table):
            self.pool.release(block_id)
        seq.block_table.clear()
        seq.keys.clear()

    @property
    def usage(self) -> float:
        return self.pool.num_used / self.pool.num_blocks
