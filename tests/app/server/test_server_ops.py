"""`llmapp serve` as an operator meets it: API keys, CORS, the Host check, a full queue, a
model that is loading or not pulled, Ctrl-C with streams in flight, ps and stop."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from server_proc import Server

pytestmark = pytest.mark.real_model

Serve = Callable[..., Server]
HELLO = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
ENDLESS = {
    "messages": [{"role": "user", "content": "Write a very long story."}],
    "max_tokens": 5000,
    "ignore_eos": True,
    "stream": True,
}


def test_api_keys(serve: Serve) -> None:
    server = serve("smollm2:135m", "--api-key", "k1", "--api-key", "k2", "--cors-origin", "*")
    url = server.v1 + "/chat/completions"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-Api-Key": "nope"}):
        r = httpx.post(url, json=HELLO, headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.post(url, json=HELLO, headers={"Authorization": "Bearer k1"}).status_code == 200
    assert httpx.post(url, json=HELLO, headers={"X-Api-Key": "k2"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        bad = openai.OpenAI(base_url=server.v1, api_key="bad", max_retries=0)
        bad.chat.completions.create(model="smollm2:135m", **HELLO)  # type: ignore[arg-type]
    good = openai.OpenAI(base_url=server.v1, api_key="k1")
    assert good.chat.completions.create(model="smollm2:135m", **HELLO).choices  # type: ignore[arg-type]
    for open_path in ("/health", "/v1/models"):
        assert httpx.get(server.url + open_path).status_code == 200
    assert httpx.get(server.url + "/metrics").status_code == 401
    preflight = httpx.options(
        url,
        headers={
            "Origin": "http://editor.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, x-stainless-os",
        },
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] in ("*", "http://editor.example")


def test_no_cors_and_loopback_hosts_only_by_default(serve: Serve) -> None:
    server = serve("smollm2:135m")
    r = httpx.options(
        server.v1 + "/chat/completions",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in r.headers
    rebound = httpx.get(server.url + "/v1/models", headers={"Host": "evil.example"})
    assert rebound.status_code == 400  # a DNS-rebinding page cannot reach the API
    assert httpx.get(server.url + "/v1/models", headers={"Host": "localhost"}).status_code == 200


def test_a_full_queue_is_a_503_with_retry_after(serve: Serve) -> None:
    server = serve("smollm2:135m", "--max-num-seqs", "1", "--max-queue", "1")
    with httpx.Client(base_url=server.v1, timeout=30) as http:
        with http.stream("POST", "/chat/completions", json=ENDLESS) as running:
            lines = running.iter_lines()  # kept: dropping it would hang up
            next(lines)  # generating: holds the one running slot
            waiting = threading.Thread(
                target=lambda: httpx.post(server.v1 + "/chat/completions", json=HELLO, timeout=60)
            )
            waiting.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                ps = http.get(server.url + "/api/ps").json()["models"][0]
                if ps["sessions_waiting"] == 1:
                    break
                time.sleep(0.05)
            assert ps["sessions_running"] == ps["sessions_waiting"] == 1
            r = http.post("/chat/completions", json=HELLO)
            assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"
            assert "rate limit" not in r.json()["error"]["message"]
        waiting.join(60)
    assert httpx.post(server.v1 + "/chat/completions", json=HELLO).status_code == 200


def test_health_is_503_while_loading_and_unpulled_models_are_refused(
    serve: Serve, tmp_path: object
) -> None:
    server = serve("qwen2.5-coder:0.5b", "--no-pull", wait_healthy=False)
    first = httpx.get(server.url + "/health", timeout=10)
    assert first.status_code in (200, 503)
    if first.status_code == 503:
        assert first.json()["error"]["code"] == "model_loading" and first.headers["retry-after"]
    deadline = time.monotonic() + 60
    while httpx.get(server.url + "/health").status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    r = httpx.post(server.v1 + "/chat/completions", json={**HELLO, "model": "../../etc/passwd"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_ps_and_stop(serve: Serve) -> None:
    server = serve("smollm2:135m")
    models = httpx.get(server.url + "/api/ps").json()["models"]
    assert [m["name"] for m in models] == ["smollm2:135m"] and models[0]["ctx_size"] > 0
    r = httpx.post(server.url + "/api/stop", json={"model": "smollm2:135m"})
    assert r.json() == {"model": "smollm2:135m", "stopped": True}
    assert httpx.get(server.url + "/api/ps").json()["models"] == []
    # The next request loads it again.
    assert httpx.post(server.v1 + "/chat/completions", json=HELLO).status_code == 200


def test_ctrl_c_ends_streams_with_an_error_event(serve: Serve) -> None:
    server = serve("smollm2:135m")
    events: list[str] = []

    def read() -> None:
        with httpx.stream("POST", server.v1 + "/chat/completions", json=ENDLESS) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 20
    while len(events) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    start = time.monotonic()
    status = server.stop(signal.SIGINT)
    reader.join(10)
    assert not reader.is_alive() and time.monotonic() - start < 10
    assert status in (0, 130)
    last = json.loads(events[-1])
    assert "shutting down" in last["error"]["message"]
