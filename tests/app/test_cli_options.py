"""The command line as people type it: options anywhere, `--`, usage errors, --version, help.

Run as subprocesses (the installed `llmapp` when it is on PATH) so exit statuses and streams are
what a shell sees."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from llmapp.app.cli import build_parser, parse_args, verb_parsers


def _command() -> list[str]:
    exe = shutil.which("llmapp")
    return [exe] if exe else [sys.executable, "-m", "llmapp.app.cli"]


LLMAPP = _command()


def llmapp(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    kw.setdefault("timeout", 120)
    return subprocess.run([*LLMAPP, *args], capture_output=True, text=True, **kw)


# Each verb, written with its options first and then with them after (or between) its
# positionals: both must parse to the same thing.
ORDERS: dict[str, list[list[str]]] = {
    "pull": [["--force", "m:1"], ["m:1", "--force"]],
    "list": [["--all", "--json"], ["--json", "--all"]],
    "rm": [["m:1"], ["--", "m:1"]],
    "show": [["--json", "m:1"], ["m:1", "--json"]],
    "run": [
        ["--ctx-size", "64", "--threads", "1", "m:1", "a prompt"],
        ["m:1", "--ctx-size", "64", "a prompt", "--threads", "1"],
        ["m:1", "a prompt", "--threads=1", "--ctx-size", "64"],
    ],
    "serve": [["--port", "9", "--threads", "1", "m:1"], ["m:1", "--port", "9", "--threads", "1"]],
    "perplexity": [["--ctx", "32", "m:1", "f.txt"], ["m:1", "--ctx", "32", "f.txt"]],
    "bench": [["-p", "8", "-n", "2", "m:1"], ["m:1", "-p", "8", "-n", "2"]],
    "quantize": [
        ["--type", "Q8_0", "a", "b"],
        ["a", "--type", "q8_0", "b"],
        ["a", "b", "--type=Q8_0"],
    ],
    "tokenize": [["--json", "--bos", "m:1", "hi"], ["m:1", "--json", "hi", "--bos"]],
    "ps": [["--port", "9", "--json"], ["--json", "--port", "9"]],
    "stop": [["--port", "9", "m:1"], ["m:1", "--port", "9"]],
    "completion": [["bash"], ["--", "bash"]],
    "chat": [["--threads", "1", "m:1"], ["m:1", "--threads", "1"]],
    "__complete-models": [[], []],
}


def _parsed(argv: list[str]) -> dict[str, Any]:
    args = vars(parse_args(argv))
    args.pop("handler")
    return args


def test_every_verb_has_an_option_order_case() -> None:
    assert set(verb_parsers(build_parser())) <= set(ORDERS)


@pytest.mark.parametrize("verb", sorted(ORDERS))
def test_options_in_any_order(verb: str) -> None:
    if verb not in verb_parsers(build_parser()):
        pytest.skip(f"no {verb} verb in this build")
    first, *others = ORDERS[verb]
    expected = _parsed([verb, *first])
    for argv in others:
        assert _parsed([verb, *argv]) == expected, argv


def test_double_dash_ends_options() -> None:
    args = parse_args(["run", "m:1", "--threads", "1", "--", "-1 is less than 0?"])
    assert args.prompt == "-1 is less than 0?" and args.threads == 1
    assert parse_args(["run", "m:1", "--", "--json"]).prompt == "--json"
    assert parse_args(["tokenize", "m:1", "--", "-x"]).text == "-x"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--bogus"],
        ["runn", "m:1"],
        ["run"],
        ["run", "m:1", "p", "--bogus"],
        ["run", "m:1", "p", "extra"],
        ["run", "m:1", "--ctx-size", "many"],
        ["quantize", "a", "b"],
        ["quantize", "a", "b", "--type", "Q3"],
        ["completion", "tcsh"],
        ["stop"],
    ],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    out = llmapp(*argv)
    assert out.returncode == 2, out
    assert "usage:" in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == ""


def test_unknown_verb_suggests_the_close_one() -> None:
    out = llmapp("shwo", "m:1")
    assert out.returncode == 2 and "did you mean 'show'?" in out.stderr


def test_version() -> None:
    out = llmapp("--version")
    assert out.returncode == 0
    assert out.stdout == f"llmapp {version('llmapp')}\n"


def test_help_documents_exit_codes() -> None:
    out = llmapp("--help")
    assert out.returncode == 0
    for line in ("0    success", "1    error", "2    usage", "130  interrupted", "141"):
        assert line in out.stdout
    assert "__complete-models" not in out.stdout  # the hidden verb stays hidden


@pytest.mark.parametrize(
    "verb",
    [
        *("pull", "list", "show", "rm", "run", "perplexity", "bench", "quantize", "tokenize"),
        *("ps", "stop", "completion", "serve", "chat"),
    ],
)
def test_each_verb_help_has_examples(verb: str) -> None:
    if verb not in verb_parsers(build_parser()):
        pytest.skip(f"no {verb} verb in this build")
    out = llmapp(verb, "--help")
    assert out.returncode == 0
    examples = out.stdout.split("examples:\n", 1)[1]
    assert f"llmapp {verb}" in examples


def test_options_after_positionals_reach_the_verb(tmp_path: Path) -> None:
    # Each verb's own error (exit 1), not a usage error: the options were accepted.
    missing = str(tmp_path / "none.gguf")
    assert llmapp("pull", "nosuch:1", "--force").returncode == 1
    assert llmapp("quantize", missing, "--type", "Q8_0", str(tmp_path / "o.gguf")).returncode == 1
    assert llmapp("stop", "m:1", "--port", "9", "--host", "127.0.0.1").returncode == 1
    listed = llmapp("list", "--json", "--all")
    assert listed.returncode == 0 and "models" in json.loads(listed.stdout)


@pytest.mark.real_model
def test_run_with_options_between_model_and_prompt(smollm2_path: Path) -> None:
    out = llmapp(
        "run", "smollm2:135m", "--ctx-size", "64", "a prompt", "--max-tokens", "2",
        "--threads", "1", "--temperature", "0", "--json", "--quiet",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["completion_tokens"] == 2
    assert out.stderr == ""


@pytest.mark.real_model
def test_prompt_starting_with_dash_after_double_dash(smollm2_path: Path) -> None:
    out = llmapp(
        "run", "--threads", "1", "smollm2:135m", "--raw", "--max-tokens", "1", "--json",
        "--quiet", "--", "-1, -2, -3,",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["prompt_tokens"] >= 6


@pytest.mark.real_model
def test_show_and_tokenize_in_either_order(smollm2_path: Path) -> None:
    a = llmapp("show", "--json", "smollm2:135m")
    b = llmapp("show", "smollm2:135m", "--json")
    assert a.returncode == b.returncode == 0 and json.loads(a.stdout) == json.loads(b.stdout)
    a = llmapp("tokenize", "--json", "smollm2:135m", "Hello world")
    b = llmapp("tokenize", "smollm2:135m", "Hello world", "--json")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout
