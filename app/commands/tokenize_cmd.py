"""`llmapp tokenize MODEL [TEXT|-]`: the ids and pieces a model's tokenizer makes of a text."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from llmapp.app.commands.run_cmds import resolve
from llmapp.runtime.files.gguf_file import GGUFFile
from llmapp.runtime.text.tokenizer import Tokenizer

EXAMPLES = """\
examples:
  llmapp tokenize smollm2:135m "Hello world"
  llmapp tokenize gemma3:270m --json --special - < prompt.txt"""


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "tokenize",
        help="show the token ids and pieces of a text",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="catalog name (pulled on first use) or path")
    p.add_argument(
        "text", metavar="TEXT", nargs="?", default="-", help="the text; '-' or none reads stdin"
    )
    p.add_argument("--json", action="store_true", help='print one JSON object {"ids": [...], ...}')
    p.add_argument(
        "--special", action="store_true", help="parse control tokens written in the text"
    )
    p.add_argument("--bos", action="store_true", help="start with the BOS token")
    p.set_defaults(handler=run_tokenize)


def run_tokenize(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.text == "-" else args.text
    path = resolve(args.model)
    with GGUFFile(path) as gguf:
        tokenizer = Tokenizer.from_gguf(gguf)
    ids = tokenizer.encode(text, add_bos=args.bos, parse_special=args.special)
    pieces = [tokenizer.token_piece(i) for i in ids]
    if args.json:
        result = {"model": args.model, "ids": ids, "pieces": pieces, "n_tokens": len(ids)}
        print(json.dumps(result, ensure_ascii=False))
        return 0
    width = len(str(max(ids, default=0)))
    for token_id, piece in zip(ids, pieces, strict=True):
        # JSON string syntax keeps whitespace and control characters visible
        print(f"{token_id:>{width}}  {json.dumps(piece, ensure_ascii=False)}")
    print(f"{len(ids)} tokens", file=sys.stderr)
    return 0
