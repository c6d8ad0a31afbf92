"""Store verbs: pull, list, rm, show."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any, TextIO

from llmapp.runtime import store
from llmapp.runtime.ggml_types import type_name


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
    rows = [("NAME", "SIZE", "QUANT", "STATUS", "PATH")]
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
