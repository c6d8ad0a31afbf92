"""`llmapp serve` driven by the official openai client (sync, async, streaming, raw) and by
raw httpx for the SSE bytes, against a real model on loopback."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from typing import Any

import httpx
import openai
import pytest
from server_proc import Server

pytestmark = pytest.mark.real_model

HELLO = [{"role": "user", "content": "Name three colours."}]


def client(server: Server, **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="none", **kw)


def greedy_chat(server: Server, messages: Any = None, **kw: Any) -> Any:
    kw.setdefault("temperature", 0)
    return client(server).chat.completions.create(
        model="smollm2:135m", messages=messages or HELLO, **kw
    )


def sse_events(raw: bytes) -> list[str]:
    """The data payloads of an SSE body, checking the framing clients rely on."""
    text = raw.decode()
    assert text.endswith("\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        lines = block.split("\n")
        if all(line.startswith(":") for line in lines):
            continue  # a keep-alive comment
        assert len(lines) == 1 and lines[0].startswith("data: "), block
        events.append(lines[0][6:])
    return events


# ---- chat ---------------------------------------------------------------------------------


def test_models_list_and_retrieve(smol_server: Server) -> None:
    c = client(smol_server)
    ids = [m.id for m in c.models.list().data]
    assert ids[0] == "smollm2:135m"
    model = c.models.retrieve("smollm2:135m")
    assert model.id == "smollm2:135m" and model.object == "model"
    assert model.model_extra is not None and model.model_extra["context_length"] == 1024


def test_chat_whole_and_streamed_agree(smol_server: Server) -> None:
    whole = greedy_chat(smol_server, max_tokens=24)
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 24 and whole.usage.prompt_tokens > 5
    assert whole.id.startswith("chatcmpl-")
    chunks = list(
        client(smol_server).chat.completions.create(
            model="smollm2:135m",
            messages=HELLO,
            temperature=0,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content is None
    assert len({c.id for c in chunks}) == 1
    finishes = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0].choices[0].finish_reason == "length"
    content = [c.choices[0].delta.content for c in chunks[1:] if c.choices]
    assert all(piece != "" for piece in content)  # no empty deltas after the first
    assert "".join(p or "" for p in content) == text
    assert all(c.choices[0].delta.role is None for c in chunks[1:] if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_sse_bytes_on_the_wire(smol_server: Server) -> None:
    body = {"messages": HELLO, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", smol_server.v1 + "/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_bytes())
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "usage" not in chunks[-1]  # only when asked for


def test_async_client_and_raw_response(smol_server: Server) -> None:
    async def main() -> tuple[str, str]:
        c = openai.AsyncOpenAI(base_url=smol_server.v1, api_key="none")
        stream = await c.chat.completions.create(
            model="smollm2:135m", messages=HELLO, temperature=0, max_tokens=16, stream=True
        )
        text = "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        raw = await c.chat.completions.with_raw_response.create(
            model="smollm2:135m", messages=HELLO, temperature=0, max_tokens=16
        )
        assert raw.headers["x-request-id"].startswith("chatcmpl-")
        return text, raw.parse().choices[0].message.content or ""

    streamed, whole = asyncio.run(main())
    assert streamed == whole


def test_message_shapes_editors_send(smol_server: Server) -> None:
    messages = [
        {"role": "developer", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "!"}],
        },
        {"role": "assistant", "content": None},
        {"role": "user", "content": "Again?"},
    ]
    reply = client(smol_server).chat.completions.create(
        model="smollm2:135m",
        messages=messages,  # type: ignore[arg-type]
        max_completion_tokens=4,
        extra_body={"prompt_cache_key": "x", "reasoning_effort": "low", "top_k": 1, "min_p": 0.1},
        parallel_tool_calls=False,
    )
    assert reply.usage is not None and reply.usage.completion_tokens == 4


def test_logprobs(smol_server: Server) -> None:
    reply = greedy_chat(smol_server, max_tokens=8, logprobs=True, top_logprobs=3)
    items = reply.choices[0].logprobs.content
    assert len(items) == 8
    assert "".join(i.token for i in items) == reply.choices[0].message.content
    for item in items:
        assert item.logprob <= 0 and bytes(item.bytes).decode() == item.token
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].logprob >= item.logprob


def test_stop_strings_never_appear(smol_server: Server) -> None:
    base = greedy_chat(smol_server, max_tokens=24).choices[0].message.content
    words = base.split()
    stop = words[2]
    for stream in (False, True):
        kw: dict[str, Any] = {"max_tokens": 24, "stop": [stop, "zzz"], "stream": stream}
        if stream:
            chunks = list(greedy_chat(smol_server, **kw))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            reply = greedy_chat(smol_server, **kw)
            text, reason = reply.choices[0].message.content, reply.choices[0].finish_reason
        assert stop not in text and base.startswith(text) and reason == "stop"


def test_seed_logit_bias_and_penalties(smol_server: Server) -> None:
    kw = {"temperature": 1.0, "max_tokens": 12, "seed": 7}
    a = greedy_chat(smol_server, **kw).choices[0].message.content
    assert greedy_chat(smol_server, **kw).choices[0].message.content == a
    first = greedy_chat(smol_server, max_tokens=1, logprobs=True).choices[0].logprobs.content[0]
    ids = httpx.post(smol_server.url + "/tokenize", json={"content": first.token}).json()["tokens"]
    banned = greedy_chat(smol_server, max_tokens=1, logit_bias={str(ids[0]): -100})
    assert banned.choices[0].message.content != first.token
    reply = greedy_chat(
        smol_server, max_tokens=8, presence_penalty=1.5, frequency_penalty=0.5,
        extra_body={"repeat_penalty": 1.3},
    )  # fmt: skip
    assert reply.usage.completion_tokens == 8


# ---- text completions ---------------------------------------------------------------------


def test_text_completions(smol_server: Server) -> None:
    c = client(smol_server)
    one = c.completions.create(model="smollm2:135m", prompt="1, 2, 3,", max_tokens=6, temperature=0)
    assert one.object == "text_completion" and one.choices[0].text
    two = c.completions.create(
        model="smollm2:135m", prompt=["1, 2, 3,", "a, b, c,"], max_tokens=6, temperature=0
    )
    assert [ch.index for ch in two.choices] == [0, 1]
    assert two.choices[0].text == one.choices[0].text
    assert two.usage.completion_tokens == 12
    ids = httpx.post(smol_server.url + "/tokenize", json={"content": "1, 2, 3,"}).json()["tokens"]
    by_ids = c.completions.create(model="smollm2:135m", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == one.choices[0].text
    chunks = list(
        c.completions.create(
            model="smollm2:135m", prompt=["1, 2, 3,", "a, b, c,"], max_tokens=6,
            temperature=0, stream=True, logprobs=2,
        )
    )  # fmt: skip
    for i in (0, 1):
        mine = [ch.choices[0] for ch in chunks if ch.choices[0].index == i]
        assert "".join(ch.text for ch in mine) == two.choices[i].text
        assert sum(1 for ch in mine if ch.finish_reason) == 1
        assert all(ch.logprobs for ch in mine if ch.text)


def test_fill_in_the_middle(smol_server: Server) -> None:
    c = client(smol_server)
    reply = c.completions.create(
        model="qwen2.5-coder:0.5b",
        prompt="def add(a, b):\n    ",
        suffix="\n\nprint(add(1, 2))\n",
        max_tokens=12,
        temperature=0,
    )
    assert "return" in reply.choices[0].text
    with pytest.raises(openai.BadRequestError, match="fill-in-the-middle"):
        c.completions.create(model="smollm2:135m", prompt="def f(", suffix=")", max_tokens=2)


# ---- tokenize, health, metrics ------------------------------------------------------------


def test_tokenize_and_detokenize(smol_server: Server) -> None:
    url = smol_server.url
    ids = httpx.post(url + "/tokenize", json={"content": "Hello world"}).json()["tokens"]
    pieces = httpx.post(url + "/tokenize", json={"content": "Hello world", "with_pieces": True})
    assert [p["id"] for p in pieces.json()["tokens"]] == ids
    assert "".join(p["piece"] for p in pieces.json()["tokens"]) == "Hello world"
    with_bos = httpx.post(url + "/tokenize", json={"content": "Hello", "add_special": True})
    assert len(with_bos.json()["tokens"]) >= len(
        httpx.post(url + "/tokenize", json={"content": "Hello"}).json()["tokens"]
    )
    back = httpx.post(url + "/detokenize", json={"tokens": ids}).json()
    assert back == {"content": "Hello world"}


def test_health_and_metrics(smol_server: Server) -> None:
    assert httpx.get(smol_server.url + "/health").json() == {"status": "ok"}
    greedy_chat(smol_server, max_tokens=3)
    text = httpx.get(smol_server.url + "/metrics").text
    for name in (
        "llmapp:num_requests_running",
        "llmapp:num_requests_waiting",
        "llmapp:kv_cache_usage_perc",
        "llmapp:prompt_tokens_total",
        "llmapp:generation_tokens_total",
        "llmapp:prefix_cache_queries_total",
        "llmapp:prefix_cache_hits_total",
        "llmapp:num_preemptions_total",
        "llmapp:request_success_total",
        "llmapp:time_to_first_token_seconds_bucket",
        "llmapp:inter_token_latency_seconds_bucket",
        "llmapp:e2e_request_latency_seconds_count",
        "llmapp:request_queue_time_seconds_sum",
    ):
        lines = [line for line in text.splitlines() if line.startswith(name + "{")]
        assert any('model_name="smollm2:135m"' in line for line in lines), name
    buckets = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("llmapp:time_to_first_token_seconds_bucket") and "smollm2" in line
    ]
    assert buckets == sorted(buckets) and buckets[-1] > 0  # cumulative


def test_cached_tokens_reported(smol_server: Server) -> None:
    long = [{"role": "user", "content": "Repeat after me: " + "red green blue " * 30}]
    greedy_chat(smol_server, long, max_tokens=2)
    again = greedy_chat(smol_server, long, max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens >= 64


# ---- errors -------------------------------------------------------------------------------


def test_errors_have_one_shape(smol_server: Server) -> None:
    c = client(smol_server, max_retries=0)
    with pytest.raises(openai.NotFoundError) as nf:
        c.chat.completions.create(model="no-such-model", messages=HELLO)
    assert nf.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        c.chat.completions.create(model="smollm2:135m", messages=HELLO, n=2)
    with pytest.raises(openai.BadRequestError, match="top_p must be in"):
        c.chat.completions.create(model="smollm2:135m", messages=HELLO, top_p=2)
    for body in ({}, {"messages": "hi"}, {"messages": [{"role": "king", "content": "x"}]}):
        r = httpx.post(smol_server.v1 + "/chat/completions", json=body)
        assert r.status_code == 400
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "invalid_request_error"
    r = httpx.post(smol_server.v1 + "/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.get(smol_server.url + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_an_overlong_prompt_is_a_400_also_when_streamed(smol_server: Server) -> None:
    huge = [{"role": "user", "content": "word " * 3000}]
    for stream in (False, True):
        r = httpx.post(
            smol_server.v1 + "/chat/completions", json={"messages": huge, "stream": stream}
        )
        assert r.status_code == 400 and r.headers["content-type"] == "application/json"
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded"
        assert "exceeds the available context size" in error["message"]
    with pytest.raises(openai.BadRequestError, match="exceeds the available context size"):
        client(smol_server, max_retries=0).chat.completions.create(
            model="smollm2:135m",
            messages=huge,  # type: ignore[arg-type]
        )


def test_a_request_that_cannot_sample_fails_alone(smol_server: Server) -> None:
    everything = {str(t): -100 for t in range(49152)}
    results: dict[str, Any] = {}

    def neighbour() -> None:
        results["ok"] = greedy_chat(smol_server, max_tokens=16).choices[0].message.content

    thread = threading.Thread(target=neighbour)
    thread.start()
    with pytest.raises(openai.BadRequestError, match="no token can be sampled"):
        client(smol_server, max_retries=0).chat.completions.create(
            model="smollm2:135m", messages=HELLO, logit_bias=everything, max_tokens=4
        )
    thread.join(60)
    assert results["ok"] == greedy_chat(smol_server, max_tokens=16).choices[0].message.content


# ---- many clients -------------------------------------------------------------------------

QUESTIONS = [f"Count from {n} to {n + 5}." for n in range(1, 17)]


def _margins_ok(alone: Any, text: str) -> bool:
    """Equal up to the first near tie of the lone run (batched sums may flip a tie)."""
    want = ""
    for item in alone.choices[0].logprobs.content:
        top = item.top_logprobs
        if len(top) > 1 and top[0].logprob - top[1].logprob < 0.5:
            return text.startswith(want)
        want += item.token
    return text == alone.choices[0].message.content


def test_sixteen_streaming_clients_at_once(smol_server: Server) -> None:
    def ask(q: str, **kw: Any) -> Any:
        return greedy_chat(smol_server, [{"role": "user", "content": q}], max_tokens=20, **kw)

    alone = {q: ask(q, logprobs=True, top_logprobs=2) for q in QUESTIONS}

    async def main() -> list[str]:
        c = openai.AsyncOpenAI(base_url=smol_server.v1, api_key="none")

        async def one(q: str) -> str:
            stream = await c.chat.completions.create(
                model="smollm2:135m", messages=[{"role": "user", "content": q}],
                temperature=0, max_tokens=20, stream=True,
            )  # fmt: skip
            return "".join([ch.choices[0].delta.content or "" async for ch in stream])

        return await asyncio.gather(*(one(q) for q in QUESTIONS))

    for q, text in zip(QUESTIONS, asyncio.run(main()), strict=True):
        assert _margins_ok(alone[q], text), (q, text)


def test_fifty_clients_hanging_up_leave_nothing_running(smol_server: Server) -> None:
    rng = random.Random(5)

    async def hang_up(i: int, http: httpx.AsyncClient) -> None:
        body = {
            "messages": [{"role": "user", "content": f"Tell a long story number {i}."}],
            "max_tokens": 400,
            "stream": i % 5 != 0,
        }
        try:
            async with asyncio.timeout(rng.uniform(0.05, 1.5)):
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    async for _ in r.aiter_bytes():
                        pass
        except TimeoutError:
            pass  # the client went away mid-request

    async def main() -> None:
        async with httpx.AsyncClient(base_url=smol_server.url, timeout=30) as http:
            await asyncio.gather(*(hang_up(i, http) for i in range(50)))

    asyncio.run(main())
    for _ in range(100):
        ps = httpx.get(smol_server.url + "/api/ps").json()["models"]
        if all(m["sessions_running"] == m["sessions_waiting"] == 0 for m in ps):
            break
        asyncio.run(asyncio.sleep(0.1))
    else:
        raise AssertionError(f"requests left running: {ps}")
    assert httpx.get(smol_server.url + "/health").status_code == 200
    assert greedy_chat(smol_server, max_tokens=2).usage.completion_tokens == 2
