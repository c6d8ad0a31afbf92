"""The remote backend: OpenAI-style streaming over HTTP (a mock transport), and the app on it."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import httpx
import pytest
from chat_helpers import notes, screen_text, wait_until

from llmapp.app.tui.app import ChatApp
from llmapp.app.tui.backend import BackendError, RequestRejected
from llmapp.app.tui.conversation import ChatSettings
from llmapp.app.tui.history import History
from llmapp.app.tui.remote import RemoteBackend, request_body

URL = "http://test.invalid/v1"


def sse(*events: Any) -> bytes:
    lines = [f"data: {json.dumps(e)}\n\n" if not isinstance(e, str) else e for e in events]
    return "".join(lines).encode()


def delta(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


USAGE = {
    "choices": [],
    "usage": {
        "prompt_tokens": 20,
        "completion_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 16},
    },
}


class Server:
    """A mock OpenAI-compatible server; records the requests it gets."""

    def __init__(self, body: bytes = b"", status: int = 200) -> None:
        self.body = body
        self.status = status
        self.requests: list[httpx.Request] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.url.path.endswith("/models"):
            return httpx.Response(200, json={"data": [{"id": "served-model"}, {"id": "other"}]})
        return httpx.Response(
            self.status, content=self.body, headers={"content-type": "text/event-stream"}
        )

    def backend(self) -> RemoteBackend:
        return RemoteBackend(URL, "key-1", transport=httpx.MockTransport(self.handler))


async def collect(backend: RemoteBackend, text: str = "hi") -> list[Any]:
    messages = [{"role": "user", "content": text}]
    return [c async for c in backend.stream("served-model", messages, ChatSettings(seed=5))]


async def test_streams_chunks_and_usage() -> None:
    server = Server(sse(delta("Hel"), delta("lo"), delta("", "stop"), USAGE, "data: [DONE]\n\n"))
    backend = server.backend()
    chunks = await collect(backend)
    assert "".join(c.text for c in chunks) == "Hello"
    final = chunks[-1]
    assert (final.finish_reason, final.prompt_tokens, final.cached_tokens) == ("stop", 20, 16)
    assert final.ttft_ms is not None
    request = server.requests[0]
    assert request.headers["authorization"] == "Bearer key-1"
    body = json.loads(request.content)
    assert body["stream"] is True and body["seed"] == 5 and body["model"] == "served-model"
    assert await backend.default_model() == "served-model"
    assert [m.name for m in await backend.models()] == ["served-model", "other"]
    await backend.close()


async def test_ignores_comments_and_reports_length() -> None:
    server = Server(sse(": keep-alive\n\n", delta("a"), delta("b", "length"), "data: [DONE]\n\n"))
    chunks = await collect(server.backend())
    assert "".join(c.text for c in chunks) == "ab" and chunks[-1].finish_reason == "length"


async def test_bad_request_is_rejected_with_the_servers_message() -> None:
    error = {"error": {"message": "the prompt has 5000 tokens; the context holds 4096"}}
    server = Server(json.dumps(error).encode(), status=400)
    with pytest.raises(RequestRejected, match="context holds 4096"):
        await collect(server.backend())


async def test_server_error_mid_stream() -> None:
    server = Server(sse(delta("x"), {"error": {"message": "boom"}}))
    with pytest.raises(BackendError, match="boom"):
        await collect(server.backend())


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_server() -> None:
    backend = RemoteBackend(f"http://127.0.0.1:{closed_port()}/v1", connect_timeout=2)
    with pytest.raises(BackendError, match="does not answer"):
        await backend.load("x")
    with pytest.raises(BackendError, match="does not answer"):
        await collect(backend)


def test_request_body_carries_the_settings() -> None:
    settings = ChatSettings(temperature=0.1, top_p=0.5, top_k=3, min_p=0.2, max_tokens=9)
    body = request_body("m", [], settings)
    assert {k: body[k] for k in ("temperature", "top_p", "top_k", "min_p", "max_tokens")} == {
        "temperature": 0.1,
        "top_p": 0.5,
        "top_k": 3,
        "min_p": 0.2,
        "max_tokens": 9,
    }
    assert "seed" not in body and body["stream_options"] == {"include_usage": True}


async def test_app_on_a_server(history_path: Path) -> None:
    server = Server(sse(delta("From "), delta("the server.", "stop"), USAGE, "data: [DONE]\n\n"))
    app = ChatApp(server.backend(), History(history_path), cursor_blink=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: app.chat_screen.pane is not None)
        await wait_until(pilot, lambda: "served-model" in screen_text(app), what="the model")
        await pilot.press(*"hello", "enter")
        await wait_until(pilot, lambda: "From the server." in screen_text(app))
        assert "cached 16/20" in screen_text(app)
        await pilot.press("ctrl+q")
    assert app.return_code == 0


async def test_app_says_when_the_server_does_not_answer(history_path: Path) -> None:
    backend = RemoteBackend(f"http://127.0.0.1:{closed_port()}/v1", connect_timeout=2)
    app = ChatApp(backend, History(history_path), model="m", cursor_blink=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: "does not answer" in notes(app), what="the error")
        await pilot.press(*"anyone?", "enter")
        screen = app.chat_screen
        await wait_until(pilot, lambda: not screen.conversation.generating)  # type: ignore[union-attr]
        await pilot.press("ctrl+q")
    assert app.return_code == 0
