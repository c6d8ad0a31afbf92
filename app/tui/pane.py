"""One conversation on screen: its messages, its input, and the worker that streams its reply.

Every open conversation keeps its pane (hidden when another is shown), so a reply goes on
streaming into its own pane while the user types in another. Each pane's reply worker is in
the pane's own "reply" group: starting or cancelling one never touches another pane's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Protocol

from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.widgets import Markdown
from textual.worker import Worker, WorkerCancelled, WorkerFailed

from llmapp.app.tui.backend import BackendError, ChatBackend, ReplyChunk, RequestRejected
from llmapp.app.tui.conversation import (
    DONE,
    ERROR,
    GENERATING,
    NEW_TITLE,
    STOPPED,
    Conversation,
    Message,
    make_title,
)
from llmapp.app.tui.widgets import MessageView, Note, PromptInput


class PaneHost(Protocol):
    """What a pane needs from the screen that holds it."""

    backend: ChatBackend

    async def ensure_model(self, model: str) -> bool: ...

    def save_message(self, conv: Conversation, message: Message) -> None: ...

    def forget_from(self, conv: Conversation, message: Message) -> None: ...

    def forget_conversation(self, conv: Conversation) -> None: ...

    def conversation_changed(self, conv: Conversation) -> None: ...


@dataclass
class ReplyStats:
    """Figures of the latest reply, for the status line."""

    state: str = ""  # waiting | streaming | done | stopped | error
    started: float = 0.0
    first_at: float | None = None
    n_tokens: int = 0
    tokens_per_s: float | None = None
    ttft_ms: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None

    def add(self, chunk: ReplyChunk) -> None:
        now = time.perf_counter()
        if chunk.text and self.first_at is None:
            self.first_at = now
            self.ttft_ms = (now - self.started) * 1000
            self.state = "streaming"
        self.n_tokens += chunk.n_tokens
        if self.first_at is not None and now > self.first_at and self.n_tokens > 1:
            self.tokens_per_s = (self.n_tokens - 1) / (now - self.first_at)
        if chunk.finish_reason is not None:  # the backend's own figures win at the end
            self.tokens_per_s = chunk.tokens_per_s or self.tokens_per_s
            self.ttft_ms = chunk.ttft_ms if chunk.ttft_ms is not None else self.ttft_ms
            self.prompt_tokens = chunk.prompt_tokens
            self.cached_tokens = chunk.cached_tokens


_OUTCOME = {"stop": DONE, "length": DONE, "abort": STOPPED, "error": ERROR}


class ChatPane(Vertical):
    def __init__(self, conversation: Conversation, host: PaneHost, cursor_blink: bool) -> None:
        super().__init__(id=f"pane-{conversation.key}", classes="pane")
        self.conversation = conversation
        self.host = host
        self.stats = ReplyStats()
        self._cursor_blink = cursor_blink
        self._worker: Worker[None] | None = None

    def compose(self) -> ComposeResult:
        with VerticalScroll(classes="messages"):
            for message in self.conversation.messages:
                yield MessageView(message, self.conversation.model)
        prompt = PromptInput(
            placeholder="Message (enter: send, ctrl+j: new line)", compact=True, classes="prompt"
        )
        prompt.cursor_blink = self._cursor_blink
        yield prompt

    def on_mount(self) -> None:
        # Follow new text only while the user has not scrolled up to read.
        self.messages.anchor()

    @property
    def messages(self) -> VerticalScroll:
        return self.query_one(".messages", VerticalScroll)

    @property
    def input(self) -> PromptInput:
        return self.query_one(PromptInput)

    @property
    def generating(self) -> bool:
        return self._worker is not None and self._worker.is_running

    # ---- sending -----------------------------------------------------------------------------

    async def on_prompt_input_submitted(self, event: PromptInput.Submitted) -> None:
        event.stop()
        await self.send(event.text)

    async def send(self, text: str) -> bool:
        """Add the user's message and start the reply; False when it cannot be sent now."""
        if not text.strip():
            return False
        if self.generating:
            self.app.notify("Still replying here: esc stops it.", severity="warning")
            return False
        conv = self.conversation
        message = Message("user", text)
        conv.messages.append(message)
        if conv.title == NEW_TITLE:
            conv.title = make_title(text)
        self.host.save_message(conv, message)  # saved now: a crash loses only the reply
        self.input.clear()
        await self.messages.mount(MessageView(message))
        self.start_reply()
        return True

    def start_reply(self) -> None:
        self._worker = self.run_worker(
            self._generate(), group="reply", exclusive=True, exit_on_error=False
        )

    async def _generate(self) -> None:
        conv = self.conversation
        conv.generating = True
        self.stats = ReplyStats(state="waiting", started=time.perf_counter())
        self.host.conversation_changed(conv)
        try:
            if await self.host.ensure_model(conv.model):
                await self._stream_reply()
            else:
                self.stats.state = "error"
        finally:
            conv.generating = False
            self.host.conversation_changed(conv)

    async def _stream_reply(self) -> None:
        conv = self.conversation
        reply = Message("assistant", "", status=GENERATING, model=conv.model)
        view = MessageView(reply)
        await self.messages.mount(view)
        stream = Markdown.get_stream(view.body)
        parts: list[str] = []
        error: str | None = None
        rejected: str | None = None
        final: ReplyChunk | None = None
        status = STOPPED  # what a cancelled worker (escape, quit) leaves
        chunks = self.host.backend.stream(conv.model, conv.request_messages(), conv.settings)
        try:
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    self.stats.add(chunk)
                    if chunk.text:
                        parts.append(chunk.text)
                        await stream.write(chunk.text)
                    final = chunk if chunk.finish_reason else final
            status = _OUTCOME.get(final.finish_reason or "", DONE) if final else DONE
            error = final.error if final else None
        except RequestRejected as exc:
            rejected = str(exc)
        except BackendError as exc:
            status, error = ERROR, str(exc)
        finally:
            # Runs when escape cancels this worker too: the partial reply stays, marked stopped.
            # stop() raises CancelledError when the stream's task was cancelled before it ever
            # ran (nothing was written); that is not this worker being cancelled.
            with contextlib.suppress(asyncio.CancelledError):
                await stream.stop()
            reply.content, reply.status = "".join(parts), status
            self.stats.state = reply.status
            if rejected is not None:
                await view.remove()
                await self._retract_prompt(rejected)
            else:
                await self._keep_reply(view, reply, error, final)

    async def _keep_reply(
        self, view: MessageView, reply: Message, error: str | None, final: ReplyChunk | None
    ) -> None:
        conv = self.conversation
        conv.messages.append(reply)
        if reply.content or reply.status != ERROR:
            self.host.save_message(conv, reply)
        note = " · max tokens reached" if final and final.finish_reason == "length" else ""
        await view.finish(error, note)

    async def _retract_prompt(self, reason: str) -> None:
        """The backend refused the prompt: take the message back, its text back to the input."""
        conv = self.conversation
        message = conv.last("user")
        if message is not None and conv.messages[-1] is message:
            await self._drop_from(len(conv.messages) - 1)
            if not self.input.text:
                self.input.set_text(message.content)
        if not conv.messages:  # a first message refused: no conversation is left to keep
            conv.title = NEW_TITLE
            self.host.forget_conversation(conv)
        self.stats.state = "error"
        await self.show_note(reason)

    # ---- stop, regenerate, edit ------------------------------------------------------------

    def stop(self) -> bool:
        """Stop the reply being generated here (escape); False when there is none."""
        if not self.generating or self._worker is None:
            return False
        self._worker.cancel()
        return True

    async def stop_and_wait(self) -> None:
        worker = self._worker
        if worker is not None and worker.is_running:
            worker.cancel()
            with contextlib.suppress(WorkerCancelled, WorkerFailed):
                await worker.wait()

    async def regenerate(self) -> bool:
        """Replace the last reply with a new one (or answer a last message that has none)."""
        await self.stop_and_wait()
        conv = self.conversation
        if conv.messages and conv.messages[-1].role == "assistant":
            await self._drop_from(len(conv.messages) - 1)
        if not conv.messages:
            return False
        self.start_reply()
        return True

    async def edit_last(self) -> bool:
        """Take back the last user message (and what followed) into the input for editing."""
        await self.stop_and_wait()
        conv = self.conversation
        message = conv.last("user")
        if message is None:
            return False
        index = max(i for i, m in enumerate(conv.messages) if m is message)
        await self._drop_from(index)
        if index == 0:
            conv.title = NEW_TITLE  # the resent text names the conversation again
        self.input.set_text(message.content)
        self.input.focus()
        return True

    async def _drop_from(self, index: int) -> None:
        conv = self.conversation
        dropped = conv.messages[index:]
        if dropped:
            self.host.forget_from(conv, dropped[0])
        del conv.messages[index:]
        for view in list(self.query(MessageView)):
            if any(view.message is m for m in dropped):
                await view.remove()
        await self.query(Note).remove()
        self.host.conversation_changed(conv)

    async def show_note(self, text: str, kind: str = "error") -> None:
        await self.messages.mount(Note(text, kind))
