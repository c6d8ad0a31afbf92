"""Pre-tokenizers for byte-level BPE vocabularies: text -> words, as llama.cpp splits it.

`tokenizer.ggml.pre` names a list of regular expressions. Each one in turn splits every piece
left by the one before into its matches and the stretches between them; BPE then runs inside
each resulting word only.

llama.cpp evaluates `\\p{L}`, `\\p{N}`, ... with its own Unicode 15.1 tables and `\\s` as the
Unicode White_Space set (never the ASCII separators 0x1C-0x1F). Python's `re` would use the
running Python's Unicode version and a wider `\\s`, so each expression is translated first:
every category and `\\s` becomes an explicit character class built from `unicode_ranges`.
Its hand-written splitters for the common expressions (gpt2, llama3, qwen2) behave as the
expressions themselves do, so one translated expression stands for both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from llmapp.runtime.errors import TokenizerError
from llmapp.runtime.text.unicode_ranges import CATEGORY_RANGES

# Unicode White_Space: what llama.cpp means by \s (and what its std::regex fallback sees as
# whitespace once non-ASCII spaces are folded to \v).
_WHITESPACE = (
    "\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
    "\u200a\u2028\u2029\u202f\u205f\u3000"
)

# Every letter sub-category collapses to "letter" in llama.cpp (\p{Lu} matches lowercase too).
_CATEGORY_ALIASES = {
    "L": "L",
    "Lu": "L",
    "Ll": "L",
    "Lt": "L",
    "Lm": "L",
    "Lo": "L",
    "N": "N",
    "P": "P",
    "M": "M",
    "S": "S",
}


def _escape_cp(cp: int) -> str:
    return f"\\U{cp:08x}" if cp > 0xFFFF else f"\\u{cp:04x}"


@cache
def _class_body(major: str) -> str:
    """The inside of a [...] class matching one major category (no brackets)."""
    parts = []
    for item in CATEGORY_RANGES[major].split(","):
        first, _, last = item.partition("-")
        lo = int(first, 16)
        hi = int(last, 16) if last else lo
        parts.append(_escape_cp(lo) if lo == hi else f"{_escape_cp(lo)}-{_escape_cp(hi)}")
    return "".join(parts)


_WS_BODY = "".join(_escape_cp(ord(c)) for c in _WHITESPACE)


def translate(expr: str) -> str:
    """A llama.cpp pre-tokenizer expression -> an equivalent Python `re` pattern.

    Categories and \\s/\\S become explicit classes; capturing groups become non-capturing so
    the caller can wrap the whole pattern in one group for `re.split`.
    """
    out: list[str] = []
    in_class = False
    i = 0
    while i < len(expr):
        c = expr[i]
        if c == "\\" and i + 1 < len(expr):
            token, i = _translate_escape(expr, i, in_class)
            out.append(token)
            continue
        if c == "[" and not in_class:
            in_class = True
        elif c == "]" and in_class:
            in_class = False
        elif c == "(" and not in_class and not expr.startswith("(?", i):
            out.append("(?:")
            i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _translate_escape(expr: str, i: int, in_class: bool) -> tuple[str, int]:
    nxt = expr[i + 1]
    if nxt == "p" and expr.startswith("{", i + 2):
        end = expr.find("}", i + 3)
        name = expr[i + 3 : end] if end > 0 else ""
        major = _CATEGORY_ALIASES.get(name)
        if major is None:
            raise TokenizerError(f"pre-tokenizer expression uses unsupported \\p{{{name}}}")
        body = _class_body(major)
        return (body if in_class else f"[{body}]"), end + 1
    if nxt == "s":
        return (_WS_BODY if in_class else f"[{_WS_BODY}]"), i + 2
    if nxt == "S":
        if in_class:
            raise TokenizerError("pre-tokenizer expression uses \\S inside a class")
        return f"[^{_WS_BODY}]", i + 2
    return expr[i : i + 2], i + 2


# ---- the expressions, as llama.cpp lists them per pre-tokenizer type -----------------------

_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER_THEN_LOWER = r"((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
_LOWER_AFTER_UPPER = r"((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?"
    + _UPPER_THEN_LOWER
    + r"|[^\r\n\p{L}\p{N}]?"
    + _LOWER_AFTER_UPPER
    + r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?" + _UPPER_THEN_LOWER + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?" + _LOWER_AFTER_UPPER + _CONTRACTIONS + "?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SEED_CODER = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BAILING = (
    r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
)
_NO_CONTRACTIONS = (
    r"[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_MINICPM5 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}+| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PORO = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"


@dataclass(frozen=True)
class PreTokenizerSpec:
    """What a `tokenizer.ggml.pre` value means: its expressions and the load-time flags
    llama.cpp sets with it (a whole word already in the vocabulary skips merging;
    a BOS is added unless the file says otherwise)."""

    expressions: tuple[str, ...]
    ignore_merges: bool = False
    add_bos_default: bool = False


_DEFAULT = PreTokenizerSpec(
    (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
)
_FAMILIES: list[tuple[tuple[str, ...], PreTokenizerSpec]] = [
    (("default",), _DEFAULT),
    (
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2"),
        PreTokenizerSpec((_LLAMA3,), ignore_merges=True, add_bos_default=True),
    ),
    (("dbrx", "smaug-bpe", "chatglm-bpe"), PreTokenizerSpec((_LLAMA3,))),
    (
        ("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4"),
        PreTokenizerSpec((_GPT2,)),
    ),
    (("gigachat", "a.x-4.0", "mellum"), PreTokenizerSpec((_GPT2,))),
    (
        ("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"),
        PreTokenizerSpec((r"\p{N}", _GPT2)),
    ),
    (("mellum2",), PreTokenizerSpec((r"\p{N}", _GPT2))),
    (
        ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2", "hunyuan"),
        PreTokenizerSpec((_QWEN2,)),
    ),
    (("solar-open", "grok-2"), PreTokenizerSpec((_QWEN2,))),
    (("qwen35",), PreTokenizerSpec((_QWEN35,))),
    (("falcon",), PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"))),
    (("poro-chat", "bloom", "gpt3-finnish"), PreTokenizerSpec((_PORO,))),
    (("viking",), PreTokenizerSpec((_PORO, r"\p{N}"))),
    (("tekken",), PreTokenizerSpec((_TEKKEN,), ignore_merges=True, add_bos_default=True)),
    (("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), PreTokenizerSpec((_GPT4O,))),
    (("seed-coder",), PreTokenizerSpec((_SEED_CODER,))),
    (("bailingmoe", "bailingmoe2", "llada-moe"), PreTokenizerSpec((_BAILING,))),
    (("ufakzeka",), PreTokenizerSpec((_NO_CONTRACTIONS,))),
    (("minicpm5",), PreTokenizerSpec((r"\p{N}{1,3}", _MINICPM5), ignore_merges=True)),
]
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    name: spec for names, spec in _FAMILIES for name in names
}


def pre_tokenizer_spec(pre: str | None) -> PreTokenizerSpec:
    """The spec for a `tokenizer.ggml.pre` value; a missing one means llama.cpp's default."""
    if not pre:
        return _DEFAULT
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        raise TokenizerError(f"unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre)")
    return spec


class PreTokenizer:
    """Splits text into the words BPE merges within."""

    def __init__(self, spec: PreTokenizerSpec) -> None:
        self.spec = spec
        # One capturing group around the whole pattern: re.split then returns the stretches
        # between matches and the matches themselves, in order, all in C.
        self._patterns = [re.compile(f"({translate(e)})") for e in spec.expressions]

    def split(self, text: str) -> list[str]:
        pieces = [text]
        for pattern in self._patterns:
            split = pattern.split
            pieces = [part for piece in pieces for part in split(piece) if part]
        return pieces
