"""Engine deltas -> OpenAI response objects, streamed (chunks) or whole.

The wire rules clients rely on: one id across a stream's chunks; the first chat delta carries
the role with null content; no empty content deltas after it; exactly one chunk with a
finish_reason; usage as a last chunk with `"choices": []` only when asked for; logprobs whose
tokens join to the content.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from llmapp.app.server.tools import StreamSplitter, split_reply
from llmapp.runtime import Delta, RequestStream
from llmapp.runtime.core.engine import TokenLogprob, Usage
from llmapp.runtime.text.tokenizer import Tokenizer

Kind = Literal["chat", "text"]
KEEPALIVE_SECONDS = 15.0


def usage_json(usage: Usage | None) -> dict[str, Any]:
    u = usage or Usage(0, 0, 0)
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def sum_usage(usages: list[Usage | None]) -> Usage:
    got = [u for u in usages if u is not None]
    return Usage(
        sum(u.prompt_tokens for u in got),
        sum(u.completion_tokens for u in got),
        sum(u.cached_tokens for u in got),
    )


def sse(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


@dataclass
class Choice:
    """One choice of a reply as its deltas arrive."""

    kind: Kind
    index: int
    tokenizer: Tokenizer
    logprobs: bool
    text: list[str] = field(default_factory=list)
    pending: list[TokenLogprob] = field(default_factory=list)  # not yet sent with any text
    all_logprobs: list[TokenLogprob] = field(default_factory=list)
    final: Delta | None = None
    tools: bool = False  # the reply may hold tool calls
    tool_names: list[str] = field(default_factory=list)
    streaming: bool = False
    emitted: int = 0  # characters of content sent so far
    n_calls: int = 0  # tool calls sent so far
    calls: list[dict[str, Any]] = field(default_factory=list)
    splitter: StreamSplitter | None = None

    def __post_init__(self) -> None:
        if self.tools and self.streaming:
            self.splitter = StreamSplitter(self.tool_names)

    def _lp_entry(self, token: int, logprob: float) -> dict[str, Any]:
        data = self.tokenizer.token_bytes(token)
        return {"token": self.tokenizer.token_piece(token), "logprob": logprob, "bytes": list(data)}

    def chat_logprobs(self, items: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        content = []
        for lp in items:
            entry = self._lp_entry(lp.token_id, lp.logprob)
            entry["top_logprobs"] = [self._lp_entry(t, v) for t, v in lp.top]
            content.append(entry)
        return {"content": content}

    def text_logprobs(self, items: list[TokenLogprob], offset: int) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        tokens, values, tops, offsets = [], [], [], []
        for lp in items:
            piece = self.tokenizer.token_piece(lp.token_id)
            tokens.append(piece)
            values.append(lp.logprob)
            tops.append({self.tokenizer.token_piece(t): v for t, v in lp.top})
            offsets.append(offset)
            offset += len(piece)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops,
                "text_offset": offsets}  # fmt: skip

    def logprobs_json(self, items: list[TokenLogprob], offset: int = 0) -> dict[str, Any] | None:
        if self.kind == "chat":
            return self.chat_logprobs(items)
        return self.text_logprobs(items, offset)

    def push(self, delta: Delta) -> list[dict[str, Any]]:
        """The streamed choices for this delta (none while it adds no text yet)."""
        if delta.finish_reason is not None:
            self.final = delta
        self.pending.extend(delta.logprobs)
        self.all_logprobs.extend(delta.logprobs)
        if not delta.text:
            return []
        self.text.append(delta.text)
        if self.splitter is None:
            return [self._content(delta.text)]
        content, calls = self.splitter.feed(delta.text)
        out = [self._content(content)] if content else []
        return out + [c for call in calls for c in self._call_chunks(call)]

    def _content(self, text: str) -> dict[str, Any]:
        offset = self.emitted
        self.emitted += len(text)
        items, self.pending = self.pending, []
        body = {"content": text} if self.kind == "chat" else None
        return self._choice(body, text, items, offset, None)

    def _call_chunks(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        """A call as OpenAI streams it: id, type and name first, then the arguments."""
        index = self.n_calls
        self.n_calls += 1
        head = {"index": index, "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""}}  # fmt: skip
        args = {"index": index, "function": {"arguments": call["function"]["arguments"]}}
        return [self._choice({"tool_calls": [part]}, "", [], 0, None) for part in (head, args)]

    def closing(self) -> list[dict[str, Any]]:
        """The last streamed choices: text held back, then the one with the finish reason."""
        out = []
        if self.splitter is not None:
            rest, calls = self.splitter.finish()
            if rest:
                out.append(self._content(rest))
            out += [c for call in calls for c in self._call_chunks(call)]
        items, self.pending = self.pending, []
        body: dict[str, Any] | None = {} if self.kind == "chat" else None
        out.append(self._choice(body, "", items, self.emitted, self.finish_reason))
        return out

    def _choice(
        self,
        body: dict[str, Any] | None,
        text: str,
        items: list[TokenLogprob],
        offset: int,
        finish: str | None,
    ) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.kind == "chat":
            out["delta"] = body
        else:
            out["text"] = text
        out["logprobs"] = self.logprobs_json(items, offset) if items else None
        out["finish_reason"] = finish
        return out

    @property
    def finish_reason(self) -> str:
        if self.n_calls or (self.splitter is None and self.calls):
            return "tool_calls"
        reason = self.final.finish_reason if self.final else None
        return reason if reason in ("stop", "length") else "stop"

    def whole(self) -> dict[str, Any]:
        text = "".join(self.text)
        out: dict[str, Any] = {"index": self.index}
        if self.kind == "chat" and self.tools:
            content, self.calls = split_reply(text, self.tool_names)
            message: dict[str, Any] = {"role": "assistant", "content": content or None}
            if self.calls:
                message["tool_calls"] = self.calls
            out["message"] = message
        elif self.kind == "chat":
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["text"] = text
        out["logprobs"] = self.logprobs_json(self.all_logprobs) if self.logprobs else None
        out["finish_reason"] = self.finish_reason
        return out


@dataclass
class ReplyMeta:
    kind: Kind
    id: str
    model: str
    created: int

    def envelope(self, choices: list[dict[str, Any]], chunk: bool) -> dict[str, Any]:
        if self.kind == "chat":
            obj = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": "llmapp",
            "choices": choices,
        }


async def with_keepalive(
    items: AsyncIterator[Any], every: float = KEEPALIVE_SECONDS
) -> AsyncIterator[Any]:
    """Items as they come, and None whenever `every` seconds pass without one.

    The pending read is never cancelled by a tick (cancelling it would abort the request);
    it is cancelled only when the consumer itself goes away.
    """
    it = aiter(items)
    pending: asyncio.Future[Any] = asyncio.ensure_future(anext(it))
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=every)
            if not done:
                yield None
                continue
            try:
                item = pending.result()
            except StopAsyncIteration:
                return
            yield item
            pending = asyncio.ensure_future(anext(it))
    finally:
        if not pending.done():
            pending.cancel()


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, Delta]]:
    """(index, delta) from several streams as they arrive; leaving early aborts them all."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0].__aiter__()) as deltas:
            async for delta in deltas:
                yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, Delta] | None] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for delta in stream:
                await queue.put((i, delta))
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            item = await queue.get()
            if item is None:
                open_streams -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
