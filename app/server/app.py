"""The FastAPI application: routes, API keys, CORS, and the model pool's lifetime."""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from llmapp.app.server import completions
from llmapp.app.server.errors import APIError, install_error_handlers
from llmapp.app.server.metrics import metrics_text
from llmapp.app.server.pool import ModelPool, PoolConfig, offload_of
from llmapp.app.server.schemas import DetokenizeRequest, StopRequest, TokenizeRequest
from llmapp.runtime.files import store as model_store
from llmapp.runtime.text.tokenizer import Tokenizer

# Reachable without a key: what load balancers and editors probe before they have one.
OPEN_PATHS = ("/health", "/v1/health", "/v1/models", "/models")
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
MAX_BODY_BYTES = 32 << 20


@dataclass(frozen=True)
class ServerConfig:
    pool: PoolConfig
    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    loopback_only: bool = True  # refuse Host headers that are not loopback (DNS rebinding)
    extra: dict[str, Any] = field(default_factory=dict)


def create_app(config: ServerConfig, pool: ModelPool | None = None) -> FastAPI:
    pool = pool or ModelPool(config.pool)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool.start_loading()
        yield
        await pool.close()

    app = FastAPI(title="llmapp", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.pool = pool
    app.state.started = int(time.time())
    install_error_handlers(app)
    app.include_router(completions.router)
    app.include_router(_info_router())
    _install_middleware(app, config)
    return app


def _install_middleware(app: FastAPI, config: ServerConfig) -> None:
    app.add_middleware(Guard, keys=[k.encode() for k in config.api_keys])
    # Added after the guard, so it runs first: CORS preflights are answered without a key.
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.cors_origins),
            allow_methods=["*"],
            allow_headers=["*"],  # openai-python sends X-Stainless-* headers
            expose_headers=["x-request-id"],
        )
    if config.loopback_only:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_HOSTS)


class Guard:
    """API keys and the body size limit, as plain ASGI: a wrapper that buffered responses
    would hide a client's disconnect from the streaming routes."""

    def __init__(self, app: ASGIApp, keys: list[bytes]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            request = Request(scope)
            problem = self._check(request)
            if problem is not None:
                await problem.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, request: Request) -> APIError | None:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            return APIError(413, f"the body is over {MAX_BODY_BYTES >> 20} MiB")
        if not self.keys or request.method == "OPTIONS" or _is_open(request.url.path):
            return None
        if _key_ok(request, self.keys):
            return None
        return APIError(401, "invalid or missing API key", code="invalid_api_key")


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(("/v1/models/", "/models/"))


def _key_ok(request: Request, keys: list[bytes]) -> bool:
    auth = request.headers.get("authorization", "")
    bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    candidates = [c for c in (bearer, request.headers.get("x-api-key", "")) if c]
    return any(hmac.compare_digest(c.encode(), k) for c in candidates for k in keys)


def _info_router() -> APIRouter:
    router = APIRouter()
    routes: list[tuple[str, Callable[..., Any], list[str]]] = [
        ("/health", health, ["GET"]),
        ("/v1/health", health, ["GET"]),
        ("/v1/models", list_models, ["GET"]),
        ("/models", list_models, ["GET"]),
        ("/v1/models/{model_id:path}", get_model, ["GET"]),
        ("/models/{model_id:path}", get_model, ["GET"]),
        ("/tokenize", tokenize, ["POST"]),
        ("/v1/tokenize", tokenize, ["POST"]),
        ("/detokenize", detokenize, ["POST"]),
        ("/v1/detokenize", detokenize, ["POST"]),
        ("/metrics", metrics, ["GET"]),
        ("/v1/metrics", metrics, ["GET"]),
        ("/api/ps", ps, ["GET"]),
        ("/api/stop", stop, ["POST"]),
    ]
    for path, endpoint, methods in routes:
        router.add_api_route(path, endpoint, methods=methods)
    return router


async def health(request: Request) -> Any:
    pool: ModelPool = request.app.state.pool
    if pool.shutting_down:
        return APIError(503, "the server is shutting down", code="shutting_down").response()
    if pool.is_loaded():
        return {"status": "ok"}
    error = pool.load_error()
    if error is not None:
        return APIError(503, f"the model failed to load: {error}", code="load_failed").response()
    return APIError(503, "the model is loading", code="model_loading", retry_after=1).response()


def _model_json(pool: ModelPool, key: str, created: int) -> dict[str, Any]:
    loaded = next((m for m in pool.loaded() if m.name == key), None)
    entry = model_store.catalog().get(key)
    out: dict[str, Any] = {
        "id": pool.public_name(key),
        "object": "model",
        "created": created,
        "owned_by": "llmapp",
        "loaded": loaded is not None,
    }
    if loaded is not None:
        out["context_length"] = loaded.engine.max_model_len
    if entry is not None:
        out["quantization"] = entry.quant
    return out


async def list_models(request: Request) -> Any:
    pool: ModelPool = request.app.state.pool
    created = request.app.state.started
    keys = [pool.default_key]
    keys += [m.name for m in pool.loaded() if m.name not in keys]
    keys += [info.name for info in model_store.list_models() if info.name not in keys]
    return {"object": "list", "data": [_model_json(pool, k, created) for k in keys]}


async def get_model(model_id: str, request: Request) -> Any:
    pool: ModelPool = request.app.state.pool
    return _model_json(pool, pool.key_for(model_id), request.app.state.started)


async def tokenize(body: TokenizeRequest, request: Request) -> Any:
    model = await request.app.state.pool.get(body.model)
    tok: Tokenizer = model.engine.tokenizer
    ids = tok.encode(body.content, add_bos=body.add_special, parse_special=body.add_special)
    if not body.with_pieces:
        return {"tokens": ids}
    return {"tokens": [{"id": t, "piece": _piece(tok, t)} for t in ids]}


def _piece(tok: Tokenizer, token: int) -> str | list[int]:
    """A token's text, or its bytes where they are not valid UTF-8 on their own."""
    data = tok.token_bytes(token)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)


async def detokenize(body: DetokenizeRequest, request: Request) -> Any:
    model = await request.app.state.pool.get(body.model)
    tok: Tokenizer = model.engine.tokenizer
    bad = [t for t in body.tokens if not 0 <= t < tok.n_vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary", param="tokens")
    return {"content": tok.decode(body.tokens)}


async def metrics(request: Request) -> Response:
    text, content_type = metrics_text(request.app.state.pool)
    return Response(text, media_type=content_type)


async def ps(request: Request) -> Any:
    pool: ModelPool = request.app.state.pool
    rows = []
    for m in pool.loaded():
        snap = m.engine.metrics_snapshot()
        rows.append({
            "name": pool.public_name(m.name),
            "path": str(m.path),
            "size_bytes": m.size_bytes,
            "memory_bytes": m.memory_bytes,
            "ctx_size": m.engine.max_model_len,
            "sessions_running": snap["running"],
            "sessions_waiting": snap["waiting"],
            "loaded_at": m.loaded_at,
            "offload": split.as_dict() if (split := offload_of(m)) is not None else None,
        })  # fmt: skip
    return {"models": rows}


async def stop(body: StopRequest, request: Request) -> Any:
    pool: ModelPool = request.app.state.pool
    key = pool.key_for(body.model)
    stopped = await pool.unload(key)
    return JSONResponse({"model": body.model, "stopped": stopped})
