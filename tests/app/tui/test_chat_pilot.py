"""The chat app driven by Textual's pilot on a scripted backend: the UI's own logic.

The same flows against the real engine and model are in test_chat_real.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from chat_helpers import CODE_REPLY, ScriptedBackend, notes, screen_text, wait_until

from llmapp.app.tui.app import ChatApp, ChatScreen
from llmapp.app.tui.conversation import DONE, STOPPED
from llmapp.app.tui.dialogs import ModelPicker, SettingsScreen
from llmapp.app.tui.history import History
from llmapp.app.tui.widgets import ConversationList, MessageView

MakeApp = Callable[..., tuple[ChatApp, ScriptedBackend]]


def chat(app: ChatApp) -> ChatScreen:
    return app.chat_screen


async def started(pilot: Any, app: ChatApp) -> ChatScreen:
    await wait_until(pilot, lambda: chat(app).pane is not None, what="the first pane")
    return chat(app)


async def send(pilot: Any, text: str) -> None:
    await pilot.press(*text)
    await pilot.press("enter")


def sidebar(app: ChatApp) -> str:
    """The titles in the sidebar, one per line."""
    rows = app.query_one(ConversationList)
    return "\n".join(str(rows.get_option_at_index(i).prompt) for i in range(rows.option_count))


def notices(app: ChatApp) -> str:
    """The notifications raised so far (toasts are not drawn under run_test)."""
    return " | ".join(str(n.message) for n in app._notifications)


def n_messages(screen: ChatScreen) -> int:
    conv = screen.conversation
    return len(conv.messages) if conv else 0


async def test_send_streams_a_markdown_reply(make_app: MakeApp) -> None:
    app, backend = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await started(pilot, app)
        await send(pilot, "show me code")
        await wait_until(pilot, lambda: n_messages(screen) == 2, what="the reply")
        conv = screen.conversation
        assert conv is not None and conv.messages[1].content == CODE_REPLY
        assert conv.messages[1].status == DONE
        assert conv.title == "show me code"
        assert screen.pane is not None and screen.pane.input.text == ""
        await wait_until(pilot, lambda: "print(i)" in screen_text(app), what="code on screen")
        assert "42.0 tok/s" in screen_text(app) and "cached 4/12" in screen_text(app)


async def test_newline_keys_do_not_send(make_app: MakeApp) -> None:
    app, backend = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await started(pilot, app)
        await pilot.press("a", "ctrl+j", "b", "shift+enter", "c")
        assert screen.pane is not None and screen.pane.input.text == "a\nb\nc"
        assert backend.requests == []
        await pilot.press("enter")
        await wait_until(pilot, lambda: n_messages(screen) == 2)
        assert backend.requests[0][1][-1]["content"] == "a\nb\nc"


async def test_escape_stops_and_keeps_the_partial_reply(make_app: MakeApp) -> None:
    app, backend = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await started(pilot, app)
        await send(pilot, "wait for it [hold]")
        await wait_until(pilot, lambda: backend.active == 1 and "Done." in screen_text(app))
        await pilot.press("escape")
        await wait_until(pilot, lambda: n_messages(screen) == 2, what="the stopped reply")
        reply = screen.conversation.messages[1]  # type: ignore[union-attr]
        assert reply.status == STOPPED and reply.content == "You said: wait for it. Done."
        assert backend.aborted == 1 and backend.active == 0
        assert "stopped" in screen_text(app)
    saved = History(app.history.path).load(1).messages
    assert [(m.role, m.status) for m in saved] == [("user", DONE), ("assistant", STOPPED)]


async def test_two_conversations_generate_at_once(make_app: MakeApp) -> None:
    app, backend = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await started(pilot, app)
        await send(pilot, "first [hold]")
        await wait_until(pilot, lambda: backend.active == 1)
        first = screen.conversation
        await pilot.press("ctrl+n")
        await send(pilot, "second [hold]")
        await wait_until(pilot, lambda: backend.active == 2, what="both streaming")
        second = screen.conversation
        assert first is not None and second is not None and first is not second
        assert first.generating and second.generating
        await wait_until(pilot, lambda: screen_text(app).count("●") == 2, what="two markers")
        backend.release.set()
        await wait_until(pilot, lambda: not first.generating and not second.generating)
        assert [m.status for m in first.messages + second.messages] == [DONE] * 4
        assert "●" not in screen_text(app)


async def test_switching_by_keys_and_click(make_app: MakeApp) -> None:
    app, backend = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await started(pilot, app)
        await send(pilot, "alpha")
        await wait_until(pilot, lambda: n_messages(screen) == 2)
        alpha = screen.current
        await pilot.press("ctrl+n")
        await send(pilot, "beta")
        await wait_until(pilot, lambda: n_messages(screen) == 2)
        beta = screen.current
        assert screen._sidebar_keys == [beta, alpha]  # newest first
        await pilot.press("ctrl+down")
        assert screen.current == alpha
        await pilot.press("ctrl+up")
        assert screen.current == beta
        await pilot.press("ctrl+tab")
        assert screen.current == alpha
        await pilot.click("#conversations", offset=(4, 0))  # the first row: beta
        await wait_until(pilot, lambda: screen.current == beta, what="click to switch")


async def test_regenerate_and_edit(make_app: MakeApp) -> None:
    app, backend = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await started(pilot, app)
        await send(pilot, "one")
        await wait_until(pilot, lambda: n_messages(screen) == 2)
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: len(backend.requests) == 2 and n_messages(screen) == 2)
        conv = screen.conversation
        assert conv is not None
        assert [m.content for m in conv.messages] == ["one", "You said: one. Done."]
        assert len(app.query(MessageView)) == 2
        await pilot.press("ctrl+e")
        pane = screen.pane
        assert pane is not None and pane.input.text == "one" and conv.messages == []
        await pilot.press("end", *" more", "enter")
        await wait_until(pilot, lambda: n_messages(screen) == 2)
        assert [m.content for m in conv.messages] == ["one more", "You said: one more. Done."]
        assert conv.title == "one more"
    saved = History(app.history.path).load(1).messages
    assert [m.content for m in saved] == ["one more", "You said: one more. Done."]


async def test_history_survives_a_restart(make_app: MakeApp) -> None:
    app, backend = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await started(pilot, app)
        await send(pilot, "remember me")
        await wait_until(pilot, lambda: n_messages(screen) == 2)
        await pilot.press("ctrl+q")
    assert app.return_code == 0 and backend.closed
    app, backend = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await started(pilot, app)
        assert "remember me" in screen_text(app)  # in the sidebar
        await pilot.press("ctrl+down")  # from the new empty chat to the saved one
        await wait_until(pilot, lambda: n_messages(screen) == 2)
        await send(pilot, "and again")
        await wait_until(pilot, lambda: n_messages(screen) == 4)
        assert [m["content"] for m in backend.requests[0][1]] == [
            "remember me",
            "You said: remember me. Done.",
            "and again",
        ]


async def test_resume_opens_the_conversation(make_app: MakeApp) -> None:
    app, _ = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await started(pilot, app)
        await send(pilot, "resume this")
        await wait_until(pilot, lambda: n_messages(screen) == 2)
    app, _ = make_app(resume=1)
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await started(pilot, app)
        assert n_messages(screen) == 2
        assert "You said: resume this" in screen_text(app)


async def test_quit_mid_reply_saves_it_as_stopped(make_app: MakeApp) -> None:
    app, backend = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        await started(pilot, app)
        await send(pilot, "long one [hold]")
        await wait_until(pilot, lambda: backend.active == 1)
        await pilot.press("ctrl+q")
    assert app.return_code == 0 and backend.aborted == 1
    saved = History(app.history.path).load(1).messages
    assert [m.status for m in saved] == [DONE, STOPPED]


async def test_settings_panel_changes_the_request(make_app: MakeApp) -> None:
    app, backend = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await started(pilot, app)
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen))
        dialog = app.screen
        dialog.query_one("#temperature").value = "0"  # type: ignore[attr-defined]
        dialog.query_one("#seed").value = "7"  # type: ignore[attr-defined]
        dialog.query_one("#system").text = "Be brief."  # type: ignore[attr-defined]
        dialog.query_one("#top_k").value = "abc"  # type: ignore[attr-defined]
        await pilot.press("ctrl+s")
        assert "top-k" in screen_text(app)  # refused, with the reason, the panel stays
        dialog.query_one("#top_k").value = "20"  # type: ignore[attr-defined]
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatScreen))
        await send(pilot, "hi")
        await wait_until(pilot, lambda: n_messages(screen) == 2)
        _, messages, settings = backend.requests[0]
        assert (settings.temperature, settings.seed, settings.top_k) == (0.0, 7, 20)
        assert messages[0] == {"role": "system", "content": "Be brief."}
    saved = History(app.history.path).load(1)
    assert saved.settings.seed == 7 and saved.settings.system == "Be brief."


async def test_picker_switches_model_and_pulls(make_app: MakeApp) -> None:
    app, backend = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await started(pilot, app)
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: "scripted:other" in screen_text(app))
        assert "not pulled" in screen_text(app) and "ctx 8192" in screen_text(app)
        await pilot.press("down", "enter")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatScreen))
        assert screen.conversation is not None and screen.conversation.model == "scripted:other"
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: "scripted:big" in screen_text(app))
        await pilot.press("down", "enter")  # from the current one; not pulled: pulls first
        await wait_until(pilot, lambda: isinstance(app.screen, ChatScreen), what="pull done")
        assert backend.pulls == ["scripted:big"]
        assert screen.conversation.model == "scripted:big"
        await send(pilot, "hello")
        await wait_until(pilot, lambda: n_messages(screen) == 2)
        assert backend.requests[-1][0] == "scripted:big"


async def test_picker_pull_can_be_cancelled(make_app: MakeApp) -> None:
    backend = ScriptedBackend()

    async def slow_models() -> list[Any]:
        models = await ScriptedBackend.models(backend)
        return [*models[:2], type(models[2])("scripted:slow", False, 10)]

    backend.models = slow_models  # type: ignore[method-assign]
    app, _ = make_app(backend)
    async with app.run_test(size=(80, 24)) as pilot:
        await started(pilot, app)
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: "scripted:slow" in screen_text(app))
        await pilot.press("down", "down", "enter")
        await wait_until(pilot, lambda: "downloading" in screen_text(app), what="progress")
        await pilot.press("escape")
        await wait_until(pilot, lambda: "cancelled" in screen_text(app))
        assert isinstance(app.screen, ModelPicker)  # still open: pick another or leave
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatScreen))
        assert app.chat_screen.conversation.model == "scripted:small"  # type: ignore[union-attr]


async def test_search_filters_the_sidebar(make_app: MakeApp) -> None:
    app, backend = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await started(pilot, app)
        for text in ("apples are red", "bananas are yellow"):
            await pilot.press("ctrl+n")
            await send(pilot, text)
            await wait_until(pilot, lambda: n_messages(screen) == 2)
        await pilot.press("ctrl+f", *"yellow")
        await wait_until(pilot, lambda: "apples" not in sidebar(app))
        assert "bananas" in sidebar(app)
        await pilot.press("escape")  # closes the search, shows everything again
        await wait_until(pilot, lambda: "apples" in sidebar(app))
        app.query_one(ConversationList).focus()
        await pilot.press("slash", *"You said: apples")  # replies are searched too
        await wait_until(pilot, lambda: "bananas" not in sidebar(app))
        assert "apples" in sidebar(app)


async def test_export_and_copy(make_app: MakeApp, tmp_path: Path) -> None:
    app, backend = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await started(pilot, app)
        await pilot.press("ctrl+x")
        await wait_until(pilot, lambda: "Nothing to export" in notices(app))
        await send(pilot, "export me")
        await wait_until(pilot, lambda: n_messages(screen) == 2)
        await pilot.press("ctrl+x")
        path = tmp_path / "exports" / "chat-1-export-me.md"
        await wait_until(pilot, lambda: path.exists(), what="the export")
        text = path.read_text()
        assert text.startswith("# export me") and "You said: export me. Done." in text
        assert f"Exported to {path}" in notices(app)
        await pilot.press("ctrl+y")
        await wait_until(pilot, lambda: app.clipboard == "You said: export me. Done.")


async def test_prompt_too_long_keeps_the_text(make_app: MakeApp) -> None:
    app, backend = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await started(pilot, app)
        await send(pilot, "this is too long")
        await wait_until(pilot, lambda: "context holds 4096" in notes(app))
        assert screen.pane is not None and screen.pane.input.text == "this is too long"
        assert n_messages(screen) == 0
    assert History(app.history.path).summaries() == []  # nothing half-saved


async def test_unknown_model_is_shown_not_raised(make_app: MakeApp) -> None:
    app, backend = make_app(model="missing:model")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await started(pilot, app)
        await wait_until(pilot, lambda: "unknown model" in notes(app))
        await send(pilot, "hello?")
        await wait_until(pilot, lambda: not screen.conversation.generating)  # type: ignore[union-attr]
        assert backend.requests == []
        assert "hello?" in screen_text(app)
    assert app.return_code in (None, 0)


async def test_help_theme_and_resize(make_app: MakeApp) -> None:
    app, backend = make_app()
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await started(pilot, app)
        await pilot.press("f1")
        await wait_until(pilot, lambda: "regenerate the last reply" in screen_text(app))
        await pilot.press("escape")
        await pilot.press("ctrl+t")
        assert app.theme == "textual-light"
        await send(pilot, "code please")
        for size in ((40, 12), (200, 60), (20, 6), (80, 24)):
            await pilot.resize_terminal(*size)
            await pilot.pause(0.05)
        await wait_until(pilot, lambda: n_messages(screen) == 2)
        await pilot.press("ctrl+t")
        assert app.theme == "textual-dark"
    assert History(app.history.path).get_meta("theme") == "textual-dark"


async def test_input_takes_text_while_the_model_loads(make_app: MakeApp) -> None:
    app, backend = make_app(model="slow:model")
    async with app.run_test(size=(80, 24)) as pilot:
        screen = await started(pilot, app)
        await wait_until(pilot, lambda: "slow:model · loading" in screen_text(app))
        await send(pilot, "early bird")
        await wait_until(pilot, lambda: "early bird" in screen_text(app))
        assert backend.requests == [] and screen.conversation.generating  # type: ignore[union-attr]
        backend.loaded.set()
        await wait_until(pilot, lambda: n_messages(screen) == 2, what="the reply after the load")
        assert screen.conversation.messages[1].content == "You said: early bird. Done."  # type: ignore[union-attr]
