"""Our tokenizers against llama.cpp itself, live, on the three real models.

Ids must be identical on a varied corpus, with and without parse_special; every token's
piece and every end-of-generation decision too. Other pre-tokenizer types and a
SentencePiece vocabulary with add_space_prefix are checked through small GGUF files written
here (a real vocabulary with the metadata changed), which llama.cpp loads vocabulary-only.
"""

from __future__ import annotations

import ctypes
import random
import sysconfig
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_models import CORPUS, our_tokenizer, peer_vocab

from llmapp.runtime.files.gguf_file import GGUFFile
from llmapp.runtime.text.pretokenize import _FAMILIES
from llmapp.runtime.text.tokenizer import Tokenizer

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = [pytest.mark.real_model, pytest.mark.peer]

MODELS = ["smollm2_path", "gemma3_path", "qwen2_path"]


@pytest.fixture(params=MODELS)
def pair(request: pytest.FixtureRequest) -> tuple[Tokenizer, Any]:
    path = request.getfixturevalue(request.param)
    return our_tokenizer(path), peer_vocab(path)


def mismatches(ours: Tokenizer, peer: Any, texts: list[str], special: bool) -> list[str]:
    bad = []
    for text in texts:
        got = ours.encode(text, add_bos=False, parse_special=special)
        want = peer.tokenize(text.encode(), add_bos=False, special=special)
        if got != want:
            bad.append(f"{text[:40]!r}: ours {got[:12]} llama.cpp {want[:12]}")
    return bad


@pytest.mark.parametrize("special", [False, True], ids=["plain", "parse_special"])
def test_corpus_ids_identical(pair: tuple[Tokenizer, Any], special: bool) -> None:
    ours, peer = pair
    assert mismatches(ours, peer, list(CORPUS.values()), special) == []


def test_whole_corpus_as_one_text_and_with_bos(pair: tuple[Tokenizer, Any]) -> None:
    ours, peer = pair
    text = "\n".join(CORPUS.values())
    for special in (False, True):
        # add_bos=None is the model's own choice, as llama.cpp's add_special is
        assert ours.encode(text, parse_special=special) == peer.tokenize(
            text.encode(), add_bos=True, special=special
        )


def test_long_source_text(pair: tuple[Tokenizer, Any]) -> None:
    ours, peer = pair
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text(encoding="utf-8")
    assert ours.encode(text, add_bos=False) == peer.tokenize(text.encode(), add_bos=False)


def test_long_text_without_spaces(pair: tuple[Tokenizer, Any]) -> None:
    # No spaces: SentencePiece segments get long (cut where no token can span), BPE words too.
    ours, peer = pair
    source = (Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text(encoding="utf-8")
    rng = random.Random(5)
    noise = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789+/=") for _ in range(3000))
    for text in ("".join(source.split()), noise, "a" * 5000, "中文" * 800):
        assert ours.encode(text, add_bos=False) == peer.tokenize(text.encode(), add_bos=False)


def test_special_ids_and_flags(pair: tuple[Tokenizer, Any]) -> None:
    ours, peer = pair
    vocab = llama_cpp.llama_model_get_vocab(peer.model)
    assert ours.n_vocab == llama_cpp.llama_vocab_n_tokens(vocab)
    assert ours.bos_id == peer.token_bos() and ours.eos_id == peer.token_eos()
    assert ours.add_bos == llama_cpp.llama_vocab_get_add_bos(vocab)
    assert ours.add_eos == llama_cpp.llama_vocab_get_add_eos(vocab)
    peer_eog = {i for i in range(ours.n_vocab) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert ours.eog_ids == peer_eog


def test_every_token_piece(pair: tuple[Tokenizer, Any]) -> None:
    ours, peer = pair
    vocab = llama_cpp.llama_model_get_vocab(peer.model)
    buf = ctypes.create_string_buffer(1024)
    for special in (False, True):
        bad = []
        for i in range(ours.n_vocab):
            n = llama_cpp.llama_token_to_piece(vocab, i, buf, len(buf), 0, special)
            if buf.raw[:n] != ours.token_bytes(i, special):
                bad.append(i)
        assert bad == [], f"special={special}: {len(bad)} pieces differ, first {bad[:10]}"


# Characters that exercise the pre-tokenizers' classes, the space marker and specials.
_TRICKY = list("aZ09'sStTrReEvVlLmMdD \t\n\r.,;!?-_<>|/\\\"()[]{}$+=^~`") + [
    "\u00a0", "\u200b", "\u200d", "\u3000", "\u2003", "\x1c", "\x85", "\u2028", "é", "ß",
    "Ж", "λ", "中", "日", "한", "😀", "🏽", "🇫", "\u0301", "ſ", "İ", "K", "٣", "Ⅻ", "½",
    "\u2581", "\U00011f04", "\u1c89", "\U000e0001", "\x00", "  ", "\n\n", "'re", "'LL",
    "<|im_start|>", "<|im_end|>", "<end_of_turn>", "<bos>", "</s>", "<s>", "<0x41>", "<table>",
    "<tool_call>", "12345",
]  # fmt: skip
# Text is what a user can type: valid UTF-8, so no lone surrogates (llama.cpp takes bytes).
utf8_chars = st.characters(codec="utf-8")
tricky_text = st.lists(st.sampled_from(_TRICKY) | utf8_chars, max_size=40).map("".join)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.one_of(tricky_text, st.text(utf8_chars, max_size=40)))
def test_random_text_ids_identical(pair: tuple[Tokenizer, Any], text: str) -> None:
    ours, peer = pair
    assert mismatches(ours, peer, [text], False) == []
    assert mismatches(ours, peer, [text], True) == []


# ---- other vocabulary settings, through GGUF files written here ------------------------------


def write_vocab_gguf(src: Path, dest: Path, changes: dict[str, Any]) -> Path:
    """A tensor-less GGUF with src's metadata (tokenizer and hyper-parameters), `changes`
    applied (None deletes a key). llama.cpp can load it vocabulary-only."""
    import gguf as gguf_writer

    kinds = gguf_writer.GGUFValueType
    with GGUFFile(src) as original:
        arch = original.metadata["general.architecture"]
        writer = gguf_writer.GGUFWriter(str(dest), arch=arch)
        for key, value in original.metadata.items():
            if key == "general.architecture" or (key in changes and changes[key] is None):
                continue
            kind = kinds(original.value_type(key))
            value = changes.get(key, value)
            if kind == kinds.ARRAY:
                writer.add_key_value(key, value.to_list(), kind, sub_type=kinds(value.elem_type))
            else:
                writer.add_key_value(key, value, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def _samples(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    out = list(CORPUS.values())
    for _ in range(n):
        out.append("".join(rng.choice(_TRICKY) for _ in range(rng.randint(1, 30))))
    return out


# One name per family of pre-tokenizer types (the first; the expressions are shared).
PRE_NAMES = [names[0] for names, _ in _FAMILIES]


@pytest.mark.parametrize("pre", PRE_NAMES)
def test_pre_tokenizer_types(
    pre: str, smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # The model's own add_bos is dropped so each type's default applies (llama3 adds BOS).
    changes = {"tokenizer.ggml.pre": pre, "tokenizer.ggml.add_bos_token": None}
    path = write_vocab_gguf(smollm2_path, tmp_path_factory.mktemp("pre") / "v.gguf", changes)
    with GGUFFile(path) as gguf:
        ours = Tokenizer.from_gguf(gguf)
    peer = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    texts = _samples(len(pre), 300)
    assert mismatches(ours, peer, texts, False) == []
    text = texts[1]
    assert ours.encode(text) == peer.tokenize(text.encode(), add_bos=True)


def test_sentencepiece_with_space_prefix(
    gemma3_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Llama 2 / TinyLlama style: a space goes before the text and after every special token.
    changes = {"tokenizer.ggml.add_space_prefix": True}
    path = write_vocab_gguf(gemma3_path, tmp_path_factory.mktemp("spm") / "v.gguf", changes)
    with GGUFFile(path) as gguf:
        ours = Tokenizer.from_gguf(gguf)
    peer = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    texts = _samples(7, 300)
    for special in (False, True):
        assert mismatches(ours, peer, texts, special) == []
    assert ours.encode("Hi there") == peer.tokenize(b"Hi there", add_bos=True)
    assert ours.decode(ours.encode("Hi there"), skip_special=True) == "Hi there"
