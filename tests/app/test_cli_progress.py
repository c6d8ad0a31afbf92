"""Progress on long work: the display itself, then the verbs that show it, as subprocesses."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import LLMAPP, README, bench_quantize

from llmapp.app import progress as progress_module
from llmapp.app.commands import run_cmds
from llmapp.app.progress import Progress, human_bytes, stage_progress


class FakeTerminal(io.StringIO):
    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


# -- the display ------------------------------------------------------------------------------


def test_log_gets_a_line_per_tenth_and_a_summary() -> None:
    out = io.StringIO()
    with Progress("pulling x", 1_000_000, stream=out) as bar:
        for done in range(0, 1_000_001, 5_000):
            bar.update(done)
    lines = out.getvalue().splitlines()
    percents = [line.split(": ")[1].split(" ")[0] for line in lines[:-1]]
    assert percents == [f"{p}%" for p in range(0, 101, 10)]
    assert lines[5].startswith("pulling x: 50% (500.0 kB of 1.0 MB")
    assert lines[-1].startswith("pulling x: 1.0 MB in ")
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_log_gets_a_line_every_30_s_between_tenths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module, "_LOG_EVERY_S", 0.05)
    out = io.StringIO()
    with Progress("quantize", 1000, unit="tensor", stream=out) as bar:
        bar.update(1)
        time.sleep(0.06)
        bar.update(2, detail="blk.0.ffn_up.weight")
    lines = out.getvalue().splitlines()
    assert lines[:3] == [
        "quantize: 0% (tensor 0/1000)",
        "quantize: 0% (tensor 2/1000) blk.0.ffn_up.weight",
        lines[2],
    ]
    assert lines[2].startswith("quantize: done in ")


def test_terminal_bar_is_redrawn_at_most_ten_times_a_second() -> None:
    out = FakeTerminal()
    with Progress("pulling x", 98_000_000, stream=out) as bar:
        for done in range(0, 98_000_001, 98_000):  # 1001 updates in a few ms
            bar.update(done)
    text = out.getvalue()
    draws = text.split("\r\x1b[K")[1:]
    assert len(draws) <= 4  # the first, the last (100%) and the summary
    assert "100%" in draws[-2] and "98.0 MB of 98.0 MB" in draws[-2]
    assert draws[-1].startswith("pulling x: 98.0 MB in ")


def test_terminal_bar_shows_speed_and_eta() -> None:
    out = FakeTerminal()
    bar = Progress("pulling x", 10_000_000, stream=out)
    time.sleep(0.6)
    bar.update(5_000_000)
    bar.close("")
    assert "MB/s" in out.getvalue() and "ETA 0:0" in out.getvalue()
    assert out.getvalue().endswith("\r\x1b[K")  # close("") leaves a clean line


def test_no_color_and_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    coloured = FakeTerminal()
    Progress("x", 10, unit="chunk", stream=coloured).update(5)
    assert "\x1b[32m" in coloured.getvalue()
    monkeypatch.setenv("NO_COLOR", "1")
    plain = FakeTerminal()
    Progress("x", 10, unit="chunk", stream=plain).update(10)  # the last update always draws
    assert "\x1b[3" not in plain.getvalue() and "#" * 20 in plain.getvalue()


def test_quiet_writes_nothing() -> None:
    for stream in (io.StringIO(), FakeTerminal()):
        with Progress("x", None, quiet=True, stream=stream) as bar:
            bar.update(3)
        with Progress("x", 10, quiet=True, stream=stream) as bar:
            bar.update(10)
        assert stream.getvalue() == ""


def test_delay_hides_quick_work_and_shows_slow_work() -> None:
    out = io.StringIO()
    with Progress("loading m", None, stream=out, delay=0.5):
        time.sleep(0.05)
    assert out.getvalue() == ""
    with Progress("loading m", None, stream=out, delay=0.1):
        time.sleep(0.4)
    assert out.getvalue().splitlines()[0] == "loading m ..."


def test_unknown_total_keeps_time_moving_on_a_terminal() -> None:
    out = FakeTerminal()
    with Progress(run_cmds.COMPILE_LABEL, None, stream=out):
        time.sleep(0.35)
    assert out.getvalue().count("compiling kernels, once, ~20 s  0:00") >= 2


def test_a_broken_stream_never_stops_the_work() -> None:
    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise BrokenPipeError

    with Progress("x", 10, stream=Broken()) as bar:
        bar.update(5)


def test_stage_progress_is_the_runtime_callback() -> None:
    out = io.StringIO()
    with stage_progress("pulling m", stream=out) as callback:
        for done in (0, 50, 100):
            callback("downloading part 1", done, 100)
        callback("checking sha256", 100, 100)
    lines = out.getvalue().splitlines()
    assert lines[0] == "pulling m: downloading part 1: 0% (0 B of 100 B)"
    assert "pulling m: downloading part 1: 100% (100 B of 100 B)" in lines
    assert any(line.startswith("pulling m: checking sha256: 100%") for line in lines)


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (999, 98_362_432, 1.2e9)] == ["999 B", "98.4 MB", "1.2 GB"]


# -- cold kernel cache ----------------------------------------------------------------------


def _index_dir() -> Path:
    # Where Numba keeps the kernels' index files when NUMBA_CACHE_DIR is set.
    import llmapp.kernels_cpu

    package = Path(os.path.abspath(next(iter(llmapp.kernels_cpu.__path__))))
    return run_cmds._numba_cache_dirs(package)[0]


def test_kernel_cache_cold_until_every_module_has_a_fresh_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path))
    assert run_cmds.kernel_cache_is_cold()
    index_dir = _index_dir()
    index_dir.mkdir(parents=True)
    for module in ("matmul", "attention", "ops"):
        (index_dir / f"{module}.kernel-1.py311.nbi").write_bytes(b"")
    assert not run_cmds.kernel_cache_is_cold()
    stale = index_dir / "ops.kernel-1.py311.nbi"
    os.utime(stale, (0, 0))  # older than its source: Numba recompiles
    assert run_cmds.kernel_cache_is_cold()


@pytest.mark.real_model
def test_cold_compile_is_announced_in_a_log(tmp_path: Path, smollm2_path: Path) -> None:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    done = subprocess.run(
        [*LLMAPP, "run", "smollm2:135m", "Hi", "--max-tokens", "1", "--threads", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[0] == "compiling kernels, once, ~20 s ..."
    assert lines[-1].startswith("kernels compiled in ") and "cached for later runs" in lines[-1]
    assert all("compiling kernels" in line for line in lines[:-1])  # a line per 30 s at most


# -- verbs ------------------------------------------------------------------------------------


def _synthetic(tmp_path: Path) -> Path:
    bench = bench_quantize()
    shape: dict[str, Any] = dict(n_embd=64, n_ff=128, n_layer=2, n_head=2, n_head_kv=1)
    return Path(bench.write_synthetic_llama(tmp_path / "f32.gguf", seed=0, **shape))


def test_quantize_in_a_log_counts_tensors(tmp_path: Path) -> None:
    src = _synthetic(tmp_path)
    args = ["quantize", str(src), str(tmp_path / "q.gguf"), "--type", "Q8_0"]
    done = subprocess.run([*LLMAPP, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    table = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert table[0].startswith("[ 1/21] ") and table[-1].startswith("[21/21] ")
    assert done.stderr == ""  # the table already counts n/N in a log: no second display
    quiet = subprocess.run([*LLMAPP, *args, "--quiet"], capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert quiet.stdout.startswith("wrote ") and "[ 1/21]" not in quiet.stdout


def test_quantize_shows_a_bar_on_a_terminal_while_stdout_goes_to_a_file(tmp_path: Path) -> None:
    src = _synthetic(tmp_path)
    args = ["quantize", str(src), str(tmp_path / "q.gguf"), "--type", "Q8_0"]
    stderr = _stderr_on_a_terminal([*LLMAPP, *args], tmp_path / "stdout.txt")
    assert "quantize " in stderr and "100%  tensor 21/21" in stderr
    assert "\r\x1b[K" in stderr
    assert "[21/21]" in (tmp_path / "stdout.txt").read_text()


def _stderr_on_a_terminal(argv: list[str], stdout_file: Path) -> str:
    parent, child = pty.openpty()
    with stdout_file.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=child)
    os.close(child)
    chunks = []
    while True:
        try:
            chunk = os.read(parent, 4096)
        except OSError:  # EIO: the child end closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(parent)
    assert proc.wait(timeout=300) == 0
    return b"".join(chunks).decode()


@pytest.mark.real_model
def test_perplexity_in_a_log_shows_chunks_and_the_running_value(smollm2_path: Path) -> None:
    args = ["perplexity", "smollm2:135m", str(README), "--ctx", "32", "--chunks", "10"]
    done = subprocess.run(
        [*LLMAPP, *args, "--threads", "1"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("perplexity: ")]
    assert lines[0] == "perplexity: 0% (chunk 0/10)"
    assert lines[10].startswith("perplexity: 100% (chunk 10/10) ppl ")
    final = float(done.stdout.split()[1])
    assert float(lines[10].split("ppl ")[1]) == pytest.approx(final, rel=1e-4)
    quiet = subprocess.run([*LLMAPP, *args, "--threads", "1", "--quiet"], capture_output=True)
    assert quiet.returncode == 0 and quiet.stderr == b""


@pytest.mark.real_model
def test_perplexity_progress_reports_the_runtime_figure(smollm2_path: Path) -> None:
    import argparse

    from llmapp.runtime.execution.model_runner import ModelRunner, RunnerOptions
    from llmapp.runtime.perplexity import perplexity
    from llmapp.runtime.text.tokenizer import Tokenizer

    runner = ModelRunner(smollm2_path, RunnerOptions(ctx_size=64, n_threads=1))
    tokenizer = Tokenizer.from_gguf(runner.gguf)
    text = README.read_text()
    ours = perplexity(runner, tokenizer, text, 32, 3)
    args = argparse.Namespace(ctx=32, chunks=3, quiet=True)
    with run_cmds.LoadProgress("m", quiet=True) as loading:
        shown = run_cmds.perplexity_with_progress(runner, tokenizer, text, args, loading)
    assert shown == ours
