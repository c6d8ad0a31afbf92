"""SVG snapshots of the chat app's main screens at 80x24, on the scripted backend.

Update after an intended change of looks: pytest tests/app/tui/test_chat_snapshots.py
--snapshot-update, then look at the SVGs in __snapshots__/ before committing them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chat_helpers import ScriptedBackend, notes, screen_text, wait_until

from llmapp.app.tui.app import ChatApp, ChatScreen
from llmapp.app.tui.dialogs import HelpScreen, ModelPicker, SettingsScreen
from llmapp.app.tui.pane import ReplyStats

MakeApp = Callable[..., tuple[ChatApp, ScriptedBackend]]
SIZE = (80, 24)


async def ready(pilot: Any, app: ChatApp) -> None:
    """The first pane is up and its model loaded (the status line says so)."""
    screen = app.chat_screen
    await wait_until(pilot, lambda: screen.pane is not None)
    await wait_until(pilot, lambda: screen.model_state.get(screen.model) == "ready")
    screen.update_status()


async def converse(pilot: Any, app: ChatApp, *texts: str) -> None:
    """Each text in a conversation of its own, each reply complete."""
    screen = app.chat_screen
    await ready(pilot, app)
    for i, text in enumerate(texts):
        if i:
            await pilot.press("ctrl+n")
        await pilot.press(*text, "enter")
        conv = screen.conversation
        assert conv is not None
        await wait_until(pilot, lambda c=conv: len(c.messages) == 2 and not c.generating)
    await pilot.pause()


def test_conversation(snap_compare: Any, make_app: MakeApp) -> None:
    app, _ = make_app()

    async def run_before(pilot: Any) -> None:
        await converse(pilot, app, "What is the capital of France?", "show me some code")

    assert snap_compare(app, run_before=run_before, terminal_size=SIZE)


def test_conversation_light_theme(snap_compare: Any, make_app: MakeApp) -> None:
    app, _ = make_app()

    async def run_before(pilot: Any) -> None:
        await converse(pilot, app, "show me some code")
        await pilot.press("ctrl+t")
        await pilot.pause()

    assert snap_compare(app, run_before=run_before, terminal_size=SIZE)


def test_two_generating(snap_compare: Any, make_app: MakeApp) -> None:
    app, backend = make_app()

    async def run_before(pilot: Any) -> None:
        await converse(pilot, app, "a finished one")
        await pilot.press("ctrl+n", *"first long reply [hold]", "enter")
        await wait_until(pilot, lambda: backend.active == 1)
        await pilot.press("ctrl+n", *"second long reply [hold]", "enter")
        await wait_until(pilot, lambda: backend.active == 2)
        screen: ChatScreen = app.chat_screen
        await wait_until(pilot, lambda: any(e.generating for e in screen.sidebar_entries()))
        await wait_until(pilot, lambda: "second long reply. Done." in screen_text(app))
        assert screen.pane is not None
        # Live figures depend on the clock; pin them so the picture does not.
        screen.pane.stats = ReplyStats(state="streaming")
        screen.update_status()
        await pilot.pause()

    assert snap_compare(app, run_before=run_before, terminal_size=SIZE)


def test_stopped_reply(snap_compare: Any, make_app: MakeApp) -> None:
    app, backend = make_app()

    async def run_before(pilot: Any) -> None:
        screen: ChatScreen = app.chat_screen
        await ready(pilot, app)
        await pilot.press(*"tell me everything [hold]", "enter")
        await wait_until(pilot, lambda: backend.active == 1)
        await pilot.press("escape")
        await wait_until(pilot, lambda: backend.active == 0)
        await wait_until(pilot, lambda: not screen.conversation.generating)  # type: ignore[union-attr]
        assert screen.pane is not None
        screen.pane.stats = ReplyStats(state="stopped")
        screen.update_status()
        await pilot.pause()

    assert snap_compare(app, run_before=run_before, terminal_size=SIZE)


def test_prompt_too_long(snap_compare: Any, make_app: MakeApp) -> None:
    app, _ = make_app()

    async def run_before(pilot: Any) -> None:
        await ready(pilot, app)
        await pilot.press(*"this prompt is too long", "enter")
        await wait_until(pilot, lambda: "context holds" in notes(app))
        await pilot.pause()

    assert snap_compare(app, run_before=run_before, terminal_size=SIZE)


def test_help(snap_compare: Any, make_app: MakeApp) -> None:
    app, _ = make_app()

    async def run_before(pilot: Any) -> None:
        await ready(pilot, app)
        await pilot.press("f1")
        await wait_until(pilot, lambda: isinstance(app.screen, HelpScreen))
        await pilot.pause()

    assert snap_compare(app, run_before=run_before, terminal_size=SIZE)


def test_settings(snap_compare: Any, make_app: MakeApp) -> None:
    app, _ = make_app(system="You are terse.")

    async def run_before(pilot: Any) -> None:
        await ready(pilot, app)
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen))
        await pilot.pause()

    assert snap_compare(app, run_before=run_before, terminal_size=SIZE)


def test_model_picker(snap_compare: Any, make_app: MakeApp) -> None:
    app, _ = make_app()

    async def run_before(pilot: Any) -> None:
        await ready(pilot, app)
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen, ModelPicker))
        picker = app.screen
        await wait_until(pilot, lambda: bool(picker.choices))  # type: ignore[attr-defined]
        await pilot.pause()

    assert snap_compare(app, run_before=run_before, terminal_size=SIZE)
