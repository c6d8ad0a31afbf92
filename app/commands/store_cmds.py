"""Store verbs: pull, list, rm, show."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(sub: Any) -> None:
    p = sub.add_parser("list", help="list pulled models")
    p.set_defaults(handler=run_list)


def run_list(args: argparse.Namespace) -> int:
    return 0
