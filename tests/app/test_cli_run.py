"""`llmapp run`, `bench` and `perplexity` on a real model, as a user types them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from llmapp.app.cli import main

pytestmark = pytest.mark.real_model


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(list(argv)) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out  # --json: one line and nothing else on stdout
    return json.loads(out[0])


def test_run_json_fields(smollm2_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(
        capsys,
        "run",
        "smollm2:135m",
        "Why is the sky blue?",
        "--json",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--ctx-size",
        "256",
    )
    assert set(out) >= {"text", "token_ids", "prompt_tokens", "completion_tokens", "finish_reason"}
    assert out["finish_reason"] == "length"
    assert out["completion_tokens"] == 8 == len(out["token_ids"])
    assert out["text"].strip()
    assert set(out["timings"]) == {"prompt_ms", "decode_ms", "prefill_tps", "decode_tps"}


def test_run_is_deterministic_and_streams(
    smollm2_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["run", str(smollm2_path), "Name a color.", "--seed", "7", "--max-tokens", "12"]
    assert main([*argv, "--ctx-size", "256"]) == 0
    first = capsys.readouterr().out
    assert main([*argv, "--ctx-size", "256"]) == 0
    assert capsys.readouterr().out == first  # same seed, same text
    assert first.strip()


def test_run_raw_from_stdin_stops_on_stop_string(
    smollm2_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("1, 2, 3, 4,"))
    out = run_json(
        capsys,
        "run",
        str(smollm2_path),
        "-",
        "--raw",
        "--json",
        "--temperature",
        "0",
        "--max-tokens",
        "24",
        "--stop",
        "7",
        "--ctx-size",
        "256",
    )
    assert "7" not in out["text"]
    assert out["finish_reason"] == "stop"


def test_run_over_long_prompt_is_one_clear_line(
    smollm2_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(smollm2_path), "word " * 400, "--raw", "--ctx-size", "64"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "401 tokens" in err[0] and "--ctx-size" in err[0]


def test_run_unknown_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "no-such-model:1b", "hi"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no-such-model" in err[0]


def test_bench_json_single_session(smollm2_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_json(
        capsys, "bench", str(smollm2_path), "-p", "16,32", "-n", "4", "-r", "1", "--json"
    )
    assert out["model"] == str(smollm2_path) and out["threads"] >= 1
    assert set(out["prefill_tps"]) == {"16", "32"}
    assert all(v > 0 for v in out["prefill_tps"].values())
    assert out["decode_tps"] > 0
    assert "peer" not in out and "concurrency" not in out


SESSION_KEYS = {"concurrency", "aggregate_decode_tps", "per_session_decode_tps", "ttft_ms_p50"}


def test_bench_json_concurrency_one_has_the_session_keys(
    smollm2_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", str(smollm2_path), "-p", "16", "-n", "4", "-r", "1", "--concurrency", "1"]
    out = run_json(capsys, *argv, "--json")
    assert out["concurrency"] == 1
    assert SESSION_KEYS <= set(out)
    assert out["aggregate_decode_tps"] > 0 and out["per_session_decode_tps"] > 0
    assert out["ttft_ms_p50"] > 0


def test_bench_json_concurrency_and_shared_prefix(
    smollm2_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", str(smollm2_path), "-p", "16", "-n", "6", "-r", "1", "--concurrency", "3"]
    out = run_json(capsys, *argv, "--shared-prefix", "70", "--json")
    assert out["concurrency"] == 3 and SESSION_KEYS <= set(out)
    assert out["aggregate_decode_tps"] > 0 and out["per_session_decode_tps"] > 0
    assert out["shared_prefix"] == 70 and out["shared_prefix_suffix_tokens"] > 0
    # whole 16-token blocks of the prefix are reused: 64 of its 70 tokens
    assert out["shared_prefix_cached_tokens"] == 64
    assert out["ttft_ms_cold"] > 0 and out["ttft_ms_cached"] > 0


@pytest.mark.peer
def test_bench_json_peer_ratios(smollm2_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["bench", str(smollm2_path), "-p", "16", "-n", "4", "-r", "1", "--concurrency", "2"]
    out = run_json(capsys, *argv, "--peer", "--json")
    peer = out["peer"]
    assert peer["name"] == "llama.cpp" and peer["decode_tps"] > 0
    assert peer["concurrency"]["concurrency"] == 2 and SESSION_KEYS <= set(peer["concurrency"])
    ratios = peer["ratios"]
    assert ratios["decode"] == pytest.approx(out["decode_tps"] / peer["decode_tps"], abs=1e-3)
    assert ratios["prefill"]["16"] == pytest.approx(
        out["prefill_tps"]["16"] / peer["prefill_tps"]["16"], abs=1e-3
    )
    want = out["aggregate_decode_tps"] / peer["concurrency"]["aggregate_decode_tps"]
    assert ratios["aggregate_decode"] == pytest.approx(want, abs=2e-3)


@pytest.mark.parametrize(
    "flags, problem",
    [(["--concurrency", "0"], "--concurrency"), (["--shared-prefix", "-5"], "--shared-prefix")],
)
def test_bench_rejects_bad_session_flags(
    smollm2_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], problem: str
) -> None:
    assert main(["bench", str(smollm2_path), *flags]) == 1
    err = capsys.readouterr().err
    assert problem in err and "Traceback" not in err


def test_perplexity_needs_enough_text(
    smollm2_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    assert main(["perplexity", str(smollm2_path), str(short), "--ctx", "64"]) == 1
    assert "needs at least 128" in capsys.readouterr().err
