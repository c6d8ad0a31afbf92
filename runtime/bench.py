"""Speed measurements in the manner of llama-bench, for us and, when installed, for llama.cpp.

Prefill: one forward pass over n prompt tokens from an empty cache. Decode: n tokens, one per
forward pass, after a 128-token prompt. Token ids are drawn at random from the vocabulary, as
llama-bench does, so the figures do not depend on a text.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from llmapp.runtime.batch import build_batch
from llmapp.runtime.kv_cache import KVCacheManager, SequenceBlocks
from llmapp.runtime.model_runner import ModelRunner

DECODE_PROMPT = 128


@dataclass
class BenchResult:
    prefill_tps: dict[str, float] = field(default_factory=dict)
    decode_tps: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"prefill_tps": self.prefill_tps, "decode_tps": self.decode_tps}


def random_tokens(n: int, n_vocab: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(0, n_vocab, n)]


def median_rate(run: Callable[[], tuple[int, float]], repeats: int) -> float:
    """Median tokens/s over repeats of run() -> (tokens, seconds)."""
    rates = []
    for _ in range(repeats):
        n, seconds = run()
        rates.append(n / seconds)
    return statistics.median(rates)


class OurBench:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.n_vocab = runner.config.n_vocab

    def _fresh(self) -> tuple[KVCacheManager, SequenceBlocks]:
        r = self.runner
        return KVCacheManager(
            r.num_blocks, r.block_size, enable_prefix_cache=False
        ), SequenceBlocks()

    def prefill(self, n: int, n_batch: int = 512) -> tuple[int, float]:
        ids = random_tokens(n, self.n_vocab)
        kv, seq = self._fresh()
        kv.allocate(seq, n)
        start = time.perf_counter()
        for done in range(0, n, n_batch):
            end = min(done + n_batch, n)
            want = 1 if end == n else 0
            self.runner.forward(
                build_batch([(ids[:end], done, seq.block_table, want)], self.runner.block_size)
            )
        return n, time.perf_counter() - start

    def decode(self, n: int) -> tuple[int, float]:
        ids = random_tokens(DECODE_PROMPT, self.n_vocab)
        kv, seq = self._fresh()
        kv.allocate(seq, DECODE_PROMPT + n)
        bs = self.runner.block_size
        logits = self.runner.forward(build_batch([(ids, 0, seq.block_table, 1)], bs))
        start = time.perf_counter()
        for _ in range(n):
            ids.append(int(np.argmax(logits[0])))
            logits = self.runner.forward(build_batch([(ids, len(ids) - 1, seq.block_table, 1)], bs))
        return n, time.perf_counter() - start


class PeerBench:
    """llama.cpp through llama-cpp-python, driven the same way."""

    def __init__(self, path: Path, n_threads: int, n_ctx: int) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            n_batch=512,
            verbose=False,
        )
        self.n_vocab = self.llm.n_vocab()

    def prefill(self, n: int) -> tuple[int, float]:
        ids = random_tokens(n, self.n_vocab)
        self.llm.reset()  # eval() drops cached positions from n_tokens on
        start = time.perf_counter()
        self.llm.eval(ids)
        return n, time.perf_counter() - start

    def decode(self, n: int) -> tuple[int, float]:
        ids = random_tokens(DECODE_PROMPT, self.n_vocab)
        self.llm.reset()  # eval() drops cached positions from n_tokens on
        self.llm.eval(ids)
        start = time.perf_counter()
        for _ in range(n):
            self.llm.eval([int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))])
        return n, time.perf_counter() - start


def run_bench(
    bench: OurBench | PeerBench, prompts: list[int], n_gen: int, repeats: int
) -> BenchResult:
    bench.prefill(min(prompts))  # warm-up: compile, page in the weights
    result = BenchResult()
    for p in prompts:
        result.prefill_tps[str(p)] = median_rate(partial(bench.prefill, p), repeats)
    if n_gen > 0:
        result.decode_tps = median_rate(partial(bench.decode, n_gen), repeats)
    return result
