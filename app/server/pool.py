"""The models a server holds: loaded on first use (pulled first if need be), unloaded least
recently used when `max_loaded` or the memory budget would be exceeded.

Names a client may use are catalog/store names and the aliases of the model given on the
command line; a client can never make the server open a path of its choosing.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmapp.app.server.errors import APIError, from_runtime
from llmapp.runtime import Engine, EngineOptions, RunnerOptions
from llmapp.runtime.core.kv_cache import CACHE_TYPES, DEFAULT_CACHE_TYPE, kv_bytes_per_token
from llmapp.runtime.errors import LlmappError, ModelNotFoundError
from llmapp.runtime.execution.models import load_config
from llmapp.runtime.files import store as model_store
from llmapp.runtime.files.gguf_file import GGUFFile

DEFAULT_CTX_CAP = 8192  # per-request context when --ctx-size is not given
LOAD_WAIT_SECONDS = 10.0  # a request waits this long for a loading model, then gets a 503


@dataclass(frozen=True)
class PoolConfig:
    default_model: str
    ctx_size: int | None = None  # tokens one request may use (None: trained, capped)
    parallel: int = 1  # the KV pool holds this many full-length sessions
    threads: int | None = None
    n_gpu_layers: int | str = 0  # --n-gpu-layers: a slot count, "auto" or "all"
    gpu_margin: int = 512 << 20  # bytes --n-gpu-layers auto leaves free on the device
    max_queue: int = 256
    max_num_seqs: int = 16
    max_loaded: int = 1
    memory_budget: int | None = None  # bytes for weights and KV of all loaded models
    kv_memory: int | None = None  # bytes of KV cache per model (instead of ctx * parallel)
    speculative_tokens: int = 0  # n-gram drafts per step (0: no speculative decoding)
    allow_pull: bool = True
    cache_type: str = DEFAULT_CACHE_TYPE  # how K/V are stored: f16, f32 or q8_0

    def __post_init__(self) -> None:
        if self.parallel < 1 or self.max_loaded < 1 or self.max_queue < 1:
            raise ValueError("--parallel, --max-loaded-models and --max-queue must be >= 1")
        if self.ctx_size is not None and self.ctx_size < 16:
            raise ValueError("--ctx-size must be at least 16 tokens")
        if self.cache_type not in CACHE_TYPES:
            raise ValueError(f"--cache-type must be one of {', '.join(CACHE_TYPES)}")


@dataclass
class LoadedModel:
    name: str
    path: Path
    engine: Engine
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    memory_bytes: int = 0
    defaults: Any = None  # the catalog's SamplingDefaults, if any

    @property
    def busy(self) -> bool:
        snap = self.engine.metrics_snapshot()
        return bool(snap["running"] or snap["waiting"])

    @property
    def size_bytes(self) -> int:
        return self.path.stat().st_size


@dataclass(frozen=True)
class Sizing:
    """How big a model will be once loaded, from the file's header alone."""

    ctx: int  # tokens one request may use
    pool_tokens: int  # tokens the KV cache holds, shared by every session
    memory_bytes: int  # weights (the file) + KV cache


def plan_sizing(path: Path, config: PoolConfig) -> Sizing:
    with GGUFFile(path) as gguf:
        cfg = load_config(gguf)
    ctx = config.ctx_size or min(int(cfg.context_length), DEFAULT_CTX_CAP)
    per_token = kv_bytes_per_token(cfg.n_layer, cfg.n_head_kv, cfg.head_dim, config.cache_type)
    pool_tokens = ctx * config.parallel
    if config.kv_memory is not None:
        pool_tokens = config.kv_memory // per_token
        if pool_tokens < ctx:
            raise APIError(
                400,
                f"--kv-memory of {config.kv_memory >> 20} MiB holds {pool_tokens} tokens, less "
                f"than one {ctx}-token context ({per_token * ctx >> 20} MiB needed)",
                code="kv_memory_too_small",
            )
    return Sizing(ctx, pool_tokens, path.stat().st_size + per_token * pool_tokens)


def offload_of(model: LoadedModel) -> Any:
    """The model's OffloadInfo when some of its layers run on a GPU, else None."""
    return getattr(getattr(model.engine, "runner", None), "offload", None)


class ModelPool:
    def __init__(self, config: PoolConfig, engine_factory: Callable[..., Engine] = Engine) -> None:
        self.config = config
        self._engine_factory = engine_factory
        self._loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Task[LoadedModel]] = {}
        self._aliases: dict[str, str] = {}  # names a client may use -> the pool's key
        self._lock = asyncio.Lock()
        self.shutting_down = False
        self._register_default(config.default_model)

    # ---- names ---------------------------------------------------------------------------

    def _register_default(self, model: str) -> None:
        """The command line's model may be a path; clients reach it by name or file stem."""
        key, display = model, model
        if Path(model).expanduser().is_file():
            key, display = str(Path(model).expanduser().absolute()), Path(model).stem
            self._aliases[Path(model).stem] = key
            self._aliases[Path(model).name] = key
        self._aliases[model] = key
        self._display = {key: display}
        self.default_key = key

    def key_for(self, name: str | None) -> str:
        if not name:
            return self.default_key
        if name in self._aliases:
            return self._aliases[name]
        # Catalog names and models already pulled; a client cannot start a pull of an
        # arbitrary hub repository or URL.
        if name in model_store.catalog():
            return name
        if model_store.is_model_name(name) and model_store.find_record(name) is not None:
            return model_store.canonical_name(name)
        raise APIError(
            404,
            f"model '{name}' is not served here; GET /v1/models lists the names",
            code="model_not_found",
            param="model",
        )

    def public_name(self, key: str) -> str:
        return self._display.get(key, key)

    # ---- loading -------------------------------------------------------------------------

    def is_loaded(self, name: str | None = None) -> bool:
        return self.key_for(name) in self._loaded

    def loaded(self) -> list[LoadedModel]:
        return list(self._loaded.values())

    async def get(self, name: str | None) -> LoadedModel:
        """The loaded model for a request's `model` field, loading it first if need be."""
        if self.shutting_down:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        key = self.key_for(name)
        model = self._loaded.get(key)
        if model is not None and model.engine.alive:
            model.last_used = time.monotonic()
            return model
        task = await self._load_task(key)
        try:
            model = await asyncio.wait_for(asyncio.shield(task), LOAD_WAIT_SECONDS)
        except TimeoutError:
            raise APIError(
                503,
                f"model '{self.public_name(key)}' is loading; retry shortly",
                code="model_loading",
                retry_after=2,
            ) from None
        model.last_used = time.monotonic()
        return model

    async def _load_task(self, key: str) -> asyncio.Task[LoadedModel]:
        async with self._lock:
            task = self._loading.get(key)
            if task is None:
                task = asyncio.create_task(self._load(key))
                self._loading[key] = task
                task.add_done_callback(lambda _t: self._loading.pop(key, None))
            return task

    def start_loading(self, name: str | None = None) -> None:
        """Begin loading (the server's default model at startup) without waiting."""
        asyncio.get_running_loop().create_task(self._load_task(self.key_for(name)))

    def load_error(self, name: str | None = None) -> str | None:
        task = self._loading.get(self.key_for(name))
        if task is not None and task.done() and task.exception() is not None:
            return str(task.exception())
        return None

    async def _load(self, key: str) -> LoadedModel:
        try:
            path = await asyncio.to_thread(self._resolve, key)
            sizing = await asyncio.to_thread(plan_sizing, path, self.config)
            await self._make_room(sizing.memory_bytes, key)
            model = await asyncio.to_thread(self._open, key, path, sizing)
        except APIError:
            raise
        except LlmappError as exc:
            raise from_runtime(exc) from None
        model.memory_bytes = sizing.memory_bytes
        self._loaded[key] = model
        split = offload_of(model)
        if split is not None:  # the layer split, as `run --verbose` prints it
            print(f"llmapp serve: {self.public_name(key)}: {split.describe()}", file=sys.stderr)
        return model

    def _resolve(self, key: str) -> Path:
        if Path(key).is_absolute():
            return Path(key)
        try:
            return model_store.resolve_model(key, pull=self.config.allow_pull)
        except ModelNotFoundError as exc:
            raise APIError(404, str(exc), code="model_not_found", param="model") from None

    def _open(self, key: str, path: Path, sizing: Sizing) -> LoadedModel:
        cfg = self.config
        options = EngineOptions(
            runner=RunnerOptions(
                ctx_size=sizing.pool_tokens,
                n_threads=cfg.threads,
                n_gpu_layers=cfg.n_gpu_layers,
                gpu_margin=cfg.gpu_margin,
                cache_type=cfg.cache_type,
            ),
            max_num_seqs=max(cfg.max_num_seqs, cfg.parallel),
            max_waiting=cfg.max_queue,
            max_model_len=sizing.ctx,
            speculative_tokens=cfg.speculative_tokens,
        )
        engine = self._engine_factory(path, options)
        entry = model_store.entry_for_path(path)
        return LoadedModel(key, path, engine, defaults=entry.defaults if entry else None)

    async def _make_room(self, needed: int, key: str) -> None:
        """Unload idle models, least recently used first, until the new one fits."""
        budget = self.config.memory_budget
        if budget is not None and needed > budget:
            raise APIError(
                400,
                f"model '{self.public_name(key)}' needs about {needed >> 20} MiB, more than "
                f"the server's memory budget of {budget >> 20} MiB",
                code="model_too_large",
            )
        while self._over_limits(needed):
            idle = sorted((m for m in self._loaded.values() if not m.busy), key=_lru)
            if not idle:
                raise APIError(
                    503,
                    "every loaded model is busy; retry when a request has finished",
                    code="models_busy",
                    retry_after=2,
                )
            await self.unload(idle[0].name)

    def _over_limits(self, needed: int) -> bool:
        if len(self._loaded) + 1 > self.config.max_loaded:
            return True
        budget = self.config.memory_budget
        used = sum(m.memory_bytes for m in self._loaded.values())
        return budget is not None and used + needed > budget

    async def unload(self, key: str) -> bool:
        model = self._loaded.pop(key, None)
        if model is None:
            return False
        await asyncio.to_thread(model.engine.shutdown)
        return True

    def begin_shutdown(self) -> None:
        """Called from the signal handler: end every engine's requests without waiting."""
        self.shutting_down = True
        for model in list(self._loaded.values()):
            threading.Thread(target=model.engine.shutdown, daemon=True).start()

    async def close(self) -> None:
        self.shutting_down = True
        for key in list(self._loaded):
            await self.unload(key)


def _lru(model: LoadedModel) -> float:
    return model.last_used


def parse_size(text: str) -> int:
    """'4GiB', '512MiB', '2G', '1500000000' -> bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    value = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = 1
    if value and value[-1] in units:
        scale, value = units[value[-1]], value[:-1]
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"not a size: {text!r} (examples: 4GiB, 512MiB)") from None
    if number <= 0:
        raise ValueError(f"a size must be positive, got {text!r}")
    return int(number * scale)


def env_api_keys() -> list[str]:
    key = os.environ.get("LLMAPP_API_KEY", "")
    return [key] if key else []
