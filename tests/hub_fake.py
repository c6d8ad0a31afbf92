"""An imitation of the Hugging Face Hub on 127.0.0.1, for pull tests (no network needed).

Two servers, as on the real hub: the hub itself (model-info API, resolve endpoint, auth) and a
"CDN" on another port that the resolve endpoint redirects to, serving blobs by sha256 with
byte ranges. The CDN can be told to drop or stall a response part-way, or to go slowly, and
both servers log every request so a test can check what was asked and with which headers.

What the hub answers, as the real one does:
  GET  /api/models/{repo}[/revision/{rev}]      {"id", "sha", "siblings": [{"rfilename"}]}
  HEAD|GET /{repo}/resolve/{rev}/{file}         302 to the CDN, with X-Repo-Commit,
                                                X-Linked-Etag ("<sha256>"), X-Linked-Size
  401 X-Error-Code: RepoNotFound                unknown or private repo without a good token
  401/403 X-Error-Code: GatedRepo               gated repo, no token / license not accepted
  404 X-Error-Code: EntryNotFound | RevisionNotFound
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import gguf
import numpy as np

GOOD_TOKEN = "hf_good_token"
ACCEPTED_TOKEN = "hf_accepted_token"  # has accepted the gated repo's license
CHUNK = 64 * 1024


def make_gguf(path: Path, n_vocab: int = 512, n_embd: int = 256, seed: int = 0) -> bytes:
    """A small valid llama GGUF of about n_vocab * n_embd * 4 bytes (random F32 weights)."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("Hub Test Model")
    w.add_context_length(128)
    w.add_embedding_length(n_embd)
    w.add_block_count(1)
    w.add_feed_forward_length(2 * n_embd)
    w.add_head_count(4)
    w.add_head_count_kv(4)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(n_vocab)])
    w.add_tensor("token_embd.weight", rng.standard_normal((n_vocab, n_embd), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
    shapes = {  # one llama block, numpy order (out, in)
        "attn_q": (n_embd, n_embd),
        "attn_k": (n_embd, n_embd),
        "attn_v": (n_embd, n_embd),
        "attn_output": (n_embd, n_embd),
        "ffn_gate": (2 * n_embd, n_embd),
        "ffn_up": (2 * n_embd, n_embd),
        "ffn_down": (n_embd, 2 * n_embd),
    }
    for name, shape in shapes.items():
        w.add_tensor(f"blk.0.{name}.weight", rng.standard_normal(shape).astype(np.float16))
    for name in ("attn_norm", "ffn_norm"):
        w.add_tensor(f"blk.0.{name}.weight", np.ones(n_embd, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _QuietServer(ThreadingHTTPServer):
    """A client hanging up mid-response (a pull that stops on a bad hash, a dropped part) is
    what these tests provoke: not worth a traceback on stderr, where tests read the CLI's own
    one-line errors."""

    def handle_error(self, request: object, client_address: object) -> None:
        exc = sys.exc_info()[1]
        if not isinstance(exc, ConnectionError | TimeoutError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str
    private: bool = False
    gated: bool = False
    revisions: dict[str, str] = field(default_factory=dict)  # name -> commit
    etag_override: dict[str, str] = field(default_factory=dict)  # file -> X-Linked-Etag value
    commit_override: str | None = None  # what X-Repo-Commit says (for unsafe-value tests)


@dataclass
class Request:
    server: str  # "hub" or "cdn"
    method: str
    path: str
    headers: dict[str, str]


class FakeHub:
    """Start with `with FakeHub() as hub:`; point HF_ENDPOINT at `hub.endpoint`."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> bytes (the CDN's store)
        self.files: dict[str, bytes] = {}  # plain URL files on the CDN: /files/{name}
        self.requests: list[Request] = []
        self.drops: list[int] = []  # next CDN bodies: send this many bytes, then hang up
        self.stalls: list[int] = []  # next CDN bodies: send this many bytes, then go silent
        self.stall_forever = False  # every CDN body stalls at once
        self.bytes_per_s: float | None = None  # CDN speed limit
        self.ranges = True
        self.body_bytes = 0  # bytes of file bodies the CDN has sent
        self.release = threading.Event()  # wakes stalled handlers at shutdown
        self.lock = threading.Lock()
        self._servers: list[ThreadingHTTPServer] = []

    # -- setup -------------------------------------------------------------------------------

    def add_repo(self, repo: str, files: dict[str, bytes], **options: Any) -> Repo:
        commit = sha256(repo.encode() + str(sorted(files)).encode())[:40]
        entry = Repo(dict(files), commit, **options)
        entry.revisions.setdefault("main", commit)
        self.repos[repo] = entry
        for data in files.values():
            self.blobs[sha256(data)] = data
        return entry

    def __enter__(self) -> FakeHub:
        self.hub_server = self._start("hub")
        self.cdn_server = self._start("cdn")
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def _start(self, role: str) -> ThreadingHTTPServer:
        handler = type(f"{role}Handler", (_Handler,), {"hub": self, "role": role})
        server = _QuietServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
        self._servers.append(server)
        return server

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.hub_server.server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self.cdn_server.server_address[1]}"

    def url(self, name: str) -> str:
        """A plain URL on the CDN for `files[name]`."""
        return f"{self.cdn}/files/{quote(name)}"

    def body_requests(self, server: str = "cdn") -> list[Request]:
        """File-body GETs (not the one-byte probes)."""
        return [
            r
            for r in self.requests
            if r.server == server and r.method == "GET" and r.headers.get("range") != "bytes=0-0"
        ]

    def ranges_asked(self) -> list[str]:
        return [r.headers.get("range", "") for r in self.body_requests()]


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    role: str
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - silence the log
        pass

    def _record(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        with self.hub.lock:
            self.hub.requests.append(Request(self.role, self.command, self.path, headers))

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def do_GET(self) -> None:
        self._dispatch(body=True)

    def _dispatch(self, body: bool) -> None:
        self._record()
        path = urlsplit(self.path).path
        try:
            if self.role == "cdn":
                self._cdn(path, body)
            else:
                self._hub(path, body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    # -- plain answers -----------------------------------------------------------------------

    def _reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str = "") -> None:
        headers = {"X-Error-Code": code}
        if message:
            headers["X-Error-Message"] = message
        self._reply(status, json.dumps({"error": message or code}).encode(), headers)

    # -- the hub -----------------------------------------------------------------------------

    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None

    def _allowed(self, name: str, repo: Repo | None) -> bool:
        token = self._token()
        if repo is None or (repo.private and token not in (GOOD_TOKEN, ACCEPTED_TOKEN)):
            self._error(401, "RepoNotFound", "Repository not found")
            return False
        if repo.gated and token is None:
            self._error(401, "GatedRepo", f"Access to model {name} is restricted.")
            return False
        if repo.gated and token != ACCEPTED_TOKEN:
            msg = f"Access to model {name} is restricted and you are not in the authorized list."
            self._error(403, "GatedRepo", msg)
            return False
        return True

    def _hub(self, path: str, body: bool) -> None:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "models"]:
            return self._model_info(parts[2:])
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        self._reply(404, b"no such route")

    def _model_info(self, parts: list[str]) -> None:
        name = "/".join(parts[:2])
        repo = self.hub.repos.get(name)
        if not self._allowed(name, repo):
            return
        assert repo is not None
        revision = parts[3] if len(parts) >= 4 and parts[2] == "revision" else "main"
        commit = repo.revisions.get(revision, revision if revision == repo.commit else None)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        siblings = [{"rfilename": f} for f in [".gitattributes", "README.md", *repo.files]]
        info = {"id": name, "sha": commit, "siblings": siblings, "gated": repo.gated}
        self._reply(200, json.dumps(info).encode(), {"Content-Type": "application/json"})

    def _resolve(self, name: str, revision: str, file: str) -> None:
        repo = self.hub.repos.get(name)
        if not self._allowed(name, repo):
            return
        assert repo is not None
        commit = repo.revisions.get(revision, revision if revision == repo.commit else None)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        data = repo.files.get(file)
        if data is None:
            return self._error(404, "EntryNotFound", f"{file} does not exist")
        digest = sha256(data)
        headers = {
            "Location": f"{self.hub.cdn}/blobs/{digest}",
            "X-Repo-Commit": repo.commit_override or commit,
            "X-Linked-Etag": repo.etag_override.get(file, f'"{digest}"'),
            "X-Linked-Size": str(len(data)),
            "ETag": f'"{digest[:40]}"',
        }
        self._reply(302, b"", headers)

    # -- the CDN -----------------------------------------------------------------------------

    def _cdn(self, path: str, body: bool) -> None:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        data = None
        if len(parts) == 2 and parts[0] == "blobs":
            data = self.hub.blobs.get(parts[1])
        elif len(parts) == 2 and parts[0] == "files":
            data = self.hub.files.get(parts[1])
        if data is None:
            return self._reply(404, b"not found")
        self._serve(data, body)

    def _range(self, size: int) -> tuple[int, int] | None:
        spec = self.headers.get("Range", "")
        if not self.hub.ranges or not spec.startswith("bytes="):
            return None
        first, _, last = spec[6:].partition("-")
        start = int(first)
        end = min(int(last) + 1 if last else size, size)
        return start, end

    def _serve(self, data: bytes, body: bool) -> None:
        span = self._range(len(data))
        if span is not None and span[0] >= len(data):
            return self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"})
        start, end = span or (0, len(data))
        self.send_response(206 if span else 200)
        if span:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes" if self.hub.ranges else "none")
        self.send_header("ETag", f'"{sha256(data)[:16]}"')
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if body:
            # A one-byte probe for the size is no file body, even where ranges are ignored.
            self._send_body(data[start:end], is_probe=self.headers.get("Range") == "bytes=0-0")

    def _send_body(self, chunk: bytes, is_probe: bool) -> None:
        hub = self.hub
        cut = stall = None
        with hub.lock:
            if not is_probe and hub.drops:
                cut = hub.drops.pop(0)
            elif not is_probe and hub.stalls:
                stall = hub.stalls.pop(0)
            elif not is_probe and hub.stall_forever:
                stall = 0
        limit = len(chunk) if cut is None and stall is None else (cut if cut is not None else stall)
        assert limit is not None
        sent = 0
        while sent < min(limit, len(chunk)):
            piece = chunk[sent : min(sent + CHUNK, limit)]
            self.wfile.write(piece)
            self.wfile.flush()
            sent += len(piece)
            with hub.lock:
                hub.body_bytes += len(piece) if not is_probe else 0
            if hub.bytes_per_s:
                time.sleep(len(piece) / hub.bytes_per_s)
        if stall is not None:
            hub.release.wait(10)  # the client gives up long before
        if cut is not None or stall is not None:
            self.close_connection = True


_HF_VARS = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "XDG_CACHE_HOME",
)


@dataclass(frozen=True)
class Homes:
    store: Path  # LLMAPP_HOME
    hf_home: Path  # HF_HOME
    cache: Path  # the hub cache inside it


def isolate(monkeypatch: Any, tmp_path: Path, endpoint: str) -> Homes:
    """Point llmapp and the hub variables at empty temp dirs and at the fake hub; quick retries."""
    for var in _HF_VARS:
        monkeypatch.delenv(var, raising=False)
    homes = Homes(tmp_path / "llmapp", tmp_path / "hf", tmp_path / "hf" / "hub")
    monkeypatch.setenv("LLMAPP_HOME", str(homes.store))
    monkeypatch.setenv("HF_HOME", str(homes.hf_home))
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("LLMAPP_STALL_TIMEOUT", "0.5")
    monkeypatch.setenv("LLMAPP_RETRY_WAIT", "0.01")
    return homes


def tree(root: Path) -> list[str]:
    """Every file and link under `root`, relative, hidden ones included."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())
