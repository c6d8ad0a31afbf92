"""`--cache-type` end to end on the tiny model: f16 (default), f32 and q8_0 KV blocks, their
sizes as the runner, the placement estimate and the server's sizing count them, and logits
under each type against float32 KV and against the reference backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny_model import write_chat_model

from llmapp.app.cli import parse_args
from llmapp.app.server.pool import PoolConfig, plan_sizing
from llmapp.runtime import RunnerOptions
from llmapp.runtime.core.kv_cache import CACHE_TYPES, kv_bytes_per_token, kv_row_bytes
from llmapp.runtime.execution import placement
from llmapp.runtime.execution.model_runner import ModelRunner
from llmapp.runtime.perplexity import chunk_logits

CTX = 64
STORED = {"f16": np.float16, "f32": np.float32, "q8_0": np.int8}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # n_embd 128, 4 heads: head_dim 32, one q8_0 block per head row
    return write_chat_model(tmp_path_factory.mktemp("kv") / "tiny.gguf", n_embd=128)


def runner(path: Path, cache_type: str, **kw: object) -> ModelRunner:
    return ModelRunner(path, RunnerOptions(ctx_size=CTX, n_threads=1, cache_type=cache_type, **kw))  # type: ignore[arg-type]


def logits(r: ModelRunner) -> np.ndarray:
    ids = list(np.random.default_rng(0).integers(5, 300, 40))
    return chunk_logits(r, ids, 0, n_batch=8)  # later chunks read the stored K/V


def test_row_bytes() -> None:
    assert [kv_row_bytes(64, t) for t in ("f32", "f16", "q8_0")] == [256, 128, 68]
    assert kv_bytes_per_token(30, 3, 64, "f16") == 30 * 2 * 3 * 128  # SmolLM2-135M: 23040
    with pytest.raises(ValueError):
        kv_row_bytes(64, "q4_0")
    with pytest.raises(ValueError):
        RunnerOptions(cache_type="bf16")
    assert RunnerOptions().cache_type == "f16"


@pytest.mark.parametrize("cache_type", CACHE_TYPES)
def test_runner_allocates_the_type_and_counts_its_bytes(tiny_path: Path, cache_type: str) -> None:
    r = runner(tiny_path, cache_type)
    layer = r.kv_layers[0]
    assert layer[0].dtype == STORED[cache_type] and len(layer) == (4 if cache_type == "q8_0" else 2)
    tokens = r.num_blocks * r.block_size
    assert r.kv_bytes == r.kv_bytes_per_token * tokens
    costs = placement.layer_costs(r.gguf, r.config, r.num_blocks, r.block_size, cache_type)
    assert costs.kv_per_layer * r.config.n_layer == r.kv_bytes


def test_server_sizing_follows_the_type(tiny_path: Path) -> None:
    def per_token(cache_type: str) -> int:
        sizing = plan_sizing(
            tiny_path, PoolConfig(str(tiny_path), ctx_size=256, cache_type=cache_type)
        )
        return (sizing.memory_bytes - tiny_path.stat().st_size) // sizing.pool_tokens

    sizes = {t: per_token(t) for t in CACHE_TYPES}
    assert sizes["f32"] == 2 * sizes["f16"] and sizes["q8_0"] == sizes["f16"] * 34 // 64
    assert PoolConfig("m").cache_type == "f16"


def test_logits_under_each_type_track_float32(tiny_path: Path) -> None:
    want = logits(runner(tiny_path, "f32"))
    spread = np.abs(want).max()
    for cache_type, tol in (("f16", 2e-3), ("q8_0", 2e-2)):
        got = logits(runner(tiny_path, cache_type))
        assert np.abs(got - want).max() <= tol * spread, cache_type


@pytest.mark.parametrize("cache_type", CACHE_TYPES)
def test_fast_kernels_match_the_reference_backend(tiny_path: Path, cache_type: str) -> None:
    got = logits(runner(tiny_path, cache_type))
    want = logits(runner(tiny_path, cache_type, backend="reference"))
    np.testing.assert_allclose(got, want, atol=2e-3 * np.abs(want).max())


@pytest.mark.parametrize("cache_type", CACHE_TYPES)
def test_torch_device_layers_store_the_same_type(
    tiny_path: Path, cache_type: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch")
    monkeypatch.setenv("LLMAPP_DEVICE", "cpu")
    on_cpu = logits(runner(tiny_path, cache_type))
    r = runner(tiny_path, cache_type, n_gpu_layers="all")
    assert r.offload is not None
    assert str(r.kv_layers[0][0].dtype).endswith(
        {"f16": "float16", "f32": "float32", "q8_0": "int8"}[cache_type]
    )
    assert r.offload.kv_bytes == r.kv_bytes
    np.testing.assert_allclose(logits(r), on_cpu, atol=2e-3 * np.abs(on_cpu).max())


@pytest.mark.parametrize("verb", ["run", "serve", "chat", "bench", "perplexity"])
def test_cli_takes_cache_type(verb: str) -> None:
    extra = {"run": ["p"], "perplexity": ["f.txt"]}.get(verb, [])
    assert parse_args([verb, "m:1", *extra]).cache_type == "f16"
    assert parse_args([verb, "m:1", *extra, "--cache-type", "q8_0"]).cache_type == "q8_0"
    with pytest.raises(SystemExit) as exc:
        parse_args([verb, "m:1", *extra, "--cache-type", "q4_0"])
    assert exc.value.code == 2
