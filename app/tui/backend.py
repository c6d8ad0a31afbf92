"""Where replies come from: the ChatBackend interface and its in-process engine implementation.

The app only talks to a ChatBackend. `EngineBackend` runs models in this process (every
conversation on a model shares its one Engine, so they batch); `RemoteBackend` (remote.py)
talks to an OpenAI-compatible server. Tests inject a scripted backend with the same face.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from llmapp.app.tui.conversation import ChatSettings
from llmapp.runtime.errors import LlmappError, ModelNotFoundError

T = TypeVar("T")

# (stage, bytes so far, total bytes); called on the event loop's thread.
PullProgress = Callable[[str, int, int], None]


class BackendError(LlmappError):
    """A reply could not be produced (server down, model failed to load, engine error)."""


class RequestRejected(BackendError):
    """The backend refused this request as it stands (e.g. the prompt does not fit the context).

    The app puts the user's text back in the input so it can be shortened.
    """


class PullCancelled(Exception):
    """A pull was cancelled by the user. Not a StoreError: store.pull must not try other sources."""


@dataclass(frozen=True)
class ReplyChunk:
    """A piece of a reply. The last one has finish_reason and, where known, the figures."""

    text: str
    n_tokens: int = 0
    finish_reason: str | None = None  # stop | length | abort | error
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    ttft_ms: float | None = None
    tokens_per_s: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class ModelChoice:
    """One row of the model picker."""

    name: str
    pulled: bool
    size: int | None = None
    quant: str = ""
    context: int | None = None
    loaded: bool = False
    description: str = ""


@dataclass(frozen=True)
class BackendStats:
    """Engine-wide figures for the status line (None where the backend cannot tell)."""

    running: int | None = None
    waiting: int | None = None
    kv_usage_percent: float | None = None
    offload: str | None = None  # the layer split when some layers run on a GPU


class Cancel:
    """A cancel switch seen by a worker thread (check) and by asyncio code (wait)."""

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._event = asyncio.Event()

    def cancel(self) -> None:
        self._flag.set()
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._flag.is_set()

    def check(self) -> None:
        if self._flag.is_set():
            raise PullCancelled("cancelled")

    async def wait(self) -> None:
        await self._event.wait()


class ChatBackend(Protocol):
    """What the app needs from a source of replies."""

    label: str  # shown in the status line: "in-process" or the server URL

    async def load(
        self, model: str, progress: PullProgress | None = None, cancel: Cancel | None = None
    ) -> None:
        """Make `model` ready: pull, load, or reach the server (LlmappError, PullCancelled)."""
        ...

    def stream(
        self, model: str, messages: list[dict[str, str]], settings: ChatSettings
    ) -> AsyncGenerator[ReplyChunk, None]:
        """The reply, chunk by chunk. Closing the iterator early aborts the request.

        Raises RequestRejected before the first chunk for a request that cannot be served.
        """
        ...

    async def default_model(self) -> str:
        """The model to open when none is named and none was used before."""
        ...

    async def models(self) -> list[ModelChoice]: ...

    async def pull(self, model: str, progress: PullProgress, cancel: Cancel) -> None: ...

    def is_ready(self, model: str) -> bool: ...

    def stats(self, model: str) -> BackendStats: ...

    async def close(self) -> None: ...


async def in_thread(fn: Callable[[], T], name: str, cancel: Cancel | None = None) -> T:
    """Run blocking `fn` in a daemon thread and await it.

    Not asyncio.to_thread: the default executor is joined at exit, so a pull stuck in pip would
    hold the app open after ctrl+q. With `cancel`, the wait ends as soon as it is cancelled and
    the thread is left to notice on its own (raising PullCancelled) and clean up.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    def main() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting task, never lost in the thread
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(settle, future.set_exception, exc)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, future.set_result, result)

    threading.Thread(target=main, name=name, daemon=True).start()
    if cancel is None:
        return await future
    waiter: asyncio.Future[Any] = asyncio.ensure_future(cancel.wait())
    try:
        await asyncio.wait({future, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if not future.done():
        future.cancel()
        raise PullCancelled("cancelled")
    return future.result()


def thread_safe(progress: PullProgress | None, cancel: Cancel | None) -> Callable[..., None]:
    """A store.pull progress callback for the pull thread: hops to the loop, honours cancel."""
    loop = asyncio.get_running_loop()

    def report(stage: str, done: int, total: int) -> None:
        if cancel is not None:
            cancel.check()
        if progress is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(progress, stage, done, total)

    return report


async def pull_model(name: str, progress: PullProgress | None, cancel: Cancel | None) -> Path:
    """store.pull in a thread, with progress on the loop and cancellation."""
    from llmapp.runtime.files import store

    report = thread_safe(progress, cancel)
    return await in_thread(lambda: store.pull(name, progress=report), f"pull {name}", cancel)


def _needs_pull(model: str) -> bool:
    from llmapp.runtime.files import store

    try:
        store.resolve_model(model, pull=False)
    except ModelNotFoundError:
        # Catalog names, hub references and URLs can be pulled; other names fail later
        # with the store's own message.
        return store.is_model_name(model)
    return False


def _context_length(path: Path) -> int | None:
    from llmapp.runtime.files.gguf_file import GGUFFile

    try:
        with GGUFFile(path) as gguf:
            arch = gguf.get("general.architecture")
            value = gguf.get(f"{arch}.context_length")
    except (LlmappError, OSError):
        return None
    return int(value) if isinstance(value, int) else None


class EngineBackend:
    """Models run in this process. One Engine per model, shared by every conversation on it.

    Loading a model unloads the engines that have nothing in flight, so at rest one model (one
    compute thread) holds the cores; a model still generating stays until it is idle.
    """

    label = "in-process"

    def __init__(
        self,
        ctx_size: int = 4096,
        n_threads: int | None = None,
        engines: dict[str, Any] | None = None,
        speculative_tokens: int = 0,
        n_gpu_layers: int | str = 0,
        gpu_margin: int = 512 << 20,
        cache_type: str = "f16",
    ) -> None:
        """engines: already loaded Engines by model name (borrowed: close() leaves them up)."""
        self.ctx_size = ctx_size
        self.n_gpu_layers = n_gpu_layers
        self.gpu_margin = gpu_margin
        self.cache_type = cache_type
        self.n_threads = n_threads
        self.speculative_tokens = speculative_tokens
        self._engines: dict[str, Any] = dict(engines or {})
        self._borrowed = set(self._engines)
        self._loads: dict[str, asyncio.Task[Any]] = {}
        self._active: dict[str, int] = {}  # model -> requests in flight

    def is_ready(self, model: str) -> bool:
        engine = self._engines.get(model)
        # An engine whose compute thread died answers every request with an error: load anew.
        return engine is not None and getattr(engine, "alive", True)

    async def load(
        self, model: str, progress: PullProgress | None = None, cancel: Cancel | None = None
    ) -> None:
        if self.is_ready(model):
            return
        if model in self._engines and model not in self._borrowed:
            self._engines.pop(model).shutdown()
        task = self._loads.get(model)
        if task is None:
            task = asyncio.ensure_future(self._load(model, progress, cancel))
            self._loads[model] = task
            task.add_done_callback(lambda _: self._loads.pop(model, None))
        # shield: one caller giving up (its worker cancelled) must not stop the others' load.
        await asyncio.shield(task)

    async def _load(self, model: str, progress: PullProgress | None, cancel: Cancel | None) -> None:
        from llmapp.runtime.files import store

        if await in_thread(lambda: _needs_pull(model), "resolve"):
            await pull_model(model, progress, cancel)
        path = await in_thread(lambda: store.resolve_model(model, pull=False), "resolve")
        engine = await in_thread(lambda: self._open(path), f"load {model}")
        self._engines[model] = engine
        self._unload_idle(keep=model)

    def _open(self, path: Path) -> Any:
        from llmapp.runtime import Engine, EngineOptions, RunnerOptions

        runner = RunnerOptions(
            ctx_size=self.ctx_size,
            n_threads=self.n_threads,
            n_gpu_layers=self.n_gpu_layers,
            gpu_margin=self.gpu_margin,
            cache_type=self.cache_type,
        )
        return Engine(
            path, EngineOptions(runner=runner, speculative_tokens=self.speculative_tokens)
        )

    def _unload_idle(self, keep: str) -> None:
        for name in list(self._engines):
            if name != keep and not self._active.get(name) and name not in self._borrowed:
                self._engines.pop(name).shutdown()

    async def stream(
        self, model: str, messages: list[dict[str, str]], settings: ChatSettings
    ) -> AsyncGenerator[ReplyChunk, None]:
        from llmapp.runtime import RequestError

        engine = self._engines.get(model)
        if engine is None:
            raise BackendError(f"{model} is not loaded")
        try:
            request = await engine.stream(messages, settings.sampling_params())
        except RequestError as exc:
            raise RequestRejected(str(exc)) from None
        except LlmappError as exc:  # a template that fails to render, a bad parameter
            raise RequestRejected(str(exc)) from None
        self._active[model] = self._active.get(model, 0) + 1
        try:
            async for delta in request:
                yield _chunk_from_delta(delta)
        finally:
            self._active[model] -= 1

    async def default_model(self) -> str:
        from llmapp.runtime.files import store

        return store.default_model_name()

    async def models(self) -> list[ModelChoice]:
        return await in_thread(self._list_models, "models")

    def _list_models(self) -> list[ModelChoice]:
        from llmapp.runtime.files import store

        choices = []
        for info in store.list_models(include_all=True):
            choices.append(
                ModelChoice(
                    name=info.name,
                    pulled=info.pulled,
                    size=info.size,
                    quant=info.quant,
                    context=_context_length(info.path) if info.pulled else None,
                    loaded=info.name in self._engines,
                    description=info.description,
                )
            )
        known = {c.name for c in choices}
        for name in self._engines:  # a model opened by path is no catalog entry
            if name not in known:
                choices.append(ModelChoice(name=name, pulled=True, loaded=True))
        return choices

    async def pull(self, model: str, progress: PullProgress, cancel: Cancel) -> None:
        await pull_model(model, progress, cancel)

    def stats(self, model: str) -> BackendStats:
        engine = self._engines.get(model)
        if engine is None:
            return BackendStats()
        snap = engine.metrics_snapshot()
        split = getattr(getattr(engine, "runner", None), "offload", None)
        offload = f"{split.layers}/{split.of} layers on {split.device}" if split else None
        return BackendStats(snap["running"], snap["waiting"], snap["kv_usage_percent"], offload)

    def describe_load(self, model: str) -> str | None:
        """The offload split of a loaded model, as `run --verbose` prints it (None: all CPU)."""
        engine = self._engines.get(model)
        split = getattr(getattr(engine, "runner", None), "offload", None)
        return str(split.describe()) if split is not None else None

    async def close(self) -> None:
        for task in list(self._loads.values()):
            task.cancel()
        for name, engine in list(self._engines.items()):
            if name not in self._borrowed:
                # shutdown() ends every request still in flight with finish_reason 'abort'.
                await in_thread(engine.shutdown, f"shutdown {name}")
        self._engines.clear()


def _chunk_from_delta(delta: Any) -> ReplyChunk:
    usage, timings = delta.usage, delta.timings
    if delta.finish_reason is None or usage is None:
        return ReplyChunk(delta.text, len(delta.token_ids))
    tps = timings.tps(usage)[1] if timings is not None else None
    return ReplyChunk(
        delta.text,
        len(delta.token_ids),
        finish_reason=delta.finish_reason,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        cached_tokens=usage.cached_tokens,
        ttft_ms=timings.ttft_ms if timings is not None else None,
        tokens_per_s=tps,
        error=delta.error,
    )
