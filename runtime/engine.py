"""The engine: one compute thread owns the model; front ends submit requests and read deltas.

`step()` is a visible pipeline: schedule -> run -> update. Requests enter through a
thread-safe inbox; deltas leave through each request's own stream, which can be iterated
synchronously (scripts, the CLI) or asynchronously (the server, the TUI). Aborting a stream
frees its sequence's blocks on the next turn of the loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmapp.runtime.batch import build_batch
from llmapp.runtime.chat_template import ChatTemplate, encode_prompt
from llmapp.runtime.errors import GGUFError, LlmappError
from llmapp.runtime.gguf_file import GGUFFile
from llmapp.runtime.kv_cache import KVCacheManager
from llmapp.runtime.metrics import EngineMetrics
from llmapp.runtime.model_runner import ModelRunner, RunnerOptions
from llmapp.runtime.sampling import SamplingParams, StopMatcher, check_finish, make_sampler
from llmapp.runtime.scheduler import Scheduler, SchedulerConfig, Sequence
from llmapp.runtime.store import entry_for_path, resolve_model
from llmapp.runtime.tokenizer import IncrementalDetokenizer, Tokenizer


class RequestError(LlmappError):
    """A request the engine cannot serve (too long, empty, bad parameters)."""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    prompt_ms: float
    decode_ms: float
    ttft_ms: float

    def tps(self, usage: Usage) -> tuple[float, float]:
        computed = usage.prompt_tokens - usage.cached_tokens
        prefill = computed / (self.prompt_ms / 1000) if self.prompt_ms > 0 else 0.0
        n = max(usage.completion_tokens - 1, 0)
        decode = n / (self.decode_ms / 1000) if self.decode_ms > 0 and n else 0.0
        return prefill, decode


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Delta:
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  # 'stop' | 'length' | 'abort' | 'error'
    usage: Usage | None = None
    timings: Timings | None = None
    error: str | None = None


_DONE = object()


class RequestStream:
    """Deltas of one request, readable from a thread or from an asyncio loop."""

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop | None) -> None:
        self._engine = engine
        self._loop = loop
        self._sync: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._async: asyncio.Queue[Any] | None = asyncio.Queue() if loop else None
        self.seq: Sequence | None = None
        self.finished = False

    def _put(self, item: Any) -> None:
        if self._loop is not None and self._async is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, item)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        else:
            self._sync.put(item)

    def abort(self) -> None:
        self._engine.abort(self)

    def __iter__(self) -> Iterator[Delta]:
        while True:
            item = self._sync.get()
            if item is _DONE:
                return
            yield item

    async def __aiter__(self) -> AsyncIterator[Delta]:
        assert self._async is not None, "stream was created without an event loop"
        try:
            while True:
                item = await self._async.get()
                if item is _DONE:
                    return
                yield item
        finally:
            if not self.finished:
                self.abort()

    def result(self) -> tuple[str, list[int], Delta]:
        """Drain synchronously: (text, generated ids, last delta)."""
        text: list[str] = []
        ids: list[int] = []
        last: Delta | None = None
        for delta in self:
            text.append(delta.text)
            ids.extend(delta.token_ids)
            last = delta
        assert last is not None
        if last.error:
            raise RequestError(last.error)
        return "".join(text), ids, last


@dataclass
class _RequestState:
    stream: RequestStream
    params: SamplingParams
    sampler: Any
    detok: IncrementalDetokenizer
    stops: StopMatcher
    submitted: float
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    pending_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class EngineOptions:
    runner: RunnerOptions = RunnerOptions()
    max_num_seqs: int = 16
    max_batched_tokens: int = 512
    enable_prefix_cache: bool = True


class Engine:
    """Owns the model and its compute thread. Safe to call from any thread or event loop."""

    def __init__(self, model: str | Path, options: EngineOptions | None = None) -> None:
        """model: a GGUF file or a catalog name (pulled first if it is not in the store)."""
        path = resolve_model(str(model))
        self.options = options or EngineOptions()
        self._inbox: queue.SimpleQueue[tuple[str, RequestStream, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        # Orders submit() against shutdown(): a request is either in the inbox before the
        # compute thread's last drain or refused, so no caller waits on a stream nobody ends.
        self._submit_lock = threading.Lock()
        self._stop = False
        self._go = threading.Event()  # the compute thread waits for the rest of __init__
        ready = self._start_compute_thread(path)
        try:
            # Text handling is built here while the compute thread packs the weights.
            self._setup_text(path)
            self.runner = ready()
            self._setup(path)
        except BaseException:
            self._stop = True
            self._go.set()
            raise
        self._go.set()

    def _start_compute_thread(self, path: str | Path) -> Callable[[], ModelRunner]:
        """Start the compute thread and let it build the runner; returns a wait for it.

        Numba's thread count is a per-thread setting: the backend applies RunnerOptions.n_threads
        in the thread that builds it, so the runner is built in the thread that runs the kernels
        (built here, a compute thread would use every core whatever n_threads says).
        """
        built: list[ModelRunner | BaseException] = []
        ready = threading.Event()

        def main() -> None:
            try:
                built.append(ModelRunner(path, self.options.runner))
            except BaseException as exc:
                built.append(exc)
                return
            finally:
                ready.set()
            self._go.wait()
            if not self._stop:
                self._loop()

        self._thread = threading.Thread(target=main, name="llmapp-engine", daemon=True)
        self._thread.start()

        def wait() -> ModelRunner:
            ready.wait()
            if isinstance(built[0], BaseException):
                raise built[0]
            return built[0]

        return wait

    def _setup_text(self, path: str | Path) -> None:
        entry = entry_for_path(path)  # catalog overrides when the file is a catalog model
        try:
            with GGUFFile(path) as gguf:
                self.tokenizer = Tokenizer.from_gguf(
                    gguf, extra_eog=entry.eog_tokens if entry else ()
                )
                self.template = ChatTemplate.from_gguf(
                    gguf, override=entry.chat_template if entry else None
                )
        except GGUFError:
            return  # the compute thread reports the same problem with the file
        self.default_stops = tuple(
            dict.fromkeys((*(entry.stop if entry else ()), *self.template.stop_strings))
        )

    def _setup(self, path: str | Path) -> None:
        self.config = self.runner.config
        self.kv = KVCacheManager(
            self.runner.num_blocks, self.runner.block_size, self.options.enable_prefix_cache
        )
        self.max_model_len = min(
            self.runner.num_blocks * self.runner.block_size, self.config.context_length
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                self.options.max_num_seqs, self.options.max_batched_tokens, self.max_model_len
            ),
            self.kv,
        )
        self.metrics = EngineMetrics()

    # ---- front-end API ---------------------------------------------------------------------

    def submit(
        self,
        prompt: str | Seq[int] | list[dict[str, Any]],
        params: SamplingParams | None = None,
        *,
        add_special: bool | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> RequestStream:
        """Queue a request: text (completion), token ids, or chat messages (template applied)."""
        params = params or SamplingParams()
        ids = self.encode_prompt(prompt, add_special)
        self.check_fits(len(ids))
        stream = RequestStream(self, loop)
        with self._submit_lock:
            if self._stop:
                raise RequestError("the engine has been shut down")
            self._inbox.put(("add", stream, (ids, params)))
        self._wake.set()
        return stream

    async def stream(
        self,
        prompt: str | Seq[int] | list[dict[str, Any]],
        params: SamplingParams | None = None,
        *,
        add_special: bool | None = None,
    ) -> RequestStream:
        """submit() for asyncio: iterate the result with `async for`; cancelling aborts."""
        loop = asyncio.get_running_loop()
        return self.submit(prompt, params, add_special=add_special, loop=loop)

    def generate(
        self, prompt: str | Seq[int] | list[dict[str, Any]], params: SamplingParams | None = None
    ) -> tuple[str, list[int], Delta]:
        """Blocking convenience for scripts: (text, generated ids, final delta)."""
        return self.submit(prompt, params).result()

    def abort(self, stream: RequestStream) -> None:
        if not stream.finished:
            self._inbox.put(("abort", stream, None))
            self._wake.set()

    def encode_prompt(
        self, prompt: str | Seq[int] | list[dict[str, Any]], add_special: bool | None = None
    ) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_bos=add_special, parse_special=False)
        if prompt and isinstance(prompt[0], dict):
            text = self.template.render(list(prompt), add_generation_prompt=True)  # type: ignore[arg-type]
            return encode_prompt(self.tokenizer, text)
        ids = [int(t) for t in prompt]  # type: ignore[arg-type]
        bad = [t for t in ids if not 0 <= t < self.tokenizer.n_vocab]
        if bad:
            raise RequestError(
                f"token id {bad[0]} is outside the vocabulary (0..{self.tokenizer.n_vocab - 1})"
            )
        return ids

    def check_fits(self, n_prompt: int) -> None:
        if n_prompt == 0:
            raise RequestError("the prompt is empty")
        if n_prompt >= self.max_model_len:
            raise RequestError(
                f"the prompt has {n_prompt} tokens; the context holds {self.max_model_len} "
                "(raise --ctx-size or shorten the prompt)"
            )

    def metrics_snapshot(self) -> dict[str, Any]:
        """Counters and latency histograms for front ends (a consistent-enough, lock-free read)."""
        return self.metrics.snapshot(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_usage=self.kv.usage,
            prefix=self.kv.prefix_stats(),
        )

    def shutdown(self) -> None:
        """Stop the compute thread; requests still in flight end with finish_reason 'abort'."""
        with self._submit_lock:
            self._stop = True
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- compute thread --------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop:
            try:
                self._drain_inbox()
                if not self.scheduler.has_work():
                    self._wake.wait(0.5)
                    self._wake.clear()
                    continue
                self.step()
            except Exception as exc:  # never leave a caller hanging on a dead thread
                self._fail_all(f"engine error: {exc!r}")
        self._drain_inbox()
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._finish(seq, "abort")

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, stream, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self._add(stream, *payload)
                except Exception as exc:  # a bad request ends alone; the others go on
                    stream.finished = True
                    stream._put(Delta("", (), finish_reason="error", error=repr(exc)))
                    stream._put(_DONE)
            elif kind == "abort" and stream.seq is not None and not stream.finished:
                self._finish(stream.seq, "abort")

    def _add(self, stream: RequestStream, ids: list[int], params: SamplingParams) -> None:
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len
        seq = Sequence(token_ids=list(ids), num_prompt_tokens=len(ids), max_tokens=max_tokens)
        seq.payload = _RequestState(
            stream=stream,
            params=params,
            sampler=make_sampler(params, self.tokenizer.eog_ids),
            detok=IncrementalDetokenizer(self.tokenizer, skip_special=True),
            stops=StopMatcher(tuple(dict.fromkeys((*params.stop, *self.default_stops)))),
            submitted=time.perf_counter(),
        )
        stream.seq = seq
        self.scheduler.add(seq)
        self.metrics.requests_received += 1

    def step(self) -> int:
        """schedule -> run -> update; returns the number of tokens computed."""
        scheduled = self.scheduler.schedule()
        self.metrics.preemptions += len(scheduled.preempted)
        if not scheduled.seqs:
            return 0
        entries = []
        for seq, n in zip(scheduled.seqs, scheduled.num_tokens, strict=True):
            reaches_end = seq.num_computed + n == len(seq.token_ids)
            ids = seq.token_ids[: seq.num_computed + n]
            entries.append((ids, seq.num_computed, seq.blocks.block_table, int(reaches_end)))
        batch = build_batch(entries, self.runner.block_size)
        logits = self.runner.forward(batch)
        self._update(scheduled.seqs, scheduled.num_tokens, logits)
        self.metrics.tokens_processed += batch.num_rows
        self.metrics.steps += 1
        return batch.num_rows

    def _update(self, seqs: list[Sequence], counts: list[int], logits: np.ndarray) -> None:
        row = 0
        now = time.perf_counter()
        for seq, n in zip(seqs, counts, strict=True):
            seq.num_computed += n
            self.kv.publish_full_blocks(seq.blocks, seq.token_ids, seq.num_computed)
            if seq.num_computed < len(seq.token_ids):
                continue  # a prompt chunk: no token yet
            self._accept_token(seq, logits[row], now)
            row += 1

    def _accept_token(self, seq: Sequence, logits: np.ndarray, now: float) -> None:
        state: _RequestState = seq.payload
        result = state.sampler.sample(logits, seq.token_ids, seq.num_prompt_tokens)
        token = int(result.token)
        seq.token_ids.append(token)
        self.metrics.tokens_generated += 1
        if not state.first_token_at:
            state.first_token_at = now
            self.metrics.observe_ttft(now - state.submitted)
        else:
            self.metrics.observe_itl(now - state.last_token_at)
        state.last_token_at = now
        reason = check_finish(token, seq.num_generated, state.params, self.tokenizer.eog_ids)
        if reason is None and len(seq.token_ids) >= self.max_model_len:
            reason = "length"
        is_eog = token in self.tokenizer.eog_ids and not state.params.ignore_eos
        text = "" if is_eog else state.detok.push(token)
        emit, stopped = state.stops.feed(text)
        if stopped:
            reason = "stop"
        logprob: tuple[TokenLogprob, ...] = ()
        if state.params.logprobs:
            logprob = (TokenLogprob(token, result.logprob, tuple(result.top_logprobs)),)
        if reason is None:
            state.stream._put(Delta(emit, (token,), logprob))
            return
        if not stopped:
            tail, stopped = state.stops.feed(state.detok.flush())
            emit += tail if stopped else tail + state.stops.flush()
            reason = "stop" if stopped else reason
        state.stream._put(Delta(emit, (token,), logprob))
        self._finish(seq, reason)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        state: _RequestState = seq.payload
        self.metrics.requests_finished += 1  # before the blocks go: observers see both at once
        self.scheduler.finish(seq)
        stream = state.stream
        stream.finished = True
        usage = Usage(seq.num_prompt_tokens, seq.num_generated, seq.num_cached_prompt)
        first = state.first_token_at or time.perf_counter()
        timings = Timings(
            prompt_ms=(first - state.submitted) * 1000,
            decode_ms=max(state.last_token_at - first, 0.0) * 1000,
            ttft_ms=(first - state.submitted) * 1000,
        )
        stream._put(Delta("", (), (), reason, usage, timings, error))
        stream._put(_DONE)

    def _fail_all(self, message: str) -> None:
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._finish(seq, "error", message)
