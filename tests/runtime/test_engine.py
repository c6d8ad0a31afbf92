"""The engine on the real models: batching, chunked prefill, prefix hits and preemption must not
change a greedy reply; aborts, cancellations and storms of requests must not leak KV blocks.

Greedy replies are compared with the same request run alone, token for token, up to the first
position where the lone run's top-1/top-2 logit margin is below 0.5: one-row and many-row
kernels sum in different orders, so a near tie may legitimately flip there.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from llmapp.runtime import (
    Delta,
    Engine,
    EngineOptions,
    RequestError,
    RequestStream,
    RunnerOptions,
    SamplingParams,
)
from llmapp.runtime.core.batch import ForwardBatch
from llmapp.runtime.errors import GGUFError, ModelNotFoundError

MARGIN = 0.5
N_NEW = 12
THREADS = 1  # the test machine's two cores are shared; one compute thread never stalls

# Lists and copies: small models continue them with wide margins, so most positions count.
PROMPTS = [
    "1, 2, 3, 4, 5, 6,",
    "Monday, Tuesday, Wednesday, Thursday,",
    "January, February, March, April, May, June, July, August,",
    "The cat sat on the mat. The cat sat on the mat. The cat sat on the mat. The cat",
    "a b c d e f g h i j k l m n o p q r s t",
    "red, green, blue, red, green, blue, red, green, blue, red, green, blue, red,",
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Germany is",
    ", ".join(str(i) for i in range(1, 41)) + ",",  # ~150 tokens
]
SHARED = (
    "Continue each list.\nNumbers: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12.\n"
    "Colors: red, green, blue, red, green, blue.\nLetters: a b c d e f g h.\n"
)
PREFIX_PROMPTS = [
    SHARED + "Numbers: 1, 2, 3, 4,",
    SHARED + "Colors: red, green, blue, red,",
    SHARED + "Letters: a b c d",
    SHARED + "Months: January, February, March,",
]

Reply = tuple[list[int], list[float]]  # generated ids, lone run's top-1 minus top-2 logit


def greedy(max_tokens: int = N_NEW) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=True, top_logprobs=2)


def options(
    ctx: int = 1024, seqs: int = 8, batched: int = 512, prefix: bool = True
) -> EngineOptions:
    return EngineOptions(
        runner=RunnerOptions(ctx_size=ctx, n_threads=THREADS),
        max_num_seqs=seqs,
        max_batched_tokens=batched,
        enable_prefix_cache=prefix,
    )


def collect(stream: RequestStream) -> tuple[Reply, Delta]:
    ids: list[int] = []
    margins: list[float] = []
    last = None
    for delta in stream:
        ids.extend(delta.token_ids)
        for lp in delta.logprobs:
            margins.append(lp.top[0][1] - lp.top[1][1])
        last = delta
    assert last is not None and last.error is None
    return (ids, margins), last


MIN_COMPARED = 2  # a comparison that stops at a near tie must still have checked this many


def assert_matches_lone(lone: Reply, got: list[int], label: str) -> None:
    want, margins = lone
    for i, (token, margin) in enumerate(zip(want, margins, strict=True)):
        if margin < MARGIN:
            # A near tie: the orders of summation may pick either. Too early a tie would
            # make the comparison vacuous, so it must come after a few positions.
            assert i >= min(MIN_COMPARED, len(want)), f"{label}: only {i} positions compared"
            return
        assert i < len(got) and got[i] == token, f"{label}: differs at {i}: {got} vs {want}"
    assert len(got) == len(want), f"{label}: {got} vs {want}"


def run_together(engine: Engine, prompts: list[str], n: int = N_NEW) -> list[tuple[Reply, Delta]]:
    streams = [engine.submit(p, greedy(n)) for p in prompts]
    return [collect(s) for s in streams]


def assert_idle(engine: Engine, timeout: float = 5.0) -> None:
    """No sequence left and every KV block released (cached ones may stay, unreferenced)."""
    deadline = time.monotonic() + timeout
    while engine.scheduler.has_work() and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.kv.pool.num_used == 0
    assert engine.kv.pool.num_free == engine.kv.pool.num_blocks


@pytest.fixture(scope="module")
def lone(real_model_path: Path) -> dict[str, Reply]:
    """Each prompt run alone, prefix cache off: the yardstick."""
    with Engine(real_model_path, options(prefix=False)) as engine:
        return {p: collect(engine.submit(p, greedy()))[0] for p in PROMPTS + PREFIX_PROMPTS}


MakeEngine = Callable[[EngineOptions], Engine]


@pytest.fixture
def make_engine(real_model_path: Path) -> Iterator[MakeEngine]:
    made: list[Engine] = []

    def make(opts: EngineOptions) -> Engine:
        made.append(Engine(real_model_path, opts))
        return made[-1]

    yield make
    for engine in made:
        engine.shutdown()


# ---- the same reply however it is scheduled -------------------------------------------------


@pytest.mark.real_model
def test_batched_replies_match_lone_runs(make_engine: MakeEngine, lone: dict[str, Reply]) -> None:
    engine = make_engine(options(prefix=False))
    for k in (2, 4, 8):  # each request alongside 1, 3 and 7 others of different lengths
        prompts = PROMPTS[:k]
        for prompt, ((ids, _), last) in zip(prompts, run_together(engine, prompts), strict=True):
            assert_matches_lone(lone[prompt], ids, f"{k} at once: {prompt[:20]!r}")
            assert last.usage is not None and last.usage.cached_tokens == 0
        assert_idle(engine)
    assert engine.metrics_snapshot()["preemptions"] == 0


@pytest.mark.real_model
def test_chunked_prefill_matches_lone_runs(make_engine: MakeEngine, lone: dict[str, Reply]) -> None:
    engine = make_engine(options(batched=8, prefix=False))
    prompts = [PROMPTS[7], PROMPTS[0], PROMPTS[5], PROMPTS[3]]  # long ones go in 8-token chunks
    for prompt, ((ids, _), _) in zip(prompts, run_together(engine, prompts), strict=True):
        assert_matches_lone(lone[prompt], ids, f"chunked: {prompt[:20]!r}")
    snap = engine.metrics_snapshot()
    prompt_tokens = sum(len(engine.encode_prompt(p)) for p in prompts)
    assert snap["steps"] >= prompt_tokens // 8
    assert_idle(engine)


@pytest.mark.real_model
def test_prefix_hits_match_lone_runs(make_engine: MakeEngine, lone: dict[str, Reply]) -> None:
    engine = make_engine(options())
    (ids, _), first = collect(engine.submit(PREFIX_PROMPTS[0], greedy()))
    assert first.usage is not None and first.usage.cached_tokens == 0
    assert_matches_lone(lone[PREFIX_PROMPTS[0]], ids, "cold")
    shared_len = len(engine.encode_prompt(SHARED))
    prompts = PREFIX_PROMPTS[1:] + PREFIX_PROMPTS[:1]  # the cold one resent last
    results = run_together(engine, prompts)
    for prompt, ((ids, _), last) in zip(prompts, results, strict=True):
        assert_matches_lone(lone[prompt], ids, f"prefix hit: {prompt[-30:]!r}")
        assert last.usage is not None
        # At least the shared text's full blocks are reused (its last token may merge with
        # the question's first when tokenized together).
        assert last.usage.cached_tokens >= (shared_len - 1) // 16 * 16 > 0
    resent = results[-1][1].usage
    assert resent is not None  # the very same prompt again: all but its last partial block
    assert resent.cached_tokens == (resent.prompt_tokens - 1) // 16 * 16
    snap = engine.metrics_snapshot()["prefix_cache"]
    assert snap["queries"] == 5 and snap["hit_tokens"] > 0
    assert_idle(engine)


@pytest.mark.real_model
def test_replies_survive_preemption_in_a_tiny_pool(
    make_engine: MakeEngine, lone: dict[str, Reply]
) -> None:
    # 4 blocks of 16 tokens for 5 requests of up to ~30 tokens each: they must take turns.
    engine = make_engine(options(ctx=64, seqs=5))
    prompts = PROMPTS[:5]
    for prompt, ((ids, _), _) in zip(prompts, run_together(engine, prompts), strict=True):
        assert_matches_lone(lone[prompt], ids, f"preempted: {prompt[:20]!r}")
    assert engine.metrics_snapshot()["preemptions"] > 0
    assert_idle(engine)


@pytest.mark.real_model
def test_gemma_prefix_hit_beyond_the_sliding_window(gemma3_path: Path) -> None:
    """Every layer keeps every block, so a cached prefix longer than the 512-token window is
    reused whole; the sliding layers must still see only the last 512 keys."""
    words = "red green blue yellow black white orange purple brown grey pink violet".split()
    rng = random.Random(3)
    # The continuation is a count, so the first tokens are confident and get compared.
    prefix = " ".join(rng.choice(words) for _ in range(600)) + ".\nCount: 1, 2, 3, 4, 5, 6,"
    prompts = [prefix + " 7,", prefix]
    with Engine(gemma3_path, options(ctx=2048, prefix=False)) as cold:
        refs = {p: collect(cold.submit(p, greedy(8)))[0] for p in prompts}
    with Engine(gemma3_path, options(ctx=2048)) as engine:
        assert engine.config.sliding_window == 512
        assert len(engine.encode_prompt(prefix)) > 600
        for prompt in prompts + prompts:
            (ids, _), last = collect(engine.submit(prompt, greedy(8)))
            assert_matches_lone(refs[prompt], ids, f"gemma cached: {prompt[-10:]!r}")
        assert last.usage is not None
        assert last.usage.cached_tokens > engine.config.sliding_window
        assert_idle(engine)


# ---- aborts, cancellation, storms: nothing leaks --------------------------------------------


@pytest.fixture(scope="module")
def smol_engine(smollm2_path: Path) -> Iterator[Engine]:
    with Engine(smollm2_path, options(ctx=512, seqs=4, batched=4)) as engine:
        yield engine


def _hold_before_second_step(engine: Engine) -> tuple[threading.Event, threading.Event]:
    """Pause the compute thread as its second forward pass starts, until `release` is set."""
    entered, release = threading.Event(), threading.Event()
    forward = engine.runner.forward
    calls = 0

    def held(batch: ForwardBatch) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 2:
            engine.runner.forward = forward  # type: ignore[method-assign]
            entered.set()
            release.wait(10)
        return forward(batch)

    engine.runner.forward = held  # type: ignore[method-assign]
    return entered, release


@pytest.mark.real_model
def test_abort_mid_prefill_frees_blocks(smol_engine: Engine) -> None:
    entered, release = _hold_before_second_step(smol_engine)
    stream = smol_engine.submit(PROMPTS[7], greedy())
    try:
        assert entered.wait(10)
        seq = stream.seq
        assert seq is not None and 0 < seq.num_computed < seq.num_prompt_tokens
        assert smol_engine.kv.pool.num_used > 0
        stream.abort()  # lands while the second chunk is computed: still mid-prefill
    finally:
        release.set()
    _, last = collect(stream)
    assert last.finish_reason == "abort"
    assert last.usage is not None and last.usage.completion_tokens == 0
    assert_idle(smol_engine)


@pytest.mark.real_model
def test_abort_mid_decode_and_while_waiting(smol_engine: Engine) -> None:
    endless = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    running = [smol_engine.submit(p, endless) for p in PROMPTS[:4]]  # fills max_num_seqs
    queued = smol_engine.submit(PROMPTS[5], endless)
    it = iter(running[0])
    next(it), next(it)  # two tokens out: decoding
    queued.abort()
    for stream in running:
        stream.abort()
    _, last = collect(queued)
    assert last.finish_reason == "abort" and last.usage is not None
    assert last.usage.completion_tokens == 0
    finals = [collect(s)[1] for s in running[1:]] + [list(it)[-1]]
    assert all(f.finish_reason == "abort" for f in finals)
    assert_idle(smol_engine)


@pytest.mark.real_model
def test_async_streams_and_cancellation(smol_engine: Engine) -> None:
    sync_ids = smol_engine.generate(PROMPTS[0], greedy())[1]

    async def main() -> list[int]:
        stream = await smol_engine.stream(PROMPTS[0], greedy())
        ids = [t async for d in stream for t in d.token_ids]
        seen = asyncio.Event()

        async def consume() -> None:
            endless = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
            async for _ in await smol_engine.stream(PROMPTS[2], endless):
                seen.set()

        task = asyncio.create_task(consume())
        await seen.wait()
        assert smol_engine.kv.pool.num_used > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return ids

    assert asyncio.run(main()) == sync_ids
    assert_idle(smol_engine)  # the cancelled iteration aborted its sequence
    snap = smol_engine.metrics_snapshot()
    assert snap["requests_received"] == snap["requests_finished"]


@pytest.mark.real_model
def test_storm_of_submits_and_aborts_from_threads(smollm2_path: Path) -> None:
    errors: list[BaseException] = []
    finals: list[Delta] = []
    lock = threading.Lock()
    opts = options(ctx=96, seqs=6, batched=32)  # 6 blocks for up to 20 requests: preemptions

    def one(engine: Engine, rng: random.Random) -> tuple[RequestStream, str]:
        ids = [rng.randrange(1, 2000) for _ in range(rng.randrange(1, 40))]
        params = SamplingParams(
            temperature=0.7, seed=rng.randrange(100), max_tokens=rng.randrange(1, 24)
        )
        stream = engine.submit(ids, params)
        how = rng.choice(["read", "read", "abort now", "abort later", "abort reading"])
        if how == "abort now":
            stream.abort()
        return stream, how

    def worker(engine: Engine, seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(2):  # two bursts of five requests each
                burst = [one(engine, rng) for _ in range(5)]
                for stream, how in burst:
                    if how == "abort later":
                        time.sleep(rng.random() * 0.01)
                        stream.abort()
                    for n_read, delta in enumerate(stream, 1):
                        if how == "abort reading" and n_read == 2:
                            stream.abort()
                        if delta.finish_reason is not None:
                            with lock:
                                finals.append(delta)
        except BaseException as exc:  # noqa: BLE001 - surfaced by the main thread
            errors.append(exc)

    with Engine(smollm2_path, opts) as engine:
        threads = [threading.Thread(target=worker, args=(engine, s)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), "a stream never ended"
        assert not errors, errors
        assert len(finals) == 40
        assert {f.finish_reason for f in finals} <= {"abort", "length", "stop"}
        assert_idle(engine)
        snap = engine.metrics_snapshot()
        assert snap["requests_received"] == snap["requests_finished"] == 40


@pytest.mark.real_model
def test_a_failing_step_ends_requests_with_an_error_and_the_engine_goes_on(
    smol_engine: Engine,
) -> None:
    forward = smol_engine.runner.forward

    def broken(batch: ForwardBatch) -> np.ndarray:
        smol_engine.runner.forward = forward  # type: ignore[method-assign]
        raise MemoryError("no room for activations")

    smol_engine.runner.forward = broken  # type: ignore[method-assign]
    with pytest.raises(RequestError, match="no room"):
        smol_engine.generate(PROMPTS[0], greedy())
    assert_idle(smol_engine)
    assert smol_engine.generate(PROMPTS[0], greedy(2))[2].finish_reason == "length"


# ---- requests refused, shutdown, metrics, public names --------------------------------------


@pytest.mark.real_model
def test_requests_that_cannot_fit_are_refused_up_front(smol_engine: Engine) -> None:
    limit = smol_engine.max_model_len
    with pytest.raises(RequestError, match="context"):
        smol_engine.submit([1] * limit, greedy())
    with pytest.raises(RequestError, match="empty"):
        smol_engine.submit([], greedy())
    with pytest.raises(RequestError, match="vocabulary"):
        smol_engine.submit([smol_engine.tokenizer.n_vocab], greedy())
    # The longest prompt that fits runs until the context is full: "length", never truncated.
    _, ids, last = smol_engine.generate([1] * (limit - 3), SamplingParams(temperature=0))
    assert last.finish_reason == "length" and len(ids) <= 3
    assert last.usage is not None and last.usage.prompt_tokens == limit - 3
    assert_idle(smol_engine)


@pytest.mark.real_model
def test_metrics_snapshot(smol_engine: Engine) -> None:
    before = smol_engine.metrics_snapshot()
    smol_engine.generate(PROMPTS[1], greedy(4))
    snap = smol_engine.metrics_snapshot()
    for key in (
        "running",
        "waiting",
        "kv_usage_percent",
        "prefix_cache",
        "tokens_processed",
        "tokens_generated",
        "preemptions",
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
    ):
        assert key in snap
    assert snap["running"] == snap["waiting"] == 0 and snap["kv_usage_percent"] == 0
    ttft = "time_to_first_token_seconds"
    assert snap[ttft]["count"] == before[ttft]["count"] + 1
    assert (
        snap["inter_token_latency_seconds"]["count"]
        >= before["inter_token_latency_seconds"]["count"] + 3
    )
    assert snap["tokens_generated"] == before["tokens_generated"] + 4
    assert snap["prefix_cache"]["queries"] == before["prefix_cache"]["queries"] + 1


@pytest.mark.real_model
def test_shutdown_ends_streams_in_flight(smollm2_path: Path) -> None:
    engine = Engine(smollm2_path, options(ctx=256))
    stream = engine.submit(
        PROMPTS[0], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    )
    next(iter(stream))
    engine.shutdown()
    assert list(stream)[-1].finish_reason == "abort"
    with pytest.raises(RequestError, match="shut down"):
        engine.submit(PROMPTS[0], greedy())


def test_public_names_load_lazily() -> None:
    code = (
        "import sys, llmapp.runtime.files.gguf_file\n"
        "assert 'numpy' not in sys.modules and 'numba' not in sys.modules\n"
        "from llmapp.runtime import Engine, EngineOptions, RunnerOptions, SamplingParams\n"
        "from llmapp.runtime import Delta, Usage, RequestError\n"
        "from llmapp.runtime.files import store\n"
        "import llmapp.runtime as r\n"
        "assert all(getattr(r, n) for n in r.__all__)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- the concurrency bench's arithmetic and a smoke run ------------------------------------


def test_summarize_sessions_counts_the_decode_phase_only() -> None:
    from llmapp.runtime.bench import summarize_sessions

    # Session 0's first token at 1.0 s, session 1's at 2.0 s: the phase runs from 2.0 to 4.0.
    times = [[1.0, 1.5, 2.5, 3.0, 3.5], [2.0, 2.5, 3.0, 3.5, 4.0]]
    result = summarize_sessions(0.0, times)
    assert result.concurrency == 2
    assert result.aggregate_decode_tps == pytest.approx(7 / 2.0)  # 3 + 4 tokens after 2.0
    assert result.per_session_decode_tps == pytest.approx((4 / 2.5 + 4 / 2.0) / 2)
    assert result.ttft_ms_p50 == pytest.approx(1500.0)


@pytest.mark.real_model
def test_engine_bench_smoke(smol_engine: Engine) -> None:
    from llmapp.runtime.bench import EngineBench

    bench = EngineBench(smol_engine)
    result = bench.concurrent(3, 4, prompt_len=16).as_dict()
    assert result["concurrency"] == 3 and result["aggregate_decode_tps"] > 0
    assert result["ttft_ms_p50"] > 0 and result["per_session_decode_tps"] > 0
    prefix = bench.shared_prefix(48, repeats=1, suffix_len=8)
    assert prefix["shared_prefix_cached_tokens"] == 48
    assert prefix["ttft_ms_cold"] > 0 and prefix["ttft_ms_cached"] > 0
    assert_idle(smol_engine)


# ---- what the engine is given: catalog names, unknown names, broken files -------------------


@pytest.mark.real_model
def test_engine_takes_a_catalog_name(smollm2_path: Path) -> None:
    with Engine("smollm2:135m", options(ctx=256)) as engine:
        assert engine.runner.gguf.path == smollm2_path
        _, ids, last = engine.generate(PROMPTS[0], greedy(3))
        assert len(ids) == 3 and last.finish_reason == "length"


def test_engine_refuses_an_unknown_model_name() -> None:
    with pytest.raises(ModelNotFoundError, match="no-such-model:7b"):
        Engine("no-such-model:7b")


@pytest.mark.real_model
def test_engine_reports_a_truncated_file(smollm2_path: Path, tmp_path: Path) -> None:
    broken = tmp_path / "truncated.gguf"
    broken.write_bytes(smollm2_path.read_bytes()[: 3 << 20])  # header and a few tensors
    threads_before = threading.active_count()
    with pytest.raises(GGUFError, match="truncated.gguf"):
        Engine(broken, options(ctx=256))
    time.sleep(0.2)
    assert threading.active_count() <= threads_before  # the compute thread ended with it
