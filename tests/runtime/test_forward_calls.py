"""A decode step is a few backend calls per layer: the residual adds ride on the norms, q and
k rotate in one call, and the stream is normed once (at the first layer) outside them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiny_model import write_chat_model

from llmapp.runtime.core.batch import build_batch
from llmapp.runtime.execution.backend import Backend, LayerBackends
from llmapp.runtime.execution.model_runner import ModelRunner, RunnerOptions


class CountingBackend:
    """Forwards every call to `inner` and counts it by name."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return attr(*args, **kwargs)

        return counted


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chat_model(tmp_path_factory.mktemp("tiny") / "tiny-chat.gguf", n_layer=3)


def test_decode_step_calls_per_layer(tiny_path: Path) -> None:
    # the reference backend fuses q|k|v and gate|up whatever the types (the CPU one packs
    # float weights one by one)
    runner = ModelRunner(tiny_path, RunnerOptions(ctx_size=64, n_threads=1, backend="reference"))
    n_layer = runner.config.n_layer
    counting = CountingBackend(runner.backend)
    be: Any = counting
    runner.backends = LayerBackends(be, [be] * n_layer, be)
    ids = [1, 9, 300, 301, 302]
    table = np.arange(runner.num_blocks, dtype=np.int32)
    runner.forward(build_batch([(ids[:4], 0, table, 4)], runner.block_size))
    counting.calls.clear()
    runner.forward(build_batch([(ids, 4, table, 1)], runner.block_size))
    calls = counting.calls
    assert calls["rms_norm"] == 1  # the first layer's input; every other norm follows an add
    assert calls["add_rms_norm"] == 2 * n_layer  # the last one is the output norm
    assert calls["matmul"] == 4 * n_layer + 1  # qkv, attn_output, gate_up, down; the head
    assert calls["rope_qk"] == calls["write_kv"] == calls["attention"] == n_layer
    assert calls["swiglu"] == n_layer and calls["add_"] == 0


@pytest.mark.parametrize("split", [1, 2, 3])
def test_a_backend_boundary_adds_then_norms_on_the_other_side(tiny_path: Path, split: int) -> None:
    # two backends over the same arrays: the same logits, with the add before each boundary
    options = RunnerOptions(ctx_size=64, n_threads=1, backend="reference")
    runner = ModelRunner(tiny_path, options)
    batch = build_batch([([1, 9, 300, 301], 0, np.arange(4, dtype=np.int32), 4)], 16)
    want = runner.forward(batch)
    first, second = CountingBackend(runner.backend), CountingBackend(runner.backend)
    a: Any = first
    b: Any = second
    n_layer = runner.config.n_layer
    runner.backends = LayerBackends(a, [a] * split + [b] * (n_layer - split), b)
    np.testing.assert_array_equal(runner.forward(batch), want)
    assert first.calls["add_"] == 1 and second.calls["rms_norm"] == 1
