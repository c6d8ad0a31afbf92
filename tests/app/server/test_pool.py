"""The server's model pool, offline: tiny models registered in a user catalog, as a user adds
their own; loading on first use, least-recently-used unloading, budgets, names."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny_model import write_store

from llmapp.app.server.errors import APIError
from llmapp.app.server.pool import ModelPool, PoolConfig, parse_size, plan_sizing
from llmapp.runtime import SamplingParams


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """$LLMAPP_HOME with two tiny models, tiny:a and tiny:b, as pulled catalog entries."""
    monkeypatch.setenv("LLMAPP_HOME", str(tmp_path))
    write_store(tmp_path, {"a": 1, "b": 2}, defaults={"temperature": 0.0})
    yield tmp_path


def config(**kw: object) -> PoolConfig:
    base: dict[str, object] = {"default_model": "tiny:a", "threads": 1, "ctx_size": 256}
    base.update(kw)
    return PoolConfig(**base)  # type: ignore[arg-type]


def test_models_load_on_first_use_and_unload_lru(store: Path) -> None:
    async def main() -> None:
        pool = ModelPool(config(max_loaded=1))
        a = await pool.get(None)
        assert a.name == "tiny:a" and a.defaults.temperature == 0.0
        assert (await pool.get("tiny:a")) is a
        b = await pool.get("tiny:b")
        assert [m.name for m in pool.loaded()] == ["tiny:b"]
        assert not a.engine.alive  # unloaded: its engine is shut down
        _, ids, _ = b.engine.generate("hello", SamplingParams(temperature=0, max_tokens=3))
        assert len(ids) == 3
        await pool.close()

    asyncio.run(main())


def test_a_busy_model_is_not_unloaded(store: Path) -> None:
    async def main() -> None:
        pool = ModelPool(config(max_loaded=1))
        a = await pool.get("tiny:a")
        endless = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)
        stream = await a.engine.stream("hello", endless)
        with pytest.raises(APIError) as info:
            await pool.get("tiny:b")
        assert info.value.status == 503 and info.value.code == "models_busy"
        stream.abort()
        await pool.close()

    asyncio.run(main())


def test_budgets_and_names(store: Path) -> None:
    async def main() -> None:
        small = ModelPool(config(memory_budget=1 << 10))
        with pytest.raises(APIError, match="memory budget") as info:
            await small.get("tiny:a")
        assert info.value.status == 400
        pool = ModelPool(config())
        for name in ("/etc/passwd", "../models/tiny-a.gguf", "nope:1b"):
            with pytest.raises(APIError) as info:
                await pool.get(name)
            assert info.value.status == 404 and info.value.code == "model_not_found"

    asyncio.run(main())


def test_kv_sizing(store: Path) -> None:
    path = store / "models" / "tiny-a.gguf"
    sizing = plan_sizing(path, config(parallel=3))
    assert sizing.ctx == 256 and sizing.pool_tokens == 768
    per_token = (sizing.memory_bytes - path.stat().st_size) // 768
    assert plan_sizing(path, config(kv_memory=per_token * 1000)).pool_tokens == 1000
    with pytest.raises(APIError, match="less than one 256-token context"):
        plan_sizing(path, config(kv_memory=per_token * 100))
    assert plan_sizing(path, config(ctx_size=None)).ctx == 2048  # trained, under the cap


def test_parse_size() -> None:
    assert parse_size("4GiB") == 4 << 30 and parse_size("512MiB") == 512 << 20
    assert parse_size("2g") == 2 << 30 and parse_size("1500") == 1500
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)
