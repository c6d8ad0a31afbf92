"""Chat history (sqlite, migrations), conversation settings, `llmapp chat --list` and `--resume`."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
from chat_helpers import catalog_entry_toml

from llmapp.app.cli import main
from llmapp.app.tui.conversation import (
    NEW_TITLE,
    STOPPED,
    ChatSettings,
    Conversation,
    Message,
    SettingsError,
    make_title,
)
from llmapp.app.tui.history import (
    MIGRATIONS,
    SCHEMA_VERSION,
    History,
    HistoryError,
    default_path,
    to_markdown,
)


def conversation(history: History, *texts: str, model: str = "m") -> Conversation:
    conv = Conversation(model, ChatSettings(system="sys"))
    conv.title = make_title(texts[0])
    for i, text in enumerate(texts):
        role = "user" if i % 2 == 0 else "assistant"
        message = Message(role, text, model=model if role != "user" else "")
        history.add_message(conv, message)
        conv.messages.append(message)
    return conv


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    history = History(tmp_path / "chat.db")
    conv = conversation(history, "hello", "hi there")
    history.add_message(conv, Message("user", "bye"))
    history.add_message(conv, Message("assistant", "part", STOPPED, "m"))
    history.close()
    loaded = History(tmp_path / "chat.db").load(conv.id or 0)
    assert [(m.role, m.content, m.status) for m in loaded.messages] == [
        ("user", "hello", "done"),
        ("assistant", "hi there", "done"),
        ("user", "bye", "done"),
        ("assistant", "part", "stopped"),
    ]
    assert loaded.settings.system == "sys" and loaded.title == "hello" and loaded.model == "m"


def test_summaries_newest_first_and_search(tmp_path: Path) -> None:
    history = History(tmp_path / "chat.db")
    a = conversation(history, "apples", "red 100% of the time")
    b = conversation(history, "bananas", "yellow_ish")
    assert [s.id for s in history.summaries()] == [b.id, a.id]
    assert [s.n_messages for s in history.summaries()] == [2, 2]
    assert [s.id for s in history.summaries("APPLE")] == [a.id]  # titles, any case
    assert [s.id for s in history.summaries("yellow")] == [b.id]  # message text
    assert [s.id for s in history.summaries("100%")] == [a.id]  # LIKE wildcards are literal
    assert history.summaries("_ish") == history.summaries("yellow_")
    assert history.summaries("nothing like this") == []
    history.add_message(a, Message("user", "more"))
    assert history.summaries()[0].id == a.id


def test_delete_from_and_conversation(tmp_path: Path) -> None:
    history = History(tmp_path / "chat.db")
    conv = conversation(history, "q1", "a1", "q2", "a2")
    history.delete_messages_from(conv, conv.messages[2])
    assert [m.content for m in history.load(conv.id or 0).messages] == ["q1", "a1"]
    history.delete_conversation(conv.id or 0)
    assert history.summaries() == []
    with pytest.raises(HistoryError, match="no conversation with id"):
        history.load(conv.id or 0)


def test_meta(tmp_path: Path) -> None:
    history = History(tmp_path / "chat.db")
    assert history.get_meta("theme") is None
    history.set_meta("theme", "textual-light")
    history.set_meta("theme", "textual-dark")
    assert history.get_meta("theme") == "textual-dark"


def test_migrates_an_old_database(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    db = sqlite3.connect(path)
    db.executescript(f"BEGIN; {MIGRATIONS[0]} PRAGMA user_version = 1; COMMIT;")
    db.execute(
        "INSERT INTO conversations (title, model, settings, created, updated)"
        " VALUES ('old', 'm', '{\"temperature\": 0.1, \"gone\": 1}', 0, 0)"
    )
    db.execute(
        "INSERT INTO messages (conversation_id, role, content, created) VALUES (1, 'user', 'x', 0)"
    )
    db.commit()
    db.close()
    history = History(path)
    assert history._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    old = history.load(1)
    assert old.settings.temperature == 0.1  # unknown keys are dropped, known ones kept
    assert [(m.content, m.model) for m in old.messages] == [("x", "")]
    history.set_meta("k", "v")  # the table version 2 added


def test_refuses_a_newer_database(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(HistoryError, match="newer llmapp"):
        History(path)


def test_unwritable_location_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(HistoryError, match="cannot open chat history"):
        History(tmp_path / "file" / "chat.db")


def test_default_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LLMAPP_CHAT_DB", raising=False)
    monkeypatch.setenv("LLMAPP_HOME", str(tmp_path))
    assert default_path() == tmp_path / "chat.db"
    monkeypatch.setenv("LLMAPP_CHAT_DB", str(tmp_path / "other.db"))
    assert default_path() == tmp_path / "other.db"


def test_markdown_export(tmp_path: Path) -> None:
    history = History(tmp_path / "chat.db")
    conv = conversation(history, "question", "```py\nx = 1\n```")
    conv.messages[1].status = STOPPED
    text = to_markdown(conv)
    assert text.startswith("# question\n")
    assert "## System\n\nsys" in text and "## You\n\nquestion" in text
    assert "## Assistant (m) (stopped)\n\n```py\nx = 1\n```" in text


def test_settings_checks_and_defaults() -> None:
    with pytest.raises(SettingsError):
        ChatSettings(temperature=-1)
    with pytest.raises(SettingsError):
        ChatSettings(top_p=0)
    with pytest.raises(SettingsError):
        ChatSettings(max_tokens=0)
    with pytest.raises(SettingsError):
        ChatSettings(seed=-2)
    plain = ChatSettings.for_model("no-such-model", system="s")
    assert plain == ChatSettings(system="s")
    fallback = ChatSettings(temperature=0.3)
    assert ChatSettings.from_json("not json", fallback) == fallback
    assert ChatSettings.from_json('{"temperature": 99}', fallback) == fallback  # out of range
    params = replace(fallback, seed=3).sampling_params()
    assert (params.temperature, params.seed, params.max_tokens) == (0.3, 3, 1024)


def test_settings_defaults_come_from_the_catalog(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    entry = catalog_entry_toml("smollm2:135m", {"temperature": 0.2, "top_k": 5})
    (tmp_path / "models.toml").write_text(entry)
    monkeypatch.setenv("LLMAPP_HOME", str(tmp_path))
    settings = ChatSettings.for_model("smollm2:135m")
    assert (settings.temperature, settings.top_k, settings.top_p) == (0.2, 5, 0.95)


def test_titles() -> None:
    assert make_title("  hello\n  world ") == "hello world"
    assert make_title("") == NEW_TITLE
    long = make_title("x" * 100)
    assert len(long) == 60 and long.endswith("…")


def test_cli_list_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "chat.db"
    assert main(["chat", "--list", "--history", str(db)]) == 0
    assert "no conversations yet" in capsys.readouterr().out
    history = History(db)
    conversation(history, "first question", "answer", model="smollm2:135m")
    history.close()
    assert main(["chat", "--history", str(db), "--list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["ID", "UPDATED", "MSGS", "MODEL", "TITLE"]
    assert out[1].split()[0] == "1" and out[1].endswith("first question")
    assert "smollm2:135m" in out[1]
    assert main(["chat", "--history", str(db), "--resume", "7"]) == 1
    assert "no conversation with id 7" in capsys.readouterr().err
