"""The Ray Serve side of `llmapp serve --ray`: request router, engine replica, ingress, launcher.

Imported only when Ray is installed; the parts that need no Ray are in cluster.py.

Facts this relies on (ray/serve in Ray 2.60): a deployment's `request_router_config` names a
RequestRouter subclass that runs inside every caller's handle, here the ingress; its
`choose_replicas` sees the call's arguments (so the prefix keys the ingress computed), and
`on_request_completed` is called once for every request sent. A replica's
`record_routing_stats()` is polled by the controller every `request_routing_stats_period_s` and
reaches the routers as `RunningReplica.routing_stats`: that is how the ingress learns each
replica's engine metrics without calling replicas one by one. An ingress class without an app
builds it in `__serve_build_asgi_app__`, after its constructor has its handles. Serve's proxy
streams the request body to the ingress only on demand, so the body (and the prompt) is known
in the ingress, not in the proxy: routing by prompt needs the ingress hop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import ray
from fastapi import FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError

from llmapp.app.server.app import ServerConfig, _install_middleware, create_app
from llmapp.app.server.cluster import (
    BLOCK_SIZE,
    ClusterConfig,
    Forwarded,
    ModelView,
    RoutePolicy,
    cluster_metrics_text,
    deployment_name,
    json_object,
    prefix_keys,
    router_for,
    routing_ids,
)
from llmapp.app.server.errors import APIError, install_error_handlers
from llmapp.app.server.pool import ModelPool, PoolConfig
from llmapp.app.server.replies import KEEPALIVE_SECONDS, sse
from llmapp.runtime.errors import LlmappError
from llmapp.runtime.files import store as model_store

log = logging.getLogger("llmapp.cluster")

# A stream that sends nothing, not even its keep-alive comments, for this long is dead.
STREAM_IDLE_SECONDS = 4 * KEEPALIVE_SECONDS
# Headers the ingress does not pass on: Serve's proxy adds its own x-request-id, and a relayed
# stream has no length.
_DROPPED_HEADERS = (b"x-request-id", b"content-length", b"transfer-encoding")

# ---- the engine replica -------------------------------------------------------------------


class EngineReplica:
    """One engine behind the single-machine app: requests are answered by the very routes
    `llmapp serve` runs, driven over ASGI in this process."""

    async def __init__(self, pool_config: PoolConfig) -> None:  # type: ignore[misc]
        self.replica_id = serve.get_replica_context().replica_tag
        self.pool = ModelPool(pool_config)
        self.app = create_app(ServerConfig(pool=pool_config, loopback_only=False), self.pool)
        # Ready only once the model is loaded, so no request waits behind a load.
        while True:
            try:
                await self.pool.get(None)
                return
            except APIError as exc:
                if exc.code != "model_loading":
                    raise LlmappError(exc.message) from None

    async def forward(self, request: Forwarded) -> AsyncIterator[Any]:
        """The response to one request: a head (replica, status, headers), then body bytes."""
        async for item in run_asgi(self.app, request, self.replica_id):
            yield item

    async def ping(self) -> str:
        return str(self.replica_id)

    def record_routing_stats(self) -> dict[str, Any]:
        models = []
        for m in self.pool.loaded():
            models.append({
                "name": self.pool.public_name(m.name),
                "snapshot": m.engine.metrics_snapshot(),
                "context_length": m.engine.max_model_len,
                "path": str(m.path),
                "size_bytes": m.size_bytes,
                "memory_bytes": m.memory_bytes,
                "loaded_at": m.loaded_at,
            })  # fmt: skip
        return {"pid": os.getpid(), "node": socket.gethostname(), "models": models}

    def check_health(self) -> None:
        """An engine whose compute thread died fails the check: Serve replaces the replica."""
        if self.pool.shutting_down:
            return
        for m in self.pool.loaded():
            if not m.engine.alive:
                raise RuntimeError(f"the engine of {m.name} has stopped")

    def __del__(self) -> None:
        # Serve calls this when it stops the replica, after its graceful wait: streams still
        # open then end with an error event rather than a cut connection.
        pool = getattr(self, "pool", None)
        if pool is not None:
            pool.begin_shutdown()


async def run_asgi(app: Any, request: Forwarded, replica: str) -> AsyncIterator[Any]:
    """Drive an ASGI app with one request; yields the head, then body bytes as they come.

    Leaving early (the ingress cancelled: its client went away) tells the app its client
    disconnected, which aborts the engine's requests; an app still running seconds later is
    cancelled.
    """
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    gone = asyncio.Event()
    body_given = False

    async def receive() -> dict[str, Any]:
        nonlocal body_given
        if not body_given:
            body_given = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await messages.put(message)

    task = asyncio.ensure_future(app(_scope(request), receive, send))
    finished = False
    try:
        start = await _next_message(messages, task)
        if start is None or start.get("type") != "http.response.start":
            raise RuntimeError("the app ended without a response")
        yield {"replica": replica, "status": start["status"], "headers": start.get("headers", [])}
        more = True
        while more:
            message = await _next_message(messages, task)
            if message is None:
                break
            chunks, more = [message.get("body", b"")], message.get("more_body", False)
            while more and not messages.empty():  # one item per burst, not per event
                message = messages.get_nowait()
                chunks.append(message.get("body", b""))
                more = message.get("more_body", False)
            data = b"".join(chunks)
            if data:
                yield data
        finished = True
    finally:
        # The app sees the client gone and aborts its engine requests itself (a whole reply
        # polls for the disconnect; cancelling its route would leave its reader running).
        gone.set()
        if not task.done():
            await asyncio.wait({task}, timeout=5 if finished else 2)
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _scope(request: Forwarded) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": request.path,
        "raw_path": request.path.encode(),
        "query_string": request.query_string,
        "root_path": "",
        "headers": request.headers,
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 80),
    }


async def _next_message(
    messages: asyncio.Queue[dict[str, Any]], task: asyncio.Future[Any]
) -> dict[str, Any] | None:
    """The app's next message; None once it has ended (re-raising what it failed with)."""
    if not messages.empty():
        return messages.get_nowait()
    getter = asyncio.ensure_future(messages.get())
    try:
        await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not getter.done():
            getter.cancel()
    if getter.done() and not getter.cancelled():
        return getter.result()
    if not messages.empty():
        return messages.get_nowait()
    task.result()
    return None


# ---- the ingress --------------------------------------------------------------------------


class Ingress:
    """The cluster's one HTTP face: the single server's middleware (keys, CORS, Host check),
    models, health and metrics answered here; everything that needs an engine forwarded."""

    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self, config: ClusterConfig, engines: dict[str, Any]
    ) -> None:
        self.config = config
        self.names = ModelPool(config.server.pool)  # names only: this pool never loads
        self.engines = engines  # pool key -> handle of that model's replicas
        self._streaming = {key: handle.options(stream=True) for key, handle in engines.items()}
        self.started = int(time.time())
        self._text: dict[str, tuple[Any, Any] | None] = {}
        self._text_lock = threading.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        if config.min_replicas > 0:
            # The first call creates the handle's router, so /metrics and /health see the
            # replicas before any client request; it also loads the tokenizer.
            self._tasks = [asyncio.create_task(self._warm_up(k)) for k in engines]

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_ingress_app(self)

    async def _warm_up(self, key: str) -> None:
        await asyncio.to_thread(self._text_for, key)
        try:
            await self.engines[key].ping.remote()
        except Exception as exc:  # the replicas' own failures show in the deployment status
            log.warning("warm-up call to %s failed: %s", key, exc)

    # ---- names and views --------------------------------------------------------------

    def model_key(self, name: Any) -> str:
        if not isinstance(name, str) or not name:
            return self.names.default_key
        key = self.names.key_for(name)
        if key not in self.engines:
            raise APIError(
                404,
                f"model '{name}' is not served by this cluster; GET /v1/models lists the names",
                code="model_not_found",
                param="model",
            )
        return key

    def view(self, key: str) -> ModelView:
        router = router_for(deployment_name(self.names.public_name(key)))
        view = ModelView(self.names.public_name(key))
        if router is not None:
            view.replicas, view.routes = router.view()
        return view

    def _text_for(self, key: str) -> tuple[Any, Any] | None:
        """The model's tokenizer and chat template, read once from its file on this node."""
        with self._text_lock:
            if key not in self._text:
                self._text[key] = _load_text(key, self.config.server.pool.allow_pull)
            return self._text[key]

    def prefix_keys_for(self, key: str, fields: dict[str, Any]) -> tuple[bytes, ...]:
        text = self._text_for(key)
        if text is None:
            return ()
        blocks = self.config.prefix_blocks
        try:
            ids = routing_ids(fields, text[0], text[1], blocks * BLOCK_SIZE)
        except Exception:  # a body the replica will refuse: nothing to route by
            return ()
        return prefix_keys(ids, blocks)

    # ---- forwarding -------------------------------------------------------------------

    async def forward(self, request: Request, keyed: bool) -> Response:
        body = await request.body()
        fields = json_object(body)
        key = self.model_key(fields.get("model"))
        keys = await asyncio.to_thread(self.prefix_keys_for, key, fields) if keyed else None
        forwarded = Forwarded(
            request.method,
            request.url.path,
            request.scope.get("query_string", b""),
            list(request.scope["headers"]),
            body,
            keys,
        )
        stream = None
        try:
            stream = self._streaming[key].forward.remote(forwarded)
            head = await stream.__anext__()
        except BackPressureError:
            _cancel(stream)
            raise APIError(503, "every replica's queue is full; retry shortly",
                           code="queue_full", retry_after=1) from None  # fmt: skip
        except Exception as exc:
            _cancel(stream)
            log.warning("replica failed before answering: %s", exc)
            raise APIError(503, f"the replica failed before answering ({_reason(exc)})",
                           code="replica_failed", retry_after=1) from None  # fmt: skip
        headers = [(k, v) for k, v in head["headers"] if k.lower() not in _DROPPED_HEADERS]
        headers.append((b"x-llmapp-replica", str(head["replica"]).encode()))
        if _is_event_stream(headers):
            response: Response = StreamingResponse(
                _relay(stream, str(head["replica"])), status_code=head["status"]
            )
        else:
            content = await _collect(request, stream)
            response = Response(content, status_code=head["status"])
            headers.append((b"content-length", str(len(content)).encode()))
        response.raw_headers = headers
        return response


def _load_text(key: str, allow_pull: bool) -> tuple[Any, Any] | None:
    from llmapp.runtime.files.gguf_file import GGUFFile
    from llmapp.runtime.text.chat_template import ChatTemplate
    from llmapp.runtime.text.tokenizer import Tokenizer

    try:
        path = Path(key) if Path(key).is_absolute() else model_store.resolve_model(key, allow_pull)
        entry = model_store.entry_for_path(path)
        with GGUFFile(path) as gguf:
            tokenizer = Tokenizer.from_gguf(gguf, extra_eog=entry.eog_tokens if entry else ())
            template = ChatTemplate.from_gguf(gguf, entry.chat_template if entry else None)
    except Exception as exc:  # routing falls back to load alone; replicas report real errors
        log.warning("no tokenizer for %s on the ingress node (%s): routing by load only", key, exc)
        return None
    return tokenizer, template


def _cancel(stream: Any) -> None:
    if stream is not None:
        stream.cancel()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _is_event_stream(headers: list[tuple[bytes, bytes]]) -> bool:
    return any(
        k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in headers
    )


async def _relay(stream: Any, replica: str) -> AsyncIterator[bytes]:
    """A replica's SSE bytes; if it dies (or goes silent) the client gets one error event."""
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(stream.__anext__(), STREAM_IDLE_SECONDS)
            except StopAsyncIteration:
                return
            yield chunk
    except Exception as exc:
        log.warning("replica %s failed mid-stream: %s", replica, exc)
        problem = APIError(
            503,
            f"replica {replica} stopped while answering ({_reason(exc)}); retry the request",
            code="replica_failed",
        )
        yield sse(problem.body())
    finally:
        stream.cancel()


async def _collect(request: Request, stream: Any) -> bytes:
    """A whole (non-streamed) body; a client that hangs up cancels the replica's work."""
    chunks: list[bytes] = []

    async def read() -> None:
        async for chunk in stream:
            chunks.append(chunk)

    reader = asyncio.ensure_future(read())
    try:
        while not reader.done():
            done, _ = await asyncio.wait({reader}, timeout=0.25)
            if not done and await request.is_disconnected():
                reader.cancel()
                raise APIError(499, "the client went away")
        reader.result()
    except APIError:
        raise
    except Exception as exc:
        log.warning("replica failed while answering: %s", exc)
        raise APIError(503, f"the replica failed while answering ({_reason(exc)})",
                       code="replica_failed", retry_after=1) from None  # fmt: skip
    finally:
        stream.cancel()
    return b"".join(chunks)


def build_ingress_app(ingress: Ingress) -> FastAPI:
    app = FastAPI(title="llmapp", docs_url=None, redoc_url=None)
    install_error_handlers(app)

    def forwarding(keyed: bool) -> Callable[[Request], Awaitable[Response]]:
        async def route(request: Request) -> Response:
            return await ingress.forward(request, keyed)

        return route

    for path in ("/v1/chat/completions", "/chat/completions", "/v1/completions", "/completions"):
        app.add_api_route(path, forwarding(True), methods=["POST"])
    for path in ("/tokenize", "/v1/tokenize", "/detokenize", "/v1/detokenize"):
        app.add_api_route(path, forwarding(False), methods=["POST"])
    info = _InfoRoutes(ingress)
    routes: list[tuple[str, Callable[..., Any], str]] = [
        ("/health", info.health, "GET"),
        ("/v1/health", info.health, "GET"),
        ("/v1/models", info.models, "GET"),
        ("/models", info.models, "GET"),
        ("/v1/models/{model_id:path}", info.model, "GET"),
        ("/models/{model_id:path}", info.model, "GET"),
        ("/metrics", info.metrics, "GET"),
        ("/v1/metrics", info.metrics, "GET"),
        ("/api/ps", info.ps, "GET"),
        ("/api/stop", info.stop, "POST"),
    ]
    for path, endpoint, method in routes:
        app.add_api_route(path, endpoint, methods=[method])
    _install_middleware(app, ingress.config.server)
    return app


class _InfoRoutes:
    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress

    def _model_json(self, key: str) -> dict[str, Any]:
        view = self.ingress.view(key)
        out: dict[str, Any] = {
            "id": view.model_name,
            "object": "model",
            "created": self.ingress.started,
            "owned_by": "llmapp",
            "loaded": bool(view.replicas),
            "replicas": len(view.replicas),
        }
        for stats in view.replicas.values():
            for model in stats.get("models", ()):
                out["context_length"] = model["context_length"]
        entry = model_store.catalog().get(key)
        if entry is not None:
            out["quantization"] = entry.quant
        return out

    async def models(self) -> Any:
        return {"object": "list", "data": [self._model_json(k) for k in self.ingress.engines]}

    async def model(self, model_id: str) -> Any:
        return self._model_json(self.ingress.model_key(model_id))

    async def health(self) -> Any:
        counts = {self.ingress.names.public_name(k): len(self.ingress.view(k).replicas)
                  for k in self.ingress.engines}  # fmt: skip
        if all(counts.values()) or self.ingress.config.min_replicas == 0:
            return {"status": "ok", "replicas": counts}
        waiting = ", ".join(name for name, n in counts.items() if not n)
        return APIError(503, f"no replica of {waiting} is running yet", code="model_loading",
                        retry_after=1).response()  # fmt: skip

    async def metrics(self) -> Response:
        views = [self.ingress.view(k) for k in self.ingress.engines]
        text, content_type = cluster_metrics_text(views)
        return Response(text, media_type=content_type)

    async def ps(self) -> Any:
        rows = []
        for key in self.ingress.engines:
            for replica, stats in sorted(self.ingress.view(key).replicas.items()):
                for m in stats.get("models", ()):
                    snap = m["snapshot"]
                    rows.append({
                        "name": m["name"],
                        "replica": replica,
                        "node": stats.get("node"),
                        "pid": stats.get("pid"),
                        "path": m["path"],
                        "size_bytes": m["size_bytes"],
                        "memory_bytes": m["memory_bytes"],
                        "ctx_size": m["context_length"],
                        "sessions_running": snap["running"],
                        "sessions_waiting": snap["waiting"],
                        "loaded_at": m["loaded_at"],
                    })  # fmt: skip
        return {"models": rows}

    async def stop(self) -> Any:
        raise APIError(
            400,
            "models of a --ray deployment stay loaded on their replicas; stop `llmapp serve "
            "--ray` itself to unload them",
        )


# ---- building and running -----------------------------------------------------------------


def build_app(config: ClusterConfig) -> Any:
    """The Serve application: one deployment of engine replicas per model, and the ingress."""
    pool = config.server.pool
    names = ModelPool(pool)
    key = names.default_key
    name = deployment_name(names.public_name(key))
    replica_pool = dataclasses.replace(
        pool, max_loaded=1, threads=pool.threads or max(1, int(config.replica_cpus))
    )
    router = {
        "request_router_class": "llmapp.app.server.cluster_router.PrefixRouter",
        "request_router_kwargs": {
            "deployment": name,
            "routing": config.routing,
            "policy": dataclasses.asdict(RoutePolicy.for_capacity(config.capacity)),
        },
        "request_routing_stats_period_s": config.stats_period_s,
    }
    engine = _deployment(EngineReplica).options(
        name=name,
        ray_actor_options={"num_cpus": config.replica_cpus},
        # Enough to keep a full batch and a short queue inside each engine; the rest wait in
        # the ingress's handle, where the autoscaler counts them.
        max_ongoing_requests=2 * config.capacity,
        max_queued_requests=pool.max_queue,
        health_check_period_s=5,
        graceful_shutdown_timeout_s=5,
        max_constructor_retry_count=3,
        request_router_config=router,
        **_scaling(config),
    )
    # Wrapped here, not where it is defined: the class stays importable by name, so its methods
    # see this module's router registry instead of a pickled copy of it.
    ingress = _deployment(serve.ingress()(Ingress)).options(
        name="ingress",
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=max(1024, 2 * pool.max_queue),
    )
    return ingress.bind(config, {key: engine.bind(replica_pool)})


def _deployment(cls: type) -> Any:
    # serve.deployment(cls) returns a Deployment; Ray's annotation only covers the decorator
    # form called with options.
    deploy: Any = serve.deployment
    return deploy(cls)


def _scaling(config: ClusterConfig) -> dict[str, Any]:
    if config.autoscale is None:
        return {"num_replicas": config.replicas}
    low, high = config.autoscale
    return {
        "autoscaling_config": {
            "min_replicas": low,
            "max_replicas": high,
            "initial_replicas": max(low, 1),
            # Half a full batch in flight per replica: the batch still has room when the
            # next replica is asked for, and a replica takes seconds to load its model.
            "target_ongoing_requests": max(1, config.capacity // 2),
            "upscale_delay_s": 10.0,
            "downscale_delay_s": 120.0,
        }
    }


def _connect(config: ClusterConfig) -> bool:
    """Join the cluster at config.address, or start a local one; True if we started it."""
    if config.address is not None:
        ray.init(address=config.address, log_to_driver=False, logging_level=logging.WARNING)
        return False
    cores = os.cpu_count() or 1
    needed = math.ceil(config.max_replicas * config.replica_cpus)
    if needed > cores:
        print(
            f"llmapp serve: note: {config.max_replicas} replicas x {config.replica_cpus} CPUs "
            f"on {cores} cores: the replicas share the cores",
            file=sys.stderr,
        )
    ray.init(
        num_cpus=max(cores, needed),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        logging_level=logging.WARNING,
    )
    return True


def _check_model(config: ClusterConfig) -> None:
    """Find (or pull) the model here first: a wrong name is one line, not a failed deployment
    after Ray has started. This node hosts the ingress, which reads the tokenizer from it."""
    pool = config.server.pool
    key = ModelPool(pool).default_key
    if not Path(key).is_absolute():
        model_store.resolve_model(key, pull=pool.allow_pull)


def run(config: ClusterConfig) -> int:
    _check_model(config)
    started_ray = _connect(config)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    try:
        serve.start(
            proxy_location="HeadOnly", http_options={"host": config.host, "port": config.port}
        )
        shown = f"[{config.host}]" if ":" in config.host else config.host
        pool = config.server.pool
        replicas = (f"{config.replicas} replica{'s' if config.replicas > 1 else ''}"
                    if config.autoscale is None
                    else "{}-{} replicas".format(*config.autoscale))  # fmt: skip
        print(
            f"llmapp serve: http://{shown}:{config.port}/v1 (model {pool.default_model}, "
            f"{replicas} on Ray Serve)",
            flush=True,
        )
        try:
            serve.run(build_app(config), name=config.app_name, route_prefix="/")
        except RuntimeError as exc:
            cause = _failure(config) or _reason(exc)
            raise LlmappError(f"the deployment failed: {cause}") from None
        print("llmapp serve: ready", file=sys.stderr, flush=True)
        _wait_for_stop()
    except KeyboardInterrupt:
        pass
    finally:
        _teardown(config, started_ray)
    return 0


def _failure(config: ClusterConfig) -> str | None:
    """Why Serve gave up on the deployment: the last line of the first failed replica's
    error (its constructor's exception), as Serve's status reports it."""
    try:
        app = serve.status().applications.get(config.app_name)
    except Exception:  # the status is a courtesy; the caller has the plain error
        return None
    for deployment in app.deployments.values() if app is not None else ():
        lines = [line.strip() for line in (deployment.message or "").splitlines() if line.strip()]
        if lines:  # "package.module.SomeError: message" -> "message"
            return re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])
    return None


def _wait_for_stop() -> None:
    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    while True:
        time.sleep(3600)


def _teardown(config: ClusterConfig, started_ray: bool) -> None:
    try:
        if started_ray:
            serve.shutdown()
        else:
            serve.delete(config.app_name)  # leave the cluster and its other apps running
    finally:
        ray.shutdown()
