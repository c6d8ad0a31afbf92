"""Perplexity by the method of llama.cpp's perplexity tool, so the figures compare directly.

The text is tokenized once (BOS only if the model adds one), cut into chunks of ctx tokens;
each chunk starts from an empty cache with its first token replaced by BOS when the model adds
BOS, and only its second half is scored: the logits at position j predict token j + 1 for
j in [ctx/2, ctx - 2].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from llmapp.runtime.core.batch import build_batch
from llmapp.runtime.core.kv_cache import KVCacheManager, SequenceBlocks
from llmapp.runtime.errors import LlmappError
from llmapp.runtime.execution.model_runner import ModelRunner
from llmapp.runtime.text.tokenizer import Tokenizer


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    tokens: int  # tokens of the whole text
    chunks: int
    scored: int  # positions that entered the average


def log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(target) per row, in float64 like the reference tool's accumulation."""
    rows = logits.astype(np.float64)
    peak = rows.max(axis=1, keepdims=True)
    lse = np.log(np.exp(rows - peak).sum(axis=1)) + peak[:, 0]
    return rows[np.arange(len(targets)), targets] - lse


def chunk_logits(runner: ModelRunner, ids: list[int], first: int, n_batch: int) -> np.ndarray:
    """Logits of positions first..len(ids)-1 of one chunk, computed from an empty cache."""
    kv = KVCacheManager(runner.num_blocks, runner.block_size, enable_prefix_cache=False)
    seq = SequenceBlocks()
    kv.allocate(seq, len(ids))
    out = []
    done = 0
    try:
        while done < len(ids):
            end = min(done + n_batch, len(ids))
            want = max(0, end - max(done, first))
            batch = build_batch([(ids[:end], done, seq.block_table, want)], runner.block_size)
            logits = runner.forward(batch)
            if want:
                out.append(logits)
            done = end
    finally:
        kv.free(seq)
    return np.concatenate(out)


def perplexity(
    runner: ModelRunner,
    tokenizer: Tokenizer,
    text: str,
    ctx: int = 256,
    chunks: int = -1,
    n_batch: int = 512,
    progress: Callable[[int, int, float], None] | None = None,
) -> PerplexityResult:
    """progress(chunks done, chunks in all, running perplexity) before the first chunk (the
    value NaN then) and after each chunk."""
    tokens = tokenizer.encode(text, add_bos=None)
    if len(tokens) < 2 * ctx:
        need = 2 * ctx
        raise LlmappError(f"the text has {len(tokens)} tokens; --ctx {ctx} needs at least {need}")
    if ctx > runner.num_blocks * runner.block_size:
        raise LlmappError(
            f"--ctx {ctx} exceeds the KV cache ({runner.num_blocks * runner.block_size})"
        )
    n_chunk = len(tokens) // ctx if chunks < 0 else min(chunks, len(tokens) // ctx)
    first = ctx // 2
    nll = 0.0
    count = 0
    if progress is not None:
        progress(0, n_chunk, float("nan"))
    for i in range(n_chunk):
        ids = tokens[i * ctx : (i + 1) * ctx]
        if tokenizer.add_bos:
            ids[0] = tokenizer.bos_id
        logits = chunk_logits(runner, ids, first, n_batch)  # positions first..ctx-1
        targets = np.asarray(tokens[i * ctx + first + 1 : (i + 1) * ctx], dtype=np.int64)
        nll -= float(log_softmax_at(logits[: len(targets)], targets).sum())
        count += len(targets)
        if progress is not None:
            progress(i + 1, n_chunk, float(np.exp(nll / count)))
    return PerplexityResult(float(np.exp(nll / count)), len(tokens), n_chunk, count)
