"""Verbs around a running `llmapp serve` (ps, stop) and the shell's completion scripts."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from llmapp.runtime.errors import LlmappError

API_KEY_ENV = "LLMAPP_API_KEY"

# Verbs whose first positional is a model: the completion scripts offer model names there.
MODEL_VERBS = (
    *("run", "chat", "serve", "bench", "perplexity", "tokenize"),
    *("show", "pull", "rm", "quantize", "stop"),
)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ps",
        help="list the models a running `llmapp serve` has loaded",
        epilog="examples:\n  llmapp ps\n  llmapp ps --port 8081 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_server_options(p)
    p.add_argument("--json", action="store_true", help="print the server's JSON answer")
    p.set_defaults(handler=run_ps)

    p = sub.add_parser(
        "stop",
        help="unload a model from a running `llmapp serve`",
        epilog="examples:\n  llmapp stop smollm2:135m\n  llmapp stop gemma3:270m --port 8081",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="name of a loaded model (as `llmapp ps` shows)")
    _add_server_options(p)
    p.set_defaults(handler=run_stop)

    p = sub.add_parser(
        "completion",
        help="print a shell completion script (bash, zsh or fish)",
        epilog=(
            "examples:\n"
            "  source <(llmapp completion bash)          # in ~/.bashrc\n"
            "  llmapp completion zsh > ~/.zfunc/_llmapp   # a directory on $fpath\n"
            "  llmapp completion fish > ~/.config/fish/completions/llmapp.fish"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("shell", choices=["bash", "zsh", "fish"], help="the shell")
    p.set_defaults(handler=run_completion)

    # Hidden (no help= means no line in `llmapp --help`): what the completion scripts call.
    p = sub.add_parser("__complete-models")
    p.set_defaults(handler=run_complete_models)


def _add_server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="server address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="server port (default 8080)")
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"the server's API key (default: ${API_KEY_ENV})",
    )


# -- talking to the server ------------------------------------------------------------------


def _base_url(args: argparse.Namespace) -> str:
    host = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 literal
    return f"http://{host}:{args.port}"


def _request(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    """The server's JSON answer; any failure becomes one LlmappError line."""
    import httpx

    url = _base_url(args) + path
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        response = httpx.request(method, url, json=body, headers=headers, timeout=10.0)
    except httpx.TimeoutException:
        raise LlmappError(f"the server at {_base_url(args)} did not answer in 10 s") from None
    except httpx.HTTPError:
        raise LlmappError(
            f"no llmapp server answers at {_base_url(args)} (start one with `llmapp serve MODEL`)"
        ) from None
    if response.status_code in (401, 403):
        raise LlmappError(
            f"the server at {_base_url(args)} refused the API key "
            f"(give it with --api-key or ${API_KEY_ENV})"
        )
    try:
        data = response.json()
    except ValueError:
        raise LlmappError(
            f"{url} answered {response.status_code} without JSON: is it an llmapp server?"
        ) from None
    if response.status_code >= 400:
        raise LlmappError(_error_text(data, response.status_code))
    return data


def _error_text(data: Any, status: int) -> str:
    # The server's one error shape: {"error": {"message": ..., ...}}
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    return f"the server answered {status}: {json.dumps(data)[:200]}"


def run_ps(args: argparse.Namespace) -> int:
    data = _request(args, "GET", "/api/ps")
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    models = data.get("models", []) if isinstance(data, dict) else []
    print_ps_table(models, now=time.time())
    if not models:
        print("no models loaded; one loads on its first request", file=sys.stderr)
    return 0


def print_ps_table(models: list[dict[str, Any]], now: float) -> None:
    from llmapp.app.progress import human_bytes

    rows = [("NAME", "SIZE", "MEMORY", "CONTEXT", "PROCESSOR", "SESSIONS", "LOADED")]
    for m in models:
        running, waiting = m.get("sessions_running", 0), m.get("sessions_waiting", 0)
        sessions = f"{running} running" + (f", {waiting} waiting" if waiting else "")
        split = m.get("offload") or {}
        processor = f"{split['layers']}/{split['of']} on {split['device']}" if split else "CPU"
        rows.append(
            (
                str(m.get("name", "?")),
                human_bytes(m.get("size_bytes", 0)),
                human_bytes(m.get("memory_bytes", 0)),
                str(m.get("ctx_size", "?")),
                processor,
                sessions,
                _ago(now - float(m.get("loaded_at", now))),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now" if seconds < 5 else f"{int(seconds)} seconds ago"


def run_stop(args: argparse.Namespace) -> int:
    data = _request(args, "POST", "/api/stop", {"model": args.model})
    if data.get("stopped"):
        print(f"stopped {args.model}", file=sys.stderr)
    else:
        print(f"{args.model} was not running", file=sys.stderr)
    return 0


# -- completion -----------------------------------------------------------------------------


def run_complete_models(args: argparse.Namespace) -> int:
    from llmapp.runtime.files.store import list_models

    # Pulled models first: those are what a user most often means.
    infos = list_models(include_all=True)
    for info in sorted(infos, key=lambda i: not i.pulled):
        print(info.name)
    return 0


def run_completion(args: argparse.Namespace) -> int:
    from llmapp.app.cli import build_parser, verb_helps, verb_parsers

    parser = build_parser()
    helps = verb_helps(parser)
    verbs = {
        name: (helps.get(name, ""), _long_options(p))
        for name, p in verb_parsers(parser).items()
        if not name.startswith("_")
    }
    script = {"bash": bash_script, "zsh": zsh_script, "fish": fish_script}[args.shell]
    sys.stdout.write(script(verbs))
    return 0


def _long_options(p: argparse.ArgumentParser) -> list[str]:
    return [s for a in p._actions for s in a.option_strings if s.startswith("--")]


Verbs = dict[str, tuple[str, list[str]]]


def bash_script(verbs: Verbs) -> str:
    cases = "\n".join(f'        {v}) opts="{" ".join(o)}" ;;' for v, (_, o) in verbs.items())
    return (
        _BASH.replace("@VERBS@", " ".join(verbs))
        .replace("@CASES@", cases)
        .replace("@MODEL_VERBS@", "|".join(MODEL_VERBS))
    )


_BASH = r"""# bash completion for llmapp; load it with: source <(llmapp completion bash)
_llmapp() {
    local line="${COMP_LINE:0:COMP_POINT}"
    # bash splits words at ':' (COMP_WORDBREAKS); model names hold one, so take the whole word
    local cur="${line##*[[:space:]]}"
    local verb="" w i
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${COMP_WORDS[i]}"
        case "$w" in -*) ;; *) verb="$w"; break ;; esac
    done
    if [[ -z "$verb" ]]; then
        COMPREPLY=($(compgen -W "@VERBS@ --help --version" -- "$cur"))
        return
    fi
    local opts="--help"
    case "$verb" in
@CASES@
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
        return
    fi
    case "$verb" in
        completion) COMPREPLY=($(compgen -W "bash zsh fish" -- "$cur")) ;;
        @MODEL_VERBS@)
            COMPREPLY=($(compgen -W "$(llmapp __complete-models 2>/dev/null)" -- "$cur")) ;;
    esac
    # bash replaces only the part of the word after its last ':'
    if [[ "$cur" == *:* ]]; then
        local head="${cur%"${cur##*:}"}"
        COMPREPLY=("${COMPREPLY[@]#"$head"}")
    fi
}
complete -o default -F _llmapp llmapp
"""


def zsh_script(verbs: Verbs) -> str:
    described = "\n".join(f"    '{v}:{_quote_zsh(d)}'" for v, (d, _) in verbs.items())
    cases = "\n".join(f"    {v}) opts=({' '.join(o)}) ;;" for v, (_, o) in verbs.items())
    return (
        _ZSH.replace("@VERBS@", described)
        .replace("@CASES@", cases)
        .replace("@MODEL_VERBS@", "|".join(MODEL_VERBS))
    )


def _quote_zsh(text: str) -> str:
    return text.replace("'", "'\\''").replace(":", "\\:")


_ZSH = r"""#compdef llmapp
# zsh completion for llmapp: save as _llmapp on $fpath, or `source <(llmapp completion zsh)`
# after compinit.
_llmapp() {
  local -a verbs opts models
  verbs=(
@VERBS@
  )
  local verb="" i
  for ((i = 2; i < CURRENT; i++)); do
    [[ ${words[i]} != -* ]] && { verb=${words[i]}; break }
  done
  if [[ -z $verb ]]; then
    _describe 'command' verbs
    return
  fi
  case $verb in
@CASES@
  esac
  if [[ $PREFIX == -* ]]; then
    compadd -- $opts
    return
  fi
  case $verb in
    completion) compadd bash zsh fish ;;
    @MODEL_VERBS@)
      models=(${(f)"$(llmapp __complete-models 2>/dev/null)"})
      compadd -a models
      _files ;;
    *) _files ;;
  esac
}
if [[ ${zsh_eval_context[-1]} == loadautofunc ]]; then
  _llmapp "$@"
else
  compdef _llmapp llmapp
fi
"""


def fish_script(verbs: Verbs) -> str:
    lines = [
        "# fish completion for llmapp:",
        "#   llmapp completion fish > ~/.config/fish/completions/llmapp.fish",
        "complete -c llmapp -n __fish_use_subcommand -f -l version -d 'print the version'",
    ]
    for verb, (desc, opts) in verbs.items():
        lines.append(f"complete -c llmapp -n __fish_use_subcommand -f -a {verb} -d {_fq(desc)}")
        for opt in opts:
            cond = f"'__fish_seen_subcommand_from {verb}'"
            lines.append(f"complete -c llmapp -n {cond} -l {opt[2:]}")
    seen = "'__fish_seen_subcommand_from " + " ".join(MODEL_VERBS) + "'"
    lines.append(f"complete -c llmapp -n {seen} -a '(llmapp __complete-models 2>/dev/null)'")
    lines.append(
        "complete -c llmapp -n '__fish_seen_subcommand_from completion' -f -a 'bash zsh fish'"
    )
    return "\n".join(lines) + "\n"


def _fq(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
