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
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np

from llmapp.runtime.core.batch import ForwardBatch, build_batch
from llmapp.runtime.core.compute import ComputeThread
from llmapp.runtime.core.kv_cache import KVCacheManager
from llmapp.runtime.core.metrics import EngineMetrics
from llmapp.runtime.core.sampling import SamplingParams, StopMatcher, check_finish, make_sampler
from llmapp.runtime.core.scheduler import (
    ScheduledStep,
    Scheduler,
    SchedulerConfig,
    SeqStatus,
    Sequence,
)
from llmapp.runtime.core.speculative import DraftBudget, ngram_draft
from llmapp.runtime.errors import GGUFError, LlmappError
from llmapp.runtime.execution.model_runner import ModelRunner, RunnerOptions
from llmapp.runtime.files.gguf_file import GGUFFile
from llmapp.runtime.files.store import entry_for_path, resolve_model
from llmapp.runtime.text.chat_template import ChatTemplate, encode_prompt
from llmapp.runtime.text.constrain import Constraint, grammar_for
from llmapp.runtime.text.tokenizer import IncrementalDetokenizer, Tokenizer


class RequestError(LlmappError):
    """A request the engine cannot serve (too long, empty, bad parameters)."""


class ContextLengthError(RequestError):
    """The prompt does not fit the context one request may use."""

    def __init__(self, n_prompt: int, n_ctx: int) -> None:
        self.n_prompt = n_prompt
        self.n_ctx = n_ctx
        super().__init__(
            f"the prompt has {n_prompt} tokens, which exceeds the available context size of "
            f"{n_ctx} tokens (raise --ctx-size or shorten the prompt)"
        )


class QueueFullError(RequestError):
    """Too many requests are waiting; the caller should retry after a while."""

    def __init__(self, waiting: int, retry_after: float = 1.0) -> None:
        self.waiting = waiting
        self.retry_after = retry_after
        super().__init__(f"the request queue is full ({waiting} waiting); retry shortly")


class EngineStoppedError(RequestError):
    """The engine was shut down, or its compute thread stopped."""


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    drafted_tokens: int = 0  # speculative decoding: tokens drafted, and of those accepted
    accepted_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    """Milliseconds, all measured from the request's arrival in submit()/stream().

    queue_ms: arrival -> first scheduled; prompt_ms: first scheduled -> first token (the
    prefill, chunks and waits between them included); ttft_ms: arrival -> first token;
    decode_ms: first token -> last token.
    """

    prompt_ms: float
    decode_ms: float
    ttft_ms: float
    queue_ms: float = 0.0

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
    # With an error: "invalid_request" when the request itself was at fault (its parameters
    # cannot be sampled, say), "internal" for a failure of ours.
    error_code: str | None = None


_DONE = object()


class _Submission(NamedTuple):
    """A request on its way to the compute thread (the arguments of Engine._add)."""

    ids: list[int]
    params: SamplingParams
    arrived: float
    constraint: Constraint | None


class _Channel:
    """The engine's end of one request's stream: where its deltas go.

    It holds no reference to the RequestStream, so a stream its caller dropped can be noticed
    (a finalizer aborts it) while the engine still holds the channel.
    """

    __slots__ = ("loop", "sync", "queue", "seq", "finished", "gone", "request_id")

    def __init__(self, loop: asyncio.AbstractEventLoop | None, request_id: str) -> None:
        self.loop = loop
        self.request_id = request_id
        # Bounded in practice: one item per generated token, and a request ends at the
        # context size at the latest.
        self.sync: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.queue: asyncio.Queue[Any] | None = asyncio.Queue() if loop else None
        self.seq: Sequence | None = None
        self.finished = False
        self.gone = False  # the caller's event loop is closed: nobody can read any more

    def put(self, item: Any) -> None:
        if self.loop is None or self.queue is None:
            self.sync.put(item)
            return
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed
            self.gone = True

    def end(self, delta: Delta) -> None:
        self.finished = True
        self.put(delta)
        self.put(_DONE)


class RequestStream:
    """Deltas of one request, readable from a thread or from an asyncio loop.

    A consumer that goes away aborts the request: breaking out of the iteration, cancelling
    the task that iterates, or dropping the stream without reading it.
    """

    def __init__(self, engine: Engine, channel: _Channel) -> None:
        self._engine = engine
        self._channel = channel
        self.id = channel.request_id
        finalizer = weakref.finalize(self, engine._abort_channel, channel)
        finalizer.atexit = False

    @property
    def seq(self) -> Sequence | None:
        return self._channel.seq

    @property
    def finished(self) -> bool:
        return self._channel.finished

    def abort(self) -> None:
        self._engine._abort_channel(self._channel)

    def __iter__(self) -> Iterator[Delta]:
        try:
            while True:
                item = self._channel.sync.get()
                if item is _DONE:
                    return
                yield item
        finally:
            if not self._channel.finished:
                self.abort()

    async def __aiter__(self) -> AsyncIterator[Delta]:
        channel = self._channel
        assert channel.queue is not None, "stream was created without an event loop"
        try:
            while True:
                item = await channel.queue.get()
                if item is _DONE:
                    return
                yield item
        finally:
            if not channel.finished:
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
    channel: _Channel
    params: SamplingParams
    sampler: Any
    detok: IncrementalDetokenizer
    stops: StopMatcher
    arrived: float  # perf_counter() when submit()/stream() was called
    scheduled_at: float = 0.0
    first_token_at: float = 0.0
    last_token_at: float = 0.0
    budget: DraftBudget | None = None  # with speculative decoding on
    draft: list[int] = field(default_factory=list)  # draft tokens now at the end of token_ids


class Runner(Protocol):
    """What the engine needs of a model runner (ModelRunner; tests may inject a small one)."""

    config: Any
    num_blocks: int
    block_size: int

    def forward(self, batch: ForwardBatch) -> np.ndarray: ...
    def bind_thread(self) -> None: ...


RunnerFactory = Callable[[Path, RunnerOptions], Runner]


@dataclass(frozen=True)
class EngineOptions:
    runner: RunnerOptions = RunnerOptions()
    max_num_seqs: int = 16
    max_batched_tokens: int = 512
    enable_prefix_cache: bool = True
    max_waiting: int = 256  # requests submitted but not yet running; beyond it QueueFullError
    max_model_len: int | None = None  # longest context of one request (None: pool and model)
    speculative_tokens: int = 0  # n-gram drafts verified per step, at most (0: off)

    def __post_init__(self) -> None:
        if self.max_waiting < 1:
            raise ValueError("max_waiting must be at least 1")
        if not 0 <= self.speculative_tokens <= 32:
            raise ValueError("speculative_tokens must be in [0, 32]")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2 tokens")


def _describe(exc: BaseException) -> tuple[str, str]:
    """A request's error (message, code): ours are already sentences; others get their type."""
    if isinstance(exc, LlmappError):
        return str(exc), "invalid_request"
    return f"{type(exc).__name__}: {exc}", "internal"


class Engine:
    """Owns one model. Safe to call from any thread or event loop.

    Steps run on the process's one compute thread (runtime/core/compute.py), shared by every
    loaded model; each engine's state is touched only there, apart from the inbox.
    """

    def __init__(
        self,
        model: str | Path,
        options: EngineOptions | None = None,
        *,
        runner_factory: RunnerFactory | None = None,
        compute: ComputeThread | None = None,
    ) -> None:
        """model: a GGUF file or a catalog name (pulled first if it is not in the store)."""
        self.path = resolve_model(str(model))
        self.options = options or EngineOptions()
        self._inbox: queue.SimpleQueue[tuple[str, _Channel | None, Any]] = queue.SimpleQueue()
        # Orders submit() against shutdown() and counts requests not yet finished.
        self._submit_lock = threading.Lock()
        self._stop = False
        self._closed = threading.Event()
        self._dead: str | None = None
        self._open: set[_Channel] = set()
        self._outstanding = 0
        ready = self._start_loading(self.path, runner_factory or ModelRunner)
        # Text handling is built here while the loader thread packs the weights.
        self._setup_text(self.path)
        self.runner = ready()
        self._setup()
        self._compute = compute or ComputeThread.shared()
        self._compute.attach(self)

    def _start_loading(self, path: Path, factory: RunnerFactory) -> Callable[[], Runner]:
        """Build the runner on a loader thread; returns a wait for it (re-raising its error)."""
        built: list[Runner | BaseException] = []

        def load() -> None:
            try:
                built.append(factory(path, self.options.runner))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                built.append(exc)

        loader = threading.Thread(target=load, name="llmapp-load", daemon=True)
        loader.start()

        def wait() -> Runner:
            loader.join()
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
            return  # the loader thread reports the same problem with the file
        self.default_stops = tuple(
            dict.fromkeys((*(entry.stop if entry else ()), *self.template.stop_strings))
        )

    def _setup(self) -> None:
        self.config = self.runner.config
        self.kv = KVCacheManager(
            self.runner.num_blocks, self.runner.block_size, self.options.enable_prefix_cache
        )
        pool_tokens = self.runner.num_blocks * self.runner.block_size
        self.max_model_len = min(pool_tokens, self.config.context_length)
        if self.options.max_model_len is not None:
            self.max_model_len = min(self.max_model_len, self.options.max_model_len)
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
        request_id: str | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> RequestStream:
        """Queue a request: text (completion), token ids, or chat messages (template applied;
        `tools` are given to templates that have a tools section)."""
        arrived = time.perf_counter()
        params = params or SamplingParams()
        ids, constraint = self._prepare(prompt, add_special, params, tools)
        return self.submit_ids(
            ids, params, loop=loop, request_id=request_id, arrived=arrived, constraint=constraint
        )

    def _prepare(
        self,
        prompt: str | Seq[int] | list[dict[str, Any]],
        add_special: bool | None,
        params: SamplingParams,
        tools: list[dict[str, Any]] | None = None,
    ) -> tuple[list[int], Constraint | None]:
        """The caller-side work of a request: prompt ids and its compiled constraint."""
        ids = self.encode_prompt(prompt, add_special, tools)
        return ids, self.compile_constraint(params)

    def compile_constraint(self, params: SamplingParams) -> Constraint | None:
        """The request's grammar as a token mask (ConstraintError names what is wrong)."""
        grammar = grammar_for(params.json_schema, params.grammar, params.regex)
        if grammar is None:
            return None
        return Constraint(grammar, self.tokenizer, params.grammar_trigger)

    def submit_ids(
        self,
        ids: list[int],
        params: SamplingParams | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        request_id: str | None = None,
        arrived: float | None = None,
        constraint: Constraint | None = None,
    ) -> RequestStream:
        """Queue already-encoded prompt ids (checked against the vocabulary by encode_prompt)."""
        arrived = time.perf_counter() if arrived is None else arrived
        params = params or SamplingParams()
        self.check_fits(len(ids))
        if constraint is None and params.constrained:
            constraint = self.compile_constraint(params)
        channel = _Channel(loop, request_id or f"req-{uuid.uuid4().hex}")
        payload = _Submission(ids, params, arrived, constraint)
        with self._submit_lock:
            self._check_accepting()
            self._outstanding += 1
            self._open.add(channel)
            self._inbox.put(("add", channel, payload))
        self._compute.wake()
        return RequestStream(self, channel)

    def _check_accepting(self) -> None:
        if self._dead is not None:
            raise EngineStoppedError(f"the engine has stopped: {self._dead}")
        if self._stop:
            raise EngineStoppedError("the engine has been shut down")
        waiting = self._outstanding - len(self.scheduler.running)
        if waiting >= self.options.max_waiting:
            raise QueueFullError(waiting)

    async def stream(
        self,
        prompt: str | Seq[int] | list[dict[str, Any]],
        params: SamplingParams | None = None,
        *,
        add_special: bool | None = None,
        request_id: str | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> RequestStream:
        """submit() for asyncio: iterate the result with `async for`; cancelling aborts.

        Template rendering and tokenizing run in a worker thread: a long prompt must not
        stall the event loop that serves every other client.
        """
        arrived = time.perf_counter()
        loop = asyncio.get_running_loop()
        params = params or SamplingParams()
        ids, constraint = await asyncio.to_thread(self._prepare, prompt, add_special, params, tools)
        return self.submit_ids(
            ids, params, loop=loop, request_id=request_id, arrived=arrived, constraint=constraint
        )

    def generate(
        self, prompt: str | Seq[int] | list[dict[str, Any]], params: SamplingParams | None = None
    ) -> tuple[str, list[int], Delta]:
        """Blocking convenience for scripts: (text, generated ids, final delta)."""
        return self.submit(prompt, params).result()

    def abort(self, stream: RequestStream) -> None:
        stream.abort()

    def _abort_channel(self, channel: _Channel) -> None:
        if not channel.finished:
            self._inbox.put(("abort", channel, None))
            self._compute.wake()

    def encode_prompt(
        self,
        prompt: str | Seq[int] | list[dict[str, Any]],
        add_special: bool | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_bos=add_special, parse_special=False)
        if prompt and isinstance(prompt[0], dict):
            messages = list(prompt)
            text = self.template.render(messages, add_generation_prompt=True, tools=tools)  # type: ignore[arg-type]
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
            raise ContextLengthError(n_prompt, self.max_model_len)

    def metrics_snapshot(self) -> dict[str, Any]:
        """Counters and latency histograms for front ends (a consistent-enough, lock-free read)."""
        return self.metrics.snapshot(
            running=len(self.scheduler.running),
            waiting=max(0, self._outstanding - len(self.scheduler.running)),
            kv_usage=self.kv.usage,
            prefix=self.kv.prefix_stats(),
        )

    @property
    def alive(self) -> bool:
        return self._dead is None and not self._stop

    def shutdown(self) -> None:
        """Stop serving; requests still in flight end with finish_reason 'abort'."""
        with self._submit_lock:
            if self._stop:
                return
            self._stop = True
            self._inbox.put(("shutdown", None, None))
        thread = self._compute.thread
        if threading.current_thread() is thread:
            self._turn()
        elif self._compute.is_alive():
            self._compute.wake()
            self._closed.wait(timeout=10)
        self._compute.detach(self)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- compute thread --------------------------------------------------------------------

    def _turn(self) -> bool:
        """One turn: take requests and aborts, then one step. True while work remains."""
        self._drain_inbox()
        if self._closed.is_set() or not self.scheduler.has_work():
            return False
        self.runner.bind_thread()
        self.step()
        return self.scheduler.has_work()

    def _compute_died(self, reason: str) -> None:
        """Called once the compute thread is gone: end every open stream with an error."""
        with self._submit_lock:
            self._dead = reason
            channels = list(self._open)
            self._open.clear()
        for channel in channels:
            if not channel.finished:
                message = f"the engine has stopped: {reason}"
                channel.end(self._final_delta("error", message, "internal"))
        self._closed.set()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, channel, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add" and channel is not None:
                self._add_or_refuse(channel, payload)
            elif kind == "abort" and channel is not None:
                if channel.seq is not None and not channel.finished:
                    self._finish(channel.seq, "abort")
            elif kind == "shutdown":
                self._close()

    def _close(self) -> None:
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self._finish(seq, "abort")
        self._closed.set()

    def _add_or_refuse(self, channel: _Channel, request: _Submission) -> None:
        if channel.finished:
            return
        try:
            self._add(channel, *request)
        except Exception as exc:  # a bad request ends alone; the others go on
            self._release(channel)
            channel.end(self._final_delta("error", *_describe(exc)))

    def _add(
        self,
        channel: _Channel,
        ids: list[int],
        params: SamplingParams,
        arrived: float,
        constraint: Constraint | None,
    ) -> None:
        seq = Sequence(token_ids=list(ids), num_prompt_tokens=len(ids))
        processors = (constraint,) if constraint is not None else ()
        seq.payload = _RequestState(
            channel=channel,
            params=params,
            sampler=make_sampler(params, self.tokenizer.eog_ids, processors),
            detok=IncrementalDetokenizer(self.tokenizer, skip_special=True),
            stops=StopMatcher(tuple(dict.fromkeys((*params.stop, *self.default_stops)))),
            arrived=arrived,
        )
        if self.options.speculative_tokens:
            seq.payload.budget = DraftBudget(self.options.speculative_tokens)
        channel.seq = seq
        self.scheduler.add(seq)
        self.metrics.requests_received += 1

    def step(self) -> int:
        """schedule -> run -> update; returns the number of tokens computed.

        A failure is contained where it happens: in the forward pass it ends the sequences of
        that batch, in one sequence's sampling or text handling it ends that sequence alone.
        """
        if self.options.speculative_tokens:
            self._propose_drafts()
        try:
            scheduled = self.scheduler.schedule()
        except Exception as exc:  # the scheduler's state cannot be trusted: end everything
            self._fail(list(self.scheduler.running) + list(self.scheduler.waiting), exc)
            return 0
        if self.options.speculative_tokens:
            self._fit_drafts(scheduled)
        self.metrics.preemptions += len(scheduled.preempted)
        if not scheduled.seqs:
            return 0
        self._mark_scheduled(scheduled.seqs)
        try:
            batch = self._build_batch(scheduled.seqs, scheduled.num_tokens)
            logits = self.runner.forward(batch)
        except Exception as exc:
            self._fail(scheduled.seqs, exc)
            return 0
        self._update(scheduled.seqs, scheduled.num_tokens, logits)
        self.metrics.tokens_processed += batch.num_rows
        self.metrics.steps += 1
        return batch.num_rows

    def _mark_scheduled(self, seqs: list[Sequence]) -> None:
        now = time.perf_counter()
        for seq in seqs:
            state: _RequestState = seq.payload
            if not state.scheduled_at:
                state.scheduled_at = now
                self.metrics.observe("queue", now - state.arrived)

    def _build_batch(self, seqs: list[Sequence], counts: list[int]) -> ForwardBatch:
        entries = []
        for seq, n in zip(seqs, counts, strict=True):
            reaches_end = seq.num_computed + n == len(seq.token_ids)
            rows = 1 + len(seq.payload.draft) if reaches_end else 0  # a row per draft too
            ids = seq.token_ids[: seq.num_computed + n]
            entries.append((ids, seq.num_computed, seq.blocks.block_table, rows))
        return build_batch(entries, self.runner.block_size)

    def _update(self, seqs: list[Sequence], counts: list[int], logits: np.ndarray) -> None:
        row = 0
        now = time.perf_counter()
        for seq, n in zip(seqs, counts, strict=True):
            seq.num_computed += n
            wants_token = seq.num_computed >= len(seq.token_ids)
            n_rows = 1 + len(seq.payload.draft) if wants_token else 0
            try:
                if seq.payload.draft:
                    self._verify(seq, logits[row : row + n_rows], now)
                else:
                    self.kv.publish_full_blocks(seq.blocks, seq.token_ids, seq.num_computed)
                    if wants_token:  # else a prompt chunk: no token yet
                        self._accept_token(seq, logits[row], now)
            except Exception as exc:
                self._fail([seq], exc)
            row += n_rows

    # ---- speculative decoding (runtime/core/speculative.py) -------------------------------------

    def _propose_drafts(self) -> None:
        """Append n-gram drafts to each decoding sequence; the step verifies them."""
        for seq in self.scheduler.running:
            state: _RequestState = seq.payload
            if state.budget is None or seq.num_pending != 1:
                continue
            room = self.max_model_len - len(seq.token_ids) - 1
            if state.params.max_tokens is not None:
                room = min(room, state.params.max_tokens - seq.num_generated - 1)
            k = min(state.budget.next_k(), room)
            state.draft = ngram_draft(seq.token_ids, k) if k > 0 else []
            seq.token_ids.extend(state.draft)

    def _fit_drafts(self, step: ScheduledStep) -> None:
        """Drop the drafts a step will not verify: of sequences left out or preempted, and
        beyond a sequence's share of the token budget."""
        scheduled = dict(zip(map(id, step.seqs), step.num_tokens, strict=True))
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            state: _RequestState = seq.payload
            if not state.draft:
                continue
            n = scheduled.get(id(seq), 0)
            keep = max(0, n - 1) if seq.status is SeqStatus.RUNNING else 0
            drop = len(state.draft) - min(keep, len(state.draft))
            if drop:
                del seq.token_ids[len(seq.token_ids) - drop :]
                state.draft = state.draft[: len(state.draft) - drop]

    def _verify(self, seq: Sequence, rows: np.ndarray, now: float) -> None:
        """Sample position by position while the samples equal the draft.

        Each sampled token is drawn exactly as in plain decoding; a draft token that matches
        was already fed at its position, so its K/V is valid and the next row's logits too.
        """
        state: _RequestState = seq.payload
        draft, state.draft = state.draft, []
        del seq.token_ids[len(seq.token_ids) - len(draft) :]
        seq.num_computed = len(seq.token_ids)  # the pending token's K/V is in the cache now
        accepted = 0
        for i, row in enumerate(rows):
            self.kv.publish_full_blocks(seq.blocks, seq.token_ids, seq.num_computed)
            if self._accept_token(seq, row, now) or i == len(draft):
                break
            if seq.token_ids[-1] != draft[i]:
                break
            seq.num_computed += 1
            accepted += 1
        assert state.budget is not None
        state.budget.record(len(draft), accepted)
        self.metrics.spec_drafted += len(draft)
        self.metrics.spec_accepted += accepted

    def _accept_token(self, seq: Sequence, logits: np.ndarray, now: float) -> bool:
        """Sample, emit and check the end of one token; True when the request finished."""
        state: _RequestState = seq.payload
        result = state.sampler.sample(logits, seq.token_ids, seq.num_prompt_tokens)
        token = int(result.token)
        seq.token_ids.append(token)
        self.metrics.tokens_generated += 1
        if not state.first_token_at:
            state.first_token_at = now
            self.metrics.observe("ttft", now - state.arrived)
            self.metrics.observe("prefill", now - (state.scheduled_at or now))
        else:
            self.metrics.observe("itl", now - state.last_token_at)
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
        if reason is not None and not stopped:
            tail, stopped = state.stops.feed(state.detok.flush())
            emit += tail if stopped else tail + state.stops.flush()
            reason = "stop" if stopped else reason
        state.channel.put(Delta(emit, (token,), logprob))
        if reason is None and state.channel.gone:
            reason = "abort"  # the caller's event loop is closed: nobody reads on
        if reason is not None:
            self._finish(seq, reason)
        return reason is not None

    def _fail(self, seqs: list[Sequence], exc: BaseException) -> None:
        message, code = _describe(exc)
        for seq in seqs:
            if seq.status is not SeqStatus.FINISHED:
                self._finish(seq, "error", message, code)

    def _finish(
        self, seq: Sequence, reason: str, error: str | None = None, code: str | None = None
    ) -> None:
        state: _RequestState = seq.payload
        if state.draft:  # a step that failed between drafting and verifying
            del seq.token_ids[len(seq.token_ids) - len(state.draft) :]
            state.draft = []
        self.metrics.record_finish(reason, seq.num_prompt_tokens)  # before the blocks go
        self.scheduler.finish(seq)
        timings = self._timings(state)
        if state.first_token_at:
            self.metrics.observe("decode", timings.decode_ms / 1000)
        self.metrics.observe("e2e", time.perf_counter() - state.arrived)
        budget = state.budget
        usage = Usage(
            seq.num_prompt_tokens,
            seq.num_generated,
            seq.num_cached_prompt,
            budget.drafted if budget else 0,
            budget.accepted if budget else 0,
        )
        self._release(state.channel)
        state.channel.end(Delta("", (), (), reason, usage, timings, error, code))

    def _timings(self, state: _RequestState) -> Timings:
        first = state.first_token_at
        scheduled = state.scheduled_at
        return Timings(
            prompt_ms=(first - scheduled) * 1000 if first and scheduled else 0.0,
            decode_ms=max(state.last_token_at - first, 0.0) * 1000 if first else 0.0,
            ttft_ms=(first - state.arrived) * 1000 if first else 0.0,
            queue_ms=(scheduled - state.arrived) * 1000 if scheduled else 0.0,
        )

    def _release(self, channel: _Channel) -> None:
        with self._submit_lock:
            if channel in self._open:
                self._open.discard(channel)
                self._outstanding -= 1

    @staticmethod
    def _final_delta(reason: str, error: str | None, code: str | None) -> Delta:
        return Delta("", (), (), reason, Usage(0, 0, 0), Timings(0.0, 0.0, 0.0), error, code)
