"""Fixtures for the chat app tests: apps on a scripted backend and a temp history."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from chat_helpers import ScriptedBackend

from llmapp.app.tui.app import ChatApp
from llmapp.app.tui.history import History


@pytest.fixture
def history_path(tmp_path: Path) -> Path:
    return tmp_path / "chat.db"


@pytest.fixture
def make_app(history_path: Path, tmp_path: Path) -> Callable[..., tuple[ChatApp, ScriptedBackend]]:
    """A ChatApp on a scripted backend and a fresh history (call again to 'restart' it)."""

    def make(backend: Any = None, **options: Any) -> tuple[ChatApp, Any]:
        backend = backend or ScriptedBackend()
        options.setdefault("cursor_blink", False)
        options.setdefault("export_dir", tmp_path / "exports")
        app = ChatApp(backend, History(history_path), **options)
        return app, backend

    return make
