"""Small widgets of the chat screen: the prompt input, one message, the sidebar list, the status."""

from __future__ import annotations

from dataclasses import dataclass

from textual import events
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message as TextualMessage
from textual.widgets import Label, Markdown, OptionList, ProgressBar, Static, TextArea
from textual.widgets.option_list import Option

from llmapp.app.tui.conversation import DONE, ERROR, GENERATING, STOPPED, Message


class PromptInput(TextArea):
    """A multi-line input where enter sends and shift+enter / ctrl+j start a new line."""

    class Submitted(TextualMessage):
        def __init__(self, prompt: PromptInput, text: str) -> None:
            super().__init__()
            self.prompt = prompt
            self.text = text

    async def _on_key(self, event: events.Key) -> None:
        if event.key == "enter":
            event.stop()
            event.prevent_default()
            self.post_message(self.Submitted(self, self.text))
            return
        if event.key in ("shift+enter", "ctrl+j"):
            event.stop()
            event.prevent_default()
            self.insert("\n")
            return
        await super()._on_key(event)

    def set_text(self, text: str) -> None:
        """Replace the text and put the cursor at its end."""
        self.text = text
        self.move_cursor(self.document.end)


_STATUS_NOTE = {STOPPED: " · stopped", ERROR: " · error", GENERATING: " · …"}


class MessageView(Vertical):
    """One message: who wrote it, then its text as Markdown (streamed while it is written)."""

    def __init__(self, message: Message, model: str = "") -> None:
        super().__init__(classes=f"message -{message.role}")
        self.message = message
        self._model = message.model or model

    def compose(self) -> ComposeResult:
        yield Label(self._header(), classes="who")
        yield Markdown(self.message.content or None)

    @property
    def body(self) -> Markdown:
        return self.query_one(Markdown)

    def _header(self, note: str = "") -> str:
        who = "You" if self.message.role == "user" else (self._model or "assistant")
        return who + _STATUS_NOTE.get(self.message.status, "") + note

    async def finish(self, error: str | None = None, note: str = "") -> None:
        """The reply is over: render its whole text (fenced code can be blank after a stream)."""
        self.set_class(self.message.status != DONE, "-interrupted")
        self.query_one(".who", Label).update(self._header(note))
        await self.body.update(self.message.content)
        if error:
            await self.mount(Static(f"⚠ {error}", classes="error", markup=False))


class Note(Static):
    """A line in a conversation that is not a message: an error, a pull that failed."""

    def __init__(self, text: str, kind: str = "error") -> None:
        super().__init__(("⚠ " if kind == "error" else "") + text, classes=f"note -{kind}")


@dataclass(frozen=True)
class SidebarEntry:
    key: str  # conversation key (open ones) or "db<id>" (only in the database so far)
    title: str
    generating: bool


class ConversationList(OptionList):
    """The sidebar's conversations, newest first; a marker shows which ones are generating."""

    BINDINGS = [Binding("slash", "search", "Search", show=False)]

    class SearchRequested(TextualMessage):
        pass

    def action_search(self) -> None:
        self.post_message(self.SearchRequested())

    def show(self, entries: list[SidebarEntry], current: str | None) -> None:
        width = max(self.size.width - 4, 12) if self.size.width else 22
        options = []
        for entry in entries:
            mark = "● " if entry.generating else "  "
            title = entry.title if len(entry.title) <= width else entry.title[: width - 1] + "…"
            options.append(Option(mark + title, id=entry.key))
        self.clear_options()
        self.add_options(options)
        keys = [e.key for e in entries]
        if current in keys:
            self.highlighted = keys.index(current)


class PullBar(Vertical):
    """Progress of a model pull (the first use of a model, or the picker): what, then how far."""

    def compose(self) -> ComposeResult:
        yield Label("", id="pull-stage")
        with Horizontal():
            yield ProgressBar(total=None, show_eta=False, id="pull-progress")
            yield Label("esc: cancel", id="pull-hint")

    def report(self, stage: str, done: int, total: int) -> None:
        self.query_one("#pull-stage", Label).update(stage)
        bar = self.query_one(ProgressBar)
        # Before pip hands over any bytes the size is known but nothing moves: show that as
        # an indeterminate bar rather than a bar stuck at 0%.
        bar.update(total=total if done else None, progress=done)
