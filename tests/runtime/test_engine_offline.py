"""The engine's request handling without a real model: a tiny chat model file with a scripted
runner (exact, known logits) or its real random weights.

Isolation, bounded admission, streams whose consumer went away, a dead compute thread, timing
from arrival, prompt work off the event loop, one compute thread for several models.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from tiny_model import ScriptedRunner, script_next, write_chat_model

from llmapp.runtime import Delta, Engine, EngineOptions, RequestStream, RunnerOptions
from llmapp.runtime import SamplingParams as SP
from llmapp.runtime.core.batch import ForwardBatch
from llmapp.runtime.core.compute import ComputeThread
from llmapp.runtime.core.engine import EngineStoppedError, QueueFullError
from llmapp.runtime.execution.model_runner import ModelRunner

PROMPTS = ["hello world", "the cat is a cat", "a", "hello, you and the world!", "it is"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chat_model(tmp_path_factory.mktemp("tiny") / "tiny-chat.gguf")


def opts(seqs: int = 8, waiting: int = 256, ctx: int = 1024) -> EngineOptions:
    return EngineOptions(
        runner=RunnerOptions(ctx_size=ctx, n_threads=1), max_num_seqs=seqs, max_waiting=waiting
    )


@pytest.fixture
def make(tiny_path: Path) -> Iterator[Callable[..., Engine]]:
    made: list[Engine] = []

    def build(options: EngineOptions | None = None, **kw: object) -> Engine:
        kw.setdefault("runner_factory", ScriptedRunner)
        made.append(Engine(tiny_path, options or opts(), **kw))  # type: ignore[arg-type]
        return made[-1]

    yield build
    for engine in made:
        engine.shutdown()


def greedy(n: int = 8, **kw: object) -> SP:
    return SP(temperature=0, max_tokens=n, **kw)  # type: ignore[arg-type]


def expected(engine: Engine, prompt: str, n: int) -> list[int]:
    """What the scripted model must generate for a prompt, computed by hand."""
    ids = engine.encode_prompt(prompt)
    out: list[int] = []
    for _ in range(n):
        out.append(script_next(ids[-1], len(ids) - 1, engine.tokenizer.n_vocab))
        ids.append(out[-1])
    return out


def drain(stream: RequestStream) -> tuple[list[int], Delta]:
    ids: list[int] = []
    last = None
    for delta in stream:
        ids.extend(delta.token_ids)
        last = delta
    assert last is not None
    return ids, last


def wait_idle(engine: Engine, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        snap = engine.metrics_snapshot()  # "waiting" counts requests still in the inbox too
        if snap["running"] == snap["waiting"] == 0 and engine.kv.pool.num_used == 0:
            return
        time.sleep(0.005)
    raise AssertionError("requests or KV blocks left behind")


class Gate:
    """Holds the compute thread inside forward() until released."""

    def __init__(self, engine: Engine) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        self._forward = engine.runner.forward
        engine.runner.forward = self.forward  # type: ignore[method-assign]

    def forward(self, batch: ForwardBatch) -> np.ndarray:
        self.entered.set()
        assert self.release.wait(10), "the gate was never released"
        return self._forward(batch)


# ---- isolation ------------------------------------------------------------------------------


def test_a_request_whose_sampling_fails_ends_alone(make: Callable[..., Engine]) -> None:
    engine = make()
    n_vocab = engine.tokenizer.n_vocab
    banned = {t: -100.0 for t in range(n_vocab)}  # every token banned: nothing can be drawn
    streams = [engine.submit(p, greedy(12)) for p in PROMPTS[:2]]
    bad = [engine.submit(PROMPTS[2], SP(temperature=t, logit_bias=banned)) for t in (0, 0.8)]
    streams += [engine.submit(p, greedy(12)) for p in PROMPTS[2:]]
    for stream in bad:
        ids, last = drain(stream)
        assert ids == [] and last.finish_reason == "error"
        assert last.error is not None and "no token can be sampled" in last.error
    for prompt, stream in zip(PROMPTS, streams, strict=True):
        ids, last = drain(stream)
        assert ids == expected(engine, prompt, 12), prompt  # exactly as alone
        assert last.finish_reason == "length" and last.error is None
    wait_idle(engine)
    snap = engine.metrics_snapshot()
    assert snap["finished_by_reason"] == {"error": 2, "length": 5}


def test_a_failing_detokenizer_ends_that_request_alone(make: Callable[..., Engine]) -> None:
    engine = make()
    gate = Gate(engine)
    victim = engine.submit(PROMPTS[0], greedy(6))
    neighbour = engine.submit(PROMPTS[1], greedy(6))
    assert gate.entered.wait(5)
    assert victim.seq is not None

    def broken(token: int) -> str:
        raise UnicodeError("broken piece")

    victim.seq.payload.detok.push = broken
    gate.release.set()
    assert drain(victim)[1].error == "UnicodeError: broken piece"
    assert drain(neighbour)[0] == expected(engine, PROMPTS[1], 6)
    wait_idle(engine)


# ---- bounded admission ----------------------------------------------------------------------


def test_the_queue_is_bounded(make: Callable[..., Engine]) -> None:
    engine = make(opts(seqs=1, waiting=2))
    gate = Gate(engine)
    first = engine.submit(PROMPTS[0], greedy(2))
    assert gate.entered.wait(5)  # running, held inside its first step
    queued = [engine.submit(p, greedy(2)) for p in PROMPTS[1:3]]
    with pytest.raises(QueueFullError, match="queue is full") as info:
        engine.submit(PROMPTS[3], greedy(2))
    assert info.value.retry_after > 0
    assert engine.metrics_snapshot()["waiting"] == 2
    gate.release.set()
    for stream in [first, *queued]:
        assert drain(stream)[1].finish_reason == "length"
    assert drain(engine.submit(PROMPTS[3], greedy(2)))[1].finish_reason == "length"
    wait_idle(engine)


# ---- nobody listening -----------------------------------------------------------------------


def endless() -> SP:
    return SP(temperature=0, max_tokens=100_000, ignore_eos=True)


def test_a_dropped_iterator_aborts(make: Callable[..., Engine]) -> None:
    engine = make()
    stream = engine.submit(PROMPTS[0], endless())
    for _ in stream:
        break  # the generator is closed here: its consumer is gone
    wait_idle(engine)
    assert engine.metrics_snapshot()["finished_by_reason"] == {"abort": 1}


def test_a_stream_dropped_unread_aborts(make: Callable[..., Engine]) -> None:
    engine = make()
    engine.submit(PROMPTS[0], endless())  # the stream object is dropped at once
    gc.collect()
    wait_idle(engine)
    assert engine.metrics_snapshot()["finished_by_reason"] == {"abort": 1}


def test_a_cancelled_task_aborts(make: Callable[..., Engine]) -> None:
    engine = make()

    async def main() -> None:
        seen = asyncio.Event()

        async def consume() -> None:
            async for _ in await engine.stream(PROMPTS[0], endless()):
                seen.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(seen.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    wait_idle(engine)


def test_a_closed_event_loop_aborts(make: Callable[..., Engine]) -> None:
    engine = make()
    loop = asyncio.new_event_loop()
    stream = loop.run_until_complete(engine.stream(PROMPTS[0], endless()))
    loop.close()  # nobody will ever read this stream
    wait_idle(engine)
    assert stream.finished


# ---- liveness -------------------------------------------------------------------------------


def test_a_dead_compute_thread_ends_every_stream(make: Callable[..., Engine]) -> None:
    compute = ComputeThread(name="llmapp-compute-test")
    engine = make(compute=compute)
    gate = Gate(engine)
    first = engine.submit(PROMPTS[0], endless())
    assert gate.entered.wait(5)
    waiting = engine.submit(PROMPTS[1], endless())

    def fatal(batch: ForwardBatch) -> np.ndarray:
        raise SystemExit("simulated crash of the compute thread")

    gate._forward = fatal
    gate.release.set()
    for stream in (first, waiting):
        last = drain(stream)[1]
        assert last.finish_reason == "error" and "stopped" in (last.error or "")
    assert compute.thread is not None
    compute.thread.join(5)
    assert not compute.is_alive()
    with pytest.raises(EngineStoppedError, match="simulated crash"):
        engine.submit(PROMPTS[0], greedy())


def test_shutdown_ends_streams_and_refuses_more(make: Callable[..., Engine]) -> None:
    engine = make()
    stream = engine.submit(PROMPTS[0], endless())
    next(iter(stream))
    engine.shutdown()
    assert drain(stream)[1].finish_reason == "abort"
    with pytest.raises(EngineStoppedError, match="shut down"):
        engine.submit(PROMPTS[0], greedy())


# ---- timing and ids -------------------------------------------------------------------------


def test_timings_count_from_arrival(make: Callable[..., Engine]) -> None:
    engine = make()
    gate = Gate(engine)
    first = engine.submit(PROMPTS[0], greedy(2))
    assert gate.entered.wait(5)
    late = engine.submit(PROMPTS[1], greedy(3))  # arrives while the compute thread is held
    time.sleep(0.2)
    gate.release.set()
    drain(first)
    timings = drain(late)[1].timings
    assert timings is not None
    assert timings.queue_ms >= 190  # waited for the held step, counted from submit()
    assert timings.ttft_ms >= timings.queue_ms + timings.prompt_ms - 1
    assert 0 < timings.prompt_ms < timings.ttft_ms  # the prefill alone, not a copy of TTFT
    snap = engine.metrics_snapshot()
    for name in ("time_to_first_token_seconds", "request_queue_time_seconds"):
        hist = snap[name]
        counts = list(hist["buckets"].values())
        assert counts == sorted(counts) and counts[-1] == hist["count"] == 2  # cumulative
    assert snap["request_queue_time_seconds"]["buckets"]["0.1"] <= 1


def test_every_request_has_an_id(make: Callable[..., Engine]) -> None:
    engine = make()
    a, b = engine.submit("a", greedy(1)), engine.submit("a", greedy(1))
    c = engine.submit("a", greedy(1), request_id="chatcmpl-123")
    assert a.id != b.id and a.id.startswith("req-") and c.id == "chatcmpl-123"
    for s in (a, b, c):
        drain(s)


def test_prompt_encoding_runs_off_the_event_loop(make: Callable[..., Engine]) -> None:
    engine = make()
    encode = engine.encode_prompt

    def slow_encode(prompt: object, *args: object) -> list[int]:
        time.sleep(0.3)  # a huge prompt's template and tokenizer work
        return encode(prompt, *args)  # type: ignore[arg-type]

    engine.encode_prompt = slow_encode  # type: ignore[method-assign]

    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        stream = await engine.stream(PROMPTS[0], greedy(2))
        async for _ in stream:
            pass
        task.cancel()
        return ticks

    assert asyncio.run(main()) >= 10  # the loop kept running while the prompt was encoded


# ---- several models, one compute thread -----------------------------------------------------


def test_two_models_share_one_compute_thread(make: Callable[..., Engine], tiny_path: Path) -> None:
    scripted = make()
    real = make(runner_factory=ModelRunner)  # the tiny file's real random weights
    alone = real.generate(PROMPTS[3], greedy(10))[1]
    streams = [real.submit(PROMPTS[3], greedy(10)), scripted.submit(PROMPTS[3], greedy(10))]
    got = [drain(s)[0] for s in streams]
    assert got == [alone, expected(scripted, PROMPTS[3], 10)]
    assert scripted._compute is real._compute
    names = [t.name for t in threading.enumerate()]
    assert names.count("llmapp-compute") == 1


def test_the_compute_thread_ends_with_the_last_engine(tiny_path: Path) -> None:
    def compute_threads() -> int:
        return sum(t.name == "llmapp-compute" for t in threading.enumerate())

    for _ in range(2):  # and a later engine starts a new one
        with Engine(tiny_path, opts(), runner_factory=ScriptedRunner) as engine:
            assert drain(engine.submit("a", greedy(2)))[1].finish_reason == "length"
            assert compute_threads() == 1
        deadline = time.monotonic() + 5
        while compute_threads() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert compute_threads() == 0
