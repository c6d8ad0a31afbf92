"""Typed layer records: q|k|v and gate|up packed as one where the backend can, as parts where
it refuses, with the same results either way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiny_model import write_chat_model

from llmapp.runtime.core.batch import build_batch
from llmapp.runtime.errors import GGUFError
from llmapp.runtime.execution.backend import ReferenceBackend
from llmapp.runtime.execution.model_runner import ModelRunner, RunnerOptions
from llmapp.runtime.execution.models.llama import projections
from llmapp.runtime.execution.weights import LayerTensors, RawRows, pack_projection
from llmapp.runtime.files.ggml_types import GGMLType
from llmapp.runtime.files.gguf_file import GGUFFile


class UnfusedBackend(ReferenceBackend):
    def pack_fused(self, parts: list[tuple[np.ndarray, int, int]]) -> Any | None:
        return None


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_chat_model(tmp_path_factory.mktemp("tiny") / "tiny-chat.gguf")


def logits(runner: ModelRunner) -> np.ndarray:
    ids = [1, 9, 300, 301, 302, 5, 6]
    table = np.arange(runner.num_blocks, dtype=np.int32)
    return runner.forward(build_batch([(ids, 0, table, len(ids))], runner.block_size))


def test_a_refused_fusion_packs_the_parts(tiny_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the reference backend fuses any types (the CPU one packs float weights alone)
    options = RunnerOptions(ctx_size=64, n_threads=1, backend="reference")
    fused = ModelRunner(tiny_path, options)
    assert all(ly.attn.qkv.fused and ly.ffn.gate_up.fused for ly in fused.weights.layers)
    want = logits(fused)
    monkeypatch.setattr(ReferenceBackend, "pack_fused", UnfusedBackend.pack_fused)
    parts = ModelRunner(tiny_path, options)
    layer = parts.weights.layers[0]
    assert len(layer.attn.qkv.linears) == 3 and len(layer.ffn.gate_up.linears) == 2
    assert not layer.attn.qkv.fused
    np.testing.assert_allclose(logits(parts), want, rtol=1e-5, atol=1e-5)


def test_biases_follow_the_parts_fused_or_not(tiny_path: Path) -> None:
    rng = np.random.default_rng(0)
    widths = (8, 4, 4)
    names = ("attn_q", "attn_k", "attn_v")
    mats = [rng.standard_normal((n, 16)).astype(np.float32) for n in widths]
    x = rng.standard_normal((3, 16)).astype(np.float32)
    bias_k = rng.standard_normal(4).astype(np.float32)
    want = [x @ m.T for m in mats]
    want[1] += bias_k
    with GGUFFile(tiny_path) as gguf:
        for be in (ReferenceBackend(1), UnfusedBackend(1)):
            tensors = LayerTensors(gguf, 0, be, vectors={"attn_k.bias": bias_k})
            for name, m in zip(names, mats, strict=True):
                tensors.matrices[name] = RawRows(m.view(np.uint8), GGMLType.F32, 16)
            proj = pack_projection(tensors, "attn_qkv")
            assert proj.widths == widths and proj.fused == (type(be) is ReferenceBackend)
            for got, w in zip(projections(be, x, proj), want, strict=True):
                np.testing.assert_allclose(got, w, rtol=1e-5, atol=1e-5)
            with pytest.raises(GGUFError, match="attn_q.bias"):
                pack_projection(tensors, "attn_qkv", require_bias=True)
