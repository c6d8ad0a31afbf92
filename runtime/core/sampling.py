"""Sampling: small pure functions on a logits row, composed per request by `make_sampler`.

The chain follows llama.cpp's default order (common/sampling.cpp): logits processors (the
per-request mask hook, where a grammar would sit) -> logit bias -> repetition / presence /
frequency penalties -> top-k -> top-p -> min-p -> temperature -> draw. A temperature <= 0 is
greedy: the argmax after bias and penalties, without touching the random generator.

The filters work on `Candidates` (token ids with their logits). Over a 150k vocabulary nothing
sorts the whole row with indices: top-k selects by partition, top-p counts mass over the sorted
values of a short head (sorting the row's values only when the head falls short of `p`), and a
draw over the whole row uses block sums instead of a full cumulative sum. Ties are broken by
the lower token id everywhere, so results are exact and reproducible.

Stop strings live apart from the sampler: `StopMatcher` works on detokenized text, and
`check_finish` decides end-of-generation and max-tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import lru_cache, partial
from typing import Any, Literal, NamedTuple

import numpy as np
import numpy.typing as npt

from llmapp.runtime.errors import LlmappError

FloatArray = npt.NDArray[np.float32]
IdArray = npt.NDArray[np.int64]
FinishReason = Literal["stop", "length"]

# Token ids as the engine holds them: a list or an int64 array.
TokenIds = Sequence[int] | IdArray
# A per-request hook: (logits [n_vocab], generated ids) -> logits [n_vocab]. It receives its
# own copy of the row, so masking in place is allowed.
LogitsProcessor = Callable[[FloatArray, TokenIds], FloatArray]

BAN_BIAS = -100.0  # OpenAI's "ban" value; applied as -inf so the ban is absolute
MAX_TOP_LOGPROBS = 20
_TOP_P_HEADS = (256, 2048)  # top-p counts mass in these heads before sorting a whole row
_BLOCK = 512  # block size for drawing over a long row without a full cumulative sum
_POOL_STRIDE = 16  # top-k first narrows the row by a threshold taken from every 16th logit


class SamplingError(LlmappError, ValueError):
    """A sampling parameter is out of range, or no token can be sampled."""


# --- parameters ---------------------------------------------------------------------------


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise SamplingError(message)


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return (_is_int(value) or isinstance(value, float | np.floating)) and math.isfinite(
        float(value)  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples. Defaults are llama.cpp's (temperature 0.8, top-k 40,
    top-p 0.95, min-p 0.05, penalties off).

    temperature <= 0 is greedy. top_k 0, top_p 1.0, min_p 0 switch those filters off.
    repeat_penalty (1.0 = off) follows llama.cpp: a positive logit of a token seen in the last
    `repeat_last_n` context tokens (prompt included; -1 = whole context, 0 = no penalties) is
    divided by it, a negative one multiplied. presence_penalty / frequency_penalty use OpenAI's
    formula (logit -= count * frequency + presence) over the same window, as llama.cpp does.
    logit_bias maps token id -> value in [-100, 100], added to the logit; -100 bans the token.
    max_tokens None means no limit here (the context size still bounds a request).
    json_schema (a schema, or True for any JSON object), grammar (Lark, or GBNF when it has
    `::=`) and regex constrain the output (runtime/text/constrain.py); at most one of them.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False
    json_schema: Mapping[str, Any] | str | bool | None = None
    grammar: str | None = None
    regex: str | None = None
    grammar_trigger: str | None = None  # the grammar applies only after this text appears

    @property
    def constrained(self) -> bool:
        return any(
            x is not None and x is not False for x in (self.json_schema, self.grammar, self.regex)
        )

    @classmethod
    def layered(cls, *layers: object) -> SamplingParams:
        """Settings from layers of increasing precedence over this class's own defaults.

        A layer is a mapping or an object with some of the fields as attributes (the catalog's
        per-model SamplingDefaults, the chat's settings); a missing or None value leaves the
        layer below it. This is how `run`, `serve` and `chat` put the user's explicit values over
        a model's catalog defaults over llama.cpp's.
        """
        values: dict[str, Any] = {}
        for layer in layers:
            if layer is None:
                continue
            for f in fields(cls):
                if isinstance(layer, Mapping):
                    value = layer.get(f.name)
                else:
                    value = getattr(layer, f.name, None)
                if value is not None:
                    values[f.name] = value
        return cls(**values)

    def __post_init__(self) -> None:
        try:
            # A bare string is one stop string, not a sequence of one-character stops.
            stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
            object.__setattr__(self, "stop", stop)
            object.__setattr__(self, "logit_bias", dict(self.logit_bias))
        except (TypeError, ValueError) as exc:
            raise SamplingError(f"stop must be text(s) and logit_bias a mapping: {exc}") from exc
        self._check_filters()
        self._check_penalties()
        self._check_request()

    def _check_filters(self) -> None:
        _require(
            _is_number(self.temperature),
            f"temperature must be a finite number, got {self.temperature!r}",
        )
        _require(
            _is_int(self.top_k) and self.top_k >= 0,
            f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}",
        )
        _require(
            _is_number(self.top_p) and 0.0 <= self.top_p <= 1.0,
            f"top_p must be in [0, 1] (1 = off), got {self.top_p!r}",
        )
        _require(
            _is_number(self.min_p) and 0.0 <= self.min_p <= 1.0,
            f"min_p must be in [0, 1] (0 = off), got {self.min_p!r}",
        )

    def _check_penalties(self) -> None:
        _require(
            _is_number(self.repeat_penalty) and self.repeat_penalty > 0.0,
            f"repeat_penalty must be > 0 (1.0 = off), got {self.repeat_penalty!r}",
        )
        _require(
            _is_int(self.repeat_last_n) and self.repeat_last_n >= -1,
            f"repeat_last_n must be an integer >= -1 (-1 = whole context, 0 = off), "
            f"got {self.repeat_last_n!r}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(
                _is_number(value) and -2.0 <= value <= 2.0,
                f"{name} must be in [-2, 2], got {value!r}",
            )
        for token, bias in self.logit_bias.items():
            _require(
                _is_int(token) and token >= 0,
                f"logit_bias keys must be token ids >= 0, got {token!r}",
            )
            _require(
                _is_number(bias) and -100.0 <= bias <= 100.0,
                f"logit_bias for token {token} must be in [-100, 100], got {bias!r}",
            )

    def _check_request(self) -> None:
        _require(
            self.seed is None or (_is_int(self.seed) and self.seed >= 0),
            f"seed must be an integer >= 0 (or None for a random seed), got {self.seed!r}",
        )
        _require(
            self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
            f"max_tokens must be an integer >= 1 (or None), got {self.max_tokens!r}",
        )
        for s in self.stop:
            _require(
                isinstance(s, str) and s != "", f"stop strings must be non-empty text, got {s!r}"
            )
        _require(
            isinstance(self.logprobs, bool),
            f"logprobs must be true or false, got {self.logprobs!r}",
        )
        _require(
            _is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS,
            f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], "
            f"got {self.top_logprobs!r}",
        )
        _require(self.top_logprobs == 0 or self.logprobs, "top_logprobs needs logprobs=true")
        _require(
            isinstance(self.ignore_eos, bool),
            f"ignore_eos must be true or false, got {self.ignore_eos!r}",
        )

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalties_active(self) -> bool:
        return self.repeat_last_n != 0 and (
            self.repeat_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


# --- whole-row steps: [n_vocab] -> [n_vocab] -------------------------------------------------


def bias_arrays(logit_bias: Mapping[int, float]) -> tuple[IdArray, FloatArray]:
    """Token ids and the values to add; the ban value becomes -inf."""
    ids = np.fromiter(logit_bias.keys(), dtype=np.int64, count=len(logit_bias))
    values = np.fromiter(logit_bias.values(), dtype=np.float32, count=len(logit_bias))
    values[values <= BAN_BIAS] = -np.inf
    return ids, values


def apply_logit_bias(logits: FloatArray, logit_bias: Mapping[int, float]) -> FloatArray:
    """A new row with each biased token's value added (-100 bans: the logit becomes -inf)."""
    ids, values = bias_arrays(logit_bias)
    return _add_bias(logits, ids, values)


def _add_bias(logits: FloatArray, ids: IdArray, values: FloatArray) -> FloatArray:
    if ids.size and int(ids.max()) >= logits.shape[0]:
        raise SamplingError(
            f"logit_bias names token {int(ids.max())}, beyond the vocabulary ({logits.shape[0]})"
        )
    out = logits.copy()
    out[ids] += values
    return out


def penalty_window(context_ids: TokenIds, repeat_last_n: int) -> IdArray:
    """The context tokens the penalties look at: the last `repeat_last_n` (-1 = all, 0 = none)."""
    if repeat_last_n == 0 or len(context_ids) == 0:
        return np.empty(0, dtype=np.int64)
    tail = context_ids if repeat_last_n < 0 else context_ids[-repeat_last_n:]
    return np.asarray(tail, dtype=np.int64)


def apply_penalties(
    logits: FloatArray,
    window_ids: IdArray,
    repeat_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
) -> FloatArray:
    """A new row with llama.cpp's penalties for the tokens in `window_ids`.

    Each distinct token seen `count` times: logit <= 0 is multiplied by repeat_penalty, a
    positive one divided (dividing alone would make a negative logit more likely), then
    count * frequency_penalty + presence_penalty is subtracted. All in float32, as llama.cpp.
    """
    out = logits.copy()
    if window_ids.size == 0:
        return out
    tokens, counts = np.unique(window_ids, return_counts=True)
    seen = out[tokens]
    rp = np.float32(repeat_penalty)
    seen = np.where(seen <= 0, seen * rp, seen / rp)
    seen -= counts.astype(np.float32) * np.float32(frequency_penalty) + np.float32(presence_penalty)
    out[tokens] = seen
    return out


def greedy(logits: FloatArray) -> int:
    """The argmax; on ties the lowest token id."""
    token = int(np.argmax(logits))
    if not math.isfinite(float(logits[token])):
        raise SamplingError("no token can be sampled: every logit is masked or not finite")
    return token


# --- candidate filters: Candidates -> Candidates ---------------------------------------------


class Candidates(NamedTuple):
    """Token ids [n] and their logits [n]; filters keep a subset."""

    ids: IdArray
    logits: FloatArray


@lru_cache(maxsize=4)
def _all_ids(n_vocab: int) -> IdArray:
    ids = np.arange(n_vocab, dtype=np.int64)
    ids.flags.writeable = False  # shared between requests
    return ids


def all_candidates(logits: FloatArray) -> Candidates:
    """The whole row as candidates (ids 0..n_vocab-1), without copying the logits."""
    return Candidates(_all_ids(logits.shape[0]), logits)


def sort_desc(c: Candidates) -> Candidates:
    """Highest logit first; ties by lower token id."""
    order = np.lexsort((c.ids, -c.logits))
    return Candidates(c.ids[order], c.logits[order])


def top_k(c: Candidates, k: int) -> Candidates:
    """The k highest logits, sorted (ties at the cut keep the lower ids). k <= 0: all, sorted."""
    if k <= 0 or k >= c.logits.shape[0]:
        return sort_desc(c)
    keep = _top_positions(c, k)
    return sort_desc(Candidates(c.ids[keep], c.logits[keep]))


def _top_positions(c: Candidates, k: int) -> IdArray:
    """Positions of the k highest logits (0 < k < n), in no particular order; at the cut, equal
    logits go to the lower ids. Selection by partition: no sort of the row."""
    pool = _top_k_pool(c.logits, k)
    values = c.logits[pool]
    kth = np.partition(values, values.shape[0] - k)[values.shape[0] - k]
    above = pool[values > kth]
    ties = pool[values == kth]
    need = k - above.shape[0]
    if ties.shape[0] > need:
        ties = ties[np.argsort(c.ids[ties], kind="stable")[:need]]
    return np.concatenate((above, ties))


def _top_k_pool(logits: FloatArray, k: int) -> IdArray:
    """Positions that surely hold the top k, few of them: every logit at least the k-th largest
    of a 1-in-16 subsample. That subsample has k values at or above the threshold, so the pool
    has at least k; about 16 k on average. (Nonzero over a dense mask is slow, so a fixed
    margin below the max, which can admit 10% of the row, is no good.)"""
    n = logits.shape[0]
    if n <= 4096 or k > n // (4 * _POOL_STRIDE):
        return _all_ids(n)
    sample = logits[::_POOL_STRIDE]
    threshold = np.partition(sample, sample.shape[0] - k)[sample.shape[0] - k]
    return np.flatnonzero(logits >= threshold)


def top_p(c: Candidates, p: float) -> Candidates:
    """Keep the fewest most likely tokens whose probability sums to at least p (always one),
    probabilities normalised over the candidates given. Input order kept. p >= 1: unchanged."""
    n = c.logits.shape[0]
    if p >= 1.0 or n <= 1:
        return c
    top = c.logits.max()
    target = p * float(np.exp(c.logits - top).sum())
    count = _top_p_count(c, float(top), target)
    if count >= n:
        return c
    keep = np.sort(_top_positions(c, count))
    return Candidates(c.ids[keep], c.logits[keep])


def _top_p_count(c: Candidates, top: float, target: float) -> int:
    """How many of the highest logits it takes to reach the target mass. The mass mostly sits
    in a short head: count over the sorted values of growing heads first, and sort the values
    of the whole row (~1 ms on 150k) only when they fall short."""
    n = c.logits.shape[0]
    for size in _TOP_P_HEADS:
        if size >= n:
            break
        head = np.sort(c.logits[_top_positions(c, size)])
        count = _count_to_mass(head[::-1], top, target)
        if count is not None:
            return count
    return _count_to_mass(np.sort(c.logits)[::-1], top, target) or n


def _count_to_mass(desc_logits: FloatArray, top: float, target: float) -> int | None:
    """How many of these (highest first) logits it takes for exp(logit - top) to sum to
    target; None if all of them fall short. Chunked so a long row rarely needs a full cumsum."""
    done = 0.0
    for start in range(0, desc_logits.shape[0], 4096):
        chunk = np.exp(desc_logits[start : start + 4096].astype(np.float64) - top)
        cum = done + np.cumsum(chunk)
        index = int(np.searchsorted(cum, target, side="left"))
        if index < chunk.shape[0]:
            return start + index + 1
        done = float(cum[-1])
    return None


def min_p(c: Candidates, p: float) -> Candidates:
    """Keep tokens whose probability is at least p times the top one's (compared as logits:
    logit >= max + log p). Order kept. p <= 0: unchanged."""
    if p <= 0.0:
        return c
    keep = c.logits >= c.logits.max() + np.float32(math.log(p))
    return Candidates(c.ids[keep], c.logits[keep])


def apply_temperature(logits: FloatArray, temperature: float) -> FloatArray:
    """Logits divided by the temperature (> 0; greedy is decided before this step)."""
    return logits / np.float32(temperature)


# --- the draw ---------------------------------------------------------------------------------


def sample_categorical(logits: FloatArray, u: float) -> int:
    """The index drawn from softmax(logits) by inverse CDF at uniform `u` in [0, 1): the first
    index whose cumulative probability exceeds u. Zero-probability entries are never drawn."""
    if not math.isfinite(float(logits.max())):
        raise SamplingError("no token can be sampled: every logit is masked or not finite")
    weights = np.exp(logits - logits.max())
    if weights.shape[0] <= 4 * _BLOCK:
        return _inverse_cdf(weights.astype(np.float64), u)
    # Long row: pick a block by its sum, then the index inside it (two short cumsums, not one
    # over the whole row, which costs ~0.5 ms on 150k floats).
    starts = np.arange(0, weights.shape[0], _BLOCK)
    block_sums = np.add.reduceat(weights, starts).astype(np.float64)
    block = _inverse_cdf(block_sums, u)
    cum = np.cumsum(block_sums)
    before = float(cum[block - 1]) if block > 0 else 0.0
    inner_u = (u * float(cum[-1]) - before) / float(block_sums[block])
    inner_u = min(max(inner_u, 0.0), math.nextafter(1.0, 0.0))
    inner = weights[starts[block] : starts[block] + _BLOCK].astype(np.float64)
    return int(starts[block]) + _inverse_cdf(inner, inner_u)


def _inverse_cdf(weights: npt.NDArray[np.float64], u: float) -> int:
    cum = np.cumsum(weights)
    index = int(np.searchsorted(cum, u * cum[-1], side="right"))
    if index >= weights.shape[0]:  # rounding at the very top: take the last drawable entry
        index = int(np.flatnonzero(weights)[-1])
    return index


# --- log-probabilities -------------------------------------------------------------------------


def logsumexp(logits: FloatArray) -> float:
    top = float(logits.max())
    # float32 pairwise summation: ample for 150k terms each <= 1, and faster than float64
    return top + math.log(float(np.exp(logits - np.float32(top)).sum()))


def log_softmax(logits: FloatArray) -> FloatArray:
    return (logits - np.float32(logsumexp(logits))).astype(np.float32)


def top_logprobs(logits: FloatArray, n: int, lse: float | None = None) -> list[tuple[int, float]]:
    """The n most likely tokens as (id, logprob), most likely first, ties by lower id."""
    if n <= 0:
        return []
    lse = logsumexp(logits) if lse is None else lse
    best = top_k(all_candidates(logits), n)
    return [(int(t), float(v) - lse) for t, v in zip(best.ids, best.logits, strict=True)]


# --- the per-request sampler -------------------------------------------------------------------


@dataclass(frozen=True)
class SampleResult:
    """The chosen token; with logprobs requested, its log-probability and the top alternatives
    (else None and [])."""

    token: int
    logprob: float | None
    top_logprobs: list[tuple[int, float]]


Filter = Callable[[Candidates], Candidates]


class Sampler:
    """One request's sampling: its parameters, its steps and its own random generator.

    Log-probabilities are those of the model: the log-softmax of the logits as given to
    `sample`, before processors, bias, penalties and temperature (what the OpenAI API reports),
    so they do not depend on the sampling settings.
    """

    def __init__(
        self,
        params: SamplingParams,
        eog_ids: Collection[int] = (),
        logits_processors: Sequence[LogitsProcessor] = (),
    ) -> None:
        self.params = params
        self.rng = np.random.default_rng(params.seed)
        self._processors = tuple(logits_processors)
        bias = dict(params.logit_bias)
        if params.ignore_eos:
            # llama.cpp's ignore_eos: end-of-generation tokens can never be drawn.
            bias.update(dict.fromkeys(eog_ids, BAN_BIAS))
        self._bias = bias_arrays(bias)
        self._filters = _build_filters(params)

    def sample(
        self,
        logits: FloatArray,
        context_ids: TokenIds,
        num_prompt_tokens: int = 0,
    ) -> SampleResult:
        """Choose the next token from `logits` [n_vocab].

        `context_ids` is the whole context so far (prompt then generated tokens); penalties look
        at its tail, and processors get `context_ids[num_prompt_tokens:]` (the generated ids).
        """
        raw = np.asarray(logits, dtype=np.float32)
        if raw.ndim != 1:
            raise SamplingError(f"logits must be one row [n_vocab], got shape {raw.shape}")
        work = self._adjust(raw, context_ids, num_prompt_tokens)
        token = greedy(work) if self.params.greedy else self._draw(work)
        return self._result(raw, token)

    def _adjust(self, raw: FloatArray, context_ids: TokenIds, num_prompt_tokens: int) -> FloatArray:
        """Processors, then bias, then penalties: the whole-row steps, in llama.cpp's order."""
        work = raw
        if self._processors:
            generated = context_ids[num_prompt_tokens:]
            work = raw.copy()  # processors may mask in place; the raw row feeds the logprobs
            for processor in self._processors:
                work = np.asarray(processor(work, generated), dtype=np.float32)
        if self._bias[0].size:
            work = _add_bias(work, *self._bias)
        p = self.params
        if p.penalties_active:
            window = penalty_window(context_ids, p.repeat_last_n)
            work = apply_penalties(
                work, window, p.repeat_penalty, p.presence_penalty, p.frequency_penalty
            )
        return work

    def _draw(self, work: FloatArray) -> int:
        c = all_candidates(work)
        if not math.isfinite(float(work.max())):
            raise SamplingError("no token can be sampled: every logit is masked or not finite")
        for step in self._filters:
            c = step(c)
        tempered = apply_temperature(c.logits, self.params.temperature)
        return int(c.ids[sample_categorical(tempered, float(self.rng.random()))])

    def _result(self, raw: FloatArray, token: int) -> SampleResult:
        if not self.params.logprobs:
            return SampleResult(token, None, [])
        lse = logsumexp(raw)
        alternatives = top_logprobs(raw, self.params.top_logprobs, lse)
        return SampleResult(token, float(raw[token]) - lse, alternatives)


def _build_filters(params: SamplingParams) -> list[Filter]:
    """Only the filters that are on, in llama.cpp's default order."""
    filters: list[Filter] = []
    if params.top_k > 0:
        filters.append(partial(top_k, k=params.top_k))
    if params.top_p < 1.0:
        filters.append(partial(top_p, p=params.top_p))
    if params.min_p > 0.0:
        filters.append(partial(min_p, p=params.min_p))
    return filters


def make_sampler(
    params: SamplingParams,
    eog_ids: Collection[int] = (),
    logits_processors: Sequence[LogitsProcessor] = (),
) -> Sampler:
    """The sampler for one request (seeded from params.seed: same seed, same tokens)."""
    return Sampler(params, eog_ids, logits_processors)


# --- finishing --------------------------------------------------------------------------------


def check_finish(
    token: int, n_generated: int, params: SamplingParams, eog_ids: Collection[int]
) -> FinishReason | None:
    """Why generation ends after `token` (the n_generated-th generated token), or None.

    An end-of-generation token ends it with 'stop' (unless ignore_eos), even when it is also
    the last token max_tokens allows; reaching max_tokens ends it with 'length'.
    """
    if token in eog_ids and not params.ignore_eos:
        return "stop"
    if params.max_tokens is not None and n_generated >= params.max_tokens:
        return "length"
    return None


class StopMatcher:
    """Cuts streamed text at the first stop string, never letting any part of one out.

    The first stop is the one that completes earliest in the text (on a tie, the longest), so
    the result does not depend on how the text is split into deltas. Text that could still be
    the start of a stop string is held back until it is decided.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise SamplingError("stop strings must be non-empty")
        self._stops = tuple(stops)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def held(self) -> str:
        return self._held

    def feed(self, text_delta: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was reached). After a stop, ("", True)."""
        if self._stopped:
            return "", True
        text = self._held + text_delta
        cut = first_stop(text, self._stops)
        if cut is not None:
            self._held, self._stopped = "", True
            return text[:cut], True
        keep_from = _undecided_start(text, self._stops, self._longest)
        self._held = text[keep_from:]
        return text[:keep_from], False

    def flush(self) -> str:
        """The held text, released when generation ends for another reason."""
        held, self._held = self._held, ""
        return held


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest-completing stop string starts in text (longest on a tie), or None."""
    best: tuple[int, int] | None = None
    for s in stops:
        start = text.find(s)
        if start >= 0:
            key = (start + len(s), start)
            best = key if best is None or key < best else best
    return None if best is None else best[1]


def _undecided_start(text: str, stops: Sequence[str], longest: int) -> int:
    """The first position from which the rest of text is a proper prefix of some stop."""
    for i in range(max(0, len(text) - longest + 1), len(text)):
        tail = text[i:]
        if any(s.startswith(tail) for s in stops):
            return i
    return len(text)
