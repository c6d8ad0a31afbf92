"""GGUF tokenizers: text <-> token ids exactly as llama.cpp does it.

Two vocabulary kinds, chosen by `tokenizer.ggml.model`:
- "gpt2": byte-level BPE. The text is split into words by the pre-tokenizer that
  `tokenizer.ggml.pre` names (pretokenize.py), each word's UTF-8 bytes are spelled with the
  GPT-2 byte alphabet, and merges apply inside a word by rank (lowest first, leftmost on ties).
- "llama": SentencePiece-style. Spaces become U+2581, characters are merged pairwise by the
  score of the token they form (highest first, leftmost on ties), and whatever is left that is
  not a token falls back to byte tokens `<0xXX>`.

Before either runs, special tokens are cut out of the text, longest first: USER_DEFINED tokens
always (Gemma's whitespace runs and HTML tags, Qwen's <tool_call>), CONTROL and UNKNOWN tokens
only when the caller asks for `parse_special`. Which tokens end generation follows llama.cpp:
the eos/eot/eom ids, FIM pad/repo/separator tokens, and tokens recognised by their text.

Both encoders cache per word (BPE) or per segment (SentencePiece), which is what makes a pure
Python tokenizer keep up with the peer: natural text repeats its words.
"""

from __future__ import annotations

import codecs
import heapq
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from llmapp.runtime.errors import TokenizerError
from llmapp.runtime.text.pretokenize import PreTokenizer, pre_tokenizer_spec

if TYPE_CHECKING:
    from llmapp.runtime.files.gguf_file import GGUFFile

# llama.cpp token attributes (bit flags), derived from tokenizer.ggml.token_type.
ATTR_UNKNOWN = 1
ATTR_UNUSED = 2
ATTR_NORMAL = 4
ATTR_CONTROL = 8
ATTR_USER_DEFINED = 16
ATTR_BYTE = 32
_TYPE_TO_ATTR = {1: ATTR_NORMAL, 2: ATTR_UNKNOWN, 3: ATTR_CONTROL, 4: ATTR_USER_DEFINED}
_TYPE_TO_ATTR |= {5: ATTR_UNUSED, 6: ATTR_BYTE}
_SPECIAL_ATTRS = ATTR_CONTROL | ATTR_UNKNOWN  # hidden when decoding without specials

SPACE_MARKER = "\u2581"  # SentencePiece's visible space
_WORD_CACHE_LIMIT = 200_000
_LONG_SEGMENT = 64  # SentencePiece segments longer than this are cut further (_unglued)

# Tokens llama.cpp recognises by their text (model files rarely declare them).
_EOT_NAMES = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>",
)  # fmt: skip
_EOM_NAMES = ("<|eom_id|>",)
_FIM_NAMES: dict[str, tuple[str, ...]] = {
    "pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>",
            "<PRE>", "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>",
            "<SUF>", "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>",
            "<MID>", "\u2581<MID>", "<|code_middle|>", "<|middle|>"),
    "pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "sep": ("<|file_sep|>",),
}  # fmt: skip
_EOG_NAMES = frozenset((
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
))  # fmt: skip
_ALWAYS_RENDERED = ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>")


def _gpt2_byte_alphabet() -> list[str]:
    """Byte value -> the printable character GPT-2 style BPE spells it with."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


_BYTE_CHARS = _gpt2_byte_alphabet()
_BYTE_TRANSLATION = {b: c for b, c in enumerate(_BYTE_CHARS)}  # latin-1 char -> alphabet
_CHAR_TO_BYTE = {c: b for b, c in enumerate(_BYTE_CHARS)}
_SURROGATES = re.compile("[\ud800-\udfff]")


# ---- metadata helpers ----------------------------------------------------------------------


def _md_list(md: Mapping[str, Any], key: str) -> list[Any] | None:
    value = md.get(key)
    if value is None:
        return None
    if hasattr(value, "to_list"):
        return list(value.to_list())
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TokenizerError(f"{key} must be an array")
    return list(value)


def _md_bool(md: Mapping[str, Any], key: str, default: bool) -> bool:
    value = md.get(key)
    return default if value is None else bool(value)


def _md_token_id(md: Mapping[str, Any], key: str, default: int | None, n_vocab: int) -> int | None:
    """A special token id: the file's if it is inside the vocabulary, else the default."""
    if default is not None and not 0 <= default < n_vocab:
        default = None
    value = md.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < n_vocab:
        return default
    return value


def _trie_pattern(words: Iterable[str]) -> str:
    """A regex matching, at a position, the longest of `words` that starts there."""
    root: dict[str, Any] = {}
    for word in words:
        node = root
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: dict[str, Any]) -> str:
        alts = [re.escape(ch) + emit(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body  # greedy: longer tokens win

    return emit(root)


class _SpecialMatcher:
    """Finds which of a set of special tokens occur in a text, cheaply, then cuts them out
    one token at a time, longest (in bytes) first, as llama.cpp's partition does."""

    _TRIE_MAX_LEN = 64  # longer texts are searched for directly (keeps the regex shallow)
    _DIRECT_MAX = 32  # this few tokens: a substring test each beats a regex pass

    def __init__(self, items: Iterable[tuple[str, int]]) -> None:
        self._by_text: dict[str, int] = {}
        for text, token_id in items:
            if text and text not in self._by_text:
                self._by_text[text] = token_id
        self._order = {t: (-len(t.encode()), i) for t, i in self._by_text.items()}
        self._long = [t for t in self._by_text if len(t) > self._TRIE_MAX_LEN]
        self._regex: re.Pattern[str] | None = None
        if len(self._by_text) > self._DIRECT_MAX:
            short = [t for t in self._by_text if len(t) <= self._TRIE_MAX_LEN]
            self._regex = re.compile(f"(?=({_trie_pattern(short)}))") if short else None

    def occurring(self, text: str) -> list[tuple[str, int]]:
        if self._regex is None:
            found = {t for t in self._by_text if t in text}
        else:
            found = {t for t in self._long if t in text}
            for longest in set(self._regex.findall(text)):
                # every special token that is a prefix of a longest match also occurs there
                found.update(longest[:k] for k in range(1, len(longest) + 1))
            found &= self._by_text.keys()
        return sorted(((t, self._by_text[t]) for t in found), key=lambda ti: self._order[ti[0]])

    def partition(self, text: str) -> list[str | int]:
        fragments: list[str | int] = [text]
        for token_text, token_id in self.occurring(text):
            cut: list[str | int] = []
            for frag in fragments:
                if isinstance(frag, int) or token_text not in frag:
                    cut.append(frag)
                    continue
                for j, part in enumerate(frag.split(token_text)):
                    if j:
                        cut.append(token_id)
                    if part:
                        cut.append(part)
            fragments = cut
        return fragments


# ---- the two merge algorithms ----------------------------------------------------------------


def _bpe_merge(symbols: list[str], ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """Merge adjacent symbols by rank, lowest first and leftmost on ties."""
    if len(symbols) > 24:
        return _bpe_merge_heap(symbols, ranks)
    while len(symbols) > 1:
        best = -1
        best_rank = 0
        for i in range(len(symbols) - 1):
            rank = ranks.get((symbols[i], symbols[i + 1]))
            if rank is not None and (best < 0 or rank < best_rank):
                best, best_rank = i, rank
        if best < 0:
            break
        symbols[best : best + 2] = [symbols[best] + symbols[best + 1]]
    return symbols


def _bpe_merge_heap(symbols: list[str], ranks: Mapping[tuple[str, str], int]) -> list[str]:
    # Same order as the quadratic loop, for long words: a heap of (rank, left, right, text);
    # an entry whose two sides changed since it was pushed no longer spells its text.
    text = list(symbols)
    n = len(text)
    nxt = [*range(1, n), -1]
    prv = list(range(-1, n - 1))
    heap: list[tuple[int, int, int, str]] = []

    def push(left: int, right: int) -> None:
        rank = ranks.get((text[left], text[right]))
        if rank is not None:
            heapq.heappush(heap, (rank, left, right, text[left] + text[right]))

    for i in range(n - 1):
        push(i, i + 1)
    while heap:
        _, left, right, joined = heapq.heappop(heap)
        a, b = text[left], text[right]
        if not a or not b or a + b != joined:
            continue
        text[left], text[right] = joined, ""
        after = nxt[right]
        nxt[left] = after
        if after >= 0:
            prv[after] = left
            push(left, after)
        if prv[left] >= 0:
            push(prv[left], left)
    return [t for t in text if t]


def _spm_merge(chars: list[str], scores: Sequence[float], vocab: Mapping[str, int]) -> list[str]:
    """Merge adjacent pieces into the token of highest score first, leftmost on ties."""
    text = list(chars)
    n = len(text)
    nxt = [*range(1, n), -1]
    prv = list(range(-1, n - 1))
    get = vocab.get
    push = heapq.heappush
    # heap entries: (-score, left, right, length of the merged text when pushed)
    heap = []
    for i in range(n - 1):
        token_id = get(text[i] + text[i + 1])
        if token_id is not None:
            heap.append((-scores[token_id], i, i + 1, len(text[i]) + len(text[i + 1])))
    heapq.heapify(heap)
    pop = heapq.heappop
    while heap:
        _, left, right, size = pop(heap)
        a, b = text[left], text[right]
        if not a or not b or len(a) + len(b) != size:
            continue  # one side was merged away or grew since this entry was pushed
        merged = text[left] = a + b
        text[right] = ""
        after = nxt[right]
        nxt[left] = after
        if after >= 0:
            prv[after] = left
            c = text[after]
            token_id = get(merged + c)
            if token_id is not None:
                push(heap, (-scores[token_id], left, after, len(merged) + len(c)))
        before = prv[left]
        if before >= 0:
            c = text[before]
            token_id = get(c + merged)
            if token_id is not None:
                push(heap, (-scores[token_id], before, left, len(c) + len(merged)))
    return [t for t in text if t]


# ---- the tokenizer ---------------------------------------------------------------------------


class Tokenizer:
    """A GGUF vocabulary with llama.cpp's encode and decode rules.

    Build with `Tokenizer.from_gguf(gguf)` or `Tokenizer.from_metadata(mapping)` (the same keys
    as the file's metadata; tests use plain dicts).
    """

    def __init__(self, md: Mapping[str, Any], extra_eog: Iterable[str | int] = ()) -> None:
        self.model = md.get("tokenizer.ggml.model")
        if self.model not in ("gpt2", "llama"):
            raise TokenizerError(
                f"unsupported tokenizer model {self.model!r} (tokenizer.ggml.model)"
            )
        self._load_vocab(md)
        self._load_options(md)
        self._load_special_ids(md)
        self._detect_special_tokens()
        self._add_extra_eog(extra_eog)
        self._eog_ids = frozenset(self._eog)  # read per generated token: built once
        self._piece_cache: list[bytes | None] = [None] * self.n_vocab
        self._matchers: dict[bool, _SpecialMatcher] = {}
        self._word_cache: dict[str, list[int]] = {}
        if self.model == "gpt2":
            self._init_bpe(md)
        else:
            self._init_spm()

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, extra_eog: Iterable[str | int] = ()) -> Tokenizer:
        return cls(gguf.metadata, extra_eog)

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], extra_eog: Iterable[str | int] = ()) -> Tokenizer:
        return cls(md, extra_eog)

    # -- loading -------------------------------------------------------------------------------

    def _load_vocab(self, md: Mapping[str, Any]) -> None:
        tokens = _md_list(md, "tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError("the file has no vocabulary (tokenizer.ggml.tokens)")
        if not all(isinstance(t, str) for t in tokens):
            raise TokenizerError("tokenizer.ggml.tokens must be an array of strings")
        # llama.cpp renames empty tokens so that none matches everywhere.
        self._tokens: list[str] = [t or f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.n_vocab = len(self._tokens)
        self._token_to_id = {t: i for i, t in enumerate(self._tokens)}  # a later duplicate wins
        scores = _md_list(md, "tokenizer.ggml.scores")
        if scores is not None and len(scores) < self.n_vocab:
            raise TokenizerError("tokenizer.ggml.scores is shorter than the vocabulary")
        self._scores: list[float] = [float(s) for s in scores] if scores else [0.0] * self.n_vocab
        types = _md_list(md, "tokenizer.ggml.token_type")
        if types is not None and len(types) < self.n_vocab:
            raise TokenizerError("tokenizer.ggml.token_type is shorter than the vocabulary")
        if types is None:
            self._attrs = [ATTR_NORMAL] * self.n_vocab
        else:
            self._attrs = [_TYPE_TO_ATTR.get(t, 0) for t in types[: self.n_vocab]]

    def _load_options(self, md: Mapping[str, Any]) -> None:
        self.pre = str(md.get("tokenizer.ggml.pre") or "")
        if self.model == "gpt2":
            spec = pre_tokenizer_spec(self.pre)
            self._pre_spec = spec
            default_bos, default_eos, default_unk = 11, 11, None
            add_bos_default, space_prefix_default = spec.add_bos_default, False
        else:
            default_bos, default_eos, default_unk = 1, 2, 0
            add_bos_default, space_prefix_default = True, True
        self._defaults = (default_bos, default_eos, default_unk)
        self.add_space_prefix = _md_bool(
            md, "tokenizer.ggml.add_space_prefix", space_prefix_default
        )
        self.add_bos = _md_bool(md, "tokenizer.ggml.add_bos_token", add_bos_default)
        self.add_eos = _md_bool(md, "tokenizer.ggml.add_eos_token", False)

    def _load_special_ids(self, md: Mapping[str, Any]) -> None:
        n = self.n_vocab
        bos, eos, unk = self._defaults
        key = "tokenizer.ggml.{}_token_id".format
        self.bos_id = _md_token_id(md, key("bos"), bos, n)
        self.eos_id = _md_token_id(md, key("eos"), eos, n)
        self.unk_id = _md_token_id(md, key("unknown"), unk, n)
        self.pad_id = _md_token_id(md, key("padding"), None, n)
        self.eot_id = _md_token_id(md, key("eot"), None, n)
        self.eom_id = _md_token_id(md, key("eom"), None, n)
        # The older prefix/suffix/middle keys, when present, win (llama.cpp reads them last).
        old_names = {"pre": "prefix", "suf": "suffix", "mid": "middle"}
        self._fim: dict[str, int | None] = {}
        for role in _FIM_NAMES:
            current = _md_token_id(md, key("fim_" + role), None, n)
            self._fim[role] = _md_token_id(md, key(old_names.get(role, "_")), current, n)

    def _detect_special_tokens(self) -> None:
        """Roles found by name, the end-of-generation set, and the attribute fixes that go with
        them (a token recognised this way is treated as a control token)."""
        t2i = self._token_to_id
        if self.eot_id is None:
            self.eot_id = self._first_present(_EOT_NAMES)
        if self.eom_id is None:
            self.eom_id = self._first_present(_EOM_NAMES)
        for role, names in _FIM_NAMES.items():
            if self._fim[role] is None:
                self._fim[role] = self._first_present(names)
        eog = {i for role in ("pad", "rep", "sep") if (i := self._fim[role]) is not None}
        for name in _EOG_NAMES:
            if name in t2i:
                eog.add(t2i[name])
                self._attrs[t2i[name]] |= ATTR_CONTROL
        for name in _ALWAYS_RENDERED:
            if name in t2i:
                self._attrs[t2i[name]] = ATTR_USER_DEFINED
        eog.update(i for i in (self.eos_id, self.eot_id, self.eom_id) if i is not None)
        self._drop_false_eog(eog)
        self._eog = eog

    def _first_present(self, names: Sequence[str]) -> int | None:
        for name in names:
            token_id = self._token_to_id.get(name)
            if token_id is not None:
                self._attrs[token_id] |= ATTR_CONTROL
                return token_id
        return None

    def _drop_false_eog(self, eog: set[int]) -> None:
        texts = {self._tokens[i]: i for i in eog}
        calls = "<|call|>" in texts or "<|calls|>" in texts
        if "<|end|>" in texts and calls and ("<|return|>" in texts or "<|flush|>" in texts):
            eog.discard(texts["<|end|>"])  # a turn separator there, not an end
            self._attrs[texts["<|end|>"]] = ATTR_USER_DEFINED
        if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):
            eog.discard(texts["</s>"])
            self._attrs[texts["</s>"]] = ATTR_NORMAL

    def _add_extra_eog(self, extra: Iterable[str | int]) -> None:
        for item in extra:
            token_id = item if isinstance(item, int) else self._token_to_id.get(item)
            if token_id is None or not 0 <= token_id < self.n_vocab:
                raise TokenizerError(f"end-of-generation token {item!r} is not in the vocabulary")
            self._eog.add(token_id)

    def _init_bpe(self, md: Mapping[str, Any]) -> None:
        merges = _md_list(md, "tokenizer.ggml.merges")
        if merges is None:
            raise TokenizerError("a gpt2 vocabulary needs tokenizer.ggml.merges")
        ranks: dict[tuple[str, str], int] = {}
        for rank, merge in enumerate(merges):
            if not isinstance(merge, str):
                raise TokenizerError("tokenizer.ggml.merges must be an array of strings")
            cut = merge.find(" ", 1)
            pair = (merge[:cut], merge[cut + 1 :]) if cut >= 0 else ("", "")
            ranks.setdefault(pair, rank)  # the first rank of a repeated merge counts
        self._ranks = ranks
        self._pre = PreTokenizer(self._pre_spec)
        self._ignore_merges = self._pre_spec.ignore_merges

    def _init_spm(self) -> None:
        # A segment boundary before a space marker is safe when no token holds the character
        # before it followed by a marker: no merge can then cross it, so segments tokenize
        # independently and repeat often enough to cache.
        glue: set[str] = set()
        for token in self._tokens:
            at = token.find(SPACE_MARKER, 1)
            while at > 0:
                glue.add(token[at - 1])
                at = token.find(SPACE_MARKER, at + 1)
        self._token_pairs: set[str] | None = None  # built on first long segment
        marker = re.escape(SPACE_MARKER)
        if glue:
            chars = "".join(re.escape(c) for c in sorted(glue))
            self._segmenter = re.compile(f"(?<![{chars}])(?={marker})")
        else:
            self._segmenter = re.compile(f"(?={marker})")

    # -- properties ----------------------------------------------------------------------------

    @property
    def eog_ids(self) -> frozenset[int]:
        """Ids that end generation: eos/eot/eom, FIM pad/repo/sep, the ones recognised by
        name (<|im_end|>, <end_of_turn>, <|endoftext|>, ...) and the catalog's extra ones."""
        return self._eog_ids

    def is_eog(self, token_id: int) -> bool:
        return token_id in self._eog_ids

    def is_control(self, token_id: int) -> bool:
        return bool(self._attrs[token_id] & _SPECIAL_ATTRS)

    def token_text(self, token_id: int) -> str:
        """The token as the vocabulary spells it (GPT-2 byte alphabet, U+2581 for spaces)."""
        self._check_id(token_id)
        return self._tokens[token_id]

    def token_to_id(self, text: str) -> int | None:
        """The id of the token whose vocabulary text is exactly `text`."""
        return self._token_to_id.get(text)

    # -- encoding ------------------------------------------------------------------------------

    def encode(
        self,
        text: str,
        add_bos: bool | None = None,
        parse_special: bool = False,
        add_eos: bool = False,
    ) -> list[int]:
        """Text -> ids. add_bos None means the model's own choice (tokenizer.ggml.add_bos_token).

        With parse_special, control tokens written in the text (<|im_start|>) become their ids;
        without it they are tokenized as plain text. Lone surrogates become U+FFFD.
        """
        if _SURROGATES.search(text):
            text = _SURROGATES.sub("\ufffd", text)
        out: list[int] = []
        if self.add_bos if add_bos is None else add_bos:
            out.append(self._required(self.bos_id, "BOS"))
        fragments = self._matcher(parse_special).partition(text) if text else []
        if self.model == "gpt2":
            self._encode_bpe(fragments, out)
        else:
            self._encode_spm(fragments, out)
        if add_eos:
            out.append(self._required(self.eos_id, "EOS"))
        return out

    def _required(self, token_id: int | None, what: str) -> int:
        if token_id is None:
            raise TokenizerError(f"the vocabulary has no {what} token")
        return token_id

    def _matcher(self, parse_special: bool) -> _SpecialMatcher:
        matcher = self._matchers.get(parse_special)
        if matcher is None:
            special = ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN
            skipped = 0 if parse_special else ATTR_CONTROL | ATTR_UNKNOWN
            items = [
                (self._tokens[i], i)
                for i, a in enumerate(self._attrs)
                if a & special and not a & skipped
            ]
            matcher = self._matchers[parse_special] = _SpecialMatcher(items)
        return matcher

    def _encode_bpe(self, fragments: list[str | int], out: list[int]) -> None:
        cache = self._word_cache
        for frag in fragments:
            if isinstance(frag, int):
                out.append(frag)
                continue
            for word in self._pre.split(frag):
                ids = cache.get(word)
                if ids is None:
                    ids = self._bpe_word(word)
                    if len(cache) >= _WORD_CACHE_LIMIT:
                        cache.clear()
                    cache[word] = ids
                out.extend(ids)

    def _bpe_word(self, word: str) -> list[int]:
        spelled = word.encode("utf-8").decode("latin-1").translate(_BYTE_TRANSLATION)
        vocab = self._token_to_id
        if self._ignore_merges and spelled in vocab:
            return [vocab[spelled]]
        ids: list[int] = []
        for symbol in _bpe_merge(list(spelled), self._ranks):
            token_id = vocab.get(symbol)
            if token_id is not None:
                ids.append(token_id)
                continue
            # Not a token: llama.cpp looks each byte up as a one-byte text; only ASCII can hit.
            for byte in symbol.encode("utf-8"):
                byte_id = vocab.get(chr(byte)) if byte < 0x80 else None
                if byte_id is not None:
                    ids.append(byte_id)
        return ids

    def _encode_spm(self, fragments: list[str | int], out: list[int]) -> None:
        after_special = True  # the text at the very start also gets the space prefix
        for frag in fragments:
            if isinstance(frag, int):
                out.append(frag)
                after_special = True
                continue
            if self.add_space_prefix and after_special:
                frag = " " + frag
            after_special = False
            self._encode_spm_text(frag.replace(" ", SPACE_MARKER), out)

    def _encode_spm_text(self, text: str, out: list[int]) -> None:
        cache = self._word_cache
        for segment in self._segmenter.split(text):
            if not segment:
                continue
            ids = cache.get(segment)
            if ids is None:
                if len(segment) > _LONG_SEGMENT:
                    ids = [i for part in self._unglued(segment) for i in self._spm_segment(part)]
                else:
                    ids = self._spm_segment(segment)
                if len(cache) >= _WORD_CACHE_LIMIT:
                    cache.clear()
                cache[segment] = ids
            out.extend(ids)

    def _unglued(self, segment: str) -> list[str]:
        """Cut a long segment (text without spaces) wherever two neighbouring characters
        appear together in no token: no merge can join across such a place."""
        if self._token_pairs is None:
            self._token_pairs = {t[i : i + 2] for t in self._tokens for i in range(len(t) - 1)}
        pairs = self._token_pairs
        parts = []
        start = 0
        for i in range(1, len(segment)):
            if segment[i - 1 : i + 1] not in pairs:
                parts.append(segment[start:i])
                start = i
        parts.append(segment[start:])
        return parts

    def _spm_segment(self, segment: str) -> list[int]:
        vocab = self._token_to_id
        ids: list[int] = []
        for piece in _spm_merge(list(segment), self._scores, vocab):
            token_id = vocab.get(piece)
            if token_id is not None:
                ids.append(token_id)
            else:
                ids.extend(self._byte_token(b) for b in piece.encode("utf-8"))
        return ids

    def _byte_token(self, byte: int) -> int:
        token_id = self._token_to_id.get(f"<0x{byte:02X}>")
        if token_id is None and byte < 0x80:
            token_id = self._token_to_id.get(chr(byte))
        if token_id is None:
            raise TokenizerError(f"the vocabulary has no byte token for 0x{byte:02X}")
        return token_id

    # -- decoding ------------------------------------------------------------------------------

    def token_bytes(self, token_id: int, special: bool = True) -> bytes:
        """The bytes a token stands for; control and unknown tokens are empty unless special."""
        self._check_id(token_id)
        if not special and self._attrs[token_id] & _SPECIAL_ATTRS:
            return b""
        piece = self._piece_cache[token_id]
        if piece is None:
            piece = self._piece_cache[token_id] = self._make_piece(token_id)
        return piece

    def token_piece(self, token_id: int) -> str:
        """A token's text for display: its bytes as UTF-8, partial characters as \\xNN."""
        return self.token_bytes(token_id).decode("utf-8", "backslashreplace")

    def _make_piece(self, token_id: int) -> bytes:
        attr = self._attrs[token_id]
        text = self._tokens[token_id]
        if attr & (_SPECIAL_ATTRS | ATTR_USER_DEFINED):
            return text.encode("utf-8")
        if attr & ATTR_NORMAL:
            if self.model == "llama":
                return text.replace(SPACE_MARKER, " ").encode("utf-8")
            return _unspell_bytes(text)
        if attr & ATTR_BYTE:
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                return b"\x00"
        return b""  # unused and undefined tokens print nothing

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.n_vocab:
            raise TokenizerError(
                f"token id {token_id} is outside the vocabulary (0..{self.n_vocab - 1})"
            )

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Ids -> text. Bytes that do not form UTF-8 become U+FFFD.

        With add_space_prefix (SentencePiece), the space encoding put in front of the text is
        taken off the first token after an optional leading BOS (llama.cpp strips it only when
        there is no BOS; this way decode(encode(text)) gives the text back either way).
        """
        ids = list(ids)
        pieces = [self.token_bytes(t, not skip_special) for t in ids]
        first_text = 1 if ids[:1] == [self.bos_id] else 0
        if self.add_space_prefix and pieces[first_text:] and pieces[first_text][:1] == b" ":
            pieces[first_text] = pieces[first_text][1:]
        return b"".join(pieces).decode("utf-8", "replace")


def _unspell_bytes(text: str) -> bytes:
    """A byte-level BPE token's text -> its bytes (GPT-2 alphabet back to byte values)."""
    out = bytearray()
    for ch in text:
        byte = _CHAR_TO_BYTE.get(ch)
        if byte is not None:
            out.append(byte)
        else:  # not in the alphabet: llama.cpp writes a marker with the raw text
            hex_utf8 = ch.encode("utf-8").hex()
            out += f"[UNK_BYTE_0x{hex_utf8}{text}]".encode()
    return bytes(out)


class IncrementalDetokenizer:
    """Streams text for ids pushed one at a time.

    push(id) returns only text that is complete: bytes of a character split across tokens are
    held back until the character is whole. The concatenation of every push and the final
    flush() equals tokenizer.decode(all ids) exactly.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self.tokenizer = tokenizer
        self._special = not skip_special
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._strip_space = tokenizer.add_space_prefix  # until the first text token is seen
        self._at_start = True

    def push(self, token_id: int) -> str:
        piece = self.tokenizer.token_bytes(token_id, self._special)
        leading_bos = self._at_start and token_id == self.tokenizer.bos_id
        self._at_start = False
        if self._strip_space and not leading_bos:
            self._strip_space = False
            if piece[:1] == b" ":
                piece = piece[1:]
        return self._decoder.decode(piece)

    def flush(self) -> str:
        """Whatever is held back (an incomplete character becomes U+FFFD)."""
        return self._decoder.decode(b"", final=True)
