"""Fixtures that start a real `llmapp serve` (see server_proc.py) and stop it after."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from server_proc import Server, start_server


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def run(*args: str, **kw: object) -> Server:
        started.append(start_server(*args, **kw))  # type: ignore[arg-type]
        return started[-1]

    yield run
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def smol_server() -> Iterator[Server]:
    """smollm2 by default, Qwen2.5-Coder loadable beside it (for fill-in-the-middle)."""
    server = start_server("smollm2:135m", "--max-loaded-models", "2", "--ctx-size", "1024")
    yield server
    assert server.stop() in (0, 130)  # 130: the documented status after Ctrl-C
