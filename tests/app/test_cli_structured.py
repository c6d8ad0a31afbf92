"""`llmapp run --json-schema FILE` / `--grammar FILE`: constrained output on the command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

LLMAPP = [sys.executable, "-m", "llmapp.app.cli"]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "age"],
}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [*LLMAPP, "run", "smollm2:135m", "--threads", "1", "--temperature", "0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.real_model
def test_json_schema_and_grammar_files(tmp_path: Path) -> None:
    schema = tmp_path / "person.json"
    schema.write_text(json.dumps(SCHEMA))
    done = run("A person, as JSON", "--json-schema", str(schema))
    assert done.returncode == 0, done.stderr
    jsonschema.validate(json.loads(done.stdout), SCHEMA)
    grammar = tmp_path / "yesno.gbnf"
    grammar.write_text('root ::= "yes" | "no"')
    done = run("Is water wet?", "--grammar", str(grammar))
    assert done.returncode == 0 and done.stdout.strip() in ("yes", "no")


@pytest.mark.real_model
def test_bad_schema_files_are_one_line_errors(tmp_path: Path) -> None:
    for content, words in (("{not json", "is not JSON"), ('{"type": "objectx"}', "objectx")):
        schema = tmp_path / "bad.json"
        schema.write_text(content)
        done = run("x", "--json-schema", str(schema))
        assert done.returncode == 1 and words in done.stderr
        assert "Traceback" not in done.stderr
    done = run("x", "--json-schema", str(tmp_path / "missing.json"))
    assert done.returncode == 1 and "cannot read" in done.stderr
