"""`llmapp chat`: the Textual app. A sidebar of conversations, one pane per open conversation,
a status line with live figures, and modal screens for help, settings and the model picker.

The screen talks to a ChatBackend only (backend.py), so the same app runs models in process
or against a server, and tests can drive it with a scripted backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any, cast

from textual import events, on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.theme import Theme
from textual.widgets import ContentSwitcher, Footer, Input, Label, OptionList, Static

from llmapp.app.tui.backend import BackendStats, Cancel, ChatBackend, PullCancelled, in_thread
from llmapp.app.tui.conversation import NEW_TITLE, ChatSettings, Conversation, Message
from llmapp.app.tui.dialogs import HelpScreen, ModelPicker, SettingsScreen
from llmapp.app.tui.history import History, HistoryError, to_markdown
from llmapp.app.tui.pane import ChatPane
from llmapp.app.tui.styles import CSS
from llmapp.app.tui.widgets import ConversationList, PullBar, SidebarEntry
from llmapp.runtime.errors import LlmappError

LIGHT, DARK = "textual-light", "textual-dark"


class ChatScreen(Screen[None]):
    BINDINGS = [
        Binding("ctrl+n", "new", "New", priority=True),
        Binding("ctrl+o", "pick_model", "Model", priority=True),
        Binding("ctrl+s", "settings", "Settings", priority=True),
        Binding("escape", "stop", "Stop"),
        Binding("f1", "help", "Help"),
        Binding("ctrl+up", "move(-1)", "Previous", show=False, priority=True),
        Binding("ctrl+down,ctrl+tab", "move(1)", "Next", show=False, priority=True),
        Binding("ctrl+r", "regenerate", "Regenerate", show=False, priority=True),
        Binding("ctrl+e", "edit", "Edit last", show=False, priority=True),
        Binding("ctrl+y", "copy", "Copy reply", show=False, priority=True),
        Binding("ctrl+x", "export", "Export", show=False, priority=True),
        Binding("ctrl+f", "search", "Search", show=False, priority=True),
        Binding("ctrl+t", "toggle_theme", "Theme", show=False, priority=True),
    ]

    def __init__(self, chat: ChatApp) -> None:
        super().__init__()
        self.chat = chat
        self.backend: ChatBackend = chat.backend
        self.history: History = chat.history
        self.conversations: dict[str, Conversation] = {}
        self.current: str | None = None
        self.model = chat.model or ""
        self.search = ""
        self.model_state: dict[str, str] = {}
        self._pulls: dict[str, Cancel] = {}
        self._sidebar_keys: list[str] = []

    def compose(self) -> ComposeResult:
        with Horizontal(id="body"):
            with Vertical(id="sidebar"):
                yield Label("Chats  (/ search)", classes="title")
                yield Input(placeholder="search", id="search", compact=True)
                yield ConversationList(id="conversations")
            with Vertical(id="main"):
                yield PullBar(id="pull")
                yield ContentSwitcher(id="panes")
        yield Static("", id="status", markup=False)
        yield Footer()

    async def on_mount(self) -> None:
        self.query_one("#search").display = False
        self.query_one("#pull").display = False
        self.model = self.model or await self._initial_model()
        conv = self._resumed() or self._new_conversation(self.model)
        await self.open_conversation(conv)
        self.set_interval(self.chat.status_interval, self.update_status)
        if self.chat.preload:
            self.preload(conv.model)

    async def _initial_model(self) -> str:
        last = self._meta(self._last_model_key())
        if last:
            return last
        try:
            return await self.backend.default_model()
        except LlmappError as exc:
            await self.show_error(str(exc))
            return "default"

    def _resumed(self) -> Conversation | None:
        if self.chat.resume is None:
            return None
        try:
            conv = self.history.load(self.chat.resume)
        except HistoryError as exc:
            self.notify(str(exc), severity="error")
            return None
        self.conversations[conv.key] = conv
        return conv

    def _new_conversation(self, model: str) -> Conversation:
        conv = Conversation(model, ChatSettings.for_model(model, self.chat.system))
        self.conversations[conv.key] = conv
        return conv

    @work(group="preload", exit_on_error=False)
    async def preload(self, model: str) -> None:
        # The input takes text meanwhile; a send waits for this same load.
        await self.ensure_model(model)

    # ---- the PaneHost side -----------------------------------------------------------------

    async def ensure_model(self, model: str) -> bool:
        """Pull and load `model` as needed, showing progress; errors end up on screen."""
        if self.backend.is_ready(model):
            return True
        self.model_state[model] = "loading"
        self.update_status()
        cancel = self._pulls.setdefault(model, Cancel())
        error: str | None = None
        try:
            await self.backend.load(model, progress=self._pull_progress(model), cancel=cancel)
            self.model_state[model] = "ready"
            self._set_meta(self._last_model_key(), model)
            split = getattr(self.backend, "describe_load", lambda _m: None)(model)
            if split:
                self.notify(f"{model}: {split}", timeout=8)
        except PullCancelled:
            self.model_state[model] = "not pulled"
            error = f"pull of {model} cancelled (ctrl+o picks another model)"
        except Exception as exc:  # a failed load is shown, never as a traceback
            self.model_state[model] = "error"
            error = str(exc) if isinstance(exc, LlmappError) else repr(exc)
        finally:
            if self._pulls.get(model) is cancel:
                del self._pulls[model]
            self.query_one(PullBar).display = False
            self.update_status()
        if error is not None:
            await self.show_error(error)
        return error is None

    def _pull_progress(self, model: str) -> Any:
        def report(stage: str, done: int, total: int) -> None:
            self.model_state[model] = f"pulling {100 * done // total}%" if total else "pulling"
            bar = self.query_one(PullBar)
            bar.display = True
            bar.report(f"pulling {model}: {stage}", done, total)

        return report

    def save_message(self, conv: Conversation, message: Message) -> None:
        try:
            self.history.add_message(conv, message)
        except HistoryError as exc:
            self.notify(str(exc), severity="error")
        self.conversation_changed(conv)

    def forget_from(self, conv: Conversation, message: Message) -> None:
        try:
            self.history.delete_messages_from(conv, message)
        except HistoryError as exc:
            self.notify(str(exc), severity="error")

    def forget_conversation(self, conv: Conversation) -> None:
        if conv.id is None:
            return
        try:
            self.history.delete_conversation(conv.id)
        except HistoryError as exc:
            self.notify(str(exc), severity="error")
        conv.id = None
        self.refresh_sidebar()

    def conversation_changed(self, conv: Conversation) -> None:
        self.refresh_sidebar()
        if conv.key == self.current:
            self.update_status()

    async def show_error(self, text: str) -> None:
        """An error the user must see: a note in the current conversation and a notification."""
        pane = self.pane
        if pane is not None:
            await pane.show_note(text)
        self.notify(text, severity="error", timeout=8)

    # ---- conversations -----------------------------------------------------------------------

    @property
    def pane(self) -> ChatPane | None:
        if self.current is None:
            return None
        with contextlib.suppress(Exception):
            return self.query_one(f"#pane-{self.current}", ChatPane)
        return None

    @property
    def conversation(self) -> Conversation | None:
        return self.conversations.get(self.current) if self.current else None

    async def open_conversation(self, conv: Conversation) -> None:
        self.conversations.setdefault(conv.key, conv)
        switcher = self.query_one(ContentSwitcher)
        if not switcher.query(f"#pane-{conv.key}"):
            await switcher.mount(ChatPane(conv, self, self.chat.cursor_blink))
        switcher.current = f"pane-{conv.key}"
        self.current = conv.key
        self.refresh_sidebar()
        self.update_status()
        pane = self.pane
        if pane is not None:
            pane.input.focus()

    async def open_key(self, key: str) -> None:
        conv = self.conversations.get(key)
        if conv is None and key.startswith("db"):
            try:
                conv = self.history.load(int(key[2:]))
            except HistoryError as exc:
                self.notify(str(exc), severity="error")
                return
            # Opened once: the same Conversation object stays, whichever key it is found by.
            known = next((c for c in self.conversations.values() if c.id == conv.id), None)
            conv = known or conv
        if conv is not None:
            await self.open_conversation(conv)

    def sidebar_entries(self) -> list[SidebarEntry]:
        by_id = {c.id: c for c in self.conversations.values() if c.id is not None}
        query = self.search.lower()
        entries = [
            SidebarEntry(c.key, c.title, c.generating)
            for c in self.conversations.values()
            if c.id is None and (not query or query in c.title.lower() or c.key == self.current)
        ]
        entries.reverse()  # newest unsaved first
        try:
            summaries = self.history.summaries(self.search)
        except HistoryError as exc:
            self.notify(str(exc), severity="error")
            summaries = []
        for s in summaries:
            conv = by_id.get(s.id)
            if conv is not None:
                entries.append(SidebarEntry(conv.key, conv.title, conv.generating))
            else:
                entries.append(SidebarEntry(f"db{s.id}", s.title, False))
        return entries

    def refresh_sidebar(self) -> None:
        entries = self.sidebar_entries()
        self._sidebar_keys = [e.key for e in entries]
        self.query_one(ConversationList).show(entries, self.current)

    @on(OptionList.OptionSelected, "#conversations")
    async def _picked(self, event: OptionList.OptionSelected) -> None:
        if event.option.id is not None and event.option.id != self.current:
            await self.open_key(event.option.id)

    # ---- status line -------------------------------------------------------------------------

    def update_status(self) -> None:
        conv, pane = self.conversation, self.pane
        if conv is None or pane is None:
            return
        stats = self.backend.stats(conv.model) if self.backend.is_ready(conv.model) else None
        state = self.model_state.get(conv.model) or (
            "ready" if self.backend.is_ready(conv.model) else "not loaded"
        )
        self.query_one("#status", Static).update(status_text(conv.model, state, pane.stats, stats))

    # ---- actions -----------------------------------------------------------------------------

    async def action_new(self) -> None:
        conv = self.conversation
        if conv is not None and conv.id is None and not conv.messages:
            if self.pane is not None:
                self.pane.input.focus()
            return  # this one is still empty: no second blank conversation
        await self.open_conversation(self._new_conversation(conv.model if conv else self.model))

    async def action_move(self, step: int) -> None:
        keys = self._sidebar_keys
        if not keys:
            return
        index = keys.index(self.current) if self.current in keys else -1
        await self.open_key(keys[(index + step) % len(keys)])

    def action_stop(self) -> None:
        pane, conv = self.pane, self.conversation
        if pane is not None and pane.stop():
            return
        if conv is not None and conv.model in self._pulls:
            self._pulls[conv.model].cancel()

    def action_help(self) -> None:
        self.app.push_screen(HelpScreen())

    async def action_regenerate(self) -> None:
        pane = self.pane
        if pane is not None and not await pane.regenerate():
            self.notify("Nothing to regenerate yet.")

    async def action_edit(self) -> None:
        pane = self.pane
        if pane is not None and not await pane.edit_last():
            self.notify("No message to edit yet.")

    async def action_copy(self) -> None:
        conv = self.conversation
        reply = conv.last("assistant") if conv else None
        if reply is None or not reply.content:
            self.notify("No reply to copy yet.")
            return
        self.app.copy_to_clipboard(reply.content)  # OSC 52: works over ssh in most terminals
        copied = await in_thread(lambda: copy_to_system_clipboard(reply.content), "clipboard")
        where = "clipboard" if copied else "terminal clipboard (OSC 52)"
        self.notify(f"Copied the last reply ({len(reply.content)} characters) to the {where}.")

    def action_export(self) -> None:
        conv = self.conversation
        if conv is None or not conv.messages:
            self.notify("Nothing to export yet.")
            return
        try:
            path = export_conversation(conv, self.chat.export_dir)
        except OSError as exc:
            self.notify(f"Export failed: {exc}", severity="error")
            return
        self.notify(f"Exported to {path}", timeout=10)

    def action_search(self) -> None:
        search = self.query_one("#search", Input)
        search.display = True
        search.focus()

    def on_conversation_list_search_requested(self) -> None:
        self.action_search()

    @on(Input.Changed, "#search")
    def _search_changed(self, event: Input.Changed) -> None:
        self.search = event.value.strip()
        self.refresh_sidebar()

    @on(Input.Submitted, "#search")
    def _search_done(self) -> None:
        self.query_one(ConversationList).focus()

    def on_key(self, event: events.Key) -> None:
        search = self.query_one("#search", Input)
        if event.key == "escape" and search.has_focus:
            event.stop()
            search.value = ""
            search.display = False
            if self.pane is not None:
                self.pane.input.focus()

    def action_toggle_theme(self) -> None:
        self.app.theme = LIGHT if self.app.current_theme.dark else DARK

    def action_settings(self) -> None:
        conv = self.conversation
        if conv is None:
            return

        def done(settings: ChatSettings | None) -> None:
            if settings is not None:
                conv.settings = settings
                self._save_conversation(conv)
                self.notify("Settings saved for this conversation.")

        self.app.push_screen(SettingsScreen(conv.settings, conv.model), done)

    def action_pick_model(self) -> None:
        conv = self.conversation
        if conv is None:
            return

        def done(model: str | None) -> None:
            if model is not None and model != conv.model:
                self.switch_model(conv, model)

        self.app.push_screen(ModelPicker(self.backend, conv.model), done)

    def switch_model(self, conv: Conversation, model: str) -> None:
        # Settings still at the old model's defaults follow the model; edited ones stay.
        old_defaults = ChatSettings.for_model(conv.model, conv.settings.system)
        if conv.settings == old_defaults:
            conv.settings = ChatSettings.for_model(model, conv.settings.system)
        conv.model = model
        self.model = model
        self._save_conversation(conv)
        self.update_status()
        self.preload(model)

    def _save_conversation(self, conv: Conversation) -> None:
        if conv.id is None:
            return  # saved with its first message
        try:
            self.history.save_conversation(conv)
        except HistoryError as exc:
            self.notify(str(exc), severity="error")

    async def shutdown(self) -> None:
        """Stop every reply (each pane saves its partial reply) before the app goes."""
        for pane in self.query(ChatPane):
            await pane.stop_and_wait()
        for cancel in self._pulls.values():
            cancel.cancel()

    # ---- app-wide settings kept in the history ---------------------------------------------

    def _last_model_key(self) -> str:
        return f"last_model:{self.backend.label}"

    def _meta(self, key: str) -> str | None:
        try:
            return self.history.get_meta(key)
        except HistoryError:  # an unreadable preference only means the default
            return None

    def _set_meta(self, key: str, value: str) -> None:
        with contextlib.suppress(HistoryError):
            self.history.set_meta(key, value)


class ChatApp(App[int]):
    """The chat app. Build it with a backend and a history; run() returns the exit status."""

    CSS = CSS
    TITLE = "llmapp chat"
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True)]

    def __init__(
        self,
        backend: ChatBackend,
        history: History,
        *,
        model: str | None = None,
        system: str = "",
        resume: int | None = None,
        export_dir: Path | None = None,
        cursor_blink: bool = True,
        preload: bool = True,
        status_interval: float = 0.5,
    ) -> None:
        super().__init__()
        self.backend = backend
        self.history = history
        self.model = model
        self.system = system
        self.resume = resume
        self.export_dir = export_dir
        self.cursor_blink = cursor_blink
        self.preload = preload
        self.status_interval = status_interval
        self._closed = False

    def get_default_screen(self) -> ChatScreen:
        return ChatScreen(self)

    @property
    def chat_screen(self) -> ChatScreen:
        return cast(ChatScreen, self.screen_stack[0])

    def on_mount(self) -> None:
        threading.Thread(target=_warm_up_highlighting, name="warm-up", daemon=True).start()
        theme = self.history_meta("theme")
        if theme in self.available_themes:
            self.theme = theme
        self.theme_changed_signal.subscribe(self, self._theme_changed)

    def _theme_changed(self, theme: Theme) -> None:
        with contextlib.suppress(HistoryError):
            self.history.set_meta("theme", theme.name)

    def history_meta(self, key: str) -> str | None:
        with contextlib.suppress(HistoryError):
            return self.history.get_meta(key)
        return None

    async def action_quit(self) -> None:
        await self.close()
        self.exit(0)

    async def close(self) -> None:
        """Abort replies (their partial text is saved), free the engines, close the history."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self.chat_screen.shutdown()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.backend.close(), timeout=15)
        self.history.close()


def _warm_up_highlighting() -> None:
    # A code fence in an unknown language makes Pygments load every lexer plugin installed
    # (IPython's takes a second to import). Done here, at start-up, instead of on the event
    # loop in the middle of a streaming reply.
    with contextlib.suppress(Exception):
        from pygments.lexers import get_lexer_by_name
        from pygments.util import ClassNotFound

        with contextlib.suppress(ClassNotFound):
            get_lexer_by_name("llmapp-no-such-language")


def status_text(model: str, state: str, reply: Any, stats: BackendStats | None) -> str:
    """model · state · tok/s · TTFT · cached prompt tokens · KV use · running requests."""
    parts = [model] if state == "ready" else [model, state]
    if reply.tokens_per_s is not None:
        parts.append(f"{reply.tokens_per_s:.1f} tok/s")
    if reply.ttft_ms is not None:
        parts.append(f"TTFT {reply.ttft_ms:.0f} ms")
    if reply.cached_tokens is not None and reply.prompt_tokens:
        parts.append(f"cached {reply.cached_tokens}/{reply.prompt_tokens}")
    if stats is not None and stats.kv_usage_percent is not None:
        parts.append(f"KV {stats.kv_usage_percent:.0f}%")
    if stats is not None and stats.running is not None:
        parts.append(f"{stats.running} running")
    if stats is not None and stats.offload:
        parts.append(stats.offload)
    return " · ".join(parts)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "chat"


def export_conversation(conv: Conversation, directory: Path | None) -> Path:
    """Write `conv` as Markdown into `directory` (default: exports/ in the store home)."""
    if directory is None:
        from llmapp.runtime.files.store import store_home

        directory = store_home() / "exports"
    directory.mkdir(parents=True, exist_ok=True)
    title = conv.title if conv.title != NEW_TITLE else "chat"
    path = directory / f"chat-{conv.id or 'new'}-{_slug(title)}.md"
    path.write_text(to_markdown(conv), encoding="utf-8")
    return path


_CLIPBOARD_TOOLS = (
    ("wl-copy",),
    ("xclip", "-selection", "clipboard"),
    ("xsel", "--clipboard", "--input"),
    ("pbcopy",),
)


def copy_to_system_clipboard(text: str) -> bool:
    """Copy with the first clipboard tool found; False when there is none (or it fails)."""
    for tool in _CLIPBOARD_TOOLS:
        if shutil.which(tool[0]) is None:
            continue
        try:
            subprocess.run(list(tool), input=text.encode(), timeout=3, check=True)
        except (OSError, subprocess.SubprocessError):
            continue
        return True
    return False
