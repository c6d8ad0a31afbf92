"""`llmapp serve --ray` on a local Ray instance (loopback) with two replicas of a real model,
driven by the official openai client and raw httpx, as the single server is.

One deployment serves the whole module; the test that kills a replica runs last.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from conftest import Server

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.ray,
    pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs llmapp[cluster]"),
    pytest.mark.timeout(300),
]

MODEL = "smollm2:135m"
HELLO = [{"role": "user", "content": "Name three colours."}]
DOCUMENT = (
    "The lighthouse at the end of the harbour wall was built of grey granite in 1862. Its lamp "
    "burned whale oil, then paraffin, and finally electricity; its keepers logged every ship. "
) * 6


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def start_cluster(*args: str, timeout: float = 150) -> Server:
    cmd = [sys.executable, "-m", "llmapp.app.cli", "serve", MODEL, "--ray", "--port", "0",
           "--threads", "1", *args]  # fmt: skip
    log = tempfile.TemporaryFile(mode="w+")  # Ray's own notices; read back on failure
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the first line names the URL, once the proxy listens
    match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
    if not match:
        proc.kill()
        log.seek(0)
        raise AssertionError(f"serve --ray did not start: {line}{log.read()}")
    server = Server(proc, f"http://127.0.0.1:{match.group(1)}")

    def healthy() -> bool:
        assert proc.poll() is None, "serve --ray exited"
        try:
            return httpx.get(server.url + "/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(healthy, timeout, "a healthy deployment")
    return server


@pytest.fixture(scope="module")
def cluster() -> Iterator[Server]:
    server = start_cluster("--replicas", "2", "--ctx-size", "1024")

    def both() -> bool:  # healthy means every model has a replica; one may still be loading
        return httpx.get(server.url + "/health").json()["replicas"][MODEL] == 2

    wait_for(both, 60, "the second replica")
    yield server
    assert server.stop(timeout=120) == 0  # Ray's shutdown is slow on a busy machine
    # Ray and Serve were shut down with it: no raylet of ours is left behind.
    assert server.proc.returncode == 0


def client(server: Server, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="none", **kw)


def replicas(server: Server) -> dict[str, int]:
    """Replica id -> its process id, as the deployment reports them."""
    rows = httpx.get(server.url + "/api/ps").json()["models"]
    return {row["replica"]: row["pid"] for row in rows}


def sse_payloads(raw: bytes) -> list[str]:
    out = []
    for block in raw.decode().split("\n\n")[:-1]:
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        if lines:
            assert len(lines) == 1 and lines[0].startswith("data: "), block
            out.append(lines[0][6:])
    return out


# ---- the OpenAI surface, through the ingress ----------------------------------------------


def test_health_models_and_two_replicas(cluster: Server) -> None:
    health = httpx.get(cluster.url + "/health").json()
    assert health == {"status": "ok", "replicas": {MODEL: 2}}
    models = client(cluster).models.list().data
    assert [m.id for m in models] == [MODEL]
    model = client(cluster).models.retrieve(MODEL)
    assert model.model_extra is not None
    assert model.model_extra["context_length"] == 1024 and model.model_extra["replicas"] == 2
    wait_for(lambda: len(replicas(cluster)) == 2, 10, "both replicas in /api/ps")


def test_chat_whole_and_streamed_agree(cluster: Server) -> None:
    raw = client(cluster).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=HELLO,
        temperature=0,
        max_tokens=16,  # type: ignore[arg-type]
    )
    assert raw.headers["x-llmapp-replica"] in replicas(cluster)
    whole = raw.parse()
    assert whole.choices[0].finish_reason == "length" and whole.usage is not None
    assert whole.usage.completion_tokens == 16
    chunks = list(
        client(cluster).chat.completions.create(
            model=MODEL,
            messages=HELLO,  # type: ignore[arg-type]
            temperature=0,
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content


def test_sse_bytes_on_the_wire(cluster: Server) -> None:
    body = {"messages": HELLO, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", cluster.v1 + "/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-llmapp-replica"]
        assert "content-length" not in r.headers
        raw = b"".join(r.iter_bytes())
    events = sse_payloads(raw)
    assert events[-1] == "[DONE]"
    assert all(json.loads(e)["object"] == "chat.completion.chunk" for e in events[:-1])


def test_text_completion_and_tokenize(cluster: Server) -> None:
    done = client(cluster).completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert done.choices[0].text and done.usage is not None and done.usage.completion_tokens == 4
    r = httpx.post(cluster.url + "/tokenize", json={"content": "Hello world"})
    assert r.status_code == 200 and r.headers["x-llmapp-replica"]
    tokens = r.json()["tokens"]
    back = httpx.post(cluster.url + "/detokenize", json={"tokens": tokens}).json()
    assert back["content"] == "Hello world"


def test_errors_have_one_shape(cluster: Server) -> None:
    c = client(cluster, max_retries=0)
    with pytest.raises(openai.NotFoundError) as nf:
        c.chat.completions.create(model="no-such-model", messages=HELLO)  # type: ignore[arg-type]
    assert nf.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        c.chat.completions.create(model=MODEL, messages=HELLO, n=2)  # type: ignore[arg-type]
    for body in ({}, {"messages": "hi"}):
        r = httpx.post(cluster.v1 + "/chat/completions", json=body)
        assert r.status_code == 400
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(cluster.v1 + "/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.get(cluster.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = httpx.post(cluster.url + "/api/stop", json={"model": MODEL})
    assert r.status_code == 400 and "--ray" in r.json()["error"]["message"]


def test_an_overlong_prompt_is_a_400_also_when_streamed(cluster: Server) -> None:
    huge = [{"role": "user", "content": "word " * 3000}]
    for stream in (False, True):
        r = httpx.post(cluster.v1 + "/chat/completions", json={"messages": huge, "stream": stream})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json"
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded"
        assert "exceeds the available context size" in error["message"]
    with pytest.raises(openai.BadRequestError, match="exceeds the available context size"):
        client(cluster, max_retries=0).chat.completions.create(
            model=MODEL,
            messages=huge,  # type: ignore[arg-type]
        )


# ---- routing -------------------------------------------------------------------------------


def test_sixteen_streaming_clients_use_both_replicas(cluster: Server) -> None:
    async def one(c: openai.AsyncOpenAI, i: int) -> tuple[str, str]:
        async with c.chat.completions.with_streaming_response.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Say something about the number {i}."}],
            max_tokens=12,
            stream=True,
        ) as response:
            replica = response.headers["x-llmapp-replica"]
            text = ""
            async for chunk in await response.parse():
                text += "".join(ch.delta.content or "" for ch in chunk.choices)
            return replica, text

    async def main() -> list[tuple[str, str]]:
        c = openai.AsyncOpenAI(base_url=cluster.v1, api_key="none", max_retries=0)
        return await asyncio.gather(*(one(c, i) for i in range(16)))

    results = asyncio.run(main())
    assert all(text for _, text in results)
    seen = [replica for replica, _ in results]
    assert set(seen) == set(replicas(cluster)), seen
    assert min(seen.count(r) for r in set(seen)) >= 4, seen  # spread, not just touched


def test_a_repeated_long_prompt_stays_where_its_cache_is(cluster: Server) -> None:
    c = client(cluster)
    messages = [{"role": "user", "content": DOCUMENT + "When was the lighthouse built?"}]
    landed, cached = [], []
    for _ in range(3):
        raw = c.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=messages,
            max_tokens=8,
            temperature=0,  # type: ignore[arg-type]
        )
        reply = raw.parse()
        assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
        landed.append(raw.headers["x-llmapp-replica"])
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)
    assert len(set(landed)) == 1, landed
    assert cached[1] > 200 and cached[2] > 200, cached
    # The conversation's next turn (history + a new question) lands there too.
    turn = [*messages, {"role": "assistant", "content": reply.choices[0].message.content},
            {"role": "user", "content": "Who kept it?"}]  # fmt: skip
    raw = c.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=turn,
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    assert raw.headers["x-llmapp-replica"] == landed[0]
    usage = raw.parse().usage
    assert usage is not None and usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens >= cached[1]


def metrics(cluster: Server) -> str:
    return httpx.get(cluster.url + "/metrics").text


def series(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in /metrics")


def test_metrics_report_every_replica_and_the_routing(cluster: Server) -> None:
    ids = replicas(cluster)

    def settled() -> str | None:  # replicas report their engines' metrics every second
        text = metrics(cluster)
        hits = sum(series(text, "llmapp:prefix_cache_hits_total", replica=r) for r in ids)
        return text if hits > 400 else None  # the repeated prompt's cached tokens

    text = wait_for(settled, 10, "replica metrics")
    for replica in ids:
        assert series(text, "llmapp:num_requests_running", model_name=MODEL, replica=replica) >= 0
        assert series(text, "llmapp:time_to_first_token_seconds_count", replica=replica) > 0
    assert series(text, "llmapp:cluster_replicas", model_name=MODEL) == 2
    routed = {r: series(text, "llmapp:cluster_routed_requests_total", route=r)
              for r in ("prefix", "fallback_busy", "fallback_miss", "random")}  # fmt: skip
    assert routed["prefix"] >= 3 and routed["fallback_miss"] >= 1 and routed["random"] == 0


def test_a_client_hanging_up_aborts_its_request(cluster: Server) -> None:
    def aborted() -> float:
        text = metrics(cluster)
        pattern = r'^llmapp:request_success_total\{finished_reason="abort"[^}]*\} (\S+)$'
        return sum(float(v) for v in re.findall(pattern, text, re.M))

    before = aborted()
    body = {"messages": HELLO, "max_tokens": 600, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", cluster.v1 + "/chat/completions", json=body) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 8:
                break
    wait_for(lambda: aborted() > before, 15, "the engine to abort the request")

    def idle() -> bool:
        text = metrics(cluster)
        running = re.findall(r"^llmapp:num_requests_running\{[^}]*\} (\S+)$", text, re.M)
        return len(running) == 2 and not any(float(v) for v in running)

    wait_for(idle, 15, "nothing running")


# ---- a replica dies -----------------------------------------------------------------------


def test_killing_a_replica_ends_its_streams_with_an_error_event(cluster: Server) -> None:
    """Runs last: it kills one of the module's two replicas."""
    started: dict[int, str] = {}
    outcome: dict[int, str] = {}

    def stream(i: int) -> None:
        c = client(cluster, max_retries=0, timeout=120)
        try:
            with c.chat.completions.with_streaming_response.create(
                model=MODEL,
                messages=[{"role": "user", "content": f"Write an essay on ships, part {i}."}],
                max_tokens=500,
                stream=True,
                extra_body={"ignore_eos": True},
            ) as response:
                for n, _ in enumerate(response.parse()):
                    if n == 1:
                        started[i] = response.headers["x-llmapp-replica"]
            outcome[i] = "done"
        except openai.APIError as exc:
            outcome[i] = f"error: {exc.message}"

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    wait_for(lambda: len(started) == 4, 60, "four streams to start")
    victim = started[0]
    pids = replicas(cluster)
    assert set(started.values()) == set(pids)  # the four streams are on both replicas
    os.kill(pids[victim], signal.SIGKILL)
    killed_at = time.monotonic()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    for i, replica in started.items():
        if replica == victim:
            assert outcome[i].startswith(f"error: replica {victim} stopped while answering")
        else:
            assert outcome[i] == "done", outcome[i]
    # A later request succeeds (the client may retry a 503 once, as openai's does), and Serve
    # starts a replacement replica.
    reply = client(cluster).chat.completions.with_raw_response.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=4,  # type: ignore[arg-type]
    )
    assert reply.http_response.status_code == 200
    assert reply.headers["x-llmapp-replica"] != victim

    def replaced() -> bool:
        now = replicas(cluster)
        return len(now) == 2 and victim not in now

    wait_for(replaced, 90, "a replacement replica")
    assert time.monotonic() - killed_at < 90
