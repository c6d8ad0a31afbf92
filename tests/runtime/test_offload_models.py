"""Layers offloaded to torch's CPU device (LLMAPP_DEVICE=cpu) give the pure CPU path's greedy
tokens on the three real models, for 0, 1 (the head only), some and all layers, with sessions
batched across the split and a prefix-cached request.

Tokens are compared up to the first position where the CPU run's top-1/top-2 logit margin is
below 0.5 (the two paths sum in different orders and may pick either of a near tie), and at
least MIN_COMPARED positions must have been compared.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import llmapp.kernels_cpu.threads  # noqa: F401  (its OpenMP settings must precede torch's load)
from llmapp.runtime import Engine, EngineOptions, RunnerOptions
from llmapp.runtime.core.sampling import SamplingParams

pytestmark = pytest.mark.real_model
torch = pytest.importorskip("torch")

MARGIN = 0.5
MIN_COMPARED = 2
N_NEW = 4
SOME = 3  # the head and the last two blocks
PROMPTS = [
    "1, 2, 3, 4, 5, 6,",
    "Monday, Tuesday, Wednesday, Thursday,",
]
SHARED = "Numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12. Colors: red, green, blue, red, green,"

Reply = tuple[list[int], list[float]]


@pytest.fixture(autouse=True)
def cpu_device(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("LLMAPP_DEVICE", "cpu")
    monkeypatch.delenv("LLMAPP_DEVICE_MEMORY", raising=False)
    yield


def open_engine(path: Path, ngl: int | str) -> Engine:
    runner = RunnerOptions(ctx_size=256, n_threads=1, n_gpu_layers=ngl)
    return Engine(path, EngineOptions(runner=runner, max_num_seqs=4, enable_prefix_cache=True))


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, logprobs=True, top_logprobs=2)


def replies(engine: Engine, prompts: list[str], n: int = N_NEW) -> list[tuple[Reply, int]]:
    """Greedy replies of prompts run together, with each one's cached prompt tokens."""
    streams = [engine.submit(p, greedy(n)) for p in prompts]
    out = []
    for stream in streams:
        ids: list[int] = []
        margins: list[float] = []
        last = None
        for delta in stream:
            ids.extend(delta.token_ids)
            margins.extend(lp.top[0][1] - lp.top[1][1] for lp in delta.logprobs)
            last = delta
        assert last is not None and last.error is None and last.usage is not None
        out.append(((ids, margins), last.usage.cached_tokens))
    return out


def assert_agrees(cpu: Reply, got: list[int], label: str) -> None:
    want, margins = cpu
    for i, (token, margin) in enumerate(zip(want, margins, strict=True)):
        if margin < MARGIN:
            assert i >= MIN_COMPARED, f"{label}: a near tie after only {i} positions"
            return
        assert i < len(got) and got[i] == token, f"{label}: differs at {i}: {got} vs {want}"


@pytest.mark.parametrize("fixture", ["smollm2_path", "gemma3_path", "qwen2_path"])
def test_greedy_tokens_match_the_cpu_path(fixture: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    prompts = [*PROMPTS, SHARED]
    with open_engine(path, 0) as engine:
        assert engine.runner.offload is None
        n_layer = engine.config.n_layer
        cpu = [reply for reply, _ in replies(engine, prompts)]
    for ngl in (1, SOME, "all"):
        with open_engine(path, ngl) as engine:
            offload = engine.runner.offload
            assert offload is not None and offload.device == "cpu"
            assert offload.layers == (n_layer + 1 if ngl == "all" else ngl)
            # all prompts prefill and decode side by side
            for i, ((got, _), _cached) in enumerate(replies(engine, prompts)):
                assert_agrees(cpu[i], got, f"{fixture} ngl={ngl} prompt {i}")
            # the same prompt again: its full blocks come from the prefix cache, on both sides
            # of the split
            if ngl == SOME:
                (((got, _), cached),) = replies(engine, [SHARED])
                assert cached > 0
                assert_agrees(cpu[2], got, f"{fixture} ngl={ngl} cached")


def test_preempted_sessions_across_the_split(smollm2_path: Path) -> None:
    """4 blocks of 16 tokens for 3 replies that grow into 2 blocks each: running sessions are
    preempted and recomputed, their KV blocks freed and refilled on both sides of the split."""
    prompts = [*PROMPTS, "a b c d e f g h i j k l"]
    n = 10
    with open_engine(smollm2_path, 0) as engine:
        cpu = [reply for reply, _ in replies(engine, prompts, n)]
    runner = RunnerOptions(ctx_size=64, n_threads=1, n_gpu_layers=SOME)
    options = EngineOptions(runner=runner, max_num_seqs=3, enable_prefix_cache=False)
    with Engine(smollm2_path, options) as engine:
        for i, ((got, _), _cached) in enumerate(replies(engine, prompts, n)):
            assert_agrees(cpu[i], got, f"preempted prompt {i}")
        assert engine.metrics_snapshot()["preemptions"] > 0
