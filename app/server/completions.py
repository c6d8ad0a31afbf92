"""POST /v1/chat/completions and /v1/completions: thin over the engine's async streams."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from llmapp.app.server import tools
from llmapp.app.server.errors import APIError, from_runtime
from llmapp.app.server.pool import LoadedModel, ModelPool
from llmapp.app.server.replies import (
    Choice,
    Kind,
    ReplyMeta,
    merged,
    sse,
    sum_usage,
    usage_json,
    with_keepalive,
)
from llmapp.app.server.schemas import ChatCompletionRequest, CompletionRequest, _Sampling
from llmapp.runtime import Delta, RequestStream, SamplingParams
from llmapp.runtime.core.sampling import SamplingError

router = APIRouter()
FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
_PARAM_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "repeat_last_n",
                 "presence_penalty", "frequency_penalty", "seed")  # fmt: skip


def pool_of(request: Request) -> ModelPool:
    pool: ModelPool = request.app.state.pool
    return pool


def sampling_params(
    body: _Sampling,
    model: LoadedModel,
    max_tokens: int | None,
    logprobs: bool,
    top_logprobs: int,
) -> SamplingParams:
    """The request's fields over the catalog's defaults over llama.cpp's."""
    if body.n is not None and body.n > 1:
        raise APIError(400, "n > 1 is not supported; send n requests", param="n")
    values: dict[str, Any] = {k: getattr(body, k) for k in _PARAM_FIELDS}
    if max_tokens is not None:
        values["max_tokens"] = max_tokens
    values["logit_bias"] = _logit_bias(body.logit_bias, model.engine.tokenizer.n_vocab)
    values["stop"] = body.stop or ()
    values.update(_constraint_fields(body))
    try:
        values.update(logprobs=logprobs, top_logprobs=top_logprobs, ignore_eos=body.ignore_eos)
        return SamplingParams.layered(model.defaults, values)
    except SamplingError as exc:
        raise APIError(400, str(exc)) from None


def _constraint_fields(body: _Sampling) -> dict[str, Any]:
    """response_format (or the grammar/regex/json_schema extensions) as SamplingParams fields."""
    out: dict[str, Any] = {}
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_object":
        out["json_schema"] = fmt.schema_ if fmt.schema_ is not None else True
    elif fmt is not None and fmt.type == "json_schema":
        schema = fmt.json_schema.schema_ if fmt.json_schema is not None else fmt.schema_
        if schema is None:
            raise APIError(
                400, "response_format json_schema needs json_schema.schema", "response_format"
            )
        out["json_schema"] = schema
    for name in ("json_schema", "grammar", "regex"):
        if getattr(body, name) is not None:
            if out:
                raise APIError(400, f"{name} cannot be combined with response_format", name)
            out[name] = getattr(body, name)
    return out


def _logit_bias(bias: dict[str, float] | None, n_vocab: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(
                400, f"logit_bias key {key!r} is not a token id", param="logit_bias"
            ) from None
        if not 0 <= token < n_vocab:
            raise APIError(
                400, f"logit_bias token {token} is outside the vocabulary", param="logit_bias"
            )
        out[token] = value
    return out


def chat_messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """Messages for the chat template: developer is system; text parts are joined."""
    out = []
    for m in body.messages:
        if isinstance(m.content, list):
            content = "".join(p.text or "" for p in m.content if p.type == "text")
        else:
            content = m.content or ""
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
        message["content"] = content
        for extra in ("name", "tool_call_id", "tool_calls"):
            if getattr(m, extra) is not None:
                message[extra] = getattr(m, extra)
        out.append(message)
    return out


async def _open_streams(
    model: LoadedModel,
    prompts: list[Any],
    params: SamplingParams,
    request_id: str,
    template_tools: list[dict[str, Any]] | None = None,
) -> list[RequestStream]:
    """Submit every prompt; any refusal (too long, queue full) refuses the whole request."""
    streams: list[RequestStream] = []
    try:
        for i, prompt in enumerate(prompts):
            rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            stream = await model.engine.stream(prompt, params, request_id=rid, tools=template_tools)
            streams.append(stream)
    except Exception as exc:
        for stream in streams:
            stream.abort()
        raise from_runtime(exc) from None
    return streams


@router.post("/v1/chat/completions")
@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    pool = pool_of(request)
    model = await pool.get(body.model)
    max_tokens = (
        body.max_completion_tokens if body.max_completion_tokens is not None else (body.max_tokens)
    )
    params = sampling_params(body, model, max_tokens, body.logprobs, body.top_logprobs or 0)
    messages, template_tools, params = _with_tools(body, model, params)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    streams = await _open_streams(model, [messages], params, rid, template_tools)
    names = [t.get("function", {}).get("name") for t in body.tools or [] if params.grammar]
    return await _respond(request, "chat", rid, pool, model, streams, body, params.logprobs, names)


def _with_tools(
    body: ChatCompletionRequest, model: LoadedModel, params: SamplingParams
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, SamplingParams]:
    """The request's messages, tools for the template, and params with the calls' grammar."""
    messages = chat_messages(body)
    if not body.tools:
        return messages, None, params
    if params.constrained:
        raise APIError(400, "tools cannot be combined with response_format", "tools")
    parallel = body.parallel_tool_calls is not False
    template = model.engine.template
    plan = tools.plan(messages, body.tools, body.tool_choice, parallel, template.supports_tools)
    if plan.grammar is None:
        return plan.messages, None, params
    params = dataclasses.replace(params, grammar=plan.grammar, grammar_trigger=plan.trigger)
    return plan.messages, plan.template_tools, params


@router.post("/v1/completions")
@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    pool = pool_of(request)
    model = await pool.get(body.model)
    if body.echo:
        raise APIError(400, "echo is not supported", param="echo")
    n_lp = body.logprobs
    params = sampling_params(body, model, body.max_tokens, n_lp is not None, n_lp or 0)
    prompts = completion_prompts(body, model)
    rid = f"cmpl-{uuid.uuid4().hex}"
    streams = await _open_streams(model, prompts, params, rid)
    return await _respond(request, "text", rid, pool, model, streams, body, params.logprobs)


def completion_prompts(body: CompletionRequest, model: LoadedModel) -> list[Any]:
    """A string, a list of strings, token ids, or lists of ids -> one prompt per choice."""
    p = body.prompt
    if isinstance(p, str):
        prompts: list[Any] = [p]
    elif not p:
        raise APIError(400, "prompt must not be empty", param="prompt")
    elif all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    else:
        prompts = list(p)
    if body.suffix is not None:
        prompts = [fill_in_the_middle(model, text, body.suffix) for text in prompts]
    return prompts


def fill_in_the_middle(model: LoadedModel, prefix: Any, suffix: str) -> list[int]:
    tok = model.engine.tokenizer
    ids = [tok.token_to_id(t) for t in FIM_TOKENS]
    if any(i is None for i in ids):
        message = "this model has no fill-in-the-middle tokens; suffix cannot be used"
        raise APIError(400, message, param="suffix")
    if not isinstance(prefix, str):
        raise APIError(400, "suffix needs a text prompt", param="suffix")
    encode = tok.encode
    return [ids[0], *encode(prefix, add_bos=False), ids[1], *encode(suffix, add_bos=False),
            ids[2]]  # type: ignore[list-item]  # fmt: skip


async def _respond(
    request: Request,
    kind: Kind,
    rid: str,
    pool: ModelPool,
    model: LoadedModel,
    streams: list[RequestStream],
    body: _Sampling,
    logprobs: bool,
    tool_names: list[str] | None = None,
) -> Any:
    meta = ReplyMeta(kind, rid, pool.public_name(model.name), int(time.time()))
    tok = model.engine.tokenizer
    choices = [
        Choice(
            kind,
            i,
            tok,
            logprobs,
            tools=bool(tool_names),
            tool_names=tool_names or [],
            streaming=body.stream,
        )
        for i in range(len(streams))
    ]
    headers = {"x-request-id": rid}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _sse_events(meta, choices, streams, pool, include_usage)
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)
    await _collect(request, choices, streams)
    finals = [c.final for c in choices]
    problem = _failure(finals, pool)
    if problem is not None:
        raise problem
    reply = meta.envelope([c.whole() for c in choices], chunk=False)
    reply["usage"] = usage_json(sum_usage([f.usage for f in finals if f]))
    return JSONResponse(reply, headers=headers)


async def _collect(request: Request, choices: list[Choice], streams: list[RequestStream]) -> None:
    """Read every stream to its end; a client that hangs up aborts them at once."""

    async def read() -> None:
        async for i, delta in merged(streams):
            choices[i].push(delta)

    reader = asyncio.create_task(read())
    try:
        while not reader.done():
            done, _ = await asyncio.wait({reader}, timeout=0.25)
            if not done and await request.is_disconnected():
                return  # the finally below ends the requests
        reader.result()
    finally:
        # A hang-up, or this handler itself cancelled: the requests end at once.
        if not reader.done():
            reader.cancel()
            for stream in streams:
                stream.abort()


def _failure(finals: list[Delta | None], pool: ModelPool) -> APIError | None:
    """The error a reply ended with, if any. No final delta means the client hung up (nobody
    reads the answer); an abort is the server unloading the model or shutting down."""
    for final in finals:
        if final is None or final.finish_reason == "abort":
            if pool.shutting_down:
                return APIError(503, "the server is shutting down", code="shutting_down")
            return APIError(503, "the request was aborted: its model was unloaded",
                            code="aborted", retry_after=1)  # fmt: skip
        if final.finish_reason == "error":
            status = 400 if final.error_code == "invalid_request" else 500
            return APIError(status, final.error or "generation failed", code=final.error_code)
    return None


async def _sse_events(
    meta: ReplyMeta,
    choices: list[Choice],
    streams: list[RequestStream],
    pool: ModelPool,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    if meta.kind == "chat":
        first = {"index": 0, "delta": {"role": "assistant", "content": None},
                 "logprobs": None, "finish_reason": None}  # fmt: skip
        yield sse(meta.envelope([first], chunk=True))
    # Closed on every way out (an error event, a hang-up): the reads still pending go too.
    async with contextlib.aclosing(with_keepalive(merged(streams))) as items:
        async for item in items:
            if item is None:
                yield b": keep-alive\n\n"
                continue
            i, delta = item
            for choice in choices[i].push(delta):
                yield sse(meta.envelope([choice], chunk=True))
            if delta.finish_reason is None:
                continue
            problem = _failure([delta], pool)
            if problem is not None:
                yield sse(problem.body())  # the stream ends here, after one error event
                return
            for choice in choices[i].closing():
                yield sse(meta.envelope([choice], chunk=True))
    if include_usage:
        usage = sum_usage([c.final.usage for c in choices if c.final])
        yield sse({**meta.envelope([], chunk=True), "usage": usage_json(usage)})
    yield sse("[DONE]")
