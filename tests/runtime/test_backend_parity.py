"""The Numba backend against the numpy reference backend, layer math and all, on real models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from llmapp.runtime.core.batch import build_batch
from llmapp.runtime.core.kv_cache import KVCacheManager, SequenceBlocks
from llmapp.runtime.execution.model_runner import ModelRunner, RunnerOptions
from llmapp.runtime.text.tokenizer import Tokenizer

pytestmark = pytest.mark.real_model

TEXT = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is"


def logits(path: Path, backend: str, chunks: int) -> np.ndarray:
    runner = ModelRunner(path, RunnerOptions(ctx_size=64, backend=backend))
    ids = Tokenizer.from_gguf(runner.gguf).encode(TEXT, add_bos=True)
    kv = KVCacheManager(runner.num_blocks, runner.block_size)
    seq = SequenceBlocks()
    kv.allocate(seq, len(ids))
    out = []
    step = -(-len(ids) // chunks)
    for done in range(0, len(ids), step):
        end = min(done + step, len(ids))
        batch = build_batch([(ids[:end], done, seq.block_table, end - done)], runner.block_size)
        out.append(runner.forward(batch))
    return np.concatenate(out)


@pytest.mark.parametrize("fixture", ["smollm2_path", "gemma3_path"])
def test_cpu_backend_matches_reference(fixture: str, request: pytest.FixtureRequest) -> None:
    path: Path = request.getfixturevalue(fixture)
    ref = logits(path, "reference", chunks=1)
    # the fast side decodes token by token (one-row int8 path) after a chunked prefill
    one_row = logits(path, "cpu", chunks=len(ref))
    fast = np.concatenate([logits(path, "cpu", chunks=2)[:8], one_row[8:]])
    scale = np.abs(ref).max()
    assert np.abs(fast - ref).max() < 0.1 * scale
    top2 = np.sort(ref, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.5
    assert (fast.argmax(1) == ref.argmax(1))[clear].all()
