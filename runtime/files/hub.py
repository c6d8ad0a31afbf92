"""Hugging Face Hub pulls: references, the hub's environment variables, file lists and metadata
headers, and the hub's shared cache layout, so a file is downloaded once for every tool.

Cache layout (the one huggingface_hub reads and writes):

    $HF_HUB_CACHE/models--USER--REPO/
        blobs/<sha256>                      the bytes, named by their LFS sha256
        snapshots/<commit>/<file>           relative symlink to ../../blobs/<sha256>
        refs/<revision>                     the commit a branch or tag pointed at
    $HF_HUB_CACHE/.locks/models--USER--REPO/<sha256>.lock

huggingface_hub reads its environment once, when it is imported, keeps no partial download
across runs and does not check sha256, so the transfer is ours (runtime/files/download.py) and the
environment is read here on every call; the names of the headers are the library's.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from huggingface_hub import constants as hf_constants

from llmapp.runtime.errors import StoreError
from llmapp.runtime.files import download as dl

if TYPE_CHECKING:
    import httpx

NotifyFn = Callable[[str], None]

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_QUANT = "Q4_K_M"
DEFAULT_REVISION = "main"
REF_PREFIXES = ("hf.co/", "huggingface.co/")

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_REPO_PART_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_FILE_PART_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+ ()\[\]-]{0,254}$")
_REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,99}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_QUANT_RE = re.compile(
    r"(?:^|[-._])((?:UD-)?(?:I?Q[0-9](?:_[A-Z0-9]+)*|BF16|F16|F32|MXFP4(?:_MOE)?))(?=$|[-.])",
    re.IGNORECASE,
)
_MAX_JSON = 64 << 20

log = logging.getLogger("llmapp.store")


# ---------------------------------------------------------------------------------------------
# Environment


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


@dataclass(frozen=True)
class HubEnv:
    """The hub settings in force now (read from the environment at each call)."""

    endpoint: str
    token: str | None
    cache: Path
    offline: bool

    def auth(self) -> dl.Auth | None:
        return dl.Auth(self.token, dl.origin(self.endpoint)) if self.token else None


def _hf_home() -> Path:
    home = os.environ.get("HF_HOME")
    if home:
        return Path(os.path.expandvars(home)).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "huggingface"


def _token(home: Path) -> str | None:
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        value = os.environ.get(name, "").strip()
        if value:
            return value
    path = Path(os.environ.get("HF_TOKEN_PATH") or home / "token").expanduser()
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def cache_dir() -> Path:
    """$HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(os.path.expandvars(cache)).expanduser() if cache else _hf_home() / "hub"


def hub_env() -> HubEnv:
    """HF_ENDPOINT, HF_TOKEN (or the token file), HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE."""
    endpoint = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/") or DEFAULT_ENDPOINT
    dl.check_url(endpoint)
    offline = _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(
        os.environ.get("TRANSFORMERS_OFFLINE")
    )
    return HubEnv(
        endpoint=endpoint,
        token=_token(_hf_home()),
        cache=cache_dir(),
        offline=offline,
    )


# ---------------------------------------------------------------------------------------------
# Names: everything here ends up in a URL or a path, so everything is checked


def check_repo(repo: str) -> str:
    """USER/REPO with the hub's characters only (no '..', no '--', no empty part)."""
    parts = repo.split("/")
    if len(parts) != 2 or not all(_REPO_PART_RE.match(p) for p in parts):
        raise StoreError(f"{repo!r} is not a hub repository name (USER/REPO)")
    if ".." in repo or "--" in repo:
        raise StoreError(f"{repo!r}: '..' and '--' are not allowed in a repository name")
    return repo


def check_repo_file(name: str) -> str:
    """A file path inside a repo: relative, '/'-separated, no '..' or hidden parts."""
    parts = name.split("/")
    if not name or len(name) > 1000 or not all(_FILE_PART_RE.match(p) for p in parts):
        raise StoreError(f"{name!r} is not a safe file name inside a repository")
    if any(p in (".", "..") or ".." in p for p in parts):
        raise StoreError(f"{name!r}: '..' is not allowed in a file name")
    return name


def check_revision(revision: str) -> str:
    if not _REVISION_RE.match(revision) or ".." in revision or "//" in revision:
        raise StoreError(f"{revision!r} is not a revision name (branch, tag or commit)")
    return revision


def _check_commit(commit: Any, where: str) -> str:
    if not isinstance(commit, str) or not _COMMIT_RE.match(commit):
        raise StoreError(f"{where}: the hub gave no valid commit id ({str(commit)[:50]!r})")
    return commit


@dataclass(frozen=True)
class HubRef:
    """What to pull from a repo: one exact file, or the file carrying a quant tag."""

    repo: str
    file: str | None = None
    tag: str | None = None  # upper case; None with no file: the default quant
    revision: str = DEFAULT_REVISION

    def __post_init__(self) -> None:
        check_repo(self.repo)
        check_revision(self.revision)
        if self.file is not None:
            check_repo_file(self.file)
            if not self.file.lower().endswith(".gguf"):
                raise StoreError(f"{self.file!r} is not a .gguf file")
        if self.tag is not None and not _TAG_RE.match(self.tag):
            raise StoreError(f"{self.tag!r} is not a quant tag such as Q4_K_M")

    @property
    def name(self) -> str:
        """The model's name in the store: hf.co/USER/REPO:TAG or hf.co/USER/REPO/FILE."""
        if self.file is not None:
            return f"hf.co/{self.repo}/{self.file}"
        return f"hf.co/{self.repo}" + (f":{self.tag}" if self.tag else "")


def is_hub_ref(text: str) -> bool:
    return text.lower().startswith(REF_PREFIXES)


def parse_ref(text: str, revision: str | None = None) -> HubRef:
    """hf.co/USER/REPO[:TAG] or hf.co/USER/REPO/FILE.gguf (also huggingface.co/...)."""
    lower = text.lower()
    prefix = next((p for p in REF_PREFIXES if lower.startswith(p)), None)
    if prefix is None:
        raise StoreError(f"{text!r} is not a hub reference (hf.co/USER/REPO[:QUANT])")
    parts = text[len(prefix) :].split("/")
    rev = revision or DEFAULT_REVISION
    if len(parts) > 2:
        return HubRef("/".join(parts[:2]), file="/".join(parts[2:]), revision=rev)
    repo, _, tag = "/".join(parts).partition(":")
    return HubRef(repo, tag=tag.upper() or None, revision=rev)


# ---------------------------------------------------------------------------------------------
# Picking files in a repo


def shard_names(file: str) -> list[str]:
    """All shards of a split GGUF (`x-00001-of-00003.gguf` -> three names), else [file]."""
    match = _SHARD_RE.search(file)
    if match is None:
        return [file]
    index, count = int(match.group(1)), int(match.group(2))
    if not 1 <= index <= count <= 999:
        raise StoreError(f"{file!r}: shard {index} of {count} is not a valid split")
    prefix, ext = file[: match.start()], file[-5:]
    return [f"{prefix}-{i:05d}-of-{count:05d}{ext}" for i in range(1, count + 1)]


def stem(file: str) -> str:
    """A file's base name without its directory, shard suffix and .gguf."""
    base = file.rsplit("/", 1)[-1]
    match = _SHARD_RE.search(base)
    return base[: match.start()] if match else base[:-5]


def quant_of(file: str) -> str:
    """The quant a file name carries (Q4_K_M, IQ4_XS, F16, ...), upper case; '' if none."""
    found = _QUANT_RE.findall(stem(file))
    return found[-1].upper() if found else ""


def _is_weights(file: str) -> bool:
    base = file.rsplit("/", 1)[-1].lower()
    return base.endswith(".gguf") and not base.startswith(("mmproj", "imatrix"))


def _models(files: list[str]) -> dict[str, list[str]]:
    """GGUF weight files grouped into models: a split's shards form one model, in order."""
    groups: dict[str, list[str]] = {}
    for file in sorted(files):
        if _is_weights(file):
            key = file[: m.start()] + file[-5:] if (m := _SHARD_RE.search(file)) else file
            groups.setdefault(key, []).append(file)
    return groups


def tag_matches(file: str, tag: str) -> bool:
    """Whether a quant tag names `file` (case-insensitively, as a whole part of the name)."""
    # The tag is a whole part of the name: after a '-', '.', '_' or the start, and before a
    # '-', '.' or the end, so Q4_K (followed by '_M') does not match a Q4_K_M file.
    pattern = r"(?:^|[-._])" + re.escape(tag) + r"(?=$|[-.])"
    return re.search(pattern, stem(file), re.IGNORECASE) is not None


def _quants(models: dict[str, list[str]]) -> str:
    quants = sorted({quant_of(files[0]) or stem(files[0]) for files in models.values()})
    return ", ".join(quants) or "none"


def pick_files(repo: str, files: list[str], tag: str | None) -> list[str]:
    """The files of the model in `files` that `tag` names (all shards of a split), in order.

    No tag: the Q4_K_M file if there is one, else the only .gguf. Zero or several matches are
    an error that lists the quants the repo has.
    """
    models = _models(files)
    if not models:
        raise StoreError(f"{repo} has no .gguf files")
    wanted = tag or DEFAULT_QUANT
    hits = [key for key in models if tag_matches(key, wanted)]
    if not hits and tag is None and len(models) == 1:
        hits = list(models)
    if len(hits) != 1:
        what = "no" if not hits else "more than one"
        names = ", ".join(hits[:6]) if hits else ""
        raise StoreError(
            f"{repo}: {what} .gguf file matches {wanted}"
            + (f" ({names})" if names else "")
            + f"; quants there: {_quants(models)}"
        )
    chosen = models[hits[0]]
    expected = shard_names(chosen[0])
    if chosen != expected:
        raise StoreError(f"{repo}: split model {hits[0]} is incomplete: has {len(chosen)} shards")
    return chosen


# ---------------------------------------------------------------------------------------------
# The cache layout


def repo_dir(cache: Path, repo: str) -> Path:
    return cache / ("models" + hf_constants.REPO_ID_SEPARATOR + repo.replace("/", "--"))


def lock_path(cache: Path, repo: str, sha256: str) -> Path:
    return cache / ".locks" / repo_dir(cache, repo).name / f"{sha256}.lock"


def _inside(path: Path, root: Path) -> Path:
    if not os.path.abspath(path).startswith(os.path.abspath(root) + os.sep):
        raise StoreError(f"{path}: refusing a path outside {root}")
    return path


def blob_path(cache: Path, repo: str, sha256: str) -> Path:
    return _inside(repo_dir(cache, repo) / "blobs" / sha256, cache)


def pointer_path(cache: Path, repo: str, commit: str, file: str) -> Path:
    return _inside(repo_dir(cache, repo) / "snapshots" / commit / file, cache)


def _atomic_symlink(target: str, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{os.getpid()}.link")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _link(cache: Path, repo: str, commit: str, file: str, blob: Path) -> Path:
    """snapshots/<commit>/<file> -> the blob, relative so the cache can move."""
    link = pointer_path(cache, repo, commit, file)
    link.parent.mkdir(parents=True, exist_ok=True)
    _atomic_symlink(os.path.relpath(blob, link.parent), link)
    return link


def _write_ref(cache: Path, repo: str, revision: str, commit: str) -> None:
    if revision == commit:
        return
    ref = _inside(repo_dir(cache, repo) / "refs" / revision, cache)
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".{ref.name}.{os.getpid()}.tmp")
    tmp.write_text(commit, encoding="ascii")
    os.replace(tmp, ref)


def _cached_commit(cache: Path, repo: str, revision: str) -> str | None:
    if _COMMIT_RE.match(revision):
        return revision
    try:
        ref = _inside(repo_dir(cache, repo) / "refs" / revision, cache)
        commit = ref.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return commit if _COMMIT_RE.match(commit) else None


def _snapshot_files(snapshot: Path) -> list[str]:
    found = []
    for root, _dirs, names in os.walk(snapshot):
        rel = os.path.relpath(root, snapshot)
        found += [name if rel == "." else f"{rel}/{name}" for name in names]
    return found


# ---------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class PulledFile:
    """One verified file of a pulled model."""

    path: Path
    sha256: str
    size: int


@dataclass(frozen=True)
class HubPull:
    """A model in the hub cache: where its files are and what they were checked against."""

    repo: str
    revision: str
    commit: str
    files: tuple[str, ...]  # names in the repo, shards in order
    pulled: tuple[PulledFile, ...]

    @property
    def quant(self) -> str:
        return quant_of(self.files[0])


def _verified_cached(
    cache: Path, repo: str, commit: str, file: str, progress: dl.ProgressFn | None
) -> PulledFile | None:
    """A complete cached file whose bytes match the sha256 its blob is named by."""
    pointer = pointer_path(cache, repo, commit, file)
    if not pointer.is_file():
        return None
    target = pointer.resolve()
    digest = dl.sha256_file(pointer, progress, f"verifying cached {file.rsplit('/', 1)[-1]}")
    if _SHA256_RE.match(target.name) and digest != target.name:
        raise dl.ChecksumError(
            f"cached {file} in {cache} is corrupt: expected sha256 {target.name}, found {digest}; "
            "delete it and pull again"
        )
    return PulledFile(pointer, digest, pointer.stat().st_size)


def from_cache(env: HubEnv, ref: HubRef, progress: dl.ProgressFn | None = None) -> HubPull | None:
    """The model `ref` names, from the cache alone (no request); None if it is not all there."""
    commit = _cached_commit(env.cache, ref.repo, ref.revision)
    if commit is None:
        return None
    snapshot = repo_dir(env.cache, ref.repo) / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    if ref.file is not None:
        files = shard_names(ref.file)
    else:
        files = pick_files(ref.repo, _snapshot_files(snapshot), ref.tag)
    pulled = []
    for file in files:
        found = _verified_cached(env.cache, ref.repo, commit, file, progress)
        if found is None:
            return None
        pulled.append(found)
    return HubPull(ref.repo, ref.revision, commit, tuple(files), tuple(pulled))


# ---------------------------------------------------------------------------------------------
# Talking to the hub


@dataclass(frozen=True)
class FileMeta:
    """What the hub's resolve endpoint says about one file."""

    file: str
    commit: str
    sha256: str
    size: int
    url: str  # pinned to the commit, so every part and retry gets the same bytes


def explain(exc: dl.HttpError, env: HubEnv, repo: str, revision: str, file: str | None) -> str:
    """The hub's error statuses in words a user can act on."""
    code = exc.headers.get("x-error-code", "")
    message = exc.headers.get("x-error-message", "")
    page = f"{env.endpoint}/{repo}"
    if code == "GatedRepo" or (exc.status == 403 and "gated" in message.lower()):
        login = "" if env.token else " and set HF_TOKEN"
        return f"{repo} is gated: accept its license at {page}{login}, then pull again"
    if exc.status == 401:
        if "invalid credentials" in message.lower():
            return f"HF_TOKEN was refused by {env.endpoint}: check or renew the token"
        return f"{repo} not found, or private: check the name, or set HF_TOKEN"
    if exc.status == 403:
        detail = f" ({message})" if message else ""
        return f"access to {repo} denied{detail}: check that HF_TOKEN can read it"
    if exc.status == 404:
        if code == "RevisionNotFound":
            return f"revision {revision!r} not found in {repo}"
        if code == "EntryNotFound" and file:
            return f"{file} not found in {repo} (revision {revision})"
        return f"{repo} not found" + (f" (or it has no {file})" if file else "")
    return f"{repo}: HTTP {exc.status}" + (f" {message}" if message else "")


def _hub_call(
    env: HubEnv, repo: str, revision: str, file: str | None, call: Callable[[], Any]
) -> Any:
    try:
        return call()
    except dl.HttpError as exc:
        raise StoreError(explain(exc, env, repo, revision, file)) from None


def list_files(
    client: httpx.Client, env: HubEnv, repo: str, revision: str, options: dl.TransferOptions
) -> tuple[str, list[str]]:
    """(commit, file names) of a repo at a revision, from the model-info API."""
    url = f"{env.endpoint}/api/models/{repo}/revision/{quote(revision, safe='')}"

    def attempt() -> Any:
        with dl.stream(client, "GET", url, auth=env.auth()) as response:
            dl.raise_for_status(response)
            body = b"".join(_capped(response.iter_bytes(), _MAX_JSON))
        return json.loads(body)

    try:
        info = _hub_call(env, repo, revision, None, lambda: dl.with_retries(options, url, attempt))
    except ValueError:
        raise StoreError(f"{url}: the hub's answer is not JSON") from None
    siblings = info.get("siblings") if isinstance(info, dict) else None
    if not isinstance(siblings, list):
        raise StoreError(f"{url}: the hub's answer lists no files")
    names = [s.get("rfilename") for s in siblings if isinstance(s, dict)]
    files = []
    for name in names:
        if isinstance(name, str) and _is_weights(name):
            try:
                files.append(check_repo_file(name))
            except StoreError:
                log.warning("skipping unsafe file name %r listed by %s", name, repo)
    return _check_commit(info.get("sha"), url), files


def _capped(chunks: Any, limit: int) -> Any:
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise StoreError(f"the hub's answer is larger than {limit >> 20} MB")
        yield chunk


def file_meta(
    client: httpx.Client,
    env: HubEnv,
    repo: str,
    revision: str,
    file: str,
    options: dl.TransferOptions,
) -> FileMeta:
    """Commit, LFS sha256 and size of one file, from the headers of its resolve endpoint."""
    url = f"{env.endpoint}/{repo}/resolve/{quote(revision, safe='')}/{quote(file)}"

    def attempt() -> dict[str, str]:
        # The metadata sits on the hub's own answer; a redirect to a CDN is not followed.
        with dl.stream(client, "HEAD", url, auth=env.auth(), stop_at_other_origin=True) as r:
            dl.raise_for_status(r)
            return {k.lower(): v for k, v in r.headers.items()}

    headers = _hub_call(env, repo, revision, file, lambda: dl.with_retries(options, url, attempt))
    commit = _check_commit(headers.get(hf_constants.HUGGINGFACE_HEADER_X_REPO_COMMIT.lower()), url)
    etag = headers.get(hf_constants.HUGGINGFACE_HEADER_X_LINKED_ETAG.lower()) or headers.get(
        "etag", ""
    )
    sha256 = etag.removeprefix("W/").strip('"').lower()
    if not _SHA256_RE.match(sha256):
        raise StoreError(f"{repo}/{file}: the hub gives no sha256 for it (not an LFS file)")
    size_text = headers.get(hf_constants.HUGGINGFACE_HEADER_X_LINKED_SIZE.lower()) or headers.get(
        "content-length", ""
    )
    if not size_text.isdigit() or int(size_text) <= 0:
        raise StoreError(f"{repo}/{file}: the hub gives no size for it")
    pinned = f"{env.endpoint}/{repo}/resolve/{commit}/{quote(file)}"
    return FileMeta(file, commit, sha256, int(size_text), pinned)


# ---------------------------------------------------------------------------------------------
# The pull


@dataclass(frozen=True)
class Expect:
    """What a catalog entry says the (single) file must be, on top of the hub's own hash."""

    sha256: str | None = None
    size: int | None = None


def _resolve(
    client: httpx.Client, env: HubEnv, ref: HubRef, options: dl.TransferOptions
) -> list[FileMeta]:
    revision = ref.revision
    if ref.file is not None:
        files = shard_names(ref.file)
    else:
        revision, listed = list_files(client, env, ref.repo, ref.revision, options)
        files = pick_files(ref.repo, listed, ref.tag)
    metas = [file_meta(client, env, ref.repo, revision, f, options) for f in files]
    if len({m.commit for m in metas}) != 1:
        raise StoreError(f"{ref.repo} changed while its files were being looked up; pull again")
    return metas


def _check_expected(
    files: list[tuple[str, str, int]], expect: Expect | None, whose: str = "the hub's"
) -> None:
    """(file, sha256, size) against what the catalog says the one file must be."""
    if expect is None or not (expect.sha256 or expect.size):
        return
    if len(files) != 1:
        raise StoreError("a catalog sha256 or size can only check a model of one file")
    file, sha256, size = files[0]
    if expect.sha256 and expect.sha256 != sha256:
        raise dl.ChecksumError(
            f"{file}: {whose} sha256 is {sha256}, the catalog expects {expect.sha256}"
        )
    if expect.size and expect.size != size:
        raise dl.ChecksumError(f"{file}: {whose} size is {size}, the catalog expects {expect.size}")


def _check_cached(cached: HubPull, expect: Expect | None) -> HubPull:
    found = [(f, p.sha256, p.size) for f, p in zip(cached.files, cached.pulled, strict=True)]
    _check_expected(found, expect, "the cached file's")
    return cached


def file_lock(path: Path, what: str, notify: NotifyFn) -> Any:
    """An acquired inter-process lock on `path`; says so first if another holder makes us wait."""
    import filelock

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(path))
    try:
        lock.acquire(timeout=0.2)
    except filelock.Timeout:
        notify(f"waiting for another download of {what} to finish")
        lock.acquire()
    return lock


def _fetch_blob(
    client: httpx.Client,
    env: HubEnv,
    meta: FileMeta,
    job: tuple[str, int, int],
    force: bool,
    progress: dl.ProgressFn | None,
    notify: NotifyFn,
    options: dl.TransferOptions,
) -> Path:
    repo, index, count = job
    blob = blob_path(env.cache, repo, meta.sha256)
    label = meta.file.rsplit("/", 1)[-1]
    counter = f" ({index}/{count})" if count > 1 else ""
    lock = file_lock(lock_path(env.cache, repo, meta.sha256), label, notify)
    try:
        if blob.is_file() and not force:
            # Already here (another tool, or a pull that ran while we waited): check it once.
            digest = dl.sha256_file(blob, progress, f"verifying {label}{counter}")
            if digest == meta.sha256 and blob.stat().st_size == meta.size:
                return blob
            notify(f"the cached {label} is damaged; downloading it again")
        blob.unlink(missing_ok=True)
        # Ask the download host itself whether it serves ranges (a mirror may not).
        remote = dl.probe(client, meta.url, env.auth(), options)
        if remote.size != meta.size:
            raise dl.ChecksumError(
                f"{label}: served with {remote.size} bytes, the hub says {meta.size}"
            )
        download = dl.Download(
            meta.url, blob, meta.size, meta.sha256, label, env.auth(), remote.ranges
        )
        dl.fetch(client, download, options, progress, f"downloading {label}{counter}")
        return blob
    finally:
        lock.release()


def _free_space(env: HubEnv, repo: str, metas: list[FileMeta]) -> None:
    needed = 0
    for meta in metas:
        blob = blob_path(env.cache, repo, meta.sha256)
        if not blob.is_file():
            needed += meta.size - dl.partial_bytes(dl.partial_path(blob), meta.size, meta.sha256)
    blobs = repo_dir(env.cache, repo) / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    dl.check_free_space(blobs, needed, repo)


def _transfer(
    client: httpx.Client,
    env: HubEnv,
    ref: HubRef,
    metas: list[FileMeta],
    force: bool,
    progress: dl.ProgressFn | None,
    notify: NotifyFn,
    options: dl.TransferOptions,
) -> HubPull:
    _free_space(env, ref.repo, metas)
    pulled = []
    for index, meta in enumerate(metas, 1):
        job = (ref.repo, index, len(metas))
        blob = _fetch_blob(client, env, meta, job, force, progress, notify, options)
        link = _link(env.cache, ref.repo, meta.commit, meta.file, blob)
        pulled.append(PulledFile(link, meta.sha256, meta.size))
    commit = metas[0].commit
    _write_ref(env.cache, ref.repo, ref.revision, commit)
    files = tuple(m.file for m in metas)
    return HubPull(ref.repo, ref.revision, commit, files, tuple(pulled))


def _network_failure(exc: BaseException) -> bool:
    import httpx

    return isinstance(exc, (dl.TransferError, httpx.TransportError))


def _cached(env: HubEnv, ref: HubRef, progress: dl.ProgressFn | None) -> tuple[HubPull | None, str]:
    """The model from the cache, or None and why not (a damaged file is an error, not a miss)."""
    try:
        return from_cache(env, ref, progress), ""
    except dl.ChecksumError:
        raise
    except StoreError as exc:  # the cached snapshot has no file for this tag
        return None, f" ({exc})"


def _offline(env: HubEnv, ref: HubRef, progress: dl.ProgressFn | None) -> HubPull:
    cached, detail = _cached(env, ref, progress)
    if cached is None:
        raise StoreError(
            f"HF_HUB_OFFLINE is set and {ref.name} (revision {ref.revision}) is not "
            f"complete in the hub cache {env.cache}{detail}"
        )
    return cached


def pull(
    ref: HubRef,
    *,
    expect: Expect | None = None,
    force: bool = False,
    progress: dl.ProgressFn | None = None,
    notify: NotifyFn | None = None,
    options: dl.TransferOptions | None = None,
) -> HubPull:
    """Bring the model `ref` names into the hub cache, verified; where its files are.

    HF_HUB_OFFLINE=1 uses the cache only and sends nothing. Without it, a hub that cannot be
    reached falls back to a complete cached copy, with a warning through `notify`.
    """
    env = hub_env()
    say = notify or log.warning
    if env.offline:
        return _check_cached(_offline(env, ref, progress), expect)
    options = options or dl.TransferOptions.from_env()
    with dl.open_client(options) as client:
        try:
            metas = _resolve(client, env, ref, options)
        except Exception as exc:
            if not _network_failure(exc) or force:
                raise
            cached, _ = _cached(env, ref, progress)
            if cached is None:
                raise StoreError(f"cannot reach {env.endpoint}: {dl.describe(exc)}") from None
            say(f"cannot reach {env.endpoint} ({dl.describe(exc)}); using the cached {ref.name}")
            return _check_cached(cached, expect)
        _check_expected([(m.file, m.sha256, m.size) for m in metas], expect)
        return _transfer(client, env, ref, metas, force, progress, say, options)
