"""`llmapp chat`: the terminal chat app (Textual), or `--list` of saved conversations."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from llmapp.app.commands.run_cmds import (
    add_cache_type_option,
    add_offload_options,
    add_speculative_options,
    speculative_tokens,
)

API_KEY_ENV = "LLMAPP_API_KEY"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "chat", help="chat in the terminal; several conversations can generate at once"
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="catalog name or .gguf path (default: the last one used, else the catalog default)",
    )
    p.add_argument(
        "--url", default=None, help="an OpenAI-compatible server, e.g. http://127.0.0.1:8080/v1"
    )
    p.add_argument(
        "--api-key", default=None, help=f"bearer token for --url (default: ${API_KEY_ENV})"
    )
    p.add_argument("--system", default="", help="system prompt of new conversations")
    p.add_argument("--ctx-size", type=int, default=4096, help="KV cache size in tokens")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: cores)")
    add_speculative_options(p)
    add_offload_options(p)
    add_cache_type_option(p)
    p.add_argument("--list", action="store_true", help="print saved conversations and exit")
    p.add_argument("--resume", type=int, default=None, metavar="ID", help="open conversation ID")
    p.add_argument(
        "--history",
        type=Path,
        default=None,
        metavar="PATH",
        help="chat history database (default: $LLMAPP_CHAT_DB, else chat.db in the store)",
    )
    p.set_defaults(handler=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    from llmapp.app.tui.history import History, default_path

    history = History(args.history or default_path())
    try:
        if args.list:
            return print_conversations(history)
        if args.resume is not None:
            history.load(args.resume)  # an unknown id fails here, before the screen opens
        return run_app(args, history)
    finally:
        history.close()


def print_conversations(history: Any) -> int:
    rows = history.summaries()
    if not rows:
        print("no conversations yet")
        return 0
    print(f"{'ID':>5}  {'UPDATED':16}  {'MSGS':>4}  {'MODEL':20}  TITLE")
    for row in rows:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(row.updated))
        print(f"{row.id:>5}  {when:16}  {row.n_messages:>4}  {row.model:20}  {row.title}")
    return 0


def make_backend(args: argparse.Namespace) -> Any:
    if args.url:
        from llmapp.app.tui.remote import RemoteBackend

        return RemoteBackend(args.url, args.api_key or os.environ.get(API_KEY_ENV) or None)
    from llmapp.app.tui.backend import EngineBackend

    return EngineBackend(
        ctx_size=args.ctx_size,
        n_threads=args.threads,
        speculative_tokens=speculative_tokens(args),
        n_gpu_layers=args.n_gpu_layers,
        gpu_margin=args.gpu_margin,
        cache_type=args.cache_type,
    )


def run_app(args: argparse.Namespace, history: Any) -> int:
    from llmapp.app.tui.app import ChatApp

    app = ChatApp(
        make_backend(args), history, model=args.model, system=args.system, resume=args.resume
    )
    result = app.run()
    return int(result or 0) if app.return_code in (None, 0) else int(app.return_code)
