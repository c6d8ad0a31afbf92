"""`llmapp completion bash|zsh|fish`: the scripts load in their shells and complete verbs,
options and model names (from the store, through the hidden `llmapp __complete-models`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def _command() -> list[str]:
    exe = shutil.which("llmapp")
    return [exe] if exe else [sys.executable, "-m", "llmapp.app.cli"]


LLMAPP = _command()
needs_llmapp_on_path = pytest.mark.skipif(
    shutil.which("llmapp") is None, reason="the scripts call `llmapp` by name"
)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    # An empty store: the names offered are the shipped catalog's.
    return {**os.environ, "LLMAPP_HOME": str(tmp_path / "store")}


def shell(argv: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_hidden_verb_lists_catalog_names(env: dict[str, str]) -> None:
    names = shell([*LLMAPP, "__complete-models"], env).split()
    assert {"smollm2:135m", "gemma3:270m", "qwen2.5-coder:0.5b"} <= set(names)


@needs_llmapp_on_path
def test_bash_script_loads(env: dict[str, str]) -> None:
    out = shell(["bash", "-c", "source <(llmapp completion bash) && complete -p llmapp"], env)
    assert out.strip() == "complete -o default -F _llmapp llmapp"


BASH_DRIVER = r"""
source <(llmapp completion bash)
complete_line() {
    COMP_LINE="$1"; COMP_POINT=${#1}
    # the words as bash splits them: ':' (in COMP_WORDBREAKS) is a word of its own
    read -ra COMP_WORDS <<< "${1//:/ : }"
    [[ "$1" == *" " ]] && COMP_WORDS+=("")
    COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
    COMPREPLY=()
    _llmapp
    echo "${COMPREPLY[*]}"
}
"""


@needs_llmapp_on_path
@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("llmapp ru", "run"),
        ("llmapp --version ru", "run"),
        ("llmapp run sm", "smollm2:135m"),
        ("llmapp run --threads 1 qw", "qwen2.5-coder:0.5b"),
        ("llmapp run smollm2:", "135m"),  # bash replaces only what follows the ':'
        ("llmapp show gemma3:2", "270m"),
        ("llmapp run smollm2:135m --ctx", "--ctx-size"),
        ("llmapp quantize a b --ty", "--type"),
        ("llmapp completion b", "bash"),
    ],
)
def test_bash_completes(env: dict[str, str], line: str, expected: str) -> None:
    out = shell(["bash", "-c", BASH_DRIVER + f'complete_line "{line}"'], env).split()
    assert set(expected.split()) <= set(out)
    assert all(c.startswith(line.split()[-1].rsplit(":", 1)[-1]) for c in out)


ZSH_DRIVER = r"""
compdef() { : }
compadd() { [[ $1 == -a ]] && print -r -- ${(P)2} || print -r -- ${@:#--} }
_describe() { print -r -- ${(P)2} }
_files() { : }
source <(llmapp completion zsh)
words=(llmapp "${(@)argv}"); CURRENT=${#words}; PREFIX=${words[-1]}
_llmapp
"""


@needs_llmapp_on_path
@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_script(env: dict[str, str], tmp_path: Path) -> None:
    script = tmp_path / "_llmapp"
    script.write_text(shell([*LLMAPP, "completion", "zsh"], env))
    shell(["zsh", "-n", str(script)], env)
    driver = ["zsh", "-f", "-c", ZSH_DRIVER, "zsh"]
    assert "run:generate a reply" in shell([*driver, "ru"], env)
    assert "smollm2:135m" in shell([*driver, "run", "sm"], env).split()
    assert "--ctx-size" in shell([*driver, "run", "m", "--c"], env).split()


@needs_llmapp_on_path
@pytest.mark.skipif(shutil.which("fish") is None, reason="fish is not installed")
def test_fish_script(env: dict[str, str], tmp_path: Path) -> None:
    script = tmp_path / "llmapp.fish"
    script.write_text(shell([*LLMAPP, "completion", "fish"], env))

    def complete(line: str) -> list[str]:
        out = shell(["fish", "-c", f"source {script}; complete -C '{line}'"], env)
        return [row.split("\t")[0] for row in out.splitlines()]

    assert "run" in complete("llmapp ru")
    assert "smollm2:135m" in complete("llmapp run sm")
    assert "--ctx-size" in complete("llmapp run smollm2:135m --ctx")
    assert complete("llmapp completion ") == ["bash", "fish", "zsh"]
