"""`llmapp run` starts from the model's catalog [defaults], under the flags the user gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_model import write_store

from llmapp.app.cli import main


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$LLMAPP_HOME whose models.toml declares tiny:x (pulled) with greedy, 3-token defaults."""
    monkeypatch.setenv("LLMAPP_HOME", str(tmp_path))
    write_store(tmp_path, {"x": 1}, defaults={"temperature": 0.0, "max_tokens": 3})
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *flags: str) -> dict:
    argv = ["run", "tiny:x", "hello there", "--json", "--ctx-size", "128", "--raw", *flags]
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_run_uses_the_catalog_defaults(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = run(capsys), run(capsys)
    assert first["completion_tokens"] <= 3 and first["finish_reason"] in ("length", "stop")
    assert first["token_ids"] == second["token_ids"]  # temperature 0 from the catalog: greedy


def test_flags_override_the_catalog_defaults(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    greedy = run(capsys, "--max-tokens", "6")
    assert len(greedy["token_ids"]) > 3 or greedy["finish_reason"] == "stop"
    hot = [run(capsys, "--max-tokens", "6", "--temperature", "5", "--seed", str(s)) for s in (1, 2)]
    assert hot[0]["token_ids"] != hot[1]["token_ids"]  # the flag's temperature, not the catalog's
