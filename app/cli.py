"""The `llmapp` command: parse arguments, call the runtime, print. Nothing else lives here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType

from llmapp.runtime.errors import LlmappError


def _command_modules() -> list[ModuleType]:
    # Each verb module exposes add_parser(subparsers) and run(args) -> int.
    from llmapp.app.commands import quantize_cmd, run_cmds, store_cmds, tokenize_cmd

    return [store_cmds, run_cmds, quantize_cmd, tokenize_cmd]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmapp", description="Local LLM inference on GGUF models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _command_modules():
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except LlmappError as exc:
        print(f"llmapp: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
