"""`llmapp serve --n-gpu-layers`: the split is printed when a model loads and `/api/ps` carries
it. torch's CPU device stands in for the GPU."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from server_proc import start_server
from tiny_model import offload_store

pytest.importorskip("torch")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return offload_store(tmp_path, monkeypatch)


def test_serve_prints_the_split_and_ps_carries_it(home: Path) -> None:
    server = start_server("tiny:a", "--n-gpu-layers", "all", "--ctx-size", "128")
    try:
        body = {"model": "tiny:a", "prompt": "hello", "max_tokens": 2, "temperature": 0}
        assert httpx.post(server.v1 + "/completions", json=body, timeout=60).status_code == 200
        (row,) = httpx.get(server.url + "/api/ps", timeout=10).json()["models"]
        assert row["offload"]["device"] == "cpu"
        assert (row["offload"]["layers"], row["offload"]["of"]) == (3, 3)
    finally:
        server.stop()
    assert server.proc.stdout is not None
    log = server.proc.stdout.read()
    assert "llmapp serve: tiny:a: offload: 3/3 layers on cpu, " in log
