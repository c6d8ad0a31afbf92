"""HTTP transfers against a loopback server: resume after a dropped connection, a stall, Ctrl-C,
a killed process and a full disk; parallel ranged parts; URL pulls and their names."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest
from hub_fake import FakeHub, Homes, isolate, make_gguf, sha256, tree

from llmapp.runtime.errors import StoreError
from llmapp.runtime.files import download as dl
from llmapp.runtime.files import store

FILE = "Tiny-Q4_K_M.gguf"
ONE_PART = dl.TransferOptions(stall_timeout=0.3, retry_wait=0.01, parts=1)
FOUR_PARTS = dl.TransferOptions(stall_timeout=0.3, retry_wait=0.01, parts=4, min_part_bytes=1 << 19)


@cache
def data() -> bytes:
    """A valid GGUF of about 4 MB."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return make_gguf(Path(tmp) / "m.gguf", n_vocab=4096, n_embd=256, seed=7)


@pytest.fixture
def fake() -> Iterator[FakeHub]:
    with FakeHub() as server:
        server.files[FILE] = data()
        yield server


@pytest.fixture
def homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: FakeHub) -> Homes:
    return isolate(monkeypatch, tmp_path, fake.endpoint)


def models(homes: Homes) -> list[str]:
    return tree(homes.store / "models")


def pull(fake: FakeHub, options: dl.TransferOptions = ONE_PART, **kw: object) -> store.Pulled:
    kw.setdefault("sha256", sha256(data()))
    return store.pull_model(fake.url(FILE), options=options, **kw)  # type: ignore[arg-type]


def assert_placed(homes: Homes, got: store.Pulled) -> None:
    path = homes.store / "models" / FILE
    assert got.paths == (path,) and path.read_bytes() == data()
    assert models(homes) == [FILE, FILE + ".sha256"]  # no partial, no state, no lock left over


# --- resuming -------------------------------------------------------------------------------


def test_dropped_connection_resumes_with_a_range(homes: Homes, fake: FakeHub) -> None:
    size = len(data())
    fake.drops = [1_000_000]
    got = pull(fake)
    assert fake.ranges_asked() == [f"bytes=0-{size - 1}", f"bytes=1000000-{size - 1}"]
    assert fake.body_bytes == size  # nothing fetched twice
    assert_placed(homes, got)
    assert got.name == "Tiny-Q4_K_M" and got.checked == "sha256 verified"


def test_stall_times_out_and_retries(homes: Homes, fake: FakeHub) -> None:
    fake.stalls = [500_000]
    start = time.monotonic()
    assert_placed(homes, pull(fake))
    assert time.monotonic() - start < 5
    assert fake.ranges_asked()[1].startswith("bytes=500000-")


def test_endless_stall_gives_up_after_five_tries_and_keeps_the_partial(
    homes: Homes, fake: FakeHub
) -> None:
    fake.stalls = [300_000]  # some bytes, then silence on every attempt
    fake.stall_forever = True
    with pytest.raises(dl.TransferError, match=r"stalled .*5 tries in a row") as caught:
        pull(fake)
    assert "kept" in str(caught.value)
    assert len(fake.body_requests()) == 6  # the one that brought bytes, then five without
    assert models(homes) == [f".{FILE}.partial", f".{FILE}.partial.json"]
    fake.stall_forever = False
    assert_placed(homes, pull(fake))
    assert fake.ranges_asked()[-1].startswith("bytes=300000-")


def test_ctrl_c_keeps_the_partial_and_the_next_pull_continues(homes: Homes, fake: FakeHub) -> None:
    def interrupt(stage: str, done: int, total: int) -> None:
        if done > 1_500_000:
            raise KeyboardInterrupt

    with pytest.raises(dl.Interrupted) as caught:
        pull(fake, progress=interrupt)
    kept = caught.value.partial
    assert kept.name == f".{FILE}.partial" and kept.stat().st_size > 1_500_000
    got = pull(fake)
    first = int(fake.ranges_asked()[-1].removeprefix("bytes=").split("-")[0])
    assert first > 1_500_000
    assert_placed(homes, got)


def test_a_partial_of_another_version_is_not_resumed(homes: Homes, fake: FakeHub) -> None:
    def interrupt(stage: str, done: int, total: int) -> None:
        if done > 1_500_000:
            raise KeyboardInterrupt

    with pytest.raises(dl.Interrupted):
        pull(fake, sha256=None, progress=interrupt)
    newer = bytes(reversed(data()))  # same size, other bytes, other ETag
    fake.files[FILE] = newer
    got = pull(fake, sha256=None, force=True)
    assert fake.ranges_asked()[-1].startswith("bytes=0-")
    assert got.paths[0].read_bytes() == newer


def test_unwritable_cache_is_one_clear_error(
    homes: Homes, fake: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    monkeypatch.setenv("LLMAPP_HOME", str(not_a_dir / "store"))
    with pytest.raises(StoreError, match="cannot create the store directory .*: Not a directory"):
        pull(fake)


def test_killed_pull_resumes_on_the_next_run(homes: Homes, fake: FakeHub) -> None:
    fake.bytes_per_s = 2e6  # about two seconds for the file
    code = "import sys; from llmapp.app.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", code, "pull", "--quiet", fake.url(FILE)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    partial = homes.store / "models" / f".{FILE}.partial"
    deadline = time.monotonic() + 60
    try:
        while not (partial.exists() and partial.stat().st_size > 600_000):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the pull never got going"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait(10)
    fake.bytes_per_s = None
    got = pull(fake, sha256=None)
    first = int(fake.ranges_asked()[-1].removeprefix("bytes=").split("-")[0])
    assert first >= 600_000
    assert fake.body_bytes < 2 * len(data())
    assert_placed(homes, got)


# --- parallel parts -------------------------------------------------------------------------


def test_large_file_comes_in_parallel_ranged_parts(homes: Homes, fake: FakeHub) -> None:
    size = len(data())
    fake.drops = [100_000]  # one of the parts loses its connection once
    seen: list[tuple[str, int, int]] = []
    got = pull(fake, FOUR_PARTS, progress=lambda *a: seen.append(a))
    asked = fake.ranges_asked()
    starts = sorted(int(r.removeprefix("bytes=").split("-")[0]) for r in asked)
    step = -(-size // 4)
    assert len(asked) == 5 and {0, step, 2 * step, 3 * step} <= set(starts)
    assert fake.body_bytes == size
    assert_placed(homes, got)
    downloading = [done for stage, done, _ in seen if stage.startswith("downloading")]
    assert downloading == sorted(downloading) and downloading[-1] == size
    assert seen[-1] == (f"verifying {FILE}", size, size)


def test_server_without_ranges_restarts_from_the_start(homes: Homes, fake: FakeHub) -> None:
    fake.ranges = False
    fake.drops = [700_000]
    assert_placed(homes, pull(fake, FOUR_PARTS))
    assert fake.body_bytes == 700_000 + len(data())


# --- the disk -------------------------------------------------------------------------------


@pytest.fixture(params=["tmpfs", "simulated"])
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path | None]:
    """A real 1 MB tmpfs (needs root), or None: a write that fails with ENOSPC instead (also
    where mounting is refused)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if request.param == "simulated":
        yield None
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        yield None
        return
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_full_disk_fails_cleanly_and_resumes_after(
    homes: Homes,
    fake: FakeHub,
    small_disk: Path | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if small_disk is not None:
        monkeypatch.setenv("LLMAPP_HOME", str(small_disk))
        store_dir = small_disk / "models"
        # The free-space check comes first and refuses without fetching a byte ...
        with pytest.raises(dl.DiskFullError, match="not enough disk space"):
            pull(fake)
        assert fake.body_requests() == []
        # ... so let the disk fill up mid-way instead (as when something else writes to it).
        monkeypatch.setattr(dl, "free_bytes", lambda directory: None)
    else:
        store_dir = homes.store / "models"
        real_pwrite = os.pwrite

        def pwrite(fd: int, chunk: bytes, offset: int) -> int:
            if offset + len(chunk) > 900_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_pwrite(fd, chunk, offset)

        monkeypatch.setattr(os, "pwrite", pwrite)
    with pytest.raises(dl.DiskFullError) as caught:
        pull(fake)
    message = str(caught.value)
    assert (
        message.startswith("disk full: no space left in") and "partial download is kept" in message
    )
    partial = store_dir / f".{FILE}.partial"
    kept = partial.stat().st_size
    assert kept > 0 and not (store_dir / FILE).exists()
    if small_disk is not None:
        subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    else:
        monkeypatch.undo()
        isolate(monkeypatch, homes.store.parent, fake.endpoint)
    got = pull(fake)
    assert int(fake.ranges_asked()[-1].removeprefix("bytes=").split("-")[0]) > 0
    assert got.paths[0].read_bytes() == data()


# --- URL pulls ------------------------------------------------------------------------------


def test_url_pull_names_and_records(homes: Homes, fake: FakeHub) -> None:
    got = pull(fake, sha256=None)
    assert got.name == "Tiny-Q4_K_M" and "none was given" in got.checked
    sidecar = homes.store / "models" / (FILE + ".sha256")
    assert sidecar.read_text().split()[0] == sha256(data())
    assert not pull(fake).fresh  # already there
    assert store.resolve_model("Tiny-Q4_K_M") == got.paths[0]
    assert store.resolve_model(fake.url(FILE), pull=False) == got.paths[0]
    listed = {m.name: m for m in store.list_models()}
    assert listed["Tiny-Q4_K_M"].quant == "Q4_K_M" and listed["Tiny-Q4_K_M"].source == fake.url(
        FILE
    )
    with pytest.raises(StoreError, match="already names the model pulled from"):
        store.pull_model(fake.url(FILE) + "?mirror=2", options=ONE_PART)
    again = pull(fake, as_name="tiny-again")  # a second name for the same file shares it
    assert again.name == "tiny-again" and again.paths == got.paths
    store.remove("Tiny-Q4_K_M")
    assert got.paths[0].is_file()
    store.remove("tiny-again")
    assert models(homes) == []


def test_wrong_sha256_for_a_url_keeps_nothing(homes: Homes, fake: FakeHub) -> None:
    with pytest.raises(dl.ChecksumError) as caught:
        pull(fake, sha256="ab" * 32)
    assert f"expected {'ab' * 32}, arrived {sha256(data())}" in str(caught.value)
    assert models(homes) == []
    assert store.list_models() == []


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("{cdn}/files/%2E%2E%2Fescape.gguf", {}, "plain name"),
        ("{cdn}/files/.hidden.gguf", {}, "must not start with '.'"),
        ("{cdn}/files/model.bin", {}, "does not name a .gguf"),
        ("file:///etc/passwd.gguf", {}, "not an http"),
        ("http://user:pw@127.0.0.1/x.gguf", {}, "credentials"),
        ("{cdn}/files/" + FILE, {"as_name": "../x"}, "not a model name"),
        ("{cdn}/files/" + FILE, {"as_name": "a/b"}, "not a model name"),
        ("{cdn}/files/" + FILE, {"as_name": "smollm2:135m"}, "is a catalog model"),
        ("{cdn}/files/SmolLM2-135M-Instruct.Q4_1.gguf", {"as_name": "x"}, "catalog model"),
        ("{cdn}/files/" + FILE, {"sha256": "xyz"}, "64 hex digits"),
        ("{cdn}/files/" + FILE, {"revision": "main"}, "--revision is for hf.co"),
    ],
)
def test_unsafe_or_conflicting_url_pulls_are_refused(
    homes: Homes, fake: FakeHub, url: str, options: dict[str, str], message: str
) -> None:
    with pytest.raises(StoreError, match=message):
        store.pull_model(url.format(cdn=fake.cdn), options=ONE_PART, **options)  # type: ignore[arg-type]
    assert fake.requests == [] and not (homes.store / "models" / "escape.gguf").exists()


def test_split_url_pull_fetches_every_shard(homes: Homes, fake: FakeHub) -> None:
    half = len(data()) // 2
    fake.files["S-00001-of-00002.gguf"] = data()[:half]
    fake.files["S-00002-of-00002.gguf"] = data()[half:]
    got = store.pull_model(fake.url("S-00001-of-00002.gguf"), options=ONE_PART)
    assert got.name == "S" and [p.name for p in got.paths] == list(fake.files)[1:]
    assert store.model_files("S") == list(got.paths)
    with pytest.raises(StoreError, match="checks one file"):
        store.pull_model(fake.url("S-00002-of-00002.gguf"), sha256="a" * 64, as_name="T")


def test_missing_url_is_one_clear_error(homes: Homes, fake: FakeHub) -> None:
    with pytest.raises(dl.HttpError, match="HTTP 404"):
        store.pull_model(fake.url("nope.gguf"), options=ONE_PART)
