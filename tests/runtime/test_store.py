"""The model store: catalog validation, pulls through a local fake index, failures that leave
nothing behind, name resolution, listing and removal."""

from __future__ import annotations

import errno
import hashlib
import os
import zipfile
from pathlib import Path

import pytest

from llmapp.runtime.errors import ModelNotFoundError, StoreError
from llmapp.runtime.files import hub, store

PART1 = b"GGUF" + bytes(range(256)) * 40
PART2 = bytes(reversed(range(256))) * 33 + b"tail"
MODEL = PART1 + PART2
MODEL_SHA = hashlib.sha256(MODEL).hexdigest()
PACKAGES = ("llmapp-fake-part1==1.0", "llmapp-fake-part2==1.0")
MEMBERS = ("llmapp_fake_part1/data/part1.bin", "llmapp_fake_part2/data/part2.bin")


def make_wheel(directory: Path, spec: str, member: str, data: bytes) -> Path:
    """A minimal valid wheel holding `data` at `member` (pip checks the dist-info)."""
    dist, version = spec.split("==")
    module = dist.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    path = directory / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, data)
        zf.writestr(
            f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n"
        )
        wheel_meta = (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        zf.writestr(f"{info}/WHEEL", wheel_meta)
        zf.writestr(f"{info}/RECORD", "")
    return path


def catalog_toml(name: str = "tiny:1", sha256: str = MODEL_SHA, size: int = len(MODEL)) -> str:
    packages = ", ".join(f'"{p}"' for p in PACKAGES)
    members = ", ".join(f'"{m}"' for m in MEMBERS)
    return f"""
default = "{name}"

[models."{name}"]
file = "tiny.gguf"
size = {size}
sha256 = "{sha256}"
quant = "F32"
arch = "llama"
stop = ["<end>"]

[models."{name}".defaults]
temperature = 0.5

[[models."{name}".sources]]
kind = "pypi"
packages = [{packages}]
members = [{members}]
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty store with a user catalog naming the fake model, and pip pointed at local wheels."""
    home = tmp_path / "home"
    home.mkdir()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, PACKAGES[0], MEMBERS[0], PART1)
    make_wheel(wheels, PACKAGES[1], MEMBERS[1], PART2)
    (home / "models.toml").write_text(catalog_toml())
    monkeypatch.setenv(store.HOME_ENV, str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # hub entries' paths: not the real cache
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv(store.PIP_ARGS_ENV, f"--no-index --find-links {wheels}")
    return home


@pytest.fixture
def no_subprocess_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip the pip subprocess: hand out the prepared wheels directly (fast failure tests)."""

    def fake_download(spec: str, dest: Path) -> Path:
        dest.mkdir(parents=True)
        index = PACKAGES.index(spec)
        return make_wheel(dest, spec, MEMBERS[index], (PART1, PART2)[index])

    monkeypatch.setattr(store, "_pip_download", fake_download)


def store_files(home: Path) -> list[str]:
    """Everything in the models dir, hidden temp files and pull dirs included."""
    models = home / "models"
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


# --- catalog ----------------------------------------------------------------------------------


def test_shipped_catalog_names_the_three_real_models(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(store.HOME_ENV, "/nonexistent-llmapp-home")
    entries = store.catalog()
    assert list(entries)[:3] == ["smollm2:135m", "gemma3:270m", "qwen2.5-coder:0.5b"]
    for name in list(entries)[:3]:  # CI pulls these from the package index, as before
        assert [s.kind for s in entries[name].sources] == ["pypi"]
        assert entries[name].verify == "sha256"
    assert store.default_model_name() == "smollm2:135m"
    assert entries["qwen2.5-coder:0.5b"].size == 491400064
    assert len(entries["gemma3:270m"].sources[0].packages) == 4  # type: ignore[attr-defined]
    assert entries["gemma3:270m"].stop == ("<end_of_turn>",)
    assert store.shipped_catalog_path().is_file()


HUB_MODELS = [
    "llama3.2:1b",
    "llama3.2:3b",
    "qwen2.5:0.5b",
    "qwen2.5:1.5b",
    "qwen2.5:3b",
    "qwen2.5:7b",
    "qwen2.5-coder:1.5b",
    "qwen2.5-coder:3b",
    "qwen2.5-coder:7b",
    "gemma3:1b",
    "gemma3:4b",
    "smollm2:360m",
    "smollm2:1.7b",
    "phi3.5:3.8b",
    "phi4-mini:3.8b",
    "mistral:7b",
]


def test_shipped_catalog_entries_have_shape_and_are_unique(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(store.HOME_ENV, "/nonexistent-llmapp-home")
    entries = store.catalog()
    assert set(HUB_MODELS) <= set(entries)
    assert len({n.lower() for n in entries}) == len(entries)
    files = [e.file for e in entries.values() if e.file]
    assert len(set(files)) == len(files)
    hub_files = [(s.repo, s.file) for e in entries.values() for s in e.sources if s.kind == "hf"]
    assert len(set(hub_files)) == len(hub_files)
    for name in HUB_MODELS:
        entry = entries[name]
        # No hash could be checked from here: the hub's published one is used, never one made up.
        assert (entry.verify, entry.sha256, entry.size) == ("hub", "", 0), name
        assert 100e6 < entry.size_approx < 10e9, name
        assert entry.quant == "Q4_K_M" and entry.arch and entry.params and entry.description
        assert [s.kind for s in entry.sources] == ["hf"]
        source = entry.sources[0]
        assert isinstance(source, store.HfSource) and source.revision == "main"
        assert hub.quant_of(source.file) == "Q4_K_M" and source.file.endswith(".gguf")
        assert hub.pick_files(source.repo, [source.file], None) == [source.file]


def entry_table(**overrides: object) -> dict[str, object]:
    table: dict[str, object] = {
        "file": "m.gguf",
        "size": 10,
        "sha256": "a" * 64,
        "sources": [{"kind": "pypi", "packages": ["p==1"], "members": ["p/m.bin"]}],
    }
    table.update(overrides)
    return table


def test_valid_entry_parses() -> None:
    entry = store.parse_entry("x:1", entry_table(defaults={"top_k": 40}, eog_tokens=["<eot>"]))
    assert entry.file == "m.gguf" and entry.defaults.top_k == 40
    assert entry.eog_tokens == ("<eot>",)
    assert isinstance(entry.sources[0], store.PypiSource)


@pytest.mark.parametrize(
    "file", ["../m.gguf", "/etc/passwd", "a/b.gguf", "a\\b.gguf", "..", ".", "", ".hidden", "x..y"]
)
def test_file_names_that_could_escape_the_store_are_rejected(file: str) -> None:
    with pytest.raises(store.CatalogError, match="file name"):
        store.parse_entry("x:1", entry_table(file=file))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sha256": "abc"}, "sha256"),
        ({"sha256": "A" * 64}, "sha256"),
        ({"size": 0}, "size"),
        ({"size": -5}, "size"),
        ({"size": True}, "size"),
        ({"size": "10"}, "size"),
        ({"colour": "red"}, "unknown key"),
        ({"sources": []}, "source"),
        ({"sources": [{"kind": "ftp"}]}, "unknown source kind"),
        ({"sources": [{"kind": "pypi", "packages": ["p"], "members": ["m"]}]}, "pinned"),
        ({"sources": [{"kind": "pypi", "packages": ["--pre==1"], "members": ["m"]}]}, "pin"),
        ({"sources": [{"kind": "pypi", "packages": ["p==1"], "members": ["../m"]}]}, "member"),
        ({"sources": [{"kind": "pypi", "packages": ["p==1", "q==1"], "members": ["m"]}]}, "many"),
        ({"sources": [{"kind": "hf", "repo": "../x", "file": "m.gguf"}]}, "repository"),
        ({"sources": [{"kind": "hf", "repo": "u/r", "file": "../m.gguf"}]}, "hf source"),
        ({"sources": [{"kind": "hf", "repo": "u/r", "file": "m.bin"}]}, "not a .gguf"),
        ({"sources": [{"kind": "hf", "repo": "u/r", "file": "m.gguf", "rev": "x"}]}, "unknown"),
        ({"sources": [{"kind": "hf", "repo": "u/r", "file": "m.gguf", "revision": "../x"}]}, "rev"),
        ({"sources": [{"kind": "hf", "repo": "u/r", "file": "m-00001-of-00002.gguf"}]}, "split"),
        ({"sources": [{"kind": "url", "url": "file:///etc/passwd"}]}, "url source"),
        ({"sources": [{"kind": "url", "url": "https://h/m.gguf", "sha": "x"}]}, "unknown key"),
        ({"verify": "md5"}, "verify must be"),
        ({"verify": "hub", "size": 0, "sha256": "", "size_approx": 5}, "hf sources only"),
        ({"defaults": {"temperature": -1.0}}, "temperature"),
        ({"defaults": {"seed": 1}}, "unknown key"),
        ({"stop": [1, 2]}, "stop"),
    ],
)
def test_malformed_entries_are_rejected(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(store.CatalogError, match=message):
        store.parse_entry("x:1", entry_table(**overrides))


HF = {"kind": "hf", "repo": "u/r", "file": "m-Q4_K_M.gguf"}


def test_hub_and_url_sources_parse() -> None:
    entry = store.parse_entry(
        "x:1", entry_table(sources=[HF, {"kind": "url", "url": "https://h/m.gguf"}])
    )
    assert [s.describe() for s in entry.sources] == ["hf.co/u/r/m-Q4_K_M.gguf", "https://h/m.gguf"]
    hub_only = {"verify": "hub", "size_approx": 5, "sources": [HF], "file": ""}
    entry = store.parse_entry("x:1", entry_table(**hub_only, size=0, sha256=""))
    assert entry.verify == "hub" and entry.file == "" and entry.display_size == 5
    split = {**HF, "file": "m-00001-of-00002.gguf", "revision": "v1"}
    entry = store.parse_entry(
        "x:1", entry_table(**{**hub_only, "sources": [split]}, size=0, sha256="")
    )
    assert entry.sources[0].describe() == "hf.co/u/r/m-00001-of-00002.gguf@v1"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"size": 0, "sha256": "a" * 64}, "drop them"),
        ({"size": 10, "sha256": ""}, "drop them"),
        ({"size": 0, "sha256": "", "size_approx": 0}, "size_approx"),
        ({"size": 0, "sha256": "", "size_approx": True}, "size_approx"),
    ],
)
def test_hub_verified_entries_carry_no_hash_of_their_own(
    overrides: dict[str, object], message: str
) -> None:
    table = entry_table(verify="hub", size_approx=5, sources=[HF], file="")
    table.update(overrides)
    with pytest.raises(store.CatalogError, match=message):
        store.parse_entry("x:1", table)


def test_bad_model_name_is_rejected() -> None:
    with pytest.raises(store.CatalogError, match="model name"):
        store.parse_entry("a/b", entry_table())


def test_user_catalog_overrides_and_extends(home: Path) -> None:
    (home / "models.toml").write_text(
        catalog_toml()
        + '\n[models."smollm2:135m"]\nfile = "mine.gguf"\nsize = 3\nsha256 = "'
        + "b" * 64
        + '"\n[[models."smollm2:135m".sources]]\nkind = "pypi"\npackages = ["a==1"]\n'
        + 'members = ["a/b"]\n'
    )
    entries = store.catalog()
    assert entries["smollm2:135m"].file == "mine.gguf"
    assert "gemma3:270m" in entries and "tiny:1" in entries
    assert store.default_model_name() == "tiny:1"
    assert entries["tiny:1"].defaults.temperature == 0.5


def test_broken_user_catalog_names_the_file(home: Path) -> None:
    (home / "models.toml").write_text("[models\n")
    with pytest.raises(store.CatalogError, match="models.toml: not valid TOML"):
        store.catalog()
    (home / "models.toml").write_text(catalog_toml().replace("tiny.gguf", "../tiny.gguf"))
    with pytest.raises(store.CatalogError, match=r"models.toml: model 'tiny:1': file name"):
        store.catalog()


def test_store_home_from_env_or_platformdirs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(store.HOME_ENV, "/some/where")
    assert store.store_home() == Path("/some/where")
    assert store.models_dir() == Path("/some/where/models")
    monkeypatch.delenv(store.HOME_ENV)
    assert store.store_home().name == "llmapp"


# --- pull -------------------------------------------------------------------------------------


def test_pull_two_parts_through_pip_verifies_and_places_atomically(home: Path) -> None:
    seen: list[tuple[str, int, int]] = []
    path = store.pull("tiny:1", progress=lambda *a: seen.append(a))
    assert path == home / "models" / "tiny.gguf"
    assert path.read_bytes() == MODEL
    assert path.stat().st_mode & 0o777 == 0o644
    assert store_files(home) == ["tiny.gguf", "tiny.gguf.sha256"]
    assert (home / "models" / "tiny.gguf.sha256").read_text().split()[0] == MODEL_SHA
    assert seen[-1][1:] == (len(MODEL), len(MODEL))
    assert any("downloading llmapp-fake-part2==1.0 (2/2)" in s for s, _, _ in seen)
    info = store.list_models()[0]
    assert (info.name, info.pulled, info.verified, info.size) == ("tiny:1", True, True, len(MODEL))


def test_pull_of_a_present_model_returns_at_once(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.pull("tiny:1")

    def no_download(spec: str, dest: Path) -> Path:
        raise AssertionError("downloaded again")

    monkeypatch.setattr(store, "_pip_download", no_download)
    assert store.pull("tiny:1").read_bytes() == MODEL
    assert store.resolve_model("tiny:1") == home / "models" / "tiny.gguf"


def test_hash_mismatch_keeps_nothing(home: Path) -> None:
    (home / "models.toml").write_text(catalog_toml(sha256="0" * 64))
    with pytest.raises(StoreError, match="sha256 mismatch"):
        store.pull("tiny:1")
    assert store_files(home) == []


def test_pip_failure_is_one_clear_line(home: Path) -> None:
    (home / "models.toml").write_text(catalog_toml().replace("part2==1.0", "part2==9.9"))
    with pytest.raises(StoreError, match=r"pip could not download llmapp-fake-part2==9.9: ERROR"):
        store.pull("tiny:1")
    assert store_files(home) == []


def test_wrong_size_keeps_nothing(home: Path, no_subprocess_pip: None) -> None:
    (home / "models.toml").write_text(catalog_toml(size=len(MODEL) + 1))
    with pytest.raises(StoreError, match=f"gave {len(MODEL)} bytes, expected {len(MODEL) + 1}"):
        store.pull("tiny:1")
    (home / "models.toml").write_text(catalog_toml(size=len(PART1)))
    with pytest.raises(StoreError, match="more than the expected"):
        store.pull("tiny:1")
    assert store_files(home) == []


def test_missing_member_keeps_nothing(home: Path, no_subprocess_pip: None) -> None:
    (home / "models.toml").write_text(catalog_toml().replace("data/part2.bin", "data/nope.bin"))
    with pytest.raises(StoreError, match="has no member llmapp_fake_part2/data/nope.bin"):
        store.pull("tiny:1")
    assert store_files(home) == []


def test_interrupted_pull_keeps_nothing(
    home: Path, no_subprocess_pip: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_copy = store._copy_wheel_member

    def copy_then_interrupt(wheel: Path, member: str, sink: store.Sink) -> None:
        if member == MEMBERS[1]:
            sink.write(PART2[:100])
            raise KeyboardInterrupt
        real_copy(wheel, member, sink)

    monkeypatch.setattr(store, "_copy_wheel_member", copy_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        store.pull("tiny:1")
    assert store_files(home) == []


def test_disk_full_says_so_and_keeps_nothing(
    home: Path, no_subprocess_pip: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(self: object, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store._HashingWriter, "write", full)
    with pytest.raises(
        store.DiskFullError, match="disk full: no space left in .* nothing was kept"
    ):
        store.pull("tiny:1")
    assert store_files(home) == []


def test_corrupt_present_file_without_record_is_pulled_again(
    home: Path, no_subprocess_pip: None
) -> None:
    models = home / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(b"x" * len(MODEL))  # right size, wrong bytes
    assert store.resolve_model("tiny:1").read_bytes() == MODEL


def test_pull_never_writes_through_a_symlink(
    home: Path, tmp_path: Path, no_subprocess_pip: None
) -> None:
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"y" * len(MODEL))
    (home / "models").mkdir()
    (home / "models" / "tiny.gguf").symlink_to(outside)
    path = store.pull("tiny:1")
    assert not path.is_symlink() and path.read_bytes() == MODEL
    assert outside.read_bytes() == b"y" * len(MODEL)


# --- names, list, rm --------------------------------------------------------------------------


def test_unknown_name_suggests_close_matches(home: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="did you mean smollm2:135m"):
        store.resolve_model("smollm2")
    with pytest.raises(ModelNotFoundError, match="did you mean qwen2.5-coder:0.5b"):
        store.resolve_model("qwen2.5-codr:0.5b")
    with pytest.raises(ModelNotFoundError, match="known models: smollm2:135m"):
        store.get_entry("zzzzzz")


def test_resolve_model_paths_and_names(home: Path, tmp_path: Path, no_subprocess_pip: None) -> None:
    file = tmp_path / "local.gguf"
    file.write_bytes(b"GGUF")
    assert store.resolve_model(str(file)) == file
    with pytest.raises(ModelNotFoundError, match="is a directory"):
        store.resolve_model(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="not pulled; run: llmapp pull tiny:1"):
        store.resolve_model("tiny:1", pull=False)
    assert store.resolve_model("tiny:1").read_bytes() == MODEL  # pulled on first use
    assert store.entry_for_path(home / "models" / "tiny.gguf") == store.get_entry("tiny:1")


def test_list_and_rm(home: Path, no_subprocess_pip: None) -> None:
    assert store.list_models() == []
    names = [m.name for m in store.list_models(include_all=True)]
    assert names[0] == "smollm2:135m" and "tiny:1" in names
    path = store.pull("tiny:1")
    assert [m.name for m in store.list_models()] == ["tiny:1"]
    assert store.list_models()[0].to_json() == {
        "name": "tiny:1",
        "path": str(path),
        "size": len(MODEL),
        "quant": "F32",
        "pulled": True,
    }
    assert store.remove("tiny:1") == path
    assert store_files(home) == []
    with pytest.raises(StoreError, match="tiny:1 is not pulled"):
        store.remove("tiny:1")
    with pytest.raises(ModelNotFoundError):
        store.remove("nope:1")


# --- the real thing ---------------------------------------------------------------------------


@pytest.mark.real_model
def test_real_pull_of_smollm2_from_the_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(store.HOME_ENV, str(tmp_path))
    monkeypatch.delenv(store.PIP_ARGS_ENV, raising=False)
    try:
        path = store.pull("smollm2:135m")
    except StoreError as exc:
        if "pip could not download" in str(exc):
            pytest.skip(f"package index not reachable: {exc}")
        raise
    entry = store.get_entry("smollm2:135m")
    assert path.stat().st_size == entry.size
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == entry.sha256
    assert store_files(tmp_path) == [entry.file, entry.file + ".sha256"]
