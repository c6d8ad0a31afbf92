"""The chat app end to end on the real engine and smollm2:135m: the pilot, then the real
`llmapp chat` command in a terminal (tmux).

One Engine (1 thread) serves the pilot tests; each app borrows it, as a restart of the app
would find the model's prefix cache still warm. The store home is a temp folder that links
the real model file, with a models.toml that sets this model's defaults (greedy, short replies),
so the defaults the app shows come from the catalog entry as a user's would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from chat_helpers import catalog_entry_toml, notes, screen_text, wait_until
from textual.widgets import Input

from llmapp.app.tui.app import ChatApp, ChatScreen
from llmapp.app.tui.backend import EngineBackend
from llmapp.app.tui.conversation import DONE, STOPPED
from llmapp.app.tui.dialogs import ModelPicker, SettingsScreen
from llmapp.app.tui.history import History

pytestmark = pytest.mark.real_model

MODEL = "smollm2:135m"
SIZE = (80, 24)


def make_home(home: Path, model_path: Path, defaults: dict[str, Any]) -> Path:
    """A store home holding the real model (linked, with its recorded hash)."""
    models = home / "models"
    models.mkdir(parents=True)
    (models / model_path.name).symlink_to(model_path)
    sidecar = model_path.with_name(model_path.name + ".sha256")
    shutil.copy(sidecar, models / sidecar.name)
    (home / "models.toml").write_text(catalog_entry_toml(MODEL, defaults))
    return home


@pytest.fixture(scope="module")
def engine(smollm2_path: Path) -> Iterator[Any]:
    from llmapp.runtime import Engine, EngineOptions, RunnerOptions

    runner = RunnerOptions(ctx_size=1024, n_threads=1)
    with Engine(smollm2_path, EngineOptions(runner=runner)) as loaded:
        yield loaded


@pytest.fixture
def home(smollm2_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # The model path is resolved (smollm2_path) before LLMAPP_HOME points at the temp home.
    home = make_home(tmp_path / "home", smollm2_path, {"temperature": 0.0, "max_tokens": 16})
    monkeypatch.setenv("LLMAPP_HOME", str(home))
    return home


@pytest.fixture
def real_app(engine: Any, home: Path, tmp_path: Path) -> Callable[..., ChatApp]:
    def make(**options: Any) -> ChatApp:
        backend = EngineBackend(n_threads=1, engines={MODEL: engine})
        history = History(tmp_path / "chat.db")
        return ChatApp(backend, history, model=MODEL, cursor_blink=False, **options)

    return make


def last_reply(app: ChatApp) -> Any:
    conv = app.chat_screen.conversation
    return conv.messages[-1] if conv and conv.messages else None


async def send_and_wait(pilot: Any, app: ChatApp, text: str) -> Any:
    screen = app.chat_screen
    await wait_until(pilot, lambda: screen.pane is not None)
    before = len(screen.conversation.messages)  # type: ignore[union-attr]
    await pilot.press(*text, "enter")
    await wait_until(
        pilot,
        lambda: len(screen.conversation.messages) == before + 2,  # type: ignore[union-attr]
        timeout=60,
        what="the reply",
    )
    return last_reply(app)


async def set_max_tokens(pilot: Any, app: ChatApp, n: int) -> None:
    await pilot.press("ctrl+s")
    await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen))
    app.screen.query_one("#max_tokens", Input).value = str(n)
    await pilot.press("ctrl+s")
    await wait_until(pilot, lambda: isinstance(app.screen, ChatScreen))


async def test_reply_streams_and_history_continues_after_restart(
    real_app: Callable[..., ChatApp],
) -> None:
    app = real_app()
    async with app.run_test(size=SIZE) as pilot:
        reply = await send_and_wait(pilot, app, "What is the capital of France?")
        assert reply.status == DONE and reply.content.strip() and reply.model == MODEL
        pane = app.chat_screen.pane
        assert pane is not None and 0 < pane.stats.n_tokens <= 16
        assert pane.stats.prompt_tokens and pane.stats.tokens_per_s
        assert "tok/s" in screen_text(app) and "TTFT" in screen_text(app)
        await pilot.press("ctrl+q")
    assert app.return_code == 0
    app = real_app(resume=1)
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.chat_screen.pane is not None)
        assert len(app.chat_screen.conversation.messages) == 2  # type: ignore[union-attr]
        assert "What is the capital of France?" in screen_text(app)
        reply = await send_and_wait(pilot, app, "And of Germany?")
        assert reply.status == DONE and reply.content.strip()
        pane = app.chat_screen.pane
        assert pane is not None and pane.stats.cached_tokens  # the old turns came from cache
    saved = History(app.history.path).load(1).messages
    assert [m.role for m in saved] == ["user", "assistant", "user", "assistant"]


async def test_escape_stops_the_engine_request(
    real_app: Callable[..., ChatApp], engine: Any
) -> None:
    app = real_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = app.chat_screen
        await wait_until(pilot, lambda: screen.pane is not None)
        await set_max_tokens(pilot, app, 400)
        await pilot.press(*"Write a very long story about a dragon.", "enter")
        pane = screen.pane
        assert pane is not None
        await wait_until(pilot, lambda: pane.stats.n_tokens >= 8, timeout=60, what="tokens")
        await pilot.press("escape")
        await wait_until(pilot, lambda: not pane.generating, what="the stop")
        reply = last_reply(app)
        assert reply.status == STOPPED and reply.content.strip()
        assert "stopped" in screen_text(app)
        await wait_until(pilot, lambda: engine.metrics_snapshot()["running"] == 0)
        assert pane.stats.n_tokens < 400


async def test_two_conversations_batch_in_one_engine(
    real_app: Callable[..., ChatApp], engine: Any
) -> None:
    app = real_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = app.chat_screen
        await wait_until(pilot, lambda: screen.pane is not None)
        first = screen.pane
        assert first is not None
        await set_max_tokens(pilot, app, 900)  # long enough to outlast the whole test
        first.input.text = "Tell me a long story about the sea."
        await pilot.press("enter", "ctrl+n")
        second = screen.pane
        assert second is not None and second is not first
        # The panel is tested above; here the second request must follow the first at once.
        second.conversation.settings = replace(second.conversation.settings, max_tokens=900)
        second.input.text = "Tell me a long story about a forest."
        await pilot.press("enter")

        def both_running() -> bool:
            running = engine.metrics_snapshot()["running"]
            return running == 2 and first.generating and second.generating

        await wait_until(pilot, both_running, timeout=60, what="two requests in one batch")
        await wait_until(pilot, lambda: screen_text(app).count("●") == 2)
        n_second = second.stats.n_tokens
        await wait_until(
            pilot, lambda: first.stats.n_tokens > 4 and second.stats.n_tokens > n_second
        )
        await pilot.press("escape")  # stops the conversation on screen only
        await wait_until(pilot, lambda: not second.generating)
        assert first.generating
        await pilot.press("ctrl+down")
        assert screen.pane is first
        await pilot.press("escape")
        await wait_until(pilot, lambda: not first.generating)
        await wait_until(pilot, lambda: engine.metrics_snapshot()["running"] == 0)
        assert [m.status for m in first.conversation.messages + second.conversation.messages] == [
            DONE,
            STOPPED,
            DONE,
            STOPPED,
        ]


async def test_regenerate_and_edit(real_app: Callable[..., ChatApp]) -> None:
    app = real_app()
    async with app.run_test(size=SIZE) as pilot:
        reply = await send_and_wait(pilot, app, "Name a colour.")
        screen = app.chat_screen
        conv = screen.conversation
        assert conv is not None
        await pilot.press("ctrl+r")
        await wait_until(pilot, lambda: last_reply(app) is not reply, timeout=60)
        await wait_until(pilot, lambda: not conv.generating and len(conv.messages) == 2)
        assert last_reply(app).content == reply.content  # greedy: the same answer again
        await pilot.press("ctrl+e")
        assert screen.pane is not None and screen.pane.input.text == "Name a colour."
        assert conv.messages == []
        await pilot.press("end", "backspace", *" and a fruit.", "enter")
        await wait_until(pilot, lambda: len(conv.messages) == 2 and not conv.generating, timeout=60)
        assert conv.messages[0].content == "Name a colour and a fruit."
    saved = History(app.history.path).load(1).messages
    assert [m.content for m in saved][0] == "Name a colour and a fruit." and len(saved) == 2


async def test_picker_shows_the_store_and_settings_show_catalog_defaults(
    real_app: Callable[..., ChatApp],
) -> None:
    app = real_app()
    async with app.run_test(size=SIZE) as pilot:
        await wait_until(pilot, lambda: app.chat_screen.pane is not None)
        await pilot.press("ctrl+s")
        await wait_until(pilot, lambda: isinstance(app.screen, SettingsScreen))
        assert app.screen.query_one("#temperature", Input).value == "0.0"
        assert app.screen.query_one("#max_tokens", Input).value == "16"
        await pilot.press("escape")
        await pilot.press("ctrl+o")
        await wait_until(pilot, lambda: isinstance(app.screen, ModelPicker))
        picker = app.screen
        assert isinstance(picker, ModelPicker)
        await wait_until(pilot, lambda: bool(picker.choices))
        smol = next(c for c in picker.choices if c.name == MODEL)
        assert smol.pulled and smol.loaded and smol.context == 8192 and smol.quant == "Q4_1"
        assert not next(c for c in picker.choices if c.name == "gemma3:270m").pulled
        assert "not pulled" in screen_text(app)
        await pilot.press("enter")  # the current model: nothing to pull, nothing changes
        await wait_until(pilot, lambda: isinstance(app.screen, ChatScreen))
        assert app.chat_screen.conversation.model == MODEL  # type: ignore[union-attr]


async def test_prompt_longer_than_the_context(real_app: Callable[..., ChatApp]) -> None:
    app = real_app()
    async with app.run_test(size=SIZE) as pilot:
        screen = app.chat_screen
        await wait_until(pilot, lambda: screen.pane is not None)
        pane = screen.pane
        assert pane is not None
        long_text = "tell me more " * 600
        pane.input.text = long_text
        await pilot.press("enter")
        # The engine's own words, e.g. "the prompt has 1831 tokens, which exceeds the
        # available context size of 1024 tokens (raise --ctx-size or shorten the prompt)".
        await wait_until(pilot, lambda: "context size of 1024" in notes(app), timeout=30)
        assert pane.input.text == long_text
        assert screen.conversation is not None and screen.conversation.messages == []


# ---- the real command in a real terminal ----------------------------------------------------


class Tmux:
    """One tmux server of our own (its own socket), so nobody else's sessions are touched."""

    def __init__(self, socket: Path) -> None:
        self.base = ["tmux", "-S", str(socket)]

    def run(self, *args: str) -> str:
        done = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=30)
        return done.stdout

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "chat")

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "chat", *keys)

    def wait_for(self, predicate: Callable[[str], bool], timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.screen()
            if predicate(text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; the screen:\n{text}")
            time.sleep(0.2)


def command_line() -> list[str]:
    exe = shutil.which("llmapp")
    return [exe] if exe else [sys.executable, "-m", "llmapp.app.cli"]


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_llmapp_chat_in_tmux(smollm2_path: Path, tmp_path: Path) -> None:
    home = make_home(tmp_path / "home", smollm2_path, {"temperature": 0.0, "max_tokens": 300})
    exit_file = tmp_path / "exit"
    argv = [*command_line(), "chat", MODEL, "--threads", "1", "--ctx-size", "1024"]
    argv += ["--history", str(tmp_path / "chat.db")]
    shell = f"{subprocess.list2cmdline(argv)}; echo $? > {exit_file}; sleep 30"
    tmux = Tmux(tmp_path / "tmux.sock")
    env = {**os.environ, "LLMAPP_HOME": str(home), "TERM": "xterm-256color"}
    subprocess.run(
        [*tmux.base, "new-session", "-d", "-s", "chat", "-x", "80", "-y", "24", shell],
        env=env,
        check=True,
        timeout=30,
    )
    try:
        tmux.wait_for(lambda s: f"{MODEL} · KV" in s, 120, "the model to load")
        tmux.keys("What is the capital of France?", "Enter")
        # "cached" shows once the reply is complete (the engine's final figures).
        screen = tmux.wait_for(lambda s: "cached" in s and "0 running" in s, 120, "a reply")
        assert "What is the capital" in screen  # its title in the sidebar
        tmux.keys("Write a very long story about a dragon and a knight.", "Enter")
        tmux.wait_for(lambda s: f"{MODEL} · …" in s, 60, "the story to start")
        time.sleep(1.0)
        tmux.keys("Escape")
        screen = tmux.wait_for(lambda s: "· stopped" in s, 30, "the stop")
        assert "0 running" in tmux.wait_for(lambda s: "0 running" in s, 10, "nothing running")
        tmux.keys("C-q")
        deadline = time.monotonic() + 30
        while not exit_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert exit_file.read_text().strip() == "0", tmux.screen()
        assert "Traceback" not in tmux.screen()
    finally:
        tmux.run("kill-server")
    saved = History(tmp_path / "chat.db").load(1).messages
    assert [(m.role, m.status) for m in saved] == [
        ("user", DONE),
        ("assistant", DONE),
        ("user", DONE),
        ("assistant", STOPPED),
    ]
