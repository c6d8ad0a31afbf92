"""`llmapp tokenize MODEL [TEXT|-] [--json] [--special] [--bos]` as a user runs it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from llmapp.app.cli import main

pytestmark = pytest.mark.real_model


def run_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert main(["tokenize", *args, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one JSON object, nothing else on stdout
    return json.loads(out)


def test_json_ids_without_bos(smollm2_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = run_json(capsys, str(smollm2_path), "Hello world")
    assert result["ids"] == [19556, 905]
    assert result["pieces"] == ["Hello", " world"] and result["n_tokens"] == 2


def test_bos_and_special(gemma3_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain = run_json(capsys, str(gemma3_path), "<start_of_turn>hi")
    assert 105 not in plain["ids"]  # type: ignore[operator]
    special = run_json(capsys, str(gemma3_path), "<start_of_turn>hi", "--special", "--bos")
    assert special["ids"][:2] == [2, 105]  # type: ignore[index]


def test_stdin_and_plain_output(
    qwen2_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("a\tb\n"))
    assert main(["tokenize", str(qwen2_path), "-"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line.split(maxsplit=1)[1] for line in lines] == ['"a"', '"\\tb"', '"\\n"']
    assert captured.err.strip() == "3 tokens"


def test_unknown_model_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tokenize", "no-such-model:1", "x"]) == 1
    assert capsys.readouterr().err.startswith("llmapp: error: ")
