"""A closed stdout (`| head -1`) and Ctrl-C end every verb quietly with the documented status.

Real shell pipelines: `llmapp ... | head -1` under bash, the status taken from PIPESTATUS."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
from cli_helpers import LLMAPP, README, bench_quantize

EXIT_BROKEN_PIPE = 141


def through_head(tmp_path: Path, *args: str, stdin: Path | None = None) -> tuple[int, str, str]:
    """(llmapp's exit status, what head printed, llmapp's stderr) of `llmapp ARGS | head -1`."""
    err = tmp_path / "stderr.txt"
    feed = f" < {shlex.quote(str(stdin))}" if stdin else ""
    line = f"{shlex.join([*LLMAPP, *args])}{feed} 2>{shlex.quote(str(err))} | head -1"
    done = subprocess.run(
        ["bash", "-c", line + '; exit "${PIPESTATUS[0]}"'],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return done.returncode, done.stdout, err.read_text()


def assert_quiet_cut(status: int, out: str, err: str) -> None:
    assert status in (0, EXIT_BROKEN_PIPE), (status, err)
    assert err == "", err
    assert len(out.splitlines()) == 1, out


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["list", "--all"],
        ["list", "--all", "--json"],
        ["completion", "bash"],
        ["completion", "zsh"],
        ["completion", "fish"],
        ["__complete-models"],
        ["run", "--help"],
    ],
)
def test_head_on_light_verbs(tmp_path: Path, args: list[str]) -> None:
    assert_quiet_cut(*through_head(tmp_path, *args))


@pytest.mark.real_model
@pytest.mark.parametrize(
    "args",
    [
        ["show", "smollm2:135m"],
        ["show", "smollm2:135m", "--json"],
        ["tokenize", "smollm2:135m", "Hello world, and more words", "--json"],
        [
            "run", "smollm2:135m", "Count from 1 to 40, one number per line.",
            "--max-tokens", "48", "--temperature", "0", "--threads", "1", "--quiet",
        ],
        ["bench", "smollm2:135m", "-p", "8", "-n", "2", "-r", "1", "--threads", "1", "--quiet"],
        [
            "perplexity", "smollm2:135m", str(README), "--ctx", "32", "--chunks", "2",
            "--threads", "1", "--quiet",
        ],
    ],
)  # fmt: skip
def test_head_on_model_verbs(tmp_path: Path, smollm2_path: Path, args: list[str]) -> None:
    assert_quiet_cut(*through_head(tmp_path, *args))


@pytest.mark.real_model
def test_pull_of_a_pulled_model_through_head(tmp_path: Path, smollm2_path: Path) -> None:
    status, out, err = through_head(tmp_path, "pull", "smollm2:135m")
    assert status in (0, EXIT_BROKEN_PIPE)
    assert out.strip() == str(smollm2_path)
    assert "Traceback" not in err and "BrokenPipe" not in err


@pytest.mark.real_model
def test_long_output_cut_short_is_status_141(tmp_path: Path, smollm2_path: Path) -> None:
    # Far more than a pipe holds, so the write after head has gone must fail.
    text = tmp_path / "long.txt"
    text.write_text("hello world, " * 20000)
    status, out, err = through_head(tmp_path, "tokenize", "smollm2:135m", "-", stdin=text)
    assert status == EXIT_BROKEN_PIPE
    assert err == "" and out.split() == ["28120", '"hello"']


def test_quantize_table_through_head(tmp_path: Path) -> None:
    bench = bench_quantize()
    src = bench.write_synthetic_llama(
        tmp_path / "f32.gguf", seed=0, n_embd=64, n_ff=128, n_layer=2, n_head=2, n_head_kv=1
    )
    out_path = tmp_path / "q8.gguf"
    assert_quiet_cut(*through_head(tmp_path, "quantize", str(src), str(out_path), "--type", "Q8_0"))
    assert out_path.read_bytes()[:4] == b"GGUF"  # the reader leaving does not stop the work


@pytest.mark.real_model
def test_ctrl_c_during_generation_exits_130(smollm2_path: Path) -> None:
    args = [
        "run",
        "smollm2:135m",
        "Write a very long story about a lighthouse.",
        "--max-tokens",
        "2000",
        "--threads",
        "1",
        "--quiet",
        "--temperature",
        "0",
    ]  # fmt: skip  (greedy: a long reply, never one that ends before the signal lands)
    proc = subprocess.Popen([*LLMAPP, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        assert os.read(proc.stdout.fileno(), 1)  # generation has begun
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        assert b"Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
