"""One file over HTTP(S): resumable across runs, in parallel ranged parts, with stall timeouts and
retries, checked by size and sha256, and moved into place only after the check.

The bytes go to a hidden partial file beside the destination, with a small JSON state file that
records which byte ranges have arrived. Any interruption (a dropped connection, a stall, Ctrl-C, a
killed process, a full disk) leaves both behind, and the next transfer of the same file continues
with Range requests instead of starting over. Only a file whose size and sha256 match is renamed
to its real name; a mismatch deletes the download.

Credentials travel only to their own origin: redirects are followed by hand, and a request to
any other scheme/host/port (a CDN) carries no Authorization header.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin, urlsplit

from llmapp.runtime.errors import StoreError

if TYPE_CHECKING:
    import httpx

# What a pull reports: (what is happening, bytes done so far, total bytes). Called from one
# thread at a time, never concurrently.
ProgressFn = Callable[[str, int, int], None]

STALL_ENV = "LLMAPP_STALL_TIMEOUT"
PARTS_ENV = "LLMAPP_DOWNLOAD_PARTS"
RETRY_WAIT_ENV = "LLMAPP_RETRY_WAIT"

USER_AGENT = "llmapp/0.1"
_READ_CHUNK = 1 << 20
_HASH_CHUNK = 4 << 20
_REPORT_EVERY = 1 << 20  # bytes between progress calls
_SAVE_EVERY_S = 0.5  # seconds between state-file checkpoints
_MAX_REDIRECTS = 10
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class DiskFullError(StoreError):
    """The disk has no room for the download."""


class ChecksumError(StoreError):
    """The bytes that arrived are not the bytes that were promised."""


class HttpError(StoreError):
    """A server answered with an error status that retrying will not fix."""

    def __init__(self, url: str, status: int, headers: dict[str, str], text: str = "") -> None:
        self.url = url
        self.status = status
        self.headers = headers
        super().__init__(text or f"{url}: HTTP {status}")


class TransferError(StoreError):
    """The transfer failed after its retries; whatever arrived is kept for the next try."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a transfer; `partial` is the file kept for resuming."""

    def __init__(self, partial: Path) -> None:
        super().__init__()
        self.partial = partial


class _Retry(Exception):
    """One attempt failed in a way another attempt may not."""


def _env_float(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, ""))
    except ValueError:
        return default
    return value if value > 0 else default


@dataclass(frozen=True)
class TransferOptions:
    """How patient and how parallel a transfer is."""

    stall_timeout: float = 30.0  # seconds without a byte before an attempt is given up
    connect_timeout: float = 30.0
    tries: int = 5  # attempts in a row without progress before the transfer fails
    retry_wait: float = 1.0  # first backoff; doubles per failed attempt
    max_retry_wait: float = 30.0
    parts: int = 4  # parallel ranged requests for a large file
    min_part_bytes: int = 64 << 20  # files under parts * this go in fewer parts

    def __post_init__(self) -> None:
        if self.tries < 1 or self.parts < 1 or self.min_part_bytes < 1:
            raise ValueError("tries, parts and min_part_bytes must be at least 1")

    @classmethod
    def from_env(cls) -> TransferOptions:
        """Defaults, with LLMAPP_STALL_TIMEOUT, LLMAPP_DOWNLOAD_PARTS and LLMAPP_RETRY_WAIT."""
        parts = int(_env_float(PARTS_ENV, cls.parts))
        return cls(
            stall_timeout=_env_float(STALL_ENV, cls.stall_timeout),
            retry_wait=_env_float(RETRY_WAIT_ENV, cls.retry_wait),
            parts=max(1, min(parts, 16)),
        )


def open_client(options: TransferOptions) -> httpx.Client:
    """An HTTP client whose read timeout is the stall timeout; redirects are ours to follow."""
    import httpx

    timeout = httpx.Timeout(
        connect=options.connect_timeout,
        read=options.stall_timeout,
        write=options.stall_timeout,
        pool=None,  # parts wait for a pooled connection as long as they must
    )
    limits = httpx.Limits(
        max_connections=options.parts + 2, max_keepalive_connections=options.parts
    )
    return httpx.Client(
        timeout=timeout,
        limits=limits,
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
    )


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with default ports filled in: what must match to share a token."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def check_url(url: str) -> str:
    """Accept http(s) URLs with a host; everything else (file:, ftp:, no host) is refused."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise StoreError(f"{url!r} is not an http:// or https:// URL")
    if parts.username or parts.password:
        raise StoreError(f"{url!r}: credentials in a URL are not accepted; use HF_TOKEN")
    return url


@dataclass(frozen=True)
class Auth:
    """A bearer token and the one origin it may be sent to."""

    token: str
    origin: tuple[str, str, int | None]

    def headers_for(self, url: str) -> dict[str, str]:
        if origin(url) == self.origin:
            return {"Authorization": f"Bearer {self.token}"}
        return {}


def _headers(url: str, auth: Auth | None, extra: dict[str, str] | None) -> dict[str, str]:
    headers = dict(extra or {})
    if auth is not None:
        headers.update(auth.headers_for(url))
    return headers


def _redirect_target(response: httpx.Response) -> str | None:
    if response.status_code not in (301, 302, 303, 307, 308):
        return None
    location = response.headers.get("Location")
    if not location:
        return None
    return check_url(urljoin(str(response.request.url), location))


@contextlib.contextmanager
def stream(
    client: httpx.Client,
    method: str,
    url: str,
    *,
    auth: Auth | None = None,
    headers: dict[str, str] | None = None,
    stop_at_other_origin: bool = False,
) -> Iterator[httpx.Response]:
    """Send `method` and follow redirects by hand; yields the final (streamed) response.

    Each hop gets the Authorization header only if it goes to the token's own origin. With
    `stop_at_other_origin`, a redirect that leaves the first URL's origin is yielded as it is
    (the hub's metadata headers sit on that redirect).
    """
    first = origin(url)
    for _ in range(_MAX_REDIRECTS + 1):
        request = client.build_request(method, url, headers=_headers(url, auth, headers))
        response = client.send(request, stream=True)
        try:
            target = _redirect_target(response)
            if target is None or (stop_at_other_origin and origin(target) != first):
                yield response
                return
        finally:
            response.close()
        url = target
    raise StoreError(f"{url}: too many redirects")


def raise_for_status(response: httpx.Response) -> None:
    """Retryable statuses become _Retry; other errors HttpError (the caller words them)."""
    status = response.status_code
    if status < 400:
        return
    if status in _RETRY_STATUS:
        raise _Retry(f"HTTP {status} from {urlsplit(str(response.request.url)).hostname}")
    text = ""
    with contextlib.suppress(Exception):
        text = response.read()[:300].decode("utf-8", "replace").strip()
    url = str(response.request.url)
    raise HttpError(url, status, dict(response.headers), f"{url}: HTTP {status} {text}".rstrip())


def _is_transient(exc: BaseException) -> bool:
    import httpx

    return isinstance(exc, (httpx.TransportError, _Retry))


def with_retries(
    options: TransferOptions,
    what: str,
    attempt: Callable[[], Any],
    stop: threading.Event | None = None,
) -> Any:
    """Run `attempt` until it succeeds, backing off between transient failures."""
    stop = stop or threading.Event()
    wait = options.retry_wait
    for tries in range(1, options.tries + 1):
        try:
            return attempt()
        except Exception as exc:
            if not _is_transient(exc) or tries == options.tries:
                if _is_transient(exc):
                    raise TransferError(f"{what}: {describe(exc)} ({tries} tries)") from exc
                raise
        if stop.wait(wait):
            raise KeyboardInterrupt
        wait = min(wait * 2, options.max_retry_wait)
    raise AssertionError("unreachable")


def describe(exc: BaseException) -> str:
    """One line for a network failure: what kind it was, not a traceback."""
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return "stalled (no data within the timeout)"
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect ({exc})"
    return str(exc) or type(exc).__name__


# ---------------------------------------------------------------------------------------------
# The size of a remote file


@dataclass(frozen=True)
class RemoteFile:
    size: int
    ranges: bool  # whether the server serves byte ranges
    version: str = ""  # its ETag or Last-Modified: a partial from another version is useless


def probe(
    client: httpx.Client, url: str, auth: Auth | None, options: TransferOptions
) -> RemoteFile:
    """The size of `url` and whether it serves ranges, from a one-byte ranged GET.

    (A ranged GET rather than HEAD: some servers and CDNs answer HEAD differently, and the
    Content-Range total is the most reliable size a server gives.)
    """

    def attempt() -> RemoteFile:
        with stream(client, "GET", url, auth=auth, headers={"Range": "bytes=0-0"}) as response:
            raise_for_status(response)
            headers = response.headers
            version = headers.get("ETag") or headers.get("Last-Modified") or ""
            if response.status_code == 206:
                total = headers.get("Content-Range", "").rpartition("/")[2]
                if total.isdigit():
                    return RemoteFile(int(total), True, version)
            length = headers.get("Content-Length", "")
            if response.status_code == 200 and length.isdigit():
                return RemoteFile(int(length), False, version)
        raise StoreError(f"{url}: the server does not say how large the file is")

    return with_retries(options, url, attempt)  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------------
# Partial files and their state


@dataclass
class _Part:
    start: int
    end: int  # exclusive
    done: int = 0  # bytes written from start

    @property
    def offset(self) -> int:
        return self.start + self.done

    @property
    def remaining(self) -> int:
        return self.end - self.offset


def partial_path(dest: Path) -> Path:
    """The hidden name a download of `dest` is kept under until it is checked."""
    return dest.with_name(f".{dest.name}.partial")


def _state_path(partial: Path) -> Path:
    return partial.with_name(partial.name + ".json")


def _layout(size: int, options: TransferOptions, ranges: bool) -> list[_Part]:
    count = min(options.parts, max(1, size // options.min_part_bytes)) if ranges else 1
    step = -(-size // count)
    return [_Part(start, min(start + step, size)) for start in range(0, size, step)] or [
        _Part(0, 0)
    ]


def _load_parts(partial: Path, size: int, identity: str) -> list[_Part] | None:
    """The parts recorded for this exact file, or None when there is nothing to resume."""
    try:
        state = json.loads(_state_path(partial).read_text(encoding="utf-8"))
        if state.get("size") != size or state.get("identity") != identity or not partial.is_file():
            return None
        parts = [_Part(int(s), int(e), int(d)) for s, e, d in state["parts"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not parts or parts[0].start != 0 or parts[-1].end != size:
        return None
    for before, after in zip(parts, parts[1:], strict=False):
        if before.end != after.start:
            return None
    if any(not 0 <= p.done <= p.end - p.start for p in parts):
        return None
    if len(parts) == 1:
        # One sequential part: every byte in the file arrived in order, so the file's length is
        # the truth even when the process died before its last checkpoint.
        parts[0].done = max(parts[0].done, min(partial.stat().st_size, size))
    return parts


def _save_parts(partial: Path, size: int, identity: str, parts: list[_Part]) -> None:
    state = {"size": size, "identity": identity, "parts": [[p.start, p.end, p.done] for p in parts]}
    path = _state_path(partial)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(state), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        # A full disk can refuse even this small file: the previous state stays valid, only
        # a little behind.
        tmp.unlink(missing_ok=True)


def discard_partial(partial: Path) -> None:
    partial.unlink(missing_ok=True)
    _state_path(partial).unlink(missing_ok=True)


def partial_bytes(partial: Path, size: int, identity: str) -> int:
    """How much of a file (its sha256, or URL and version) an interrupted transfer holds."""
    parts = _load_parts(partial, size, identity)
    return sum(p.done for p in parts) if parts else 0


def free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def check_free_space(directory: Path, needed: int, what: str) -> None:
    """Refuse to start when the disk holding `directory` cannot take `needed` more bytes."""
    free = free_bytes(directory)
    if free is not None and free < needed:
        raise DiskFullError(
            f"not enough disk space in {directory}: {what} needs {needed / 1e6:.1f} MB more, "
            f"{free / 1e6:.1f} MB free"
        )


# ---------------------------------------------------------------------------------------------
# The transfer


@dataclass
class Download:
    """One file to fetch: where from, where to, and what it must be."""

    url: str
    dest: Path
    size: int
    sha256: str | None  # None: computed and returned, not checked
    label: str  # for progress and messages, e.g. the file name
    auth: Auth | None = None
    ranges: bool = True
    version: str = ""  # the server's ETag or Last-Modified, when no sha256 identifies it
    partial: Path = field(init=False)

    def __post_init__(self) -> None:
        self.partial = partial_path(self.dest)

    @property
    def identity(self) -> str:
        """What a partial file must have been downloading to be resumed for this one."""
        return self.sha256 or f"{self.url} {self.version}"


class _Transfer:
    """Moves the bytes of one Download into its partial file, in one or more parts."""

    def __init__(
        self,
        client: httpx.Client,
        job: Download,
        options: TransferOptions,
        progress: ProgressFn | None,
        stage: str,
    ) -> None:
        self.client = client
        self.job = job
        self.options = options
        self.progress = progress
        self.stage = stage
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.parts = _load_parts(job.partial, job.size, job.identity) or _layout(
            job.size, options, job.ranges
        )
        self.done = sum(p.done for p in self.parts)
        self._reported = -1
        self._saved_at = 0.0

    def run(self) -> None:
        self.job.partial.touch(exist_ok=True)
        self._save(force=True)
        self._report(force=True)
        try:
            pending = [p for p in self.parts if p.remaining > 0]
            if len(pending) <= 1:
                for part in pending:
                    self._run_part(part)
            else:
                self._run_parallel(pending)
        finally:
            self.stop.set()
            with self.lock:
                self._save(force=True)
        if self.job.partial.stat().st_size > self.job.size:
            os.truncate(self.job.partial, self.job.size)

    def _run_parallel(self, pending: list[_Part]) -> None:
        threads = [
            threading.Thread(target=self._worker, args=(part,), daemon=True) for part in pending
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.2)
        except KeyboardInterrupt:
            self.stop.set()  # workers stop at their next chunk; each owns its file handle
            raise
        if self.errors:
            # The first real failure, not the interruptions it caused in the other parts.
            real = [e for e in self.errors if not isinstance(e, KeyboardInterrupt)]
            raise (real or self.errors)[0]

    def _worker(self, part: _Part) -> None:
        try:
            self._run_part(part)
        except BaseException as exc:  # handed to the main thread, which raises it
            self.errors.append(exc)
            self.stop.set()

    def _backoff(self, failures: int) -> float:
        return min(self.options.retry_wait * 2 ** (failures - 1), self.options.max_retry_wait)

    def _run_part(self, part: _Part) -> None:
        fd = os.open(self.job.partial, os.O_WRONLY)
        try:
            failures = 0
            while part.remaining > 0:
                if self.stop.is_set():
                    raise KeyboardInterrupt
                before = part.done
                try:
                    self._fetch_range(part, fd)
                except Exception as exc:
                    if not _is_transient(exc):
                        raise
                    # Only attempts that bring nothing count: a flaky link that keeps
                    # delivering is worth staying with.
                    failures = 0 if part.done > before else failures + 1
                    if failures >= self.options.tries:
                        raise TransferError(
                            f"downloading {self.job.label} failed: {describe(exc)} "
                            f"({failures} tries in a row without progress); what arrived "
                            "is kept: pull again to resume"
                        ) from exc
                    if failures and self.stop.wait(self._backoff(failures)):
                        raise KeyboardInterrupt from None
        finally:
            os.close(fd)

    def _fetch_range(self, part: _Part, fd: int) -> None:
        ask = {"Range": f"bytes={part.offset}-{part.end - 1}"}
        with stream(self.client, "GET", self.job.url, auth=self.job.auth, headers=ask) as r:
            raise_for_status(r)
            self._check_start(r, part)
            for chunk in r.iter_raw():
                if self.stop.is_set():
                    raise KeyboardInterrupt
                chunk = chunk[: part.remaining]
                if not chunk:
                    break
                os.pwrite(fd, chunk, part.offset)
                with self.lock:
                    part.done += len(chunk)
                    self.done += len(chunk)
                    self._report()
                    self._save()
        if part.remaining > 0:
            raise _Retry(f"the connection closed {part.remaining} bytes early")

    def _check_start(self, response: httpx.Response, part: _Part) -> None:
        encoding = response.headers.get("Content-Encoding", "identity").lower()
        if encoding not in ("identity", ""):
            raise StoreError(f"{self.job.label}: the server sent {encoding}-encoded bytes")
        if response.status_code == 206:
            got = response.headers.get("Content-Range", "")
            if not got.startswith(f"bytes {part.offset}-"):
                raise _Retry(f"asked for bytes from {part.offset}, got {got!r}")
            return
        # 200: the whole file. Usable only by a single part, from the start.
        if len(self.parts) != 1:
            raise StoreError(f"{self.job.label}: the server stopped serving byte ranges")
        with self.lock:
            self.done -= part.done
            part.done = 0

    def _report(self, force: bool = False) -> None:
        if self.progress is None:
            return
        if force or self.done - self._reported >= _REPORT_EVERY or self.done == self.job.size:
            if self.done != self._reported:
                self._reported = self.done
                self.progress(self.stage, self.done, self.job.size)

    def _save(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._saved_at >= _SAVE_EVERY_S:
            self._saved_at = now
            _save_parts(self.job.partial, self.job.size, self.job.identity, self.parts)


def sha256_file(path: Path, progress: ProgressFn | None = None, stage: str = "") -> str:
    """The file's sha256, reporting progress as it reads."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(stage, done, size)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    # Makes a rename durable; not every platform can open a directory.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _verify_and_place(job: Download, progress: ProgressFn | None) -> str:
    size = job.partial.stat().st_size
    if size != job.size:
        discard_partial(job.partial)
        raise ChecksumError(f"{job.label}: {size} bytes arrived, expected {job.size}")
    digest = sha256_file(job.partial, progress, f"verifying {job.label}")
    if job.sha256 is not None and digest != job.sha256:
        discard_partial(job.partial)
        raise ChecksumError(
            f"{job.label}: sha256 mismatch: expected {job.sha256}, arrived {digest}; "
            "the download was deleted"
        )
    with open(job.partial, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(job.partial, 0o644)
    os.replace(job.partial, job.dest)
    _state_path(job.partial).unlink(missing_ok=True)
    fsync_dir(job.dest.parent)
    return digest


def _disk_full(job: Download) -> DiskFullError:
    have = job.partial.stat().st_size if job.partial.exists() else 0
    kept = partial_bytes(job.partial, job.size, job.identity)
    return DiskFullError(
        f"disk full: no space left in {job.dest.parent} while downloading {job.label} "
        f"({kept / 1e6:.1f} of {job.size / 1e6:.1f} MB arrived); the partial download is kept "
        f"({job.partial.name}, {have / 1e6:.1f} MB): free some space and pull again to resume"
    )


def fetch(
    client: httpx.Client,
    job: Download,
    options: TransferOptions,
    progress: ProgressFn | None = None,
    stage: str | None = None,
) -> str:
    """Bring `job.url` to `job.dest`, resuming any earlier partial; its sha256.

    Raises ChecksumError (download deleted), DiskFullError / TransferError (partial kept),
    HttpError, or Interrupted on Ctrl-C (partial kept).
    """
    job.dest.parent.mkdir(parents=True, exist_ok=True)
    have = partial_bytes(job.partial, job.size, job.identity)
    if have == 0:
        discard_partial(job.partial)  # a leftover that does not match this file
    check_free_space(job.dest.parent, job.size - have, job.label)
    transfer = _Transfer(client, job, options, progress, stage or f"downloading {job.label}")
    try:
        transfer.run()
    except KeyboardInterrupt:
        raise Interrupted(job.partial) from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(job) from None
        raise StoreError(f"writing {job.partial}: {exc.strerror or exc}") from None
    try:
        return _verify_and_place(job, progress)
    except KeyboardInterrupt:
        raise Interrupted(job.partial) from None  # every byte is kept; the check runs again
