"""Modal screens: help (f1), conversation settings (ctrl+s), model picker (ctrl+o)."""

from __future__ import annotations

import contextlib
from dataclasses import replace

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, Static, TextArea
from textual.widgets.option_list import Option

from llmapp.app.tui.backend import Cancel, ChatBackend, ModelChoice, PullCancelled
from llmapp.app.tui.conversation import ChatSettings
from llmapp.app.tui.widgets import PullBar
from llmapp.runtime.errors import LlmappError

# (keys, what they do): the help screen and the README show this table.
KEYS: tuple[tuple[str, str], ...] = (
    ("enter", "send the message"),
    ("shift+enter, ctrl+j", "new line in the message"),
    ("escape", "stop the reply here (or cancel a pull)"),
    ("ctrl+n", "new conversation"),
    ("ctrl+up / ctrl+down", "previous / next conversation (ctrl+tab)"),
    ("ctrl+f, / in the sidebar", "search titles and messages"),
    ("ctrl+r", "regenerate the last reply"),
    ("ctrl+e", "edit and resend the last message"),
    ("ctrl+y", "copy the last reply"),
    ("ctrl+s", "settings of this conversation"),
    ("ctrl+o", "pick a model: switch, or pull one"),
    ("ctrl+x", "export this conversation to Markdown"),
    ("ctrl+t", "light / dark theme"),
    ("f1", "this help"),
    ("ctrl+q", "quit"),
)


def keys_markdown() -> str:
    rows = [f"| `{keys}` | {what} |" for keys, what in KEYS]
    return "\n".join(["| keys | action |", "|---|---|", *rows])


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape,f1,q", "close", "Close"),
    ]

    def compose(self) -> ComposeResult:
        width = max(len(keys) for keys, _ in KEYS) + 2
        table = "\n".join(f"{keys:<{width}}{what}" for keys, what in KEYS)
        with Vertical(classes="dialog", id="help"):
            yield Label("Keys", classes="title")
            with VerticalScroll(id="help-keys"):
                yield Static(table, markup=False)
            yield Label("escape closes · ctrl+p: command palette (themes, keys)", classes="hint")

    def action_close(self) -> None:
        self.dismiss(None)


# (field, label, parse) for the number fields of the settings panel
_FIELDS: tuple[tuple[str, str], ...] = (
    ("temperature", "temperature"),
    ("top_p", "top-p"),
    ("top_k", "top-k"),
    ("min_p", "min-p"),
    ("max_tokens", "max tokens"),
    ("seed", "seed"),
)
_INTS = {"top_k", "max_tokens", "seed"}


class SettingsScreen(ModalScreen[ChatSettings | None]):
    """Edit one conversation's settings; dismisses with the new settings, or None."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "save", "Save", priority=True),
    ]

    def __init__(self, settings: ChatSettings, model: str) -> None:
        super().__init__()
        self.settings = settings
        self.model = model

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="settings"):
            yield Label(f"Settings of this conversation ({self.model})", classes="title")
            yield Label("system prompt", classes="field-label")
            yield TextArea(self.settings.system, id="system", compact=True)
            for name, label in _FIELDS:
                value = getattr(self.settings, name)
                with Horizontal(classes="field"):
                    yield Label(label, classes="field-label")
                    yield Input(
                        "" if value is None else str(value),
                        placeholder="random" if name == "seed" else "",
                        id=name,
                        compact=True,
                    )
            yield Label("", id="settings-error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Save (ctrl+s)", id="save", variant="primary", compact=True)
                yield Button("Cancel (esc)", id="cancel", compact=True)

    def read(self) -> ChatSettings:
        """The settings as typed; ValueError (with a message for the user) when one is wrong."""
        values: dict[str, object] = {"system": self.query_one("#system", TextArea).text}
        for name, label in _FIELDS:
            raw = self.query_one(f"#{name}", Input).value.strip()
            if name == "seed" and not raw:
                values[name] = None
                continue
            try:
                values[name] = int(raw) if name in _INTS else float(raw)
            except ValueError:
                raise ValueError(f"{label}: {raw!r} is not a number") from None
        return replace(self.settings, **values)  # type: ignore[arg-type]

    @on(Button.Pressed, "#save")
    @on(Input.Submitted)
    def action_save(self) -> None:
        try:
            settings = self.read()
        except ValueError as exc:  # SettingsError is a ValueError too
            self.query_one("#settings-error", Label).update(str(exc))
            return
        self.dismiss(settings)

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


def _size(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def describe(choice: ModelChoice, current: str) -> str:
    mark = "▶ " if choice.name == current else "  "
    facts = [_size(choice.size), choice.quant, f"ctx {choice.context}" if choice.context else ""]
    state = "loaded" if choice.loaded else ("" if choice.pulled else "not pulled: enter pulls")
    text = " · ".join(f for f in (*facts, state) if f)
    return f"{mark}{choice.name}  {text}"


class ModelPicker(ModalScreen[str | None]):
    """Models in the store and in the catalog; picking one that is not pulled pulls it first."""

    BINDINGS = [Binding("escape", "cancel", "Cancel / close")]

    def __init__(self, backend: ChatBackend, current: str) -> None:
        super().__init__()
        self.backend = backend
        self.current = current
        self.choices: list[ModelChoice] = []
        self._pull: Cancel | None = None

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog", id="picker"):
            yield Label(f"Model of this conversation (now {self.current})", classes="title")
            yield OptionList(id="models")
            yield PullBar(id="picker-pull")
            yield Label("", id="picker-error", classes="error")
            yield Label("enter: use or pull · esc: cancel", classes="hint")

    async def on_mount(self) -> None:
        self.query_one(PullBar).display = False
        try:
            self.choices = await self.backend.models()
        except LlmappError as exc:
            self.query_one("#picker-error", Label).update(str(exc))
            return
        options = [Option(describe(c, self.current), id=c.name) for c in self.choices]
        models = self.query_one(OptionList)
        models.add_options(options)
        names = [c.name for c in self.choices]
        models.highlighted = names.index(self.current) if self.current in names else 0
        models.focus()

    @on(OptionList.OptionSelected, "#models")
    def pick(self, event: OptionList.OptionSelected) -> None:
        choice = next(c for c in self.choices if c.name == event.option.id)
        if choice.pulled:
            self.dismiss(choice.name)
        elif self._pull is None:
            self.pull(choice.name)

    @work(group="pull", exclusive=True, exit_on_error=False)
    async def pull(self, name: str) -> None:
        bar = self.query_one(PullBar)
        bar.display = True
        bar.report(f"pulling {name}", 0, 0)
        self._pull = cancel = Cancel()
        error = self.query_one("#picker-error", Label)
        try:
            await self.backend.pull(name, lambda *a: bar.report(f"{name}: {a[0]}", *a[1:]), cancel)
        except PullCancelled:
            error.update(f"pull of {name} cancelled")
        except Exception as exc:  # any failure is shown here, not as a traceback
            error.update(f"pull of {name} failed: {exc}")
        else:
            self.dismiss(name)
        finally:
            self._pull = None
            with contextlib.suppress(Exception):  # the screen may be gone already
                bar.display = False

    def action_cancel(self) -> None:
        if self._pull is not None:
            self._pull.cancel()
            return
        self.dismiss(None)
