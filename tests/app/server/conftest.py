"""A real `llmapp serve` on a free loopback port, started as a user would and stopped after."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest


@dataclass
class Server:
    proc: subprocess.Popen[str]
    url: str  # http://127.0.0.1:PORT

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def start_server(*args: str, wait_healthy: bool = True, timeout: float = 120) -> Server:
    cmd = [sys.executable, "-m", "llmapp.app.cli", "serve", "--port", "0", "--threads", "1", *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ)
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # the first line names the URL
    match = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
    if not match:
        proc.kill()
        raise AssertionError(f"serve did not start: {line}{proc.stdout.read()}")
    server = Server(proc, f"http://127.0.0.1:{match.group(1)}")
    deadline = time.monotonic() + timeout
    while wait_healthy and time.monotonic() < deadline:
        try:
            if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.1)
    if wait_healthy:
        server.stop()
        raise AssertionError("the server never became healthy")
    return server


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
