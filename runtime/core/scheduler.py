"""Which sequences run this step, and how many of their tokens.

One rule covers prefill, chunked prefill, prefix-cache hits and decode: a sequence has
`num_computed` tokens whose K/V is in the cache; each step advances it toward len(token_ids).
Running sequences go first (oldest first), then waiting ones are admitted while the token
budget, the running cap and the free blocks allow. When blocks run out, the newest running
sequence is preempted: its blocks are freed and it is recomputed later.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from llmapp.runtime.core.kv_cache import KVCacheManager, SequenceBlocks


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_counter = itertools.count()


@dataclass(eq=False)
class Sequence:
    token_ids: list[int]
    num_prompt_tokens: int
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    num_computed: int = 0
    num_cached_prompt: int = 0
    status: SeqStatus = SeqStatus.WAITING
    blocks: SequenceBlocks = field(default_factory=SequenceBlocks)
    num_preemptions: int = 0
    payload: Any = None  # the engine's per-request state (sampler, detokenizer, output)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_pending(self) -> int:
        return len(self.token_ids) - self.num_computed


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 16
    max_batched_tokens: int = 512  # per step: a long prompt is chunked to share steps
    max_model_len: int = 4096

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_batched_tokens must be positive")


@dataclass
class ScheduledStep:
    seqs: list[Sequence]
    num_tokens: list[int]  # tokens of each sequence computed this step
    preempted: list[Sequence]

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep([], [], [])
        budget = self.config.max_batched_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted by an older sequence earlier in this loop
            n = min(seq.num_pending, budget)
            if not self._reserve(seq, n, step):
                continue
            step.seqs.append(seq)
            step.num_tokens.append(n)
            budget -= n
        if not step.preempted:
            self._admit(step, budget)
        return step

    def _reserve(self, seq: Sequence, n: int, step: ScheduledStep) -> bool:
        """Blocks for n more tokens of seq, preempting the newest others if need be."""
        while self.kv.blocks_needed(seq.blocks, seq.num_computed + n) > self.kv.pool.num_free:
            victim = self.running[-1]
            self._preempt(victim, step)
            if victim is seq:
                return False
        self.kv.allocate(seq.blocks, seq.num_computed + n)
        return True

    def _preempt(self, seq: Sequence, step: ScheduledStep) -> None:
        self.running.remove(seq)
        self.kv.free(seq.blocks)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1  # the engine's metrics count them from step.preempted
        self.waiting.appendleft(seq)
        step.preempted.append(seq)
        if seq in step.seqs:
            i = step.seqs.index(seq)
            del step.seqs[i], step.num_tokens[i]

    def _admit(self, step: ScheduledStep, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if not seq.blocks.block_table:
                cached = self.kv.match_prefix(seq.blocks, seq.token_ids)
                seq.num_computed = cached
                if seq.num_preemptions == 0:
                    seq.num_cached_prompt = cached
            n = min(seq.num_pending, budget)
            if self.kv.blocks_needed(seq.blocks, seq.num_computed + n) > self.kv.pool.num_free:
                if not self.running:
                    # Nothing to wait for: shrink the chunk to what fits now.
                    n = self._fit_chunk(seq, n)
                if n == 0 or self.running and not self._fits(seq, n):
                    self.kv.free(seq.blocks)  # give back prefix blocks; retry next step
                    seq.num_computed = 0
                    break
            self.kv.allocate(seq.blocks, seq.num_computed + n)
            self.waiting.popleft()
            if seq.num_preemptions == 0:  # a recompute after preemption is not a new query
                self.kv.record_query(seq.num_prompt_tokens, seq.num_cached_prompt)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            step.seqs.append(seq)
            step.num_tokens.append(n)
            budget -= n

    def _fits(self, seq: Sequence, n: int) -> bool:
        return self.kv.blocks_needed(seq.blocks, seq.num_computed + n) <= self.kv.pool.num_free

    def _fit_chunk(self, seq: Sequence, n: int) -> int:
        room = (len(seq.blocks.block_table) + self.kv.pool.num_free) * self.kv.block_size
        return max(0, min(n, room - seq.num_computed))

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished or aborted) and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv.free(seq.blocks)
        seq.status = SeqStatus.FINISHED
