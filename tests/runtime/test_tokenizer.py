"""Tokenizer rules on small synthetic vocabularies (no model file, no peer needed).

The identity with llama.cpp on the real models is in test_tokenizer_llamacpp.py; here each
rule gets a vocabulary small enough to work the expected ids out by hand.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmapp.runtime.errors import TokenizerError
from llmapp.runtime.text.pretokenize import PreTokenizer, pre_tokenizer_spec, translate
from llmapp.runtime.text.tokenizer import (
    IncrementalDetokenizer,
    Tokenizer,
    _gpt2_byte_alphabet,
    _SpecialMatcher,
)

NORMAL, UNKNOWN, CONTROL, USER, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
ALPHABET = _gpt2_byte_alphabet()


def bpe_metadata(pre: str = "gpt-2", **extra: Any) -> dict[str, Any]:
    """Byte-level BPE: the 256 byte tokens, a few merges, and special tokens after them."""
    merges = ["h e", "l l", "he ll", "hell o", "\u0120 w", "\u0120w o", "o r"]
    merged = ["he", "ll", "hell", "hello", "\u0120w", "\u0120wo", "or"]
    special = [
        ("<|endoftext|>", CONTROL),
        ("<|im_start|>", CONTROL),
        ("<|im_end|>", CONTROL),
        ("<tool>", USER),
        ("<|fim_pad|>", CONTROL),
    ]
    tokens = ALPHABET + merged + [t for t, _ in special]
    types = [NORMAL] * (256 + len(merged)) + [ty for _, ty in special]
    md: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.ggml.eos_token_id": tokens.index("<|endoftext|>"),
    }
    md.update(extra)
    return md


def spm_metadata(**extra: Any) -> dict[str, Any]:
    """SentencePiece-style: specials, 256 byte tokens, then pieces with scores."""
    head = [("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL), ("<end_of_turn>", CONTROL)]
    head.append(("\n\n", USER))
    pieces = [("\u2581", -1.0), ("a", -2.0), ("b", -2.0), ("\u2581a", -1.5), ("ab", -0.5)]
    pieces += [("\u2581b", -2.5), ("\n", -4.0)]
    tokens = [t for t, _ in head] + [f"<0x{b:02X}>" for b in range(256)] + [p for p, _ in pieces]
    types = [ty for _, ty in head] + [BYTE] * 256 + [NORMAL] * len(pieces)
    scores = [0.0] * (len(head) + 256) + [s for _, s in pieces]
    md: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.add_space_prefix": False,
        "tokenizer.ggml.add_bos_token": False,
    }
    md.update(extra)
    return md


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.from_metadata(bpe_metadata())


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    return Tokenizer.from_metadata(spm_metadata())


def ids_of(tok: Tokenizer, *texts: str) -> list[int]:
    ids = [tok.token_to_id(t) for t in texts]
    assert None not in ids, texts
    return ids  # type: ignore[return-value]


# ---- pre-tokenizers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pre", "text", "words"),
    [
        ("gpt-2", "Hello world  123", ["Hello", " world", " ", " 123"]),
        ("gpt-2", "don't", ["don", "'t"]),
        ("llama-bpe", "12345 abc'S", ["123", "45", " abc", "'S"]),
        ("llama-bpe", "a \r\n\r\n b", ["a", " \r\n\r\n", " b"]),
        ("qwen2", "x=12", ["x", "=", "1", "2"]),
        ("smollm", "a1b  c", ["a", "1", "b", " ", " c"]),
        ("default", "a...b 12345", ["a", "...", "b", " ", "123", "45"]),
    ],
)
def test_pre_tokenizer_words(pre: str, text: str, words: list[str]) -> None:
    assert PreTokenizer(pre_tokenizer_spec(pre)).split(text) == words


def test_pre_tokenizer_uses_llama_cpp_character_classes() -> None:
    gpt2 = PreTokenizer(pre_tokenizer_spec("gpt-2"))
    # U+001C is whitespace to Python's str.isspace, not to llama.cpp (Unicode White_Space).
    assert gpt2.split("a\x1cb") == ["a", "\x1c", "b"]
    assert gpt2.split("a\u3000b") == ["a", "\u3000", "b"]
    # Unicode 15.1 tables whatever Python runs: Kawi (15.0) is a letter, U+1C89 (16.0) is not.
    assert gpt2.split("a\U00011f04b") == ["a\U00011f04b"]
    assert gpt2.split("a\u1c89b") == ["a", "\u1c89", "b"]


def test_translate_rejects_unknown_categories() -> None:
    assert translate(r"(a)|[\p{N}x]").startswith("(?:a)|[")
    with pytest.raises(TokenizerError, match="unsupported"):
        translate(r"\p{Greek}")


def test_unknown_pre_tokenizer_and_model() -> None:
    with pytest.raises(TokenizerError, match="pre-tokenizer 'nope'"):
        Tokenizer.from_metadata(bpe_metadata(pre="nope"))
    with pytest.raises(TokenizerError, match="tokenizer model 'bert'"):
        Tokenizer.from_metadata({**bpe_metadata(), "tokenizer.ggml.model": "bert"})
    with pytest.raises(TokenizerError, match="no vocabulary"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": []})
    with pytest.raises(TokenizerError, match="merges"):
        Tokenizer.from_metadata({**bpe_metadata(), "tokenizer.ggml.merges": None})


# ---- BPE ------------------------------------------------------------------------------------


def test_bpe_merges_by_rank(bpe: Tokenizer) -> None:
    # "hello": h e -> he, l l -> ll, he ll -> hell, hell o -> hello
    assert bpe.encode("hello") == ids_of(bpe, "hello")
    # " world": \u0120 w -> \u0120w, then \u0120w o (rank 5) before o r (rank 6)
    assert bpe.encode(" world") == ids_of(bpe, "\u0120wo", "r", "l", "d")
    assert bpe.decode(bpe.encode("hello world")) == "hello world"


def test_bpe_bytes_of_any_text(bpe: Tokenizer) -> None:
    ids = bpe.encode("é")  # two UTF-8 bytes, each its own byte token
    assert ids == [ALPHABET.index(chr(0xC3)), ALPHABET.index(chr(0xA9))]
    assert bpe.decode(ids) == "é"


def test_bos_eos(bpe: Tokenizer) -> None:
    eot = bpe.token_to_id("<|endoftext|>")
    assert not bpe.add_bos and bpe.bos_id == eot
    assert bpe.encode("a") == bpe.encode("a", add_bos=None) == [ALPHABET.index("a")]
    assert bpe.encode("a", add_bos=True, add_eos=True) == [eot, ALPHABET.index("a"), eot]
    forced = Tokenizer.from_metadata(bpe_metadata(**{"tokenizer.ggml.add_bos_token": True}))
    assert forced.add_bos and forced.encode("")[0] == eot


def test_llama3_pre_defaults_to_bos() -> None:
    md = bpe_metadata(pre="llama-bpe")
    assert Tokenizer.from_metadata(md).add_bos
    md["tokenizer.ggml.add_bos_token"] = False
    assert not Tokenizer.from_metadata(md).add_bos


def test_missing_bos_is_an_error() -> None:
    md = bpe_metadata()
    md["tokenizer.ggml.tokens"] = md["tokenizer.ggml.tokens"][:11]  # default bos 11 is gone
    md["tokenizer.ggml.token_type"] = md["tokenizer.ggml.token_type"][:11]
    del md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]
    tok = Tokenizer.from_metadata(md)
    assert tok.bos_id is None
    with pytest.raises(TokenizerError, match="no BOS"):
        tok.encode("a", add_bos=True)


# ---- special tokens -------------------------------------------------------------------------


def test_control_tokens_only_with_parse_special(bpe: Tokenizer) -> None:
    start = bpe.token_to_id("<|im_start|>")
    text = "<|im_start|>hi"
    assert bpe.encode(text, parse_special=True)[0] == start
    plain = bpe.encode(text)
    assert start not in plain and bpe.decode(plain) == text


def test_user_defined_tokens_always_match(bpe: Tokenizer) -> None:
    tool = bpe.token_to_id("<tool>")
    assert bpe.encode("a<tool>b") == [ALPHABET.index("a"), tool, ALPHABET.index("b")]
    assert bpe.decode([tool], skip_special=True) == "<tool>"  # user-defined text is content


def test_longest_special_token_first() -> None:
    md = bpe_metadata()
    md["tokenizer.ggml.tokens"] = md["tokenizer.ggml.tokens"] + ["<a>", "<a><b>", "<b>"]
    md["tokenizer.ggml.token_type"] = md["tokenizer.ggml.token_type"] + [USER] * 3
    tok = Tokenizer.from_metadata(md)
    assert tok.encode("<a><b><b>") == ids_of(tok, "<a><b>", "<b>")


def test_special_matcher_trie_agrees_with_substring_search() -> None:
    texts = [f"<u{i}>" for i in range(100)] + ["<u1", "<u10", "\n", "\n\n", "\n\n\n", "  "]
    items = [(t, i) for i, t in enumerate(texts)]
    trie = _SpecialMatcher(items)
    direct = _SpecialMatcher(items)
    direct._regex = None  # force the plain substring test
    sample = "x<u10>y<u1 <u99>\n\n\n\n  <u100> <u1<u1>"
    assert trie.occurring(sample) == direct.occurring(sample)
    assert trie.partition(sample) == direct.partition(sample)


def test_end_of_generation_by_name(bpe: Tokenizer) -> None:
    names = {bpe.token_text(i) for i in bpe.eog_ids}
    assert names == {"<|endoftext|>", "<|im_end|>", "<|fim_pad|>"}
    extra = Tokenizer.from_metadata(bpe_metadata(), extra_eog=["<|im_start|>", 65])
    assert {bpe.token_to_id("<|im_start|>"), 65} <= extra.eog_ids
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        Tokenizer.from_metadata(bpe_metadata(), extra_eog=["<nope>"])


def test_eog_name_makes_a_user_token_control() -> None:
    # llama.cpp treats a user-defined token whose text marks an end as control:
    # it is then no longer cut out of plain text (Gemma 3's "</s>").
    md = bpe_metadata()
    md["tokenizer.ggml.tokens"] = md["tokenizer.ggml.tokens"] + ["</s>"]
    md["tokenizer.ggml.token_type"] = md["tokenizer.ggml.token_type"] + [USER]
    tok = Tokenizer.from_metadata(md)
    end = tok.token_to_id("</s>")
    assert end in tok.eog_ids and tok.is_control(end)
    assert end not in tok.encode("a</s>")
    assert end in tok.encode("a</s>", parse_special=True)


# ---- SentencePiece --------------------------------------------------------------------------


def test_spm_merges_by_score(spm: Tokenizer) -> None:
    # "ab" (-0.5) beats "\u2581a" (-1.5): " ab" -> \u2581 + ab, not \u2581a + b
    assert spm.encode(" ab") == ids_of(spm, "\u2581", "ab")
    assert spm.encode(" a") == ids_of(spm, "\u2581a")


def test_spm_byte_fallback(spm: Tokenizer) -> None:
    ids = spm.encode("é")
    assert ids == ids_of(spm, "<0xC3>", "<0xA9>")
    assert spm.decode(ids) == "é"


def test_spm_user_defined_and_space_prefix() -> None:
    md = spm_metadata(**{"tokenizer.ggml.add_space_prefix": True})
    del md["tokenizer.ggml.add_bos_token"]
    tok = Tokenizer.from_metadata(md)
    assert tok.add_bos and tok.bos_id == 1 and tok.eos_id == 2  # SentencePiece defaults
    # a space is put before the text at the start and after every special token
    ids = tok.encode("a\n\nb", add_bos=False)
    assert ids == ids_of(tok, "\u2581a", "\n\n", "\u2581b")
    assert tok.decode(ids) == "a\n\n b"  # only the first prefix space is taken off again
    assert tok.decode(tok.encode("ab b")) == "<s>ab b"
    assert tok.decode(tok.encode("ab b"), skip_special=True) == "ab b"


def test_decode_hides_control_tokens_when_asked(spm: Tokenizer) -> None:
    ids = [1, *spm.encode("ab"), 3]
    assert spm.decode(ids) == "<s>ab<end_of_turn>"
    assert spm.decode(ids, skip_special=True) == "ab"
    assert spm.token_piece(spm.token_to_id("<0xE4>") or 0) == "\\xe4"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        spm.decode([10_000])


def test_incremental_holds_back_partial_characters(spm: Tokenizer) -> None:
    ids = spm.encode("你")  # three byte tokens
    detok = IncrementalDetokenizer(spm)
    assert [detok.push(i) for i in ids] == ["", "", "你"]
    detok.push(spm.token_to_id("<0xE4>") or 0)
    assert detok.flush() == "\ufffd"  # an unfinished character at the end


# ---- properties -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trip(text: str) -> None:
    tok = _BPE_FOR_PROPERTIES
    # byte-level BPE loses nothing: every string comes back exactly
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_spm_round_trip(text: str) -> None:
    tok = _SPM_FOR_PROPERTIES
    # normalisation: U+2581 is how SentencePiece writes a space, so it decodes as a space
    assert tok.decode(tok.encode(text)) == text.replace("\u2581", " ")


_BPE_FOR_PROPERTIES = Tokenizer.from_metadata(bpe_metadata(pre="qwen2"))
_SPM_FOR_PROPERTIES = Tokenizer.from_metadata(spm_metadata())


def test_unicode_tables_are_current() -> None:
    import unicodedata
    from pathlib import Path

    from llmapp.runtime.text import unicode_ranges

    assert unicode_ranges.UNICODE_VERSION == "15.1.0"  # the version of llama.cpp's tables
    if unicodedata.unidata_version != unicode_ranges.UNICODE_VERSION:
        pytest.skip("this Python's unicodedata is another Unicode version")
    import gen_unicode_ranges

    module = Path(unicode_ranges.__file__).read_text(encoding="utf-8")
    assert gen_unicode_ranges.module_source() == module
