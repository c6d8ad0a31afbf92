"""`llmapp chat --n-gpu-layers`: the backend offloads and the status line shows the split.
torch's CPU device stands in for the GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_model import offload_store

from llmapp.app.cli import build_parser
from llmapp.app.tui.app import status_text
from llmapp.app.tui.backend import EngineBackend
from llmapp.app.tui.conversation import ChatSettings

pytest.importorskip("torch")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return offload_store(tmp_path, monkeypatch)


def test_chat_parses_the_offload_flags() -> None:
    args = build_parser().parse_args(["chat", "tiny:a", "--n-gpu-layers", "all"])
    assert args.n_gpu_layers == "all"
    assert build_parser().parse_args(["chat", "-ngl", "2"]).n_gpu_layers == 2


async def test_chat_backend_offloads_and_shows_the_split(home: Path) -> None:
    backend = EngineBackend(ctx_size=128, n_threads=1, n_gpu_layers=1)
    try:
        await backend.load("tiny:a")
        stats = backend.stats("tiny:a")
        assert stats.offload == "1/3 layers on cpu"  # the head only: 2 blocks + the head
        assert backend.describe_load("tiny:a").startswith("offload: 1/3 layers on cpu, ")

        class Reply:
            tokens_per_s = ttft_ms = cached_tokens = prompt_tokens = None

        assert status_text("tiny:a", "ready", Reply(), stats).endswith("· 1/3 layers on cpu")
        messages = [{"role": "user", "content": "hi"}]
        settings = ChatSettings(temperature=0.0, max_tokens=3)
        chunks = [c async for c in backend.stream("tiny:a", messages, settings)]
        assert chunks
    finally:
        await backend.close()
