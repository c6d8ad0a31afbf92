"""Sampling: each step on a 4-token distribution with exact expectations, then the composed
sampler, then stop strings (with a property test on arbitrary splits)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmapp.runtime.core.sampling import (
    Candidates,
    SamplingError,
    SamplingParams,
    StopMatcher,
    all_candidates,
    apply_logit_bias,
    apply_penalties,
    apply_temperature,
    check_finish,
    first_stop,
    greedy,
    log_softmax,
    make_sampler,
    min_p,
    penalty_window,
    sample_categorical,
    sort_desc,
    top_k,
    top_logprobs,
    top_p,
)
from llmapp.runtime.errors import LlmappError

# probabilities 0.1, 0.2, 0.3, 0.4 for tokens 0..3
P4 = np.log(np.array([0.1, 0.2, 0.3, 0.4])).astype(np.float32)
PLAIN = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def cand(logits: np.ndarray) -> Candidates:
    return all_candidates(np.asarray(logits, dtype=np.float32))


def big_row(seed: int = 0, n: int = 151936) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 3).astype(np.float32)


# --- parameters --------------------------------------------------------------------------


def test_defaults_are_llama_cpp_defaults() -> None:
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.8, 40, 0.95, 0.05)
    assert (p.repeat_penalty, p.repeat_last_n) == (1.0, 64)
    assert not p.greedy and not p.penalties_active


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"temperature": float("nan")}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"repeat_penalty": 0.0}, "repeat_penalty"),
        ({"repeat_last_n": -2}, "repeat_last_n"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"logit_bias": {5: 100.5}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"seed": -1}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ("ok", "")}, "stop"),
        ({"stop": 5}, "stop"),
        ({"logit_bias": [1, 2]}, "logit_bias"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"ignore_eos": 1}, "ignore_eos"),
    ],
)
def test_bad_params_raise_clear_errors(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(SamplingError, match=field) as info:
        SamplingParams(**kwargs)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError) and isinstance(info.value, LlmappError)


def test_params_normalise_stop_and_copy_bias() -> None:
    bias = {1: 2.0}
    p = SamplingParams(stop="END", logit_bias=bias)
    assert p.stop == ("END",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")  # type: ignore[arg-type]
    bias[2] = 3.0
    assert dict(p.logit_bias) == {1: 2.0}
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=-1).greedy


# --- whole-row steps -----------------------------------------------------------------------


def test_logit_bias_adds_and_bans() -> None:
    logits = f32(1, 2, 3, 4)
    out = apply_logit_bias(logits, {0: 5.0, 3: -100.0, 1: -0.5})
    np.testing.assert_array_equal(out, f32(6, 1.5, 3, -np.inf))
    np.testing.assert_array_equal(logits, f32(1, 2, 3, 4))  # input untouched


def test_logit_bias_beyond_vocab_is_an_error() -> None:
    with pytest.raises(SamplingError, match="beyond the vocabulary"):
        apply_logit_bias(f32(1, 2, 3, 4), {4: 1.0})


def test_penalty_window() -> None:
    ctx = [1, 2, 3, 4, 5]
    assert penalty_window(ctx, 2).tolist() == [4, 5]
    assert penalty_window(ctx, -1).tolist() == ctx
    assert penalty_window(ctx, 0).tolist() == []
    assert penalty_window(ctx, 64).tolist() == ctx
    assert penalty_window(np.array(ctx), 3).tolist() == [3, 4, 5]


def test_repeat_penalty_divides_positive_multiplies_negative() -> None:
    logits = f32(2.0, -1.0, 0.5, 3.0, 0.0)
    out = apply_penalties(logits, np.array([0, 1, 1, 3, 4]), repeat_penalty=2.0)
    np.testing.assert_array_equal(out, f32(1.0, -2.0, 0.5, 1.5, 0.0))


def test_presence_and_frequency_penalties_count_occurrences() -> None:
    logits = f32(2.0, -1.0, 0.5, 3.0)
    out = apply_penalties(
        logits, np.array([0, 1, 1, 3]), 2.0, presence_penalty=0.5, frequency_penalty=0.25
    )
    # token 0 seen once: 2/2 - (0.25 + 0.5); token 1 twice: -1*2 - (2*0.25 + 0.5); token 3 once
    np.testing.assert_array_equal(out, f32(0.25, -3.0, 0.5, 0.75))
    np.testing.assert_array_equal(logits, f32(2.0, -1.0, 0.5, 3.0))


def test_greedy_takes_lowest_id_on_ties_and_rejects_all_masked() -> None:
    assert greedy(f32(1, 3, 3, 2)) == 1
    with pytest.raises(SamplingError, match="masked"):
        greedy(f32(-np.inf, -np.inf))


# --- candidate filters ---------------------------------------------------------------------


def test_top_k_keeps_k_highest_sorted() -> None:
    c = top_k(cand(f32(1, 4, 2, 3)), 2)
    assert c.ids.tolist() == [1, 3] and c.logits.tolist() == [4, 3]


def test_top_k_ties_keep_lower_ids_and_zero_means_all() -> None:
    assert top_k(cand(f32(1, 3, 3, 3)), 2).ids.tolist() == [1, 2]
    assert top_k(cand(f32(1, 4, 2, 3)), 0).ids.tolist() == [1, 3, 2, 0]
    assert top_k(cand(f32(1, 4, 2, 3)), 9).ids.tolist() == [1, 3, 2, 0]


def test_sort_desc_orders_by_logit_then_id() -> None:
    c = sort_desc(Candidates(np.array([7, 3, 5]), f32(1, 2, 2)))
    assert c.ids.tolist() == [3, 5, 7]


@pytest.mark.parametrize("k", [1, 40, 1000, 5000])  # 5000: no subsample pool
def test_top_k_on_full_vocab_matches_a_stable_sort(k: int) -> None:
    row = big_row()
    c = top_k(all_candidates(row), k)
    ref = np.argsort(-row, kind="stable")[:k]
    assert c.ids.tolist() == ref.tolist()


def test_top_k_full_vocab_with_ties_and_a_spike() -> None:
    ties = np.random.default_rng(1).integers(0, 50, 151936).astype(np.float32)
    assert (
        top_k(all_candidates(ties), 40).ids.tolist()
        == np.argsort(-ties, kind="stable")[:40].tolist()
    )
    # one logit far above the rest
    spike = big_row(2)
    spike[77] = 100.0
    ref = np.argsort(-spike, kind="stable")[:40]
    assert top_k(all_candidates(spike), 40).ids.tolist() == ref.tolist()


def test_top_p_keeps_fewest_likeliest_tokens_reaching_p_in_input_order() -> None:
    assert top_p(cand(P4), 0.35).ids.tolist() == [3]
    assert top_p(cand(P4), 0.5).ids.tolist() == [2, 3]
    assert top_p(cand(P4), 0.75).ids.tolist() == [1, 2, 3]
    assert top_p(cand(P4), 0.0).ids.tolist() == [3]  # always at least one token
    assert top_p(cand(P4), 1.0).ids.tolist() == [0, 1, 2, 3]  # off: unchanged


def test_top_p_normalises_over_the_candidates_given() -> None:
    # after top-k 2 the mass is 3/7 and 4/7: 0.55 is reached by token 3 alone (over the
    # whole row it would need token 2 too: 0.4 < 0.55), 0.6 needs both
    c = top_k(cand(P4), 2)
    assert top_p(c, 0.55).ids.tolist() == [3]
    assert top_p(cand(P4), 0.55).ids.tolist() == [2, 3]
    assert top_p(c, 0.6).ids.tolist() == [3, 2]


def test_top_p_ties_at_the_cut_keep_lower_ids() -> None:
    assert top_p(cand(f32(0, 1, 1, 1)), 0.5).ids.tolist() == [1, 2]


def _ref_top_p(row: np.ndarray, p: float) -> list[int]:
    order = np.argsort(-row, kind="stable")
    probs = np.exp(row[order].astype(np.float64) - row.max())
    cum = np.cumsum(probs) / probs.sum()
    return order[: int(np.searchsorted(cum, p)) + 1].tolist()


@pytest.mark.parametrize(
    ("scale", "p"), [(3.0, 0.9), (3.0, 0.5), (0.01, 0.5), (5.0, 0.95), (8.0, 0.95)]
)
def test_top_p_on_full_vocab_matches_a_full_sort(scale: float, p: float) -> None:
    # scale 3 and 0.01 count over the whole row; 5 and 8 stop in the 2048- or 256-token head
    row = (np.random.default_rng(3).standard_normal(151936) * scale).astype(np.float32)
    got = top_p(all_candidates(row), p).ids
    ref = _ref_top_p(row, p)
    assert abs(len(got) - len(ref)) <= 1  # float rounding may move the cut by one token
    common = min(len(got), len(ref))
    assert set(ref[:common]) <= set(got.tolist())
    assert np.all(np.diff(got) > 0)  # input (id) order


def test_min_p_keeps_tokens_within_ratio_of_the_top_in_order() -> None:
    assert min_p(cand(P4), 0.6).ids.tolist() == [2, 3]  # >= 0.24
    assert min_p(cand(P4), 0.3).ids.tolist() == [1, 2, 3]  # >= 0.12
    assert min_p(cand(P4), 1.0).ids.tolist() == [3]
    assert min_p(cand(P4), 0.0).ids.tolist() == [0, 1, 2, 3]


def test_temperature_divides() -> None:
    np.testing.assert_array_equal(apply_temperature(f32(1, 2, 3, 4), 2.0), f32(0.5, 1, 1.5, 2))


# --- the draw ------------------------------------------------------------------------------


@pytest.mark.parametrize(("u", "index"), [(0.0, 0), (0.05, 0), (0.15, 1), (0.45, 2), (0.95, 3)])
def test_sample_categorical_inverse_cdf(u: float, index: int) -> None:
    assert sample_categorical(P4, u) == index


def test_sample_categorical_never_draws_zero_probability() -> None:
    logits = f32(0, -np.inf, 0, -np.inf)
    assert [sample_categorical(logits, u) for u in (0.0, 0.4999, 0.5, 0.9999999)] == [0, 0, 2, 2]
    with pytest.raises(SamplingError):
        sample_categorical(f32(-np.inf, -np.inf), 0.5)


def test_sample_categorical_long_row_matches_a_full_cdf() -> None:
    row = big_row(4)
    weights = np.exp(row.astype(np.float64) - row.max())
    cum = np.cumsum(weights) / weights.sum()
    for u in np.random.default_rng(5).random(200):
        assert sample_categorical(row, float(u)) == int(np.searchsorted(cum, u, side="right"))


def test_sample_categorical_long_row_skips_masked_tokens() -> None:
    row = np.full(151936, -np.inf, dtype=np.float32)
    row[[10, 70000, 151935]] = 0.0
    draws = {sample_categorical(row, float(u)) for u in np.linspace(0, 1, 301)[:-1]}
    assert draws == {10, 70000, 151935}


# --- log-probabilities ---------------------------------------------------------------------


def test_log_softmax_and_top_logprobs_order() -> None:
    np.testing.assert_allclose(log_softmax(P4), np.log([0.1, 0.2, 0.3, 0.4]), rtol=1e-6)
    top = top_logprobs(f32(0, 2, 2, 1), 3)
    assert [t for t, _ in top] == [1, 2, 3]  # ties by lower id
    assert top[0][1] == top[1][1] > top[2][1]
    assert top_logprobs(P4, 0) == []


# --- the composed sampler ------------------------------------------------------------------


def test_same_seed_same_tokens_different_seed_differs() -> None:
    rows = [big_row(s, 1000) for s in range(64)]

    def run(seed: int) -> list[int]:
        sampler = make_sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=seed))
        return [sampler.sample(r, []).token for r in rows]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_greedy_ignores_the_rng() -> None:
    sampler = make_sampler(SamplingParams(temperature=0.0, seed=1))
    before = sampler.rng.bit_generator.state
    tokens = [sampler.sample(f32(1, 4, 2, 4), []).token for _ in range(5)]
    assert tokens == [1] * 5
    assert sampler.rng.bit_generator.state == before


def test_temperature_one_follows_the_distribution() -> None:
    sampler = make_sampler(SamplingParams(**PLAIN, seed=0))
    counts = np.bincount([sampler.sample(P4, []).token for _ in range(20000)], minlength=4)
    np.testing.assert_allclose(counts / 20000, [0.1, 0.2, 0.3, 0.4], atol=0.015)


def test_chain_order_top_k_then_top_p_then_min_p() -> None:
    logits = np.log(np.array([0.05, 0.15, 0.3, 0.5])).astype(np.float32)
    # top-k 3 -> {1, 2, 3} renormalised (.16, .32, .53); top-p .8 -> {3, 2}
    sampler = make_sampler(SamplingParams(temperature=1.0, top_k=3, top_p=0.8, min_p=0, seed=0))
    assert {sampler.sample(logits, []).token for _ in range(500)} == {2, 3}
    # min-p .7 then cuts {3, 2} to {3} (0.3 < 0.7 * 0.5)
    sampler = make_sampler(SamplingParams(temperature=1.0, top_k=3, top_p=0.8, min_p=0.7))
    assert {sampler.sample(logits, []).token for _ in range(200)} == {3}


def test_temperature_comes_after_min_p() -> None:
    # a huge temperature flattens the draw, but min-p has already cut on the raw logits
    sampler = make_sampler(SamplingParams(temperature=100.0, top_k=0, top_p=1.0, min_p=0.6))
    assert {sampler.sample(P4, []).token for _ in range(300)} == {2, 3}


def test_repeat_penalty_in_the_sampler_uses_the_last_n_context_tokens() -> None:
    logits = f32(2.0, 1.5, 0.0, -1.0)
    params = SamplingParams(temperature=0, repeat_penalty=2.0, repeat_last_n=1)
    sampler = make_sampler(params)
    assert sampler.sample(logits, [2, 0]).token == 1  # 0 penalised: 2/2 < 1.5
    assert sampler.sample(logits, [0, 2]).token == 0  # 0 is outside the window of 1
    off = make_sampler(SamplingParams(temperature=0, repeat_penalty=2.0, repeat_last_n=0))
    assert off.sample(logits, [0]).token == 0


def test_logit_bias_bans_and_forces() -> None:
    ban = make_sampler(SamplingParams(temperature=0, logit_bias={3: -100.0}))
    assert ban.sample(P4, []).token == 2
    force = make_sampler(SamplingParams(**PLAIN, logit_bias={0: 100.0}, seed=0))
    assert {force.sample(P4, []).token for _ in range(200)} == {0}
    banned_all = make_sampler(SamplingParams(**PLAIN, logit_bias={i: -100.0 for i in range(4)}))
    with pytest.raises(SamplingError, match="masked"):
        banned_all.sample(P4, [])


def test_ignore_eos_bans_end_of_generation_tokens() -> None:
    sampler = make_sampler(SamplingParams(temperature=0, ignore_eos=True), eog_ids={3})
    assert sampler.sample(P4, []).token == 2
    assert make_sampler(SamplingParams(temperature=0), eog_ids={3}).sample(P4, []).token == 3


def test_logits_processor_masks_first_and_sees_generated_ids() -> None:
    seen: list[list[int]] = []

    def only_token_0(logits: np.ndarray, generated: object) -> np.ndarray:
        seen.append(list(generated))  # type: ignore[call-overload]
        logits[1:] = -np.inf  # in place: the sampler gave this processor its own copy
        return logits

    params = SamplingParams(**PLAIN, logprobs=True, top_logprobs=2, seed=0)
    sampler = make_sampler(params, logits_processors=[only_token_0])
    raw = P4.copy()
    result = sampler.sample(raw, [5, 6, 7, 8], num_prompt_tokens=3)
    assert result.token == 0 and seen == [[8]]
    np.testing.assert_array_equal(raw, P4)
    # log-probabilities are the model's, before the mask
    assert result.logprob == pytest.approx(math.log(0.1), rel=1e-6)
    assert [t for t, _ in result.top_logprobs] == [3, 2]


def test_logprobs_are_from_raw_logits_whatever_the_settings() -> None:
    params = SamplingParams(
        temperature=0.3, top_k=2, repeat_penalty=1.5, logprobs=True, top_logprobs=4, seed=3
    )
    result = make_sampler(params).sample(P4, [3, 3])
    assert result.logprob == pytest.approx(math.log([0.1, 0.2, 0.3, 0.4][result.token]), rel=1e-6)
    assert [t for t, _ in result.top_logprobs] == [3, 2, 1, 0]
    values = [v for _, v in result.top_logprobs]
    assert values == sorted(values, reverse=True)
    assert make_sampler(SamplingParams(seed=3)).sample(P4, []).logprob is None


def test_sampler_rejects_a_batch_of_rows() -> None:
    with pytest.raises(SamplingError, match="one row"):
        make_sampler(SamplingParams()).sample(np.zeros((2, 4), dtype=np.float32), [])


def test_default_chain_on_full_vocab_picks_from_the_top_k() -> None:
    row = big_row(6)
    allowed = set(np.argsort(-row, kind="stable")[:40].tolist())
    sampler = make_sampler(SamplingParams(seed=0, logprobs=True, top_logprobs=5))
    for _ in range(50):
        result = sampler.sample(row, list(range(100)))
        assert result.token in allowed and len(result.top_logprobs) == 5


# --- finishing -----------------------------------------------------------------------------


def test_check_finish() -> None:
    params = SamplingParams(max_tokens=3)
    assert check_finish(5, 1, params, {2}) is None
    assert check_finish(2, 1, params, {2}) == "stop"
    assert check_finish(5, 3, params, {2}) == "length"
    assert check_finish(2, 3, params, {2}) == "stop"  # end-of-generation wins at the limit
    assert check_finish(2, 1, SamplingParams(ignore_eos=True), {2}) is None
    assert check_finish(5, 10_000, SamplingParams(), {2}) is None


# --- stop strings --------------------------------------------------------------------------


def feed_all(matcher: StopMatcher, deltas: list[str]) -> tuple[list[str], bool]:
    emitted, stopped = [], False
    for delta in deltas:
        out, stopped = matcher.feed(delta)
        emitted.append(out)
        if stopped:
            break
    return emitted, stopped


def test_stop_split_across_deltas_is_never_emitted() -> None:
    m = StopMatcher(["</s>"])
    assert m.feed("abc<") == ("abc", False) and m.held == "<"
    assert m.feed("/") == ("", False) and m.held == "</"
    assert m.feed("s") == ("", False)
    assert m.feed(">tail") == ("", True)
    assert m.stopped and m.feed("more") == ("", True) and m.flush() == ""


def test_stop_false_start_is_released() -> None:
    m = StopMatcher(["abc"])
    assert m.feed("xab") == ("x", False)
    assert m.feed("d") == ("abd", False)
    assert m.feed("a") == ("", False)
    assert m.flush() == "a" and m.held == ""


def test_stop_within_one_delta() -> None:
    assert StopMatcher(["STOP"]).feed("Hello STOP world") == ("Hello ", True)


def test_overlapping_stops_cut_at_the_first_to_complete() -> None:
    assert feed_all(StopMatcher(["abcd", "bc"]), ["abcd"]) == (["a"], True)
    assert feed_all(StopMatcher(["ab", "b"]), ["x", "a", "b"]) == (["x", "", ""], True)
    # same end: the longer one wins
    assert feed_all(StopMatcher(["b", "ab"]), ["xab"]) == (["x"], True)
    # a stop overlapping itself
    assert "".join(feed_all(StopMatcher(["aab"]), list("aaab"))[0]) == "a"


def test_multiple_stops() -> None:
    m = StopMatcher(["\n\n", "User:"])
    emitted, stopped = feed_all(m, ["hi", " Us", "er", ": x"])
    assert "".join(emitted) == "hi " and stopped


def test_unicode_stop() -> None:
    emitted, stopped = feed_all(StopMatcher(["😀!"]), list("ok 😀😀! rest"))
    assert "".join(emitted) == "ok 😀" and stopped
    assert first_stop("naïve café", ["café"]) == 6


def test_no_stops_passes_text_through() -> None:
    m = StopMatcher([])
    assert m.feed("anything") == ("anything", False) and m.flush() == ""
    with pytest.raises(SamplingError):
        StopMatcher(["x", ""])


def _reference_cut(text: str, stops: list[str]) -> tuple[str, bool]:
    """Scan end positions; the first end where a stop ends cuts there (longest on a tie)."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            return text[: end - max(len(s) for s in ending)], True
    return text, False


ALPHABET = st.sampled_from("ab😀\né")


@settings(max_examples=400, deadline=None)
@given(
    text=st.text(ALPHABET, max_size=30),
    stops=st.lists(st.text(ALPHABET, min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=10),
)
def test_stop_matcher_property(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    m = StopMatcher(stops)
    emitted, stopped, fed = "", False, ""
    for delta in deltas:
        out, stopped = m.feed(delta)
        emitted += out
        fed += delta
        if stopped:
            break
        assert emitted + m.held == fed  # nothing lost, nothing invented
    if not stopped:
        emitted += m.flush()
    expected, expect_stop = _reference_cut(text, stops)
    assert (emitted, stopped) == (expected, expect_stop)
    assert not any(s in emitted for s in stops)


def test_layered_puts_later_layers_over_earlier_ones_and_skips_none() -> None:
    @dataclass
    class Catalog:  # the shape of the catalog's SamplingDefaults
        temperature: float | None = 0.2
        top_k: int | None = None
        max_tokens: int | None = 7

    p = SamplingParams.layered({"max_tokens": 512, "top_p": 0.5}, Catalog(), {"top_k": 3})
    assert (p.temperature, p.top_k, p.top_p, p.max_tokens) == (0.2, 3, 0.5, 7)
    q = SamplingParams.layered(None, Catalog(), {"temperature": None, "max_tokens": 2})
    assert (q.temperature, q.max_tokens, q.min_p) == (0.2, 2, SamplingParams().min_p)
    assert SamplingParams.layered() == SamplingParams()
