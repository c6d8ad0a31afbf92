"""Store verbs: pull, list, rm, show."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from llmapp.app.progress import human_bytes, stage_progress
from llmapp.runtime.errors import ModelNotFoundError
from llmapp.runtime.execution.models import load_config
from llmapp.runtime.files import store
from llmapp.runtime.files.download import Interrupted
from llmapp.runtime.files.gguf_file import GGUFFile

_PULL_HELP = "download a model: a catalog name, hf.co/USER/REPO[:QUANT], hf.co/USER/REPO/FILE.gguf"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("pull", help=_PULL_HELP + " or an http(s) URL of a .gguf file")
    p.add_argument(
        "name",
        metavar="MODEL",
        help="smollm2:135m, hf.co/USER/REPO:Q4_K_M, hf.co/USER/REPO/FILE.gguf, https://.../x.gguf",
    )
    p.add_argument("--force", action="store_true", help="download again even if present")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.add_argument("--sha256", metavar="HEX", help="URL pulls: the file's expected sha256")
    p.add_argument(
        "--name", dest="as_name", metavar="NAME", help="URL pulls: the model's name in the store"
    )
    p.add_argument("--revision", metavar="REV", help="hub pulls: branch, tag or commit (main)")
    p.set_defaults(handler=run_pull)

    p = sub.add_parser("list", help="list pulled models")
    p.add_argument("--all", action="store_true", help="also list catalog models not pulled yet")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    p.set_defaults(handler=run_list)

    p = sub.add_parser("rm", help="remove a pulled model from the store")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(handler=run_rm)

    p = sub.add_parser("show", help="describe a model (a name as for pull, or a GGUF file)")
    p.add_argument("model", metavar="MODEL", help="model name (pulled on first use) or path")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    p.set_defaults(handler=run_show)


def _notice(message: str) -> None:
    # On a terminal the progress bar owns the current line: clear it first; it redraws itself.
    clear = "\r\x1b[K" if sys.stderr.isatty() else ""
    print(f"{clear}llmapp: {message}", file=sys.stderr)


def _pull(name: str, quiet: bool = False, **options: Any) -> store.Pulled:
    """store.pull_model with progress on stderr and a clear word on Ctrl-C."""
    with stage_progress(quiet=quiet) as progress:
        try:
            return store.pull_model(name, progress=progress, notify=_notice, **options)
        except KeyboardInterrupt as exc:
            progress.close()
            if isinstance(exc, Interrupted):
                kept = f"the partial download is kept: run `llmapp pull {name}` again to resume"
            else:
                kept = "nothing was kept"
            print(f"llmapp: pull of {name} interrupted; {kept}", file=sys.stderr)
            raise


def run_pull(args: argparse.Namespace) -> int:
    options = {"sha256": args.sha256, "as_name": args.as_name, "revision": args.revision}
    result = _pull(args.name, args.quiet, force=args.force, **options)
    if not result.fresh:
        print(f"{result.name} is already pulled", file=sys.stderr)
    elif not args.quiet:
        size = human_bytes(result.size)
        print(f"pulled {result.name} ({size}, {result.checked})", file=sys.stderr)
    print(result.paths[0])
    return 0


def _size(info: store.ModelInfo) -> str:
    return ("~" if info.approx else "") + human_bytes(info.size)


def run_list(args: argparse.Namespace) -> int:
    infos = store.list_models(include_all=args.all)
    if args.json:
        print(json.dumps({"models": [info.to_json() for info in infos]}, indent=2))
        return 0
    header = ("NAME", "SIZE", "QUANT", "STATUS", "PATH") + (("SOURCE",) if args.all else ())
    rows: list[tuple[str, ...]] = [header]
    for info in infos:
        status = "verified" if info.verified else "pulled" if info.pulled else "-"
        row = (info.name, _size(info), info.quant, status, str(info.path))
        rows.append(row + ((info.source,) if args.all else ()))
    _print_table(rows)
    if not infos:
        print("no models pulled; `llmapp list --all` shows the catalog", file=sys.stderr)
    return 0


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def run_rm(args: argparse.Namespace) -> int:
    path = store.remove(args.name)
    print(f"removed {args.name} ({path})", file=sys.stderr)
    return 0


def _resolve_for_show(model: str) -> tuple[Path, store.CatalogEntry | None, str | None]:
    """The file to describe, its catalog entry (for overrides) and the name it goes by."""
    given = Path(model).expanduser()
    if given.is_file():
        return given.absolute(), store.entry_for_path(given), None
    entry = store.catalog().get(model)
    try:
        if entry is not None and not store.is_verified(entry):
            raise ModelNotFoundError(model)  # present but never checked: the pull checks it
        path = store.resolve_model(model, pull=False)
    except ModelNotFoundError:
        if not store.is_model_name(model):
            raise
        path = _pull(model).paths[0]  # pulled on first use, as run does
    return path, entry, store.canonical_name(model)


_STOP_TOKEN_KEYS = (
    ("eos", "tokenizer.ggml.eos_token_id"),
    ("eot", "tokenizer.ggml.eot_token_id"),
    ("eom", "tokenizer.ggml.eom_token_id"),
)


def _stop_tokens(gguf: GGUFFile) -> list[dict[str, Any]]:
    """End-of-generation ids the metadata declares, with their text when the vocabulary has it."""
    vocab = gguf.get("tokenizer.ggml.tokens")
    found: list[dict[str, Any]] = []
    for role, key in _STOP_TOKEN_KEYS:
        token_id = gguf.get(key)
        if type(token_id) is not int or any(t["id"] == token_id for t in found):
            continue
        text = vocab[token_id] if vocab is not None and 0 <= token_id < len(vocab) else None
        found.append({"role": role, "id": token_id, "text": text})
    return found


def model_summary(
    path: Path, entry: store.CatalogEntry | None, name: str | None = None
) -> dict[str, Any]:
    """What `llmapp show` reports, as plain data (the --json output)."""
    record = store.find_record(name) if name and entry is None else None
    with GGUFFile(path) as gguf:
        config = load_config(gguf)
        n_params = sum(info.n_elements for info in gguf.tensors.values())
        template = gguf.get("tokenizer.chat_template")
        summary = {
            "name": entry.name if entry else name,
            "path": str(path),
            "file_size": gguf.file_size,
            "architecture": config.arch,
            "model_name": config.name,
            "parameters": n_params,
            "quant": entry.quant if entry else record.quant if record else None,
            "file_type": config.file_type,
            "context_length": config.context_length,
            "embedding_length": config.n_embd,
            "block_count": config.n_layer,
            "head_count": config.n_head,
            "head_count_kv": config.n_head_kv,
            "head_dim": config.head_dim,
            "feed_forward_length": config.n_ff,
            "vocab_size": config.n_vocab,
            "rope_type": config.rope_type,
            "sliding_window": config.sliding_window,
            "tensor_types": dict(config.tensor_types),
            "chat_template": template if isinstance(template, str) else None,
            "stop_tokens": _stop_tokens(gguf),
        }
    if entry is not None:
        summary["chat_template_override"] = entry.chat_template
        summary["stop"] = list(entry.stop)
        summary["eog_tokens"] = list(entry.eog_tokens)
    return summary


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _template_preview(template: str | None, max_lines: int = 4) -> list[str]:
    if not template:
        return ["none"]
    lines = template.strip().splitlines()
    more = [f"... ({len(lines) - max_lines} more lines)"] if len(lines) > max_lines else []
    return lines[:max_lines] + more


def _print_summary(s: dict[str, Any]) -> None:
    types = ", ".join(f"{name} {count}" for name, count in s["tensor_types"].items())
    stops = ", ".join(f"{t['id']} {t['text']!r} ({t['role']})" for t in s["stop_tokens"])
    rows = [
        ("model", s["name"] or s["model_name"]),
        ("path", s["path"]),
        ("architecture", s["architecture"]),
        ("parameters", f"{_count(s['parameters'])} ({s['parameters']})"),
        ("quantization", s["quant"] or f"file type {s['file_type']}"),
        ("context length", str(s["context_length"])),
        ("embedding", str(s["embedding_length"])),
        ("layers", str(s["block_count"])),
        ("heads", f"{s['head_count']} (kv {s['head_count_kv']}, dim {s['head_dim']})"),
        ("feed forward", str(s["feed_forward_length"])),
        ("vocabulary", str(s["vocab_size"])),
        ("tensor types", types),
        ("stop tokens", stops or "none"),
    ]
    if s.get("stop"):
        rows.append(("stop strings", ", ".join(repr(x) for x in s["stop"])))
    for label, value in rows:
        print(f"  {label:<15} {value}")
    template = s["chat_template"] or s.get("chat_template_override")
    print("  chat template")
    for line in _template_preview(template):
        print(f"    {line}")


def run_show(args: argparse.Namespace) -> int:
    path, entry, name = _resolve_for_show(args.model)
    summary = model_summary(path, entry, name)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 0
