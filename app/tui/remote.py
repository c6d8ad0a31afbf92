"""A ChatBackend over an OpenAI-compatible server (`llmapp serve`, llama.cpp's server, ...).

Replies come as server-sent events: `data: {chat.completion.chunk}` lines, then `data: [DONE]`.
Leaving the stream early closes the connection, which is how such servers learn to stop.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import httpx

from llmapp.app.tui.backend import (
    BackendError,
    BackendStats,
    Cancel,
    ModelChoice,
    PullProgress,
    ReplyChunk,
    RequestRejected,
)
from llmapp.app.tui.conversation import ChatSettings


class RemoteBackend:
    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.label = self.url
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No read timeout: a long prompt on a busy server may take a while to the first token.
        timeout = httpx.Timeout(connect_timeout, read=None)
        self._client = httpx.AsyncClient(headers=headers, timeout=timeout, transport=transport)
        self._reachable = False
        self._active = 0

    def is_ready(self, model: str) -> bool:
        return self._reachable

    async def load(
        self, model: str, progress: PullProgress | None = None, cancel: Cancel | None = None
    ) -> None:
        await self._get_models()  # the server answers: that is all a remote model needs

    async def _get_models(self) -> list[str]:
        data = await self._request_json("GET", "/models")
        self._reachable = True
        items = data.get("data") if isinstance(data, dict) else None
        if not isinstance(items, list):
            return []
        return [str(m["id"]) for m in items if isinstance(m, dict) and "id" in m]

    async def _request_json(self, method: str, path: str) -> Any:
        try:
            resp = await self._client.request(method, self.url + path)
        except httpx.HTTPError as exc:
            raise BackendError(self._unreachable(exc)) from None
        if resp.status_code >= 400:
            raise BackendError(f"{self.url}{path}: HTTP {resp.status_code}: {_error_text(resp)}")
        try:
            return resp.json()
        except ValueError:
            raise BackendError(f"{self.url}{path} did not answer with JSON") from None

    def _unreachable(self, exc: Exception) -> str:
        reason = str(exc) or type(exc).__name__
        return f"the server at {self.url} does not answer ({reason})"

    async def stream(
        self, model: str, messages: list[dict[str, str]], settings: ChatSettings
    ) -> AsyncGenerator[ReplyChunk, None]:
        body = request_body(model, messages, settings)
        started = time.perf_counter()
        try:
            async with self._client.stream(
                "POST", self.url + "/chat/completions", json=body
            ) as resp:
                if resp.status_code >= 400:
                    await resp.aread()
                    message = f"HTTP {resp.status_code}: {_error_text(resp)}"
                    if resp.status_code in (400, 413, 422):
                        raise RequestRejected(message)
                    raise BackendError(message)
                self._reachable = True
                self._active += 1
                try:
                    async for chunk in _parse_events(resp.aiter_lines(), started):
                        yield chunk
                finally:
                    self._active -= 1
        except httpx.HTTPError as exc:
            raise BackendError(self._unreachable(exc)) from None

    async def default_model(self) -> str:
        names = await self._get_models()
        return names[0] if names else "default"

    async def models(self) -> list[ModelChoice]:
        return [ModelChoice(name=name, pulled=True) for name in await self._get_models()]

    async def pull(self, model: str, progress: PullProgress, cancel: Cancel) -> None:
        raise BackendError("models cannot be pulled through a remote server")

    def stats(self, model: str) -> BackendStats:
        return BackendStats(running=self._active)

    async def close(self) -> None:
        await self._client.aclose()


def request_body(
    model: str, messages: list[dict[str, str]], settings: ChatSettings
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "max_tokens": settings.max_tokens,
        # Not OpenAI's, but llama.cpp's server and ours read them; others ignore them.
        "top_k": settings.top_k,
        "min_p": settings.min_p,
    }
    if settings.seed is not None:
        body["seed"] = settings.seed
    return body


async def _parse_events(
    lines: AsyncIterator[str], started: float
) -> AsyncGenerator[ReplyChunk, None]:
    """SSE lines -> chunks; the last one carries finish_reason and usage (when sent)."""
    finish: str | None = None
    usage: dict[str, Any] = {}
    first_at: float | None = None
    n_chunks = 0
    async for line in lines:
        if not line.startswith("data:"):
            continue  # comments, event names, keep-alives
        data = line[5:].strip()
        if data == "[DONE]":
            break
        event = _load_event(data)
        if "error" in event:
            raise BackendError(f"the server reported an error: {_describe(event['error'])}")
        usage = event.get("usage") or usage
        for choice in event.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") or ""
            finish = choice.get("finish_reason") or finish
            if text:
                first_at = first_at or time.perf_counter()
                n_chunks += 1
                yield ReplyChunk(text, 1)
    yield _final_chunk(finish or "stop", usage, started, first_at, n_chunks)


def _final_chunk(
    finish: str, usage: dict[str, Any], started: float, first_at: float | None, n: int
) -> ReplyChunk:
    now = time.perf_counter()
    completion = usage.get("completion_tokens", n)
    details = usage.get("prompt_tokens_details") or {}
    tps = None
    if first_at is not None and now > first_at and completion > 1:
        tps = (completion - 1) / (now - first_at)
    return ReplyChunk(
        "",
        finish_reason=finish,
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=completion,
        cached_tokens=details.get("cached_tokens"),
        ttft_ms=(first_at - started) * 1000 if first_at is not None else None,
        tokens_per_s=tps,
    )


def _load_event(data: str) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError:
        raise BackendError(f"the server sent an unreadable event: {data[:80]!r}") from None
    if not isinstance(event, dict):
        raise BackendError(f"the server sent an unexpected event: {data[:80]!r}")
    return event


def _describe(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error)


def _error_text(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:200] or resp.reason_phrase
    if isinstance(data, dict) and "error" in data:
        return _describe(data["error"])
    return str(data)[:200]
