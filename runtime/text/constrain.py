"""Constrained decoding: a per-request token mask from a JSON schema, a grammar or a regex.

The grammar engine is llguidance (what llama.cpp's own constrained decoding can use): of the
maintained engines that install from the package index it works from a vocabulary's token
bytes, compiles a schema in about a millisecond and masks Qwen2.5's 151,936-token vocabulary
in ~0.03 ms a token (median; 0.2 ms worst) on this machine, where outlines-core took ~0.6 s
to index each schema and xgrammar needs torch and transformers (benchmarks/bench_grammar.py).

A request's `Constraint` is a logits processor for its own sampler: it advances the matcher
over the tokens generated since its last call, then masks what the grammar forbids. Once the
grammar is complete only end-of-generation tokens remain, so the reply ends there. Other rows
of the batch never see it.
"""

from __future__ import annotations

import copy
import json
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from llmapp.runtime.errors import LlmappError
from llmapp.runtime.text.tokenizer import Tokenizer


class ConstraintError(LlmappError, ValueError):
    """A schema, grammar or regex that cannot be compiled or is not supported."""


def _llguidance() -> Any:
    import llguidance  # a light Rust extension, imported only for constrained requests

    return llguidance


class _VocabularyView:
    """Our tokenizer as llguidance's TokenizerWrapper expects it: token bytes, ends, encode."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        n = tokenizer.n_vocab
        self.tokens = [tokenizer.token_bytes(i) for i in range(n)]
        eog = sorted(tokenizer.eog_ids)
        self.eos_token_id = eog[0] if eog else n - 1
        self.bos_token_id = None
        self.special_token_ids = [i for i in range(n) if tokenizer.is_control(i)]
        # llguidance tokenizes pieces of text in the middle of a reply: no space prefix there.
        self._encoder = copy.copy(tokenizer)
        self._encoder.add_space_prefix = False

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self._encoder.encode(text, add_bos=False, parse_special=False)


_CACHE: weakref.WeakKeyDictionary[Tokenizer, Any] = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def _ll_tokenizer(tokenizer: Tokenizer) -> Any:
    """llguidance's view of a vocabulary, built once per tokenizer (~0.5 s for 151k tokens)."""
    with _CACHE_LOCK:
        cached = _CACHE.get(tokenizer)
        if cached is None:
            ll = _llguidance()
            view = _VocabularyView(tokenizer)
            cached = ll.LLTokenizer(ll.TokenizerWrapper(view), eos_token=sorted(tokenizer.eog_ids))
            _CACHE[tokenizer] = cached
        return cached


# Bounds that keep a small model from running on until max_tokens inside valid JSON: runs of
# whitespace, and digits after a number's decimal point (gemma3-270m wrote "1.000000..." until
# the limit). Any output they allow is still valid against the caller's schema.
WHITESPACE = r"[\x20\x0A\x0D\x09]{1,24}"
NUMBER_STEP = 1e-8  # at most 8 decimals where a schema sets no multipleOf


def bounded(schema: Any) -> Any:
    """The schema with the bounds above, and `additionalProperties: false` on objects that
    list properties and say nothing of others (what OpenAI's strict mode requires: left open,
    a small model keeps inventing properties)."""
    if isinstance(schema, list):
        return [bounded(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: bounded(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if out.get("type") == "number" and "multipleOf" not in out:
        out["multipleOf"] = NUMBER_STEP
    return out


def grammar_for(
    json_schema: Mapping[str, Any] | str | bool | None = None,
    grammar: str | None = None,
    regex: str | None = None,
) -> str | None:
    """The llguidance grammar for a request's one constraint, or None when it has none."""
    given = [x is not None and x is not False for x in (json_schema, grammar, regex)]
    if sum(given) > 1:
        raise ConstraintError("give at most one of json_schema, grammar and regex")
    if not any(given):
        return None  # llguidance is loaded only for constrained requests
    ll = _llguidance()
    if json_schema is True:
        json_schema = {"type": "object"}  # "json_object": any JSON object
    if isinstance(json_schema, Mapping | str):
        try:
            if isinstance(json_schema, str):
                json_schema = json.loads(json_schema)
            source = json.dumps(bounded(json_schema))
            options = {"whitespace_pattern": WHITESPACE}
            return str(ll.LLMatcher.grammar_from_json_schema(source, overrides=options))
        except (ValueError, TypeError, RecursionError) as exc:
            raise ConstraintError(f"invalid JSON schema: {exc}") from None
    if grammar is not None:
        if "::=" in grammar:  # GBNF, llama.cpp's grammar format
            from llguidance.gbnf_to_lark import gbnf_to_lark

            try:
                grammar = gbnf_to_lark(grammar)
            except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's input
                raise ConstraintError(f"invalid GBNF grammar: {exc}") from None
        return str(ll.LLMatcher.grammar_from_lark(grammar))
    if regex is not None:
        return str(ll.LLMatcher.grammar_from_regex(regex))
    return None


def check_grammar(grammar: str, tokenizer: Tokenizer | None = None) -> None:
    """Raise ConstraintError naming what is wrong or unsupported in a compiled grammar."""
    ll = _llguidance()
    llt = _ll_tokenizer(tokenizer) if tokenizer is not None else None
    is_error, messages = ll.LLMatcher.validate_grammar_with_warnings(grammar, llt)
    if is_error:
        raise ConstraintError(messages[0].strip() if messages else "the grammar is not valid")


class Constraint:
    """One request's matcher, applied as a logits processor to that request's row only.

    With a `trigger` the constraint is lazy: text flows freely until the generated text
    contains the trigger (a tool call opening, say); the grammar then applies to the tokens
    after the one that completed it.
    """

    def __init__(self, grammar: str, tokenizer: Tokenizer, trigger: str | None = None) -> None:
        check_grammar(grammar, tokenizer)
        ll = _llguidance()
        self._matcher = ll.LLMatcher(_ll_tokenizer(tokenizer), grammar, log_level=0)
        self._tokenizer = tokenizer
        self._n_vocab = tokenizer.n_vocab
        self._consumed = 0
        self._trigger = trigger.encode() if trigger else b""
        self._tail = b""  # the end of the generated bytes, while waiting for the trigger
        self.triggered = not trigger
        if self._matcher.is_error():
            raise ConstraintError(self._matcher.get_error())

    @property
    def is_complete(self) -> bool:
        return bool(self._matcher.is_accepting())

    def _watch_for_trigger(self, generated: Sequence[int]) -> None:
        keep = max(len(self._trigger) - 1, 0)
        for i in range(self._consumed, len(generated)):
            self._tail = (self._tail + self._tokenizer.token_bytes(int(generated[i])))[-64:]
            if self._trigger in self._tail:
                self.triggered = True
                self._consumed = i + 1
                return
            self._tail = self._tail[-keep:] if keep else b""
        self._consumed = len(generated)

    def allowed(self, generated: Sequence[int]) -> np.ndarray | None:
        """bool [n_vocab]: the tokens the grammar allows after `generated` (None: any)."""
        if not self.triggered:
            self._watch_for_trigger(generated)
            if not self.triggered:
                return None
        for token in generated[self._consumed :]:
            if not self._matcher.consume_token(int(token)):
                raise ConstraintError(f"the grammar rejected a token: {self._matcher.get_error()}")
        self._consumed = len(generated)
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[: self._n_vocab].astype(bool)
        if self._matcher.is_error():
            raise ConstraintError(f"the grammar failed: {self._matcher.get_error()}")
        return mask

    def __call__(self, logits: np.ndarray, generated: Sequence[int]) -> np.ndarray:
        """The sampler's logits-processor hook: forbidden tokens get -inf."""
        mask = self.allowed(generated)
        if mask is None:
            return logits
        out = np.where(mask, logits, np.float32(-np.inf))
        return out.astype(np.float32, copy=False)
