"""Hub pulls against an imitation hub on loopback: references and quant tags, the shared cache
layout, auth and its error messages, offline use of the cache, checksums, and hub sources in
the catalog."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from hub_fake import ACCEPTED_TOKEN, GOOD_TOKEN, FakeHub, Homes, isolate, make_gguf, sha256, tree

from llmapp.runtime.errors import ModelNotFoundError, StoreError
from llmapp.runtime.files import download as dl
from llmapp.runtime.files import hub, store

REPO = "someone/Tiny-GGUF"
Q4 = "Tiny-Q4_K_M.gguf"
Q8 = "Tiny-Q8_0.gguf"


@cache
def model_bytes(seed: int = 0, n_vocab: int = 512) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return make_gguf(Path(tmp) / "m.gguf", n_vocab=n_vocab, seed=seed)


@pytest.fixture
def fake() -> Iterator[FakeHub]:
    with FakeHub() as server:
        server.add_repo(
            REPO, {Q4: model_bytes(0), Q8: model_bytes(1), "mmproj-Tiny-F16.gguf": b"x"}
        )
        yield server


@pytest.fixture
def homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: FakeHub) -> Homes:
    return isolate(monkeypatch, tmp_path, fake.endpoint)


def repo_cache(homes: Homes, repo: str = REPO) -> Path:
    return homes.cache / ("models--" + repo.replace("/", "--"))


# --- references and picking files --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name", "file", "tag"),
    [
        ("hf.co/u/r", "hf.co/u/r", None, None),
        ("hf.co/u/r:q4_k_m", "hf.co/u/r:Q4_K_M", None, "Q4_K_M"),
        ("huggingface.co/u/r:IQ4_XS", "hf.co/u/r:IQ4_XS", None, "IQ4_XS"),
        ("HF.CO/u/r/m-Q8_0.gguf", "hf.co/u/r/m-Q8_0.gguf", "m-Q8_0.gguf", None),
        ("hf.co/u/r/sub/m.gguf", "hf.co/u/r/sub/m.gguf", "sub/m.gguf", None),
    ],
)
def test_references_parse_to_one_canonical_name(
    text: str, name: str, file: str | None, tag: str | None
) -> None:
    ref = hub.parse_ref(text)
    assert (ref.name, ref.file, ref.tag, ref.revision) == (name, file, tag, "main")


@pytest.mark.parametrize(
    "text",
    [
        "hf.co/../r",
        "hf.co/u/..",
        "hf.co/u/r/../../etc/passwd.gguf",
        "hf.co/u/r/sub/../x.gguf",
        "hf.co/u/r/.hidden.gguf",
        "hf.co/u/r//x.gguf",
        "hf.co/u--x/r",
        "hf.co/u/r:../x",
        "hf.co/u/r:a/b",
        "hf.co/u",
        "hf.co/u/r/x.bin",
        "hf.co/u/r/x\\y.gguf",
    ],
)
def test_unsafe_references_are_refused(text: str) -> None:
    with pytest.raises(StoreError):
        hub.parse_ref(text)


@pytest.mark.parametrize("revision", ["../main", "/abs", "a//b", "a\\b", ""])
def test_unsafe_revisions_are_refused(revision: str) -> None:
    with pytest.raises(StoreError, match="revision"):
        hub.HubRef("u/r", revision=revision)


FILES = [
    "m-Q4_K.gguf",
    "m-Q4_K_M.gguf",
    "m.Q8_0.gguf",
    "m-f16-00001-of-00002.gguf",
    "m-f16-00002-of-00002.gguf",
    "mmproj-m-f16.gguf",
    "README.md",
]


@pytest.mark.parametrize(
    ("tag", "picked"),
    [
        ("Q4_K", ["m-Q4_K.gguf"]),  # a whole part: not the Q4_K_M file
        ("q4_k_m", ["m-Q4_K_M.gguf"]),
        ("Q8_0", ["m.Q8_0.gguf"]),
        ("F16", ["m-f16-00001-of-00002.gguf", "m-f16-00002-of-00002.gguf"]),  # not the mmproj
        (None, ["m-Q4_K_M.gguf"]),
    ],
)
def test_a_tag_picks_the_file_that_carries_it(tag: str | None, picked: list[str]) -> None:
    assert hub.pick_files("u/r", FILES, tag) == picked


def test_missing_or_ambiguous_tags_list_the_quants() -> None:
    with pytest.raises(StoreError, match=r"no \.gguf file matches Q5_K_M; quants there: F16, Q4_K"):
        hub.pick_files("u/r", FILES, "Q5_K_M")
    with pytest.raises(StoreError, match="more than one .gguf file matches Q8_0"):
        hub.pick_files("u/r", ["a-Q8_0.gguf", "b-Q8_0.gguf"], "Q8_0")
    assert hub.pick_files("u/r", ["only-one.gguf", "x.txt"], None) == ["only-one.gguf"]
    with pytest.raises(StoreError, match="no .gguf file matches Q4_K_M; quants there: Q6_K, Q8_0"):
        hub.pick_files("u/r", ["a-Q8_0.gguf", "a-Q6_K.gguf"], None)
    with pytest.raises(StoreError, match="incomplete"):
        hub.pick_files("u/r", ["m-00001-of-00003.gguf", "m-00003-of-00003.gguf"], None)
    with pytest.raises(StoreError, match="has no .gguf files"):
        hub.pick_files("u/r", ["README.md"], None)


def test_shard_names() -> None:
    assert hub.shard_names("a/m-00002-of-00003.gguf") == [
        "a/m-00001-of-00003.gguf",
        "a/m-00002-of-00003.gguf",
        "a/m-00003-of-00003.gguf",
    ]
    assert hub.shard_names("m.gguf") == ["m.gguf"]
    with pytest.raises(StoreError):
        hub.shard_names("m-00004-of-00003.gguf")


def test_environment_is_read_at_each_call(
    homes: Homes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    env = hub.hub_env()
    assert (env.cache, env.token, env.offline) == (homes.cache, None, False)
    (homes.hf_home / "token").parent.mkdir(parents=True)
    (homes.hf_home / "token").write_text("hf_from_file\n")
    assert hub.hub_env().token == "hf_from_file"
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env = hub.hub_env()
    assert (env.token, env.cache, env.offline) == ("hf_from_env", tmp_path / "elsewhere", True)
    monkeypatch.setenv("HF_ENDPOINT", "file:///etc")
    with pytest.raises(StoreError, match="not an http"):
        hub.hub_env()


# --- pulling into the cache ------------------------------------------------------------------


def test_pull_by_tag_lands_once_in_the_hub_cache_layout(homes: Homes, fake: FakeHub) -> None:
    got = store.pull_model(f"hf.co/{REPO}:q4_k_m")
    data = model_bytes(0)
    digest, commit = sha256(data), fake.repos[REPO].commit
    rc = repo_cache(homes)
    pointer = rc / "snapshots" / commit / Q4
    assert got.name == f"hf.co/{REPO}:Q4_K_M" and got.paths == (pointer,)
    assert pointer.is_symlink() and os.readlink(pointer) == f"../../blobs/{digest}"
    assert (rc / "blobs" / digest).read_bytes() == data
    assert (rc / "refs" / "main").read_text() == commit
    assert tree(rc) == [f"blobs/{digest}", "refs/main", f"snapshots/{commit}/{Q4}"]
    assert not (homes.store / "models").exists()  # no second copy in the store
    # The name works everywhere, in either case, without another request.
    before = len(fake.requests)
    assert store.resolve_model(f"hf.co/{REPO}:Q4_K_M") == pointer
    assert store.resolve_model(f"hf.co/{REPO}:q4_k_m", pull=False) == pointer
    assert store.resolve_model(f"hf.co/{REPO}") == pointer  # no tag: the default quant
    assert not store.pull_model(f"hf.co/{REPO}:Q4_K_M").fresh
    assert len(fake.requests) == before
    info = [m for m in store.list_models() if m.name.startswith("hf.co/")]
    assert [(m.name, m.size, m.quant, m.verified) for m in info] == [
        (f"hf.co/{REPO}:Q4_K_M", len(data), "Q4_K_M", True)
    ]


def test_pull_of_an_exact_file_and_rm(homes: Homes, fake: FakeHub) -> None:
    got = store.pull_model(f"hf.co/{REPO}/{Q8}")
    assert got.name == f"hf.co/{REPO}/{Q8}" and got.paths[0].read_bytes() == model_bytes(1)
    blob = got.paths[0].resolve()
    assert store.remove(f"hf.co/{REPO}/{Q8}") == got.paths[0]
    assert not blob.exists() and not got.paths[0].is_symlink()
    with pytest.raises(ModelNotFoundError, match="not pulled; run: llmapp pull"):
        store.resolve_model(f"hf.co/{REPO}/{Q8}", pull=False)


def test_split_model_is_fetched_and_listed_together(homes: Homes, fake: FakeHub) -> None:
    data = model_bytes(2, n_vocab=600)
    third = -(-len(data) // 3)
    shards = {
        f"Big-Q4_K_M-0000{i + 1}-of-00003.gguf": data[i * third : (i + 1) * third] for i in range(3)
    }
    fake.add_repo("someone/Big-GGUF", {**shards, "Big-Q8_0.gguf": b"q8"})
    got = store.pull_model("hf.co/someone/Big-GGUF:Q4_K_M")
    assert [p.name for p in got.paths] == list(shards)
    assert b"".join(p.read_bytes() for p in got.paths) == data
    assert got.size == len(data)
    assert store.model_files("hf.co/someone/Big-GGUF:Q4_K_M") == list(got.paths)
    assert store.resolve_model("hf.co/someone/Big-GGUF:Q4_K_M") == got.paths[0]
    assert store.model_files(str(got.paths[1])) == list(got.paths)  # a path to any shard
    # An exact shard name brings the whole split.
    store.remove("hf.co/someone/Big-GGUF:Q4_K_M")
    again = store.pull_model("hf.co/someone/Big-GGUF/Big-Q4_K_M-00002-of-00003.gguf")
    assert [p.name for p in again.paths] == list(shards)


def test_the_token_goes_to_the_hub_only(
    homes: Homes, fake: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.repos[REPO].private = True
    monkeypatch.setenv("HF_TOKEN", GOOD_TOKEN)
    store.pull_model(f"hf.co/{REPO}:Q4_K_M")
    hub_auth = {r.headers.get("authorization") for r in fake.requests if r.server == "hub"}
    assert hub_auth == {f"Bearer {GOOD_TOKEN}"}
    cdn = [r for r in fake.requests if r.server == "cdn"]
    assert cdn and all("authorization" not in r.headers for r in cdn)


def test_token_file_under_hf_home_is_used(homes: Homes, fake: FakeHub) -> None:
    fake.repos[REPO].private = True
    homes.hf_home.mkdir(parents=True, exist_ok=True)
    (homes.hf_home / "token").write_text(GOOD_TOKEN + "\n")
    assert store.pull_model(f"hf.co/{REPO}:Q8_0").paths[0].is_file()


@pytest.mark.parametrize(
    ("setup", "token", "message"),
    [
        (
            "private",
            None,
            "someone/Tiny-GGUF not found, or private: check the name, or set HF_TOKEN",
        ),
        ("private", "hf_wrong", "not found, or private"),
        ("missing", None, "someone/Nope not found, or private"),
        (
            "gated",
            None,
            "is gated: accept its license at {endpoint}/someone/Tiny-GGUF and set HF_TOKEN",
        ),
        ("gated", GOOD_TOKEN, "is gated: accept its license at {endpoint}/someone/Tiny-GGUF, then"),
    ],
)
def test_auth_failures_say_what_to_do(
    homes: Homes,
    fake: FakeHub,
    monkeypatch: pytest.MonkeyPatch,
    setup: str,
    token: str | None,
    message: str,
) -> None:
    if setup in ("private", "gated"):
        setattr(fake.repos[REPO], setup, True)
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    repo = "someone/Nope" if setup == "missing" else REPO
    for ref in (f"hf.co/{repo}:Q4_K_M", f"hf.co/{repo}/{Q4}"):  # model-info API, resolve
        with pytest.raises(StoreError) as caught:
            store.pull_model(ref)
        assert message.format(endpoint=fake.endpoint) in str(caught.value)
    assert tree(homes.cache / "models--someone--Tiny-GGUF" / "blobs") == []


def test_gated_repo_with_accepted_license_pulls(
    homes: Homes, fake: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.repos[REPO].gated = True
    monkeypatch.setenv("HF_TOKEN", ACCEPTED_TOKEN)
    assert store.pull_model(f"hf.co/{REPO}:Q4_K_M").fresh


def test_missing_file_and_revision_are_named(homes: Homes, fake: FakeHub) -> None:
    with pytest.raises(StoreError, match=f"Nope-Q4_K_M.gguf not found in {REPO}"):
        store.pull_model(f"hf.co/{REPO}/Nope-Q4_K_M.gguf")
    with pytest.raises(StoreError, match=f"revision 'v9' not found in {REPO}"):
        store.pull_model(f"hf.co/{REPO}:Q4_K_M", revision="v9")
    with pytest.raises(StoreError, match="quants there: Q4_K_M, Q8_0"):
        store.pull_model(f"hf.co/{REPO}:Q2_K")


def test_revision_pins_a_commit_and_is_recorded(homes: Homes, fake: FakeHub) -> None:
    commit = fake.repos[REPO].commit
    got = store.pull_model(f"hf.co/{REPO}:Q4_K_M", revision=commit)
    assert got.paths[0].parent.name == commit
    assert not (repo_cache(homes) / "refs").exists()  # a commit needs no ref
    fake.repos[REPO].revisions["v1"] = commit
    store.pull_model(f"hf.co/{REPO}:Q4_K_M", revision="v1")
    assert (repo_cache(homes) / "refs" / "v1").read_text() == commit


# --- what arrives is what was promised ---------------------------------------------------------


def test_wrong_hash_leaves_nothing_that_looks_complete(homes: Homes, fake: FakeHub) -> None:
    claimed = "0" * 64
    fake.repos[REPO].etag_override[Q4] = f'"{claimed}"'
    with pytest.raises(dl.ChecksumError) as caught:
        store.pull_model(f"hf.co/{REPO}:Q4_K_M")
    assert f"expected {claimed}, arrived {sha256(model_bytes(0))}" in str(caught.value)
    left = tree(homes.cache) + tree(homes.store)
    assert not [p for p in left if p.endswith(".gguf") or "/blobs/" in p and ".partial" not in p]
    assert not [p for p in left if "partial" in p]
    assert store.list_models() == [] or all(
        not m.name.startswith("hf.co") for m in store.list_models()
    )


@pytest.mark.parametrize("commit", ["../../../../tmp/x", "not-a-commit", "A" * 40])
def test_unsafe_commit_from_the_hub_is_refused(homes: Homes, fake: FakeHub, commit: str) -> None:
    fake.repos[REPO].commit_override = commit
    with pytest.raises(StoreError, match="no valid commit"):
        store.pull_model(f"hf.co/{REPO}/{Q4}")
    assert tree(homes.cache) == []


def test_unsafe_file_names_listed_by_the_hub_are_skipped(homes: Homes, fake: FakeHub) -> None:
    fake.add_repo(
        "evil/Repo", {"../../escape-Q4_K_M.gguf": b"evil", "ok-Q8_0.gguf": model_bytes(1)}
    )
    with pytest.raises(StoreError, match="quants there: Q8_0"):
        store.pull_model("hf.co/evil/Repo:Q4_K_M")
    assert store.pull_model("hf.co/evil/Repo").paths[0].name == "ok-Q8_0.gguf"
    assert not (homes.cache.parent / "escape-Q4_K_M.gguf").exists()


# --- the cache, shared and offline -------------------------------------------------------------


def test_offline_uses_the_cache_and_sends_nothing(
    homes: Homes, fake: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    first = store.pull_model(f"hf.co/{REPO}:Q4_K_M").paths[0]
    # Another llmapp store (or another tool) with the same HF cache, offline.
    monkeypatch.setenv("LLMAPP_HOME", str(tmp_path / "other-store"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = len(fake.requests)
    got = store.pull_model(f"hf.co/{REPO}:q4_k_m")
    assert got.paths == (first,) and got.name == f"hf.co/{REPO}:Q4_K_M"
    assert store.resolve_model(f"hf.co/{REPO}/{Q4}") == first
    assert len(fake.requests) == before
    with pytest.raises(StoreError, match="HF_HUB_OFFLINE is set and .* is not complete"):
        store.pull_model(f"hf.co/{REPO}:Q8_0")
    with pytest.raises(StoreError, match="quants there: Q4_K_M"):
        store.pull_model(f"hf.co/{REPO}:Q5_K_M")
    assert len(fake.requests) == before


def test_file_placed_by_another_tool_is_reused_offline(
    homes: Homes, fake: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The layout huggingface_hub writes, built by hand: no llmapp record, no request.
    data, commit = model_bytes(1), "c" * 40
    rc = repo_cache(homes)
    (rc / "blobs").mkdir(parents=True)
    (rc / "blobs" / sha256(data)).write_bytes(data)
    (rc / "snapshots" / commit).mkdir(parents=True)
    (rc / "snapshots" / commit / Q8).symlink_to(f"../../blobs/{sha256(data)}")
    (rc / "refs").mkdir()
    (rc / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    got = store.pull_model(f"hf.co/{REPO}:Q8_0")
    assert got.paths[0].read_bytes() == data and fake.requests == []
    (rc / "blobs" / sha256(data)).write_bytes(b"x" * len(data))  # damaged behind our back
    store.remove(f"hf.co/{REPO}:Q8_0")
    (rc / "snapshots" / commit / Q8).symlink_to(f"../../blobs/{sha256(data)}")
    (rc / "blobs" / sha256(data)).write_bytes(b"x" * len(data))
    with pytest.raises(dl.ChecksumError, match="is corrupt"):
        store.pull_model(f"hf.co/{REPO}:Q8_0")


def test_unwritable_hub_cache_is_one_clear_error(
    homes: Homes, fake: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "file" / "hub"))
    with pytest.raises(StoreError, match="pulling hf.co/.* failed: Not a directory"):
        store.pull_model(f"hf.co/{REPO}:Q4_K_M")


def test_unreachable_hub_falls_back_to_the_cache_with_a_warning(
    homes: Homes, fake: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    first = store.pull_model(f"hf.co/{REPO}:Q4_K_M").paths[0]
    monkeypatch.setenv("LLMAPP_HOME", str(tmp_path / "other-store"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    said: list[str] = []
    got = store.pull_model(f"hf.co/{REPO}:Q4_K_M", notify=said.append)
    assert got.paths == (first,)
    assert len(said) == 1 and "cannot reach http://127.0.0.1:9" in said[0]
    with pytest.raises(StoreError, match="cannot reach"):
        store.pull_model(f"hf.co/{REPO}:Q8_0", notify=said.append)


def test_two_pulls_at_once_download_once(homes: Homes, fake: FakeHub) -> None:
    fake.bytes_per_s = 4e6  # slow enough that the second pull starts while the first runs
    results: list[object] = []
    said: list[str] = []

    def pull() -> None:
        try:
            results.append(store.pull_model(f"hf.co/{REPO}/{Q4}", notify=said.append))
        except BaseException as exc:  # reported below
            results.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(isinstance(r, store.Pulled) for r in results), results
    assert len(fake.body_requests()) == 1
    assert fake.body_bytes == len(model_bytes(0))
    assert any("waiting for another download" in s for s in said)


# --- hub sources in the catalog ----------------------------------------------------------------


def hub_entry(name: str, extra: str = "", file: str = Q4) -> str:
    return f"""
[models."{name}"]
quant = "Q4_K_M"
{extra}

[[models."{name}".sources]]
kind = "hf"
repo = "{REPO}"
file = "{file}"
"""


def test_catalog_model_from_the_hub_verified_by_its_header(homes: Homes, fake: FakeHub) -> None:
    homes.store.mkdir(parents=True)
    (homes.store / "models.toml").write_text(
        hub_entry("tiny:hub", 'verify = "hub"\nsize_approx = 600000\narch = "llama"')
    )
    listed = {m.name: m for m in store.list_models(include_all=True)}
    assert listed["tiny:hub"].approx and listed["tiny:hub"].size == 600000
    assert not listed["tiny:hub"].pulled
    path = store.resolve_model("tiny:hub")  # pulled on first use
    assert path.read_bytes() == model_bytes(0) and path.is_relative_to(homes.cache)
    assert store.entry_for_path(path) == store.get_entry("tiny:hub")
    listed = {m.name: m for m in store.list_models()}
    assert listed["tiny:hub"].size == len(model_bytes(0)) and listed["tiny:hub"].verified
    assert store.verify("tiny:hub")
    assert store.remove("tiny:hub") == path and not path.exists()


def test_catalog_hash_must_agree_with_the_hub(homes: Homes, fake: FakeHub) -> None:
    data = model_bytes(0)
    homes.store.mkdir(parents=True)
    wrong = hub_entry("tiny:pinned", f'size = {len(data)}\nsha256 = "{"1" * 64}"')
    (homes.store / "models.toml").write_text(wrong)
    with pytest.raises(dl.ChecksumError, match="the catalog expects 1111"):
        store.pull("tiny:pinned")
    right = hub_entry("tiny:pinned", f'size = {len(data)}\nsha256 = "{sha256(data)}"')
    (homes.store / "models.toml").write_text(right)
    assert store.pull("tiny:pinned").read_bytes() == data


def test_two_names_for_one_file_share_it(homes: Homes, fake: FakeHub) -> None:
    homes.store.mkdir(parents=True)
    (homes.store / "models.toml").write_text(
        hub_entry("tiny:hub", 'verify = "hub"\nsize_approx = 1')
    )
    a = store.pull("tiny:hub")
    b = store.pull(f"hf.co/{REPO}:Q4_K_M")
    assert a == b
    store.remove(f"hf.co/{REPO}:Q4_K_M")
    assert a.is_file()  # still the catalog model's file
    store.remove("tiny:hub")
    assert not a.exists() and tree(repo_cache(homes) / "blobs") == []


def test_offline_catalog_model_is_still_checked_against_the_catalog(
    homes: Homes, fake: FakeHub, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.pull_model(f"hf.co/{REPO}:Q4_K_M")  # in the cache now
    homes.store.mkdir(parents=True, exist_ok=True)
    wrong = hub_entry("tiny:pinned", f'size = {len(model_bytes(0))}\nsha256 = "{"2" * 64}"')
    (homes.store / "models.toml").write_text(wrong)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(dl.ChecksumError, match="the cached file's sha256 is .* expects 2222"):
        store.pull("tiny:pinned")


def test_a_mirror_without_ranges_still_serves_large_files(homes: Homes, fake: FakeHub) -> None:
    fake.ranges = False
    options = dl.TransferOptions(parts=4, min_part_bytes=1 << 16, retry_wait=0.01)
    got = store.pull_model(f"hf.co/{REPO}:Q8_0", options=options)
    assert got.paths[0].read_bytes() == model_bytes(1)
    assert len(fake.body_requests()) == 1  # one whole-file request, not four parts


def test_a_split_model_pulled_from_the_hub_runs(
    homes: Homes, fake: FakeHub, tmp_path: Path
) -> None:
    from tiny_model import write_chat_model

    from llmapp.runtime import Engine, EngineOptions, RunnerOptions, SamplingParams

    first = write_chat_model(tmp_path / "Tiny-F32.gguf", split_max_tensors=8)
    files = {p.name: p.read_bytes() for p in sorted(tmp_path.glob("Tiny-F32-*-of-*.gguf"))}
    fake.add_repo("someone/Tiny-GGUF", files)
    name = "hf.co/someone/Tiny-GGUF:F32"
    pulled = store.resolve_model(name)
    assert pulled.name == first.name and len(store.model_files(name)) == len(files) > 1
    opts = EngineOptions(runner=RunnerOptions(ctx_size=256, n_threads=1))
    with Engine(name, opts) as engine:
        _, ids, last = engine.generate("hello", SamplingParams(temperature=0, max_tokens=4))
    assert len(ids) == 4 and last.finish_reason == "length"
