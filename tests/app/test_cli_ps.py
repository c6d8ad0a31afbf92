"""`llmapp ps` and `llmapp stop` against a live `llmapp serve`, and without one."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmapp.app.cli import build_parser, verb_parsers
from llmapp.app.commands.ps_cmds import print_ps_table

KEY = "test-key-1"


def _command() -> list[str]:
    exe = shutil.which("llmapp")
    return [exe] if exe else [sys.executable, "-m", "llmapp.app.cli"]


LLMAPP = _command()


def llmapp(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "LLMAPP_API_KEY"}
    return subprocess.run(
        [*LLMAPP, *args], capture_output=True, text=True, timeout=120, env={**base, **(env or {})}
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_server_is_one_line_and_exit_1() -> None:
    port = str(free_port())
    for args in (["ps", "--port", port], ["stop", "smollm2:135m", "--port", port]):
        out = llmapp(*args)
        assert out.returncode == 1
        assert out.stdout == ""
        assert out.stderr == (
            f"llmapp: error: no llmapp server answers at http://127.0.0.1:{port} "
            "(start one with `llmapp serve MODEL`)\n"
        )


def test_table_like_ollama_ps(capsys: pytest.CaptureFixture[str]) -> None:
    now = 1_800_000_000.0
    row: dict[str, Any] = {
        "name": "smollm2:135m",
        "path": "/x.gguf",
        "size_bytes": 98_362_432,
        "memory_bytes": 475_849_792,
        "ctx_size": 8192,
        "sessions_running": 2,
        "sessions_waiting": 1,
        "loaded_at": now - 125,
    }
    split = {"device": "cuda:0", "layers": 13, "of": 25, "weight_bytes": 1, "kv_bytes": 1}
    other = {**row, "name": "gemma3:270m", "loaded_at": now - 7200, "offload": split}
    print_ps_table([row, other], now=now)
    lines = capsys.readouterr().out.splitlines()
    header = ["NAME", "SIZE", "MEMORY", "CONTEXT", "PROCESSOR", "SESSIONS", "LOADED"]
    assert lines[0].split() == header
    assert "  CPU  " in lines[1] and "  13/25 on cuda:0  " in lines[2]
    assert lines[1].split("  ")[0] == "smollm2:135m"
    for text in ("98.4 MB", "475.8 MB", "8192", "2 running, 1 waiting", "2 minutes ago"):
        assert text in lines[1]
    assert "2 hours ago" in lines[2]
    assert lines[1].index("98.4 MB") == lines[0].index("SIZE")  # columns line up


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if "serve" not in verb_parsers(build_parser()):
        pytest.skip("no `llmapp serve` verb in this build")
    port = str(free_port())
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    args = ["serve", "smollm2:135m", "--port", port, "--threads", "1", "--api-key", KEY]
    env = {k: v for k, v in os.environ.items() if k != "LLMAPP_API_KEY"}
    with log.open("w") as sink:
        proc = subprocess.Popen([*LLMAPP, *args], stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_until_loaded(port, proc, log)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_until_loaded(port: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"the server did not load in time:\n{log.read_text()}")


@pytest.mark.real_model
def test_ps_and_stop_against_a_live_server(server: str, tmp_path: Path) -> None:
    out = llmapp("ps", "--port", server, "--api-key", KEY)
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()
    assert header.split()[0] == "NAME" and row.startswith("smollm2:135m ")
    assert "0 running" in row

    listed = json.loads(llmapp("ps", "--json", "--port", server, "--api-key", KEY).stdout)
    (model,) = listed["models"]
    assert model["name"] == "smollm2:135m" and model["memory_bytes"] > model["size_bytes"] > 0

    err = tmp_path / "err.txt"
    line = f"{shlex.join([*LLMAPP, 'ps', '--port', server])} 2>{err} | head -1"
    cut = subprocess.run(
        ["bash", "-c", line + '; exit "${PIPESTATUS[0]}"'],
        capture_output=True,
        text=True,
        env={**os.environ, "LLMAPP_API_KEY": KEY},  # the key from the environment
    )
    assert cut.returncode in (0, 141) and cut.stdout.startswith("NAME") and err.read_text() == ""

    unknown = llmapp("stop", "nosuch:1", "--port", server, "--api-key", KEY)
    assert unknown.returncode == 1 and unknown.stderr.startswith("llmapp: error: ")
    assert len(unknown.stderr.splitlines()) == 1

    stopped = llmapp("stop", "--port", server, "smollm2:135m", env={"LLMAPP_API_KEY": KEY})
    assert stopped.returncode == 0 and stopped.stderr == "stopped smollm2:135m\n"
    after = llmapp("ps", "--port", server, "--api-key", KEY)
    assert after.returncode == 0 and after.stdout.split() == [
        *("NAME", "SIZE", "MEMORY", "CONTEXT", "PROCESSOR", "SESSIONS", "LOADED")
    ]
    again = llmapp("stop", "smollm2:135m", "--port", server, "--api-key", KEY)
    assert again.returncode == 0 and again.stderr == "smollm2:135m was not running\n"


@pytest.mark.real_model
def test_missing_or_wrong_key_is_one_line(server: str) -> None:
    for extra in ([], ["--api-key", "wrong"]):
        out = llmapp("ps", "--port", server, *extra)
        assert out.returncode == 1 and out.stdout == ""
        assert "refused the API key" in out.stderr and len(out.stderr.splitlines()) == 1
