"""Speed measurements in the manner of llama-bench, for us and, when installed, for llama.cpp.

Prefill: one forward pass over n prompt tokens from an empty cache. Decode: n tokens, one per
forward pass, after a 128-token prompt. Token ids are drawn at random from the vocabulary, as
llama-bench does, so the figures do not depend on a text.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from llmapp.runtime.core.batch import build_batch
from llmapp.runtime.core.engine import Engine, RequestStream
from llmapp.runtime.core.kv_cache import KVCacheManager, SequenceBlocks
from llmapp.runtime.core.sampling import SamplingParams
from llmapp.runtime.execution.model_runner import ModelRunner

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


# ---- bytes a decode step reads, and peak memory of a whole run ------------------------------

RUN_PROMPT = "hi"
RUN_TOKENS = 32
RUN_CTX = 2048
MB = 1e6
# The peer's side of peak_run_rss: llama.cpp through llama-cpp-python, the same file, context,
# threads, prompt and number of tokens (its defaults: the file memory-mapped, an f16 KV cache).
PEER_RUN_SCRIPT = """
import sys
import llama_cpp
path, ctx, threads, prompt, n = sys.argv[1:6]
llm = llama_cpp.Llama(model_path=path, n_ctx=int(ctx), n_threads=int(threads),
                      n_threads_batch=int(threads), verbose=False)
llm.create_completion(prompt, max_tokens=int(n), temperature=0.0)
"""


def _tensor_bytes(values: Any) -> int:
    # Packed matrices, numpy vectors and torch tensors all have nbytes; bookkeeping does not.
    return sum(int(getattr(v, "nbytes", 0)) for v in values)


def decode_read_bytes(runner: ModelRunner, n_ctx: int) -> dict[str, int]:
    """Bytes one decode step reads at a context of n_ctx tokens.

    weights: every packed matrix and vector of the blocks, the output head and its norm, and
    the one embedding row looked up; kv: the K and V of every position each layer attends to
    (a sliding-window layer at most its window), in the cache's own type.
    """
    w = runner.weights
    weights = 0
    for layer in w.layers:
        tensors = layer.tensors() if hasattr(layer, "tensors") else layer.values()
        weights += _tensor_bytes(tensors)
    weights += _tensor_bytes([w.output, w.output_norm]) + int(w.token_embd.data.shape[1])
    cfg = runner.config
    per_layer_token = runner.kv_bytes_per_token // cfg.n_layer
    window = cfg.sliding_window or n_ctx
    kv = sum(
        per_layer_token * (min(n_ctx, window) if sliding else n_ctx)
        for sliding in cfg.layer_sliding
    )
    return {"weights": weights, "kv": kv, "total": weights + kv}


# peak_rss's launcher: a child forked straight from a large process (a benchmark holding a
# model and a 1 GiB bandwidth buffer) starts out counting that process's pages, and Linux keeps
# that high-water mark across exec; forked from this small launcher it starts near 10 MB.
PEAK_LAUNCHER = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def peak_rss(argv: list[str]) -> int:
    """Peak resident bytes of a child process run to its end (its ru_maxrss, what
    `/usr/bin/time -f %M` reports), load and exit included."""
    launcher = [sys.executable, "-c", PEAK_LAUNCHER, *argv]
    done = subprocess.run(launcher, capture_output=True, text=True, check=True)
    code, kib = done.stdout.split()
    if int(code) != 0:
        raise RuntimeError(f"{argv[:4]} exited with {code}: {done.stderr[-2000:]}")
    return int(kib) * 1024  # KiB on Linux


def our_run_argv(model: str, threads: int, ctx: int = RUN_CTX, n: int = RUN_TOKENS) -> list[str]:
    """`llmapp run MODEL hi --max-tokens 32 --ctx-size 2048` as a fresh process."""
    argv = [sys.executable, "-m", "llmapp.app.cli", "run", model, RUN_PROMPT]
    return argv + ["--max-tokens", str(n), "--ctx-size", str(ctx), "--threads", str(threads)]


def peer_run_argv(path: Path, threads: int, ctx: int = RUN_CTX, n: int = RUN_TOKENS) -> list[str]:
    """The same run through llama-cpp-python."""
    args = [str(path), str(ctx), str(threads), RUN_PROMPT, str(n)]
    return [sys.executable, "-c", PEER_RUN_SCRIPT, *args]


def memory_budget(file_bytes: int, kv_bytes: int) -> float:
    """What a run may hold resident: 1.1 x the file + the KV cache + 200 MB (the
    interpreter, numpy, numba and its compiled kernels, the tokenizer)."""
    return 1.1 * file_bytes + kv_bytes + 200 * MB


# ---- many sessions at once, through the engine ------------------------------------------------

SHARED_PREFIX_SUFFIX = 32  # new tokens after the cached prefix: a chat turn's fresh message


@dataclass
class ConcurrencyResult:
    """Figures of N sessions submitted at once, in the manner of llama-batched-bench.

    aggregate_decode_tps is its S_TG: tokens generated by all sessions during the decode phase
    (from the moment the last session got its first token to the moment the last one finished)
    divided by that phase's wall time. per_session_decode_tps is the median over sessions of
    each one's own rate after its first token; ttft_ms_p50 the median time to first token.
    """

    concurrency: int
    aggregate_decode_tps: float
    per_session_decode_tps: float
    ttft_ms_p50: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "aggregate_decode_tps": round(self.aggregate_decode_tps, 2),
            "per_session_decode_tps": round(self.per_session_decode_tps, 2),
            "ttft_ms_p50": round(self.ttft_ms_p50, 2),
        }


def summarize_sessions(start: float, token_times: list[list[float]]) -> ConcurrencyResult:
    """Figures from each session's token arrival times (seconds; all submitted at `start`)."""
    sessions = [t for t in token_times if t]
    if not sessions:
        raise ValueError("no session produced a token")
    phase_start = max(t[0] for t in sessions)  # all prompts are in
    phase_end = max(t[-1] for t in sessions)
    in_phase = sum(1 for t in sessions for x in t if x > phase_start)
    span = phase_end - phase_start
    own = [(len(t) - 1) / (t[-1] - t[0]) for t in sessions if len(t) > 1 and t[-1] > t[0]]
    return ConcurrencyResult(
        concurrency=len(token_times),
        aggregate_decode_tps=in_phase / span if span > 0 else 0.0,
        per_session_decode_tps=statistics.median(own) if own else 0.0,
        ttft_ms_p50=statistics.median((t[0] - start) * 1000 for t in sessions),
    )


def session_prompts(n: int, prompt_len: int, n_vocab: int, seed: int) -> list[list[int]]:
    """Distinct random prompts, so no session reuses another's prefix."""
    return [random_tokens(prompt_len, n_vocab, seed=seed + i) for i in range(n)]


class EngineBench:
    """Sessions submitted at once through the Engine, as front ends do."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.n_vocab = engine.config.n_vocab
        self._seed = 1000  # every measurement draws fresh prompts: a cold cache stays cold

    def _prompts(self, n: int, prompt_len: int) -> list[list[int]]:
        self._seed += n
        return session_prompts(n, prompt_len, self.n_vocab, self._seed)

    def concurrent(
        self, sessions: int, n_gen: int, prompt_len: int = DECODE_PROMPT
    ) -> ConcurrencyResult:
        params = SamplingParams(temperature=0, max_tokens=n_gen, ignore_eos=True)
        prompts = self._prompts(sessions, prompt_len)
        start, times = asyncio.run(_stream_all(self.engine, prompts, params))
        return summarize_sessions(start, times)

    def ttft_ms(self, prompt: list[int]) -> tuple[float, int]:
        """Time to first token (engine-side) and the prompt tokens found cached."""
        _, _, last = self.engine.generate(prompt, SamplingParams(temperature=0, max_tokens=1))
        assert last.timings is not None and last.usage is not None
        return last.timings.ttft_ms, last.usage.cached_tokens

    def shared_prefix(
        self, prefix_len: int, repeats: int = 3, suffix_len: int = SHARED_PREFIX_SUFFIX
    ) -> dict[str, Any]:
        """TTFT of prefix + suffix cold, then of prefix + another suffix with the prefix cached."""
        cold, cached, hits = [], [], []
        for _ in range(repeats):
            prefix, first, second = self._prompts(3, prefix_len)
            cold.append(self.ttft_ms(prefix + first[:suffix_len])[0])
            ms, hit = self.ttft_ms(prefix + second[:suffix_len])
            cached.append(ms)
            hits.append(hit)
        return {
            "shared_prefix": prefix_len,
            "shared_prefix_suffix_tokens": suffix_len,
            "shared_prefix_cached_tokens": min(hits),
            "ttft_ms_cold": round(statistics.median(cold), 2),
            "ttft_ms_cached": round(statistics.median(cached), 2),
        }


async def _stream_all(
    engine: Engine, prompts: list[list[int]], params: SamplingParams
) -> tuple[float, list[list[float]]]:
    """Submit every prompt at once; each token's arrival time, per session."""

    async def read(stream: RequestStream) -> list[float]:
        times: list[float] = []
        async for delta in stream:
            if delta.error:
                raise RuntimeError(delta.error)
            times.extend([time.perf_counter()] * len(delta.token_ids))
        return times

    start = time.perf_counter()
    streams = [await engine.stream(p, params) for p in prompts]
    return start, list(await asyncio.gather(*(read(s) for s in streams)))


def median_run(runs: list[ConcurrencyResult]) -> ConcurrencyResult:
    """The run whose aggregate decode rate is the median (its other figures with it)."""
    ordered = sorted(runs, key=lambda r: r.aggregate_decode_tps)
    return ordered[len(ordered) // 2]


class PeerBatchedBench:
    """llama.cpp's batched decoding through llama-cpp-python's low-level API.

    The high-level Llama class runs one sequence; this builds a context with one KV sequence
    per session and drives llama_decode the way llama-batched-bench does: all prompts in
    batches of up to 512 tokens, then one batch of one token per session per step (greedy).
    """

    def __init__(self, path: Path, n_threads: int, max_sessions: int, n_ctx: int) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=256, n_threads=n_threads, verbose=False
        )
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = 512
        params.n_seq_max = max_sessions
        params.n_threads = params.n_threads_batch = n_threads
        params.kv_unified = True  # one cache shared by all sequences, as our pool is
        self.ctx = llama_cpp.llama_init_from_model(self.llm.model, params)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a batched context")
        self.batch = llama_cpp.llama_batch_init(512, 0, max_sessions)
        self.n_vocab = self.llm.n_vocab()

    def close(self) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.llm.close()

    def _decode(self, rows: list[tuple[int, int, int, bool]]) -> dict[int, int]:
        """rows of (token, position, sequence, wants logits) -> greedy next token per sequence."""
        lib, batch, out = self.lib, self.batch, {}
        for s in range(0, len(rows), 512):
            chunk = rows[s : s + 512]
            batch.n_tokens = len(chunk)
            for i, (token, pos, seq, want) in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.logits[i] = token, pos, int(want)
                batch.n_seq_id[i], batch.seq_id[i][0] = 1, seq
            if lib.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            for i, (_, _, seq, want) in enumerate(chunk):
                if want:
                    logits = np.ctypeslib.as_array(
                        lib.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)
                    )
                    out[seq] = int(logits.argmax())
        return out

    def concurrent(
        self, sessions: int, n_gen: int, prompt_len: int = DECODE_PROMPT
    ) -> ConcurrencyResult:
        """Greedy tokens after the first are timed, like S_TG; ttft_ms_p50 is the prompt phase."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        prompts = session_prompts(sessions, prompt_len, self.n_vocab, seed=7)
        rows = [
            (t, p, s, p == prompt_len - 1)
            for s in range(sessions)
            for p, t in enumerate(prompts[s])
        ]
        start = time.perf_counter()
        nxt = self._decode(rows)
        prompt_done = time.perf_counter()
        for step in range(n_gen - 1):
            nxt = self._decode([(nxt[s], prompt_len + step, s, True) for s in range(sessions)])
        span = time.perf_counter() - prompt_done
        agg = sessions * (n_gen - 1) / span if span > 0 else 0.0
        return ConcurrencyResult(sessions, agg, agg / sessions, (prompt_done - start) * 1000)
