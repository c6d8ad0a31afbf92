"""Store verbs: pull, list, rm, show."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from llmapp.runtime import store
from llmapp.runtime.config import load_config
from llmapp.runtime.gguf_file import GGUFFile


def add_parser(sub: Any) -> None:
    p = sub.add_parser("pull", help="download a catalog model into the store")
    p.add_argument("name", metavar="NAME", help="catalog name, e.g. smollm2:135m")
    p.add_argument("--force", action="store_true", help="download again even if present")
    p.set_defaults(handler=run_pull)

    p = sub.add_parser("list", help="list pulled models")
    p.add_argument("--all", action="store_true", help="also list catalog models not pulled yet")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    p.set_defaults(handler=run_list)

    p = sub.add_parser("rm", help="remove a pulled model from the store")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(handler=run_rm)

    p = sub.add_parser("show", help="describe a model (catalog name or GGUF file)")
    p.add_argument("model", metavar="MODEL", help="catalog name (pulled on first use) or path")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    p.set_defaults(handler=run_show)


class _ProgressPrinter:
    """Pull progress on stderr: a live percentage on a terminal, one line per stage otherwise."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._tty = out.isatty()
        self._last: tuple[str, int] | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        percent = done * 100 // total if total else 100
        if self._tty:
            if (stage, percent) != self._last:
                self._out.write(f"\r\x1b[K{stage}: {percent}% of {_megabytes(total)}")
                self._out.flush()
        elif self._last is None or self._last[0] != stage:
            self._out.write(f"{stage}\n")
            self._out.flush()
        self._last = (stage, percent)

    def finish(self) -> None:
        if self._tty and self._last is not None:
            self._out.write("\n")
        self._last = None


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _pull_with_progress(name: str, force: bool = False) -> Path:
    printer = _ProgressPrinter(sys.stderr)
    try:
        return store.pull(name, progress=printer, force=force)
    except KeyboardInterrupt:
        printer.finish()
        print(f"llmapp: pull of {name} interrupted; nothing was kept", file=sys.stderr)
        raise
    finally:
        printer.finish()


def run_pull(args: argparse.Namespace) -> int:
    entry = store.get_entry(args.name)
    if not args.force and store.is_verified(entry):
        print(f"{args.name} is already pulled", file=sys.stderr)
        path = store.model_path(entry)
    else:
        path = _pull_with_progress(args.name, force=args.force)
        print(f"pulled {args.name} ({_megabytes(entry.size)}, sha256 verified)", file=sys.stderr)
    print(path)
    return 0


def run_list(args: argparse.Namespace) -> int:
    infos = store.list_models(include_all=args.all)
    if args.json:
        print(json.dumps({"models": [info.to_json() for info in infos]}, indent=2))
        return 0
    rows: list[tuple[str, ...]] = [("NAME", "SIZE", "QUANT", "STATUS", "PATH")]
    for info in infos:
        status = "verified" if info.verified else "pulled" if info.pulled else "-"
        rows.append((info.name, _megabytes(info.size), info.quant, status, str(info.path)))
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


def _resolve_for_show(model: str) -> tuple[Path, store.CatalogEntry | None]:
    given = Path(model).expanduser()
    if given.is_file():
        return given.absolute(), store.entry_for_path(given)
    entry = store.catalog().get(model)
    if entry is not None and not store.is_verified(entry):
        return _pull_with_progress(model), entry  # pulled on first use, as run does
    return store.resolve_model(model), entry


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


def model_summary(path: Path, entry: store.CatalogEntry | None) -> dict[str, Any]:
    """What `llmapp show` reports, as plain data (the --json output)."""
    with GGUFFile(path) as gguf:
        config = load_config(gguf)
        n_params = sum(info.n_elements for info in gguf.tensors.values())
        template = gguf.get("tokenizer.chat_template")
        summary = {
            "name": entry.name if entry else None,
            "path": str(path),
            "file_size": gguf.file_size,
            "architecture": config.arch,
            "model_name": config.name,
            "parameters": n_params,
            "quant": entry.quant if entry else None,
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
    path, entry = _resolve_for_show(args.model)
    summary = model_summary(path, entry)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 0
