"""A real `llmapp serve` on a free loopback port, started as a user would and stopped after.

(Not in conftest.py: several conftest files share that module name, so imports from one of
them can find another.)
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx


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
