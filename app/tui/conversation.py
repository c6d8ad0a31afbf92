"""What a conversation is, apart from how it is shown or stored: messages and sampling settings."""

from __future__ import annotations

import itertools
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from llmapp.runtime.errors import LlmappError

TITLE_WIDTH = 60
NEW_TITLE = "New chat"

# A message's status: done, stopped (escape, or the app quit mid-reply), error; a reply being
# written is "generating" (never saved as such).
DONE, STOPPED, ERROR, GENERATING = "done", "stopped", "error", "generating"


class SettingsError(LlmappError, ValueError):
    """A conversation setting is out of range."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise SettingsError(message)


@dataclass(frozen=True)
class ChatSettings:
    """Per-conversation generation settings; the panel edits them, the backend reads them."""

    system: str = ""
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    max_tokens: int = 1024
    seed: int | None = None

    def __post_init__(self) -> None:
        _check(
            math.isfinite(self.temperature) and 0.0 <= self.temperature <= 10.0,
            "temperature must be in [0, 10]",
        )
        _check(0.0 < self.top_p <= 1.0, "top-p must be in (0, 1]")
        _check(0.0 <= self.min_p <= 1.0, "min-p must be in [0, 1]")
        _check(self.top_k >= 0, "top-k must be >= 0 (0 = off)")
        _check(self.max_tokens >= 1, "max tokens must be >= 1")
        _check(self.seed is None or self.seed >= 0, "seed must be >= 0 (or empty for random)")

    @classmethod
    def for_model(cls, model: str, system: str = "") -> ChatSettings:
        """Defaults from the model's catalog entry where it has them, llama.cpp's otherwise."""
        from llmapp.runtime.files import store

        base = cls(system=system)
        defaults = store.catalog_defaults(model)
        if defaults is None:
            return base  # a path, a remote model, or an unreadable catalog: plain defaults
        chosen = {
            f.name: getattr(defaults, f.name)
            for f in fields(defaults)
            if f.name in {g.name for g in fields(cls)} and getattr(defaults, f.name) is not None
        }
        return replace(base, **chosen)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None, fallback: ChatSettings) -> ChatSettings:
        """Settings saved by this or an older version; unknown keys and bad values fall back."""
        try:
            data = json.loads(text or "{}")
            known = {f.name for f in fields(cls)}
            return replace(fallback, **{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError, AttributeError):
            return fallback

    def sampling_params(self) -> Any:
        from llmapp.runtime import SamplingParams

        return SamplingParams.layered(self)  # the settings start from the catalog's defaults


@dataclass
class Message:
    role: str  # user | assistant
    content: str
    status: str = DONE
    model: str = ""  # the model that wrote an assistant message
    id: int | None = None  # row id once saved


_keys = itertools.count(1)


@dataclass
class Conversation:
    """One chat. `key` names it in the UI before (and after) it has a database id."""

    model: str
    settings: ChatSettings
    messages: list[Message] = field(default_factory=list)
    id: int | None = None
    title: str = NEW_TITLE
    updated: float = field(default_factory=time.time)
    generating: bool = False
    key: str = field(default_factory=lambda: f"c{next(_keys)}")

    def request_messages(self) -> list[dict[str, str]]:
        """The messages a backend sees: the system prompt, then every turn that has text."""
        out = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
        out += [{"role": m.role, "content": m.content} for m in self.messages if m.content]
        return out

    def last(self, role: str) -> Message | None:
        return next((m for m in reversed(self.messages) if m.role == role), None)


def make_title(text: str, width: int = TITLE_WIDTH) -> str:
    """The first user message on one line, cut to `width` characters."""
    line = " ".join(text.split())
    if not line:
        return NEW_TITLE
    return line if len(line) <= width else line[: width - 1].rstrip() + "…"
