"""N-gram speculative decoding: the drafter, the adaptive budget, and replies that are exactly
those of plain decoding (greedy and sampled, alone, batched, preempted, prefix-cached)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tiny_model import CyclingRunner, ScriptedRunner, write_chat_model

from llmapp.runtime import Engine, EngineOptions, RunnerOptions, SamplingParams
from llmapp.runtime.core.speculative import DraftBudget, ngram_draft


def test_drafts_follow_the_latest_occurrence_of_the_longest_ngram() -> None:
    ids = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert ngram_draft(ids, 3) == [7, 8, 5]  # "1 2 3" last seen before 7 8 5
    assert ngram_draft(ids, 1) == [7]
    assert ngram_draft([4, 5, 6], 4) == []  # nothing repeats
    assert ngram_draft([5, 6, 5], 2) == [6, 5]  # a unigram match
    assert ngram_draft(ids, 0) == []


@given(st.lists(st.integers(0, 5), min_size=2, max_size=60), st.integers(1, 8))
def test_a_draft_is_what_followed_an_earlier_match(ids: list[int], k: int) -> None:
    draft = ngram_draft(ids, k)
    assert len(draft) <= k
    if draft:  # some n >= 1: the last n tokens occurred earlier, followed by the draft
        assert any(
            ids[s : s + n] == ids[len(ids) - n :] and ids[s + n : s + n + len(draft)] == draft
            for n in range(1, 4)
            for s in range(len(ids) - n)
        )


def test_the_budget_adapts_and_rests() -> None:
    budget = DraftBudget(8)
    assert budget.next_k() == 8
    budget.record(8, 8)
    assert budget.next_k() == 8
    budget.record(8, 3)
    assert budget.next_k() == 4
    for _ in range(3):
        budget.record(budget.next_k(), 0)
    assert [budget.next_k() for _ in range(9)][:8] == [0] * 8  # resting after three misses
    assert budget.drafted >= 19 and budget.accepted == 11


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chat_model(tmp_path_factory.mktemp("spec") / "tiny.gguf")


def engine(path: Path, k: int, runner: type = CyclingRunner, ctx: int = 1024) -> Engine:
    opts = EngineOptions(
        runner=RunnerOptions(ctx_size=ctx, n_threads=1), max_num_seqs=8, speculative_tokens=k
    )
    return Engine(path, opts, runner_factory=runner)


PROMPTS = ["hello world", "the cat is a cat", "a b c", "hello, you and the world!"]


def replies(e: Engine, params: SamplingParams) -> list[tuple[list[int], object]]:
    streams = [e.submit(p, params) for p in PROMPTS]
    out = []
    for s in streams:
        _, ids, last = s.result()
        out.append((ids, last.usage))
    return out


@pytest.mark.parametrize("runner", [CyclingRunner, ScriptedRunner])
def test_greedy_and_sampled_replies_are_those_of_plain_decoding(tiny: Path, runner: type) -> None:
    for params in (
        SamplingParams(temperature=0, max_tokens=60),
        SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=3, max_tokens=60),
    ):
        with engine(tiny, 0, runner) as plain, engine(tiny, 8, runner) as spec:
            want = replies(plain, params)
            got = replies(spec, params)
        assert [ids for ids, _ in got] == [ids for ids, _ in want]
        drafted = sum(u.drafted_tokens for _, u in got)  # type: ignore[attr-defined]
        accepted = sum(u.accepted_tokens for _, u in got)  # type: ignore[attr-defined]
        assert 0 <= accepted <= drafted
        if runner is CyclingRunner and params.temperature == 0:
            assert accepted > 0.5 * sum(len(ids) for ids, _ in got)  # a repeating text


def test_speculation_under_preemption_and_prefix_hits(tiny: Path) -> None:
    params = SamplingParams(temperature=0, max_tokens=40)
    with engine(tiny, 0, ctx=1024) as plain:
        want = [ids for ids, _ in replies(plain, params)]
    with engine(tiny, 8, ctx=96) as spec:  # 6 blocks for 4 requests: they take turns
        got = [ids for ids, _ in replies(spec, params)]
        again = [ids for ids, _ in replies(spec, params)]  # prefixes cached now
        assert spec.metrics_snapshot()["preemptions"] > 0
        assert spec.kv.pool.num_used == 0
    assert got == want and again == want


def test_speculation_counts_in_metrics_and_stops_at_max_tokens(tiny: Path) -> None:
    with engine(tiny, 16) as spec:
        for n in (1, 2, 5, 17):
            _, ids, last = spec.generate("hello", SamplingParams(temperature=0, max_tokens=n))
            assert len(ids) == n and last.finish_reason == "length"
        snap = spec.metrics_snapshot()
        assert snap["spec_decode_num_accepted_tokens"] > 0
        assert snap["spec_decode_num_draft_tokens"] >= snap["spec_decode_num_accepted_tokens"]


def test_concurrent_speculating_and_plain_sessions_from_threads(tiny: Path) -> None:
    params = SamplingParams(temperature=0, max_tokens=50)
    with engine(tiny, 0) as plain:
        want = {p: plain.generate(p, params)[1] for p in PROMPTS}
    results: dict[str, list[int]] = {}
    with engine(tiny, 6) as spec:

        def one(p: str) -> None:
            results[p] = spec.generate(p, params)[1]

        threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert results == want


@pytest.fixture
def real(real_model_path: Path) -> Iterator[Path]:
    yield real_model_path


EDIT = (
    "Rewrite with type hints. Reply with code only.\n\n"
    "def area(w, h):\n    return w * h\n\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n"
)


@pytest.mark.real_model
def test_real_models_give_the_same_greedy_text(real: Path) -> None:
    messages = [{"role": "user", "content": EDIT}]
    params = SamplingParams(temperature=0, max_tokens=48)

    def run(k: int) -> tuple[list[list[int]], int]:
        opts = EngineOptions(runner=RunnerOptions(ctx_size=1024, n_threads=1),
                             speculative_tokens=k)  # fmt: skip
        with Engine(real, opts) as e:
            lone = e.generate(messages, params)[1]
            batch = [s.result()[1] for s in [e.submit(messages, params) for _ in range(3)]]
            return [lone, *batch], e.metrics_snapshot()["spec_decode_num_accepted_tokens"]

    plain, _ = run(0)
    spec, accepted = run(8)
    assert spec[0] == plain[0]  # alone: identical
    for got in spec[1:]:  # batched rows may sum in another order: compare a prefix
        assert got[:8] == plain[0][:8]
    assert accepted > 0
