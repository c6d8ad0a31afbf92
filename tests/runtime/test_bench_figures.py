"""The benchmark's memory and traffic figures: bytes a decode step reads, a child's peak RSS,
the budget."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_model import write_chat_model

from llmapp.runtime.bench import (
    MB,
    decode_read_bytes,
    memory_budget,
    our_run_argv,
    peak_rss,
    peer_run_argv,
)
from llmapp.runtime.execution.model_runner import ModelRunner, RunnerOptions


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> ModelRunner:
    path = write_chat_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
    return ModelRunner(path, RunnerOptions(ctx_size=64, n_threads=1))


def test_decode_read_bytes_counts_weights_head_and_kv(runner: ModelRunner) -> None:
    w = runner.weights
    read = decode_read_bytes(runner, 40)
    # Every block's matrices at least, and the head: more than the blocks and head alone.
    assert read["weights"] > int(w.output.nbytes)
    assert read["kv"] == runner.kv_bytes_per_token * 40  # no sliding layers in the tiny model
    assert read["total"] == read["weights"] + read["kv"]
    assert decode_read_bytes(runner, 80)["kv"] == 2 * read["kv"]


def test_peak_rss_sees_a_child_allocation() -> None:
    argv = [sys.executable, "-c", "b = bytearray(80_000_000); b[::4096] = b'x' * len(b[::4096])"]
    assert peak_rss(argv) > 80 * MB
    with pytest.raises(RuntimeError, match="exited with 3"):
        peak_rss([sys.executable, "-c", "raise SystemExit(3)"])


def test_peak_rss_does_not_count_this_process() -> None:
    big = np.ones(200_000_000 // 8)  # 200 MB resident here, not in the child
    assert peak_rss([sys.executable, "-c", "pass"]) < 100 * MB
    del big


def test_run_commands_and_budget() -> None:
    ours = our_run_argv("smollm2:135m", 2)
    assert ours[-7:] == ["hi", "--max-tokens", "32", "--ctx-size", "2048", "--threads", "2"]
    peer = peer_run_argv(Path("/m.gguf"), 2)
    assert peer[-5:] == ["/m.gguf", "2048", "2", "hi", "32"]
    assert memory_budget(100_000_000, 10_000_000) == pytest.approx(320 * MB)


@pytest.mark.real_model
def test_bench_json_reports_bytes_read_per_token(
    smollm2_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmapp.app.cli import main

    argv = ["bench", str(smollm2_path), "-p", "16", "-n", "4", "-r", "1", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    read = out["decode_read_bytes"]
    assert read["total"] == read["weights"] + read["kv"]
    assert read["weights"] > 0.5 * smollm2_path.stat().st_size  # the packed model, head included
    assert read["kv"] == out["kv_cache"]["bytes_per_token"] * (128 + 4 // 2)
