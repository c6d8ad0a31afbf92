"""Chat history in sqlite: conversations and their messages, saved as each message completes.

The schema version lives in `PRAGMA user_version`; MIGRATIONS[i] takes a database from version
i to i + 1, so an old file is brought forward step by step when it is opened, and a file from a
newer llmapp is refused instead of being written in a shape it does not know.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from llmapp.app.tui.conversation import ChatSettings, Conversation, Message
from llmapp.runtime.errors import LlmappError

HISTORY_ENV = "LLMAPP_CHAT_DB"

MIGRATIONS: tuple[str, ...] = (
    # 0 -> 1: conversations and messages
    """
    CREATE TABLE conversations (
        id INTEGER PRIMARY KEY,
        title TEXT NOT NULL,
        model TEXT NOT NULL,
        settings TEXT NOT NULL DEFAULT '{}',
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        status TEXT NOT NULL DEFAULT 'done',
        created REAL NOT NULL
    );
    CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
    """,
    # 1 -> 2: which model wrote a reply; app-wide settings (last model, theme)
    """
    ALTER TABLE messages ADD COLUMN model TEXT NOT NULL DEFAULT '';
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class HistoryError(LlmappError):
    """The history database cannot be opened or is from a newer llmapp."""


@dataclass(frozen=True)
class Summary:
    """One row of the sidebar or of `llmapp chat --list`."""

    id: int
    title: str
    model: str
    updated: float
    n_messages: int


def default_path() -> Path:
    """$LLMAPP_CHAT_DB if set, else chat.db in the store home ($LLMAPP_HOME)."""
    env = os.environ.get(HISTORY_ENV, "").strip()
    if env:
        return Path(env).expanduser().absolute()
    from llmapp.runtime.files.store import store_home

    return store_home() / "chat.db"


class History:
    """All reads and writes of chat.db. Every write commits at once: a crash loses nothing saved."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, timeout=5.0)
            self._db.execute("PRAGMA foreign_keys = ON")
            # WAL lets a second `llmapp chat` read while this one writes.
            self._db.execute("PRAGMA journal_mode = WAL")
            migrate(self._db)
        except (OSError, sqlite3.Error) as exc:
            raise HistoryError(f"cannot open chat history {path}: {exc}") from None

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.commit()
            self._db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        try:
            with self._db:  # commits, or rolls back on error
                yield self._db
        except sqlite3.Error as exc:
            raise HistoryError(f"cannot write chat history {self.path}: {exc}") from None

    # ---- conversations ---------------------------------------------------------------------

    def summaries(self, search: str = "") -> list[Summary]:
        """Conversations, newest first; `search` matches titles and message text."""
        sql = (
            "SELECT c.id, c.title, c.model, c.updated, "
            "(SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) FROM conversations c"
        )
        args: tuple[str, ...] = ()
        if search:
            pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            pattern += "%"
            sql += (
                " WHERE c.title LIKE ? ESCAPE '\\' OR EXISTS (SELECT 1 FROM messages m"
                " WHERE m.conversation_id = c.id AND m.content LIKE ? ESCAPE '\\')"
            )
            args = (pattern, pattern)
        rows = self._db.execute(sql + " ORDER BY c.updated DESC, c.id DESC", args).fetchall()
        return [Summary(*row) for row in rows]

    def load(self, conversation_id: int, fallback: ChatSettings | None = None) -> Conversation:
        row = self._db.execute(
            "SELECT title, model, settings, updated FROM conversations WHERE id = ?",
            (conversation_id,),
        ).fetchone()
        if row is None:
            raise HistoryError(
                f"no conversation with id {conversation_id} (see llmapp chat --list)"
            )
        title, model, settings, updated = row
        base = fallback or ChatSettings.for_model(model)
        conv = Conversation(model, ChatSettings.from_json(settings, base), id=conversation_id)
        conv.title, conv.updated = title, updated
        conv.messages = [
            Message(role, content, status, msg_model, msg_id)
            for msg_id, role, content, status, msg_model in self._db.execute(
                "SELECT id, role, content, status, model FROM messages"
                " WHERE conversation_id = ? ORDER BY id",
                (conversation_id,),
            )
        ]
        return conv

    def save_conversation(self, conv: Conversation) -> None:
        """Insert `conv` (setting its id) or update its title, model and settings."""
        conv.updated = time.time()
        with self._write() as db:
            if conv.id is None:
                cur = db.execute(
                    "INSERT INTO conversations (title, model, settings, created, updated)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (conv.title, conv.model, conv.settings.to_json(), conv.updated, conv.updated),
                )
                conv.id = cur.lastrowid
            else:
                db.execute(
                    "UPDATE conversations SET title = ?, model = ?, settings = ?, updated = ?"
                    " WHERE id = ?",
                    (conv.title, conv.model, conv.settings.to_json(), conv.updated, conv.id),
                )

    def delete_conversation(self, conversation_id: int) -> None:
        with self._write() as db:
            db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    # ---- messages --------------------------------------------------------------------------

    def add_message(self, conv: Conversation, message: Message) -> None:
        """Save one finished message (and the conversation first if it is new)."""
        if conv.id is None:
            self.save_conversation(conv)
        conv.updated = time.time()
        with self._write() as db:
            cur = db.execute(
                "INSERT INTO messages (conversation_id, role, content, status, model, created)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    conv.id,
                    message.role,
                    message.content,
                    message.status,
                    message.model,
                    time.time(),
                ),
            )
            message.id = cur.lastrowid
            db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (conv.updated, conv.id))

    def delete_messages_from(self, conv: Conversation, message: Message) -> None:
        """Forget `message` and every later one (regenerate, edit)."""
        if conv.id is None or message.id is None:
            return
        with self._write() as db:
            db.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND id >= ?", (conv.id, message.id)
            )

    # ---- app-wide settings -----------------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._write() as db:
            db.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?)"
                " ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )


def migrate(db: sqlite3.Connection) -> int:
    """Bring `db` to SCHEMA_VERSION, one committed step at a time; the version it ends at."""
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise HistoryError(
            f"the chat history is schema version {version}; this llmapp knows up to "
            f"{SCHEMA_VERSION} (a newer llmapp wrote it)"
        )
    for step in range(version, SCHEMA_VERSION):
        # executescript commits first; each step and its version bump land together.
        db.executescript(f"BEGIN; {MIGRATIONS[step]} PRAGMA user_version = {step + 1}; COMMIT;")
    return SCHEMA_VERSION


def to_markdown(conv: Conversation) -> str:
    """A conversation as a Markdown document (what ctrl+x writes)."""
    lines = [f"# {conv.title}", "", f"Model: `{conv.model}`", ""]
    if conv.settings.system:
        lines += ["## System", "", conv.settings.system, ""]
    for message in conv.messages:
        who = "You" if message.role == "user" else f"Assistant ({message.model or conv.model})"
        note = f" ({message.status})" if message.status != "done" else ""
        lines += [f"## {who}{note}", "", message.content, ""]
    return "\n".join(lines)
