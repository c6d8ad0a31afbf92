"""The `llmapp` command: parse arguments, call the runtime, print. Nothing else lives here.

Parsing is two steps: the top level takes its own options (--version, --help) up to the verb,
then the verb's parser takes the rest with options and positionals in any order (argparse's
intermixed parsing does not work across subparsers, so the verb is found here first).
"""

from __future__ import annotations

import argparse
import difflib
import os
import select
import sys
from collections.abc import Sequence
from types import ModuleType

from llmapp.runtime.errors import LlmappError

# The shell's status for a process ended by SIGPIPE (128 + 13), what git, cat and yes give when
# the reader of their output goes away: a script with `set -o pipefail` sees the cut.
EXIT_BROKEN_PIPE = 141

EPILOG = """\
options and arguments may come in any order; `--` ends the options, so a prompt that starts
with '-' goes after it: llmapp run smollm2:135m -- "-1 is less than 0?"

exit status:
  0    success
  1    error (a one-line message on stderr says what)
  2    usage error (unknown verb or option, a bad value)
  130  interrupted (Ctrl-C)
  141  stdout was closed early (e.g. `llmapp list | head -1`); nothing is printed on stderr

`llmapp VERB --help` shows a verb's options and examples.
"""

# Examples for verbs whose module gives none of its own, shown under their --help.
_FALLBACK_EXAMPLES = {
    "pull": "llmapp pull qwen2.5-coder:0.5b\nllmapp pull smollm2:135m --force",
    "list": "llmapp list\nllmapp list --all --json",
    "show": "llmapp show qwen2.5-coder:0.5b\nllmapp show ./my-model.gguf --json",
    "rm": "llmapp rm qwen2.5-coder:0.5b",
    "chat": "llmapp chat smollm2:135m\nllmapp chat --list",
}


def _command_modules() -> list[ModuleType]:
    # Each verb module exposes add_parser(subparsers) and run(args) -> int.
    from llmapp.app.commands import (
        chat_cmd,
        ps_cmds,
        quantize_cmd,
        run_cmds,
        serve_cmd,
        store_cmds,
        tokenize_cmd,
    )

    return [store_cmds, run_cmds, serve_cmd, quantize_cmd, tokenize_cmd, ps_cmds, chat_cmd]


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("llmapp")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmapp",
        description="Local LLM inference on GGUF models.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llmapp {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _command_modules():
        module.add_parser(sub)
    for name, verb in verb_parsers(parser).items():
        if verb.epilog is None and name in _FALLBACK_EXAMPLES:
            verb.epilog = "examples:\n" + _indent(_FALLBACK_EXAMPLES[name])
            verb.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def verb_parsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Each verb's own parser, by name (hidden verbs included)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def verb_helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The one-line help of each listed verb."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {a.dest: a.help or "" for a in action._choices_actions}
    return {}


def _split_at_verb(argv: list[str]) -> tuple[list[str], str | None, list[str]]:
    # The top level has no option that takes a value, so the first plain word is the verb.
    for i, token in enumerate(argv):
        if token == "--":
            break
        if not token.startswith("-") or token == "-":
            return argv[:i], token, argv[i + 1 :]
    return argv, None, []


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The parsed command line; exits 2 (argparse's usage error) when it does not parse."""
    parser = build_parser()
    head, verb, rest = _split_at_verb(list(argv))
    parser.parse_args(head)  # --help, --version and unknown top-level options end here
    if verb is None:
        parser.print_help(sys.stderr)
        sys.exit(2)
    verbs = verb_parsers(parser)
    if verb not in verbs:
        close = difflib.get_close_matches(verb, [v for v in verbs if not v.startswith("_")], 1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        parser.error(f"unknown command {verb!r}{hint}; `llmapp --help` lists them")
    args = verbs[verb].parse_intermixed_args(rest)
    args.command = verb
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from llmapp.runtime.execution.heap import return_large_allocations

    return_large_allocations()  # before the imports and the model fill the heap
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        code = int(args.handler(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return code
    except LlmappError as exc:
        print(f"llmapp: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        return _after_broken_pipe()


def _stdout_closed() -> bool:
    # A BrokenPipeError may come from some other pipe (a child process); only the reader of our
    # stdout going away is the quiet case. A pipe whose reader is gone polls as an error.
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return True  # cannot tell (no poll on this platform): the usual cause is our stdout


def _after_broken_pipe() -> int:
    # Python flushes stdout once more at exit, which would raise again and print a warning:
    # point the descriptor at /dev/null so that last flush succeeds silently.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
    return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
