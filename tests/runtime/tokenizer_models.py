"""Loaders shared by the tokenizer, detokenizer and template tests: each real model's
vocabulary is read once per test session, ours and llama.cpp's alike."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from llmapp.runtime.files.gguf_file import GGUFFile
from llmapp.runtime.text.tokenizer import Tokenizer


@cache
def our_tokenizer(path: Path) -> Tokenizer:
    with GGUFFile(path) as gguf:
        return Tokenizer.from_gguf(gguf)


@cache
def peer_vocab(path: Path) -> Any:
    """llama.cpp with only the vocabulary loaded (llama_cpp.Llama)."""
    import llama_cpp

    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


# Text of every kind the tokenizers must agree on (issue 3's list), plus each model's
# special-token spellings, tokenized with and without parse_special.
CORPUS: dict[str, str] = {
    "empty": "",
    "prose": (
        "The quick brown fox jumps over the lazy dog. It wasn't the first time; "
        "she'd seen it before, and they'll see it again. \"Really?\" he asked."
    ),
    "code": (
        "def fib(n: int) -> int:\n    if n < 2:\n        return n\n"
        "    return fib(n - 1) + fib(n - 2)\n\n\nclass A:\n\tpass  # tab\n"
        "for (int i = 0; i < 10; ++i) { x[i] = i * 2; }\n"
    ),
    "whitespace": "a  b   c    d\t\te \n \n\n\n   \t \n  end   ",
    "crlf": "line one\r\nline two\r\n\r\nline four\r",
    "numbers": "0 7 42 123 1234 12345 3.14159 -2.5e-10 1,000,000 12345678901234567890",
    "punctuation": "!!! ??? ... --- === +++ *** ((())) [[]] {{}} <<>> ~~ ^^ || && ;; :: @@ ##",
    "contractions": "I'm you're he's we've they'd I'll can't WON'T It'S O'Neil 'quoted'",
    "accented": "café naïve résumé Ångström façade Øresund Dvořák Łódź São Paulo",
    "cyrillic": "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "greek": "Γειά σου Κόσμε· ξεσκεπάζω την ψυχοφθόρα βδελυγμία.",
    "cjk": "你好，世界！这是一个测试。日本語のテキストです。한국어 텍스트입니다.",
    "emoji": "👍 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇫🇷🇯🇵🇺🇸 ❤️‍🔥 🧑🏿‍💻 ☺️",
    "invisible": "non\u00a0breaking zero\u200bwidth\u200c\u200djoiner\ufeffbom\u2060wj\u00ad",
    "mixed": "Ünïcödé\u3000全角\u2003em space ½ ² Ⅻ ٣ ൬ 𝔘𝔫𝔦 \U00011f04 \x1c\x85",
    "specials": (
        "<|im_start|>user\nhi<|im_end|>\n<|endoftext|><start_of_turn>model\n"
        "ok<end_of_turn>\n<bos><eos><pad><unk></s><s><tool_call>{}</tool_call>"
        "<table><tr><td>1</td></tr></table><|fim_prefix|><|fim_pad|><0x41>\u2581x"
    ),
}
