"""A loopback stand-in for the Hugging Face Hub, for tests.

It speaks just enough of the Hub's HTTP API for the *real* ``huggingface_hub``
client (2.4.x) to create repos, upload (regular + Git LFS "basic" transfer),
list and download files, with the status codes and headers the client relies
on.  Everything lives in memory; nothing leaves 127.0.0.1.

Client call                                   -> endpoint(s) served here
--------------------------------------------------------------------------------
HfApi.whoami                                  GET  /api/whoami-v2
HfApi.create_repo / delete_repo               POST /api/repos/create, DELETE /api/repos/delete
HfApi.repo_info / model_info / repo_exists    GET  /api/{type}s/{ns}/{name}[/revision/{rev}]
HfApi.list_repo_files / list_repo_tree        GET  /api/{type}s/{ns}/{name}/tree/{rev}[/{path}]
HfApi.list_repo_refs                          GET  /api/{type}s/{ns}/{name}/refs
HfApi.create_branch                           POST /api/{type}s/{ns}/{name}/branch/{branch}
upload_file / upload_folder / create_commit   POST /api/{type}s/{ns}/{name}/preupload/{rev}
                                              POST /{prefix}{ns}/{name}.git/info/lfs/objects/batch
                                              PUT  /_lfs/upload/{oid}  (pre-signed, no auth)
                                              POST /_lfs/verify
                                              POST /api/{type}s/{ns}/{name}/commit/{rev}  (NDJSON)
                                              POST /api/validate-yaml  (only when README.md is uploaded)
hf_hub_download / file_exists                 HEAD/GET /{prefix}{ns}/{name}/resolve/{rev}/{path}
                                              HEAD/GET /_lfs/{oid}  ("CDN", reached through 302)

Uploads only take the LFS path when Xet is disabled: with ``hf_xet`` installed,
huggingface_hub 2.4 uploads through Xet unconditionally unless ``HF_HUB_DISABLE_XET``
is set when it is imported (``tests/conftest.py`` sets it first). Xet itself (a CAS
server speaking xorbs, shards and merkle hashes) is not emulated.

Knobs for transfer tests and benchmarks:

- ``rate_down`` / ``rate_up``: a byte-rate throttle (bytes/s, shared by all
  connections) on what the server sends and receives;
- ``ignore_range``: answer every GET with the whole file (200), like a proxy that
  drops ``Range``; ``RequestRecord.sent`` counts the body bytes actually written
  before the client hung up;
- ``fail_next(..., cut_body_after=N)``: read N bytes of the request body, then drop
  the connection (a failure in the middle of an upload);
- ``fail_next(..., corrupt_at=N)``: answer normally, but with the byte at file offset N
  flipped (a tampered mirror or a bad proxy: the bytes differ from the listed hash);
- ``storage``: a folder to keep LFS objects in, as files, streamed in and out in
  1 MiB pieces (big benchmark repos); by default everything lives in memory;
- ``on_lfs_stored(oid)``: called after each LFS object is stored (``lfs_uploads``
  counts the completed uploads per oid);
- ``rewrite(path_pattern, fn)``: answers of matching JSON routes are ``fn(obj)``
  (bytes) instead of the JSON of ``obj``: a Hub that sends malformed listings, repo
  info or LFS batch answers (the fuzz tests mutate the real answer);
- ``python tests/hubserver.py --serve ...`` runs one in its own process (the
  benchmark does, so the server does not share the client's interpreter).
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import hashlib
import io
import itertools
import json
import os
import re
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

USER = "testuser"
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"  # the client keys on this exact text
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".gguf", ".msgpack",
                ".npy", ".npz", ".pkl", ".pickle", ".zip", ".tar", ".gz", ".tflite", ".model", ".parquet", ".arrow")
GITATTRIBUTES = b"".join(b"*%s filter=lfs diff=lfs merge=lfs -text\n" % s.encode() for s in LFS_SUFFIXES)
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubError(Exception):
    """Raised by a route to answer with an error status, an X-Error-Code and a JSON ``{"error": ...}`` body."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


_CHUNK = 1 << 20


class Throttle:
    """At most ``rate`` bytes per second in total, across threads (None: unlimited).

    Each piece reserves the next free slot on a shared virtual clock and sleeps until
    its slot ends, so concurrent connections share the rate.
    """

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.lock = threading.Lock()
        self.free_at = 0.0

    def take(self, nbytes: int) -> None:
        if not self.rate or nbytes <= 0:
            return
        with self.lock:
            now = time.monotonic()
            self.free_at = max(self.free_at, now) + nbytes / self.rate
            wait = self.free_at - now
        if wait > 0:
            time.sleep(wait)


@dataclass
class StoredFile:
    """A file of a commit: bytes in memory, or (big LFS objects of a disk-backed server) a file."""

    data_: bytes | None
    lfs: bool
    path: Path | None = None
    size_: int | None = None
    sha256_: str | None = None

    @property
    def data(self) -> bytes:
        return self.data_ if self.data_ is not None else self.path.read_bytes()

    @property
    def size(self) -> int:
        if self.size_ is None:
            self.size_ = len(self.data_) if self.data_ is not None else self.path.stat().st_size
        return self.size_

    @property
    def sha256(self) -> str:
        if self.sha256_ is None:
            self.sha256_ = hashlib.sha256(self.data).hexdigest()
        return self.sha256_

    @property
    def pointer(self) -> bytes:
        return b"version https://git-lfs.github.com/spec/v1\noid sha256:%s\nsize %d\n" % (
            self.sha256.encode(), self.size)

    @property
    def blob_id(self) -> str:
        """Git blob id (of the pointer file for LFS files), as in the Hub's tree listing."""
        return git_blob_sha1(self.pointer if self.lfs else self.data)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else git_blob_sha1(self.data)

    def open(self):
        return open(self.path, "rb") if self.data_ is None else io.BytesIO(self.data_)


@dataclass
class Commit:
    repo_id: str
    sha: str
    ref: str  # branch name or "refs/pr/N" it was made on
    message: str
    description: str
    parent: str | None
    snapshot: dict[str, StoredFile]

    @property
    def files(self) -> dict[str, bytes]:
        return {p: f.data for p, f in self.snapshot.items()}

    @property
    def oids(self) -> dict[str, str]:
        """path -> sha256 of the content, without reading disk-backed files again."""
        return {p: f.sha256 for p, f in self.snapshot.items()}


@dataclass
class Repo:
    repo_id: str
    repo_type: str
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # "main", "dev", "refs/pr/1" -> commit sha
    commits: list[Commit] = field(default_factory=list)  # oldest first
    pr_count: int = 0

    def resolve(self, revision: str) -> Commit | None:
        sha = self.refs.get(revision, revision)
        return next((c for c in self.commits if c.sha == sha), None)

    @property
    def head(self) -> Commit:
        return self.resolve("main")

    @property
    def files(self) -> dict[str, bytes]:
        """Files on ``main``: path -> bytes."""
        return self.head.files

    def files_at(self, revision: str) -> dict[str, bytes]:
        return self.resolve(revision).files

    @property
    def oids(self) -> dict[str, str]:
        """Files on ``main``: path -> sha256 of the content (disk-backed files are not read again)."""
        return self.head.oids

    @property
    def lfs_paths(self) -> set[str]:
        return {p for p, f in self.head.snapshot.items() if f.lfs}


@dataclass
class Failure:
    status: int | None
    path_contains: str
    method: str | None
    times: int | None  # None = until clear_failures()
    headers: dict
    drop: bool
    truncate_after: int | None
    cut_body_after: int | None = None
    ranged: bool | None = None  # None: any request; True/False: only requests with/without a Range header
    corrupt_at: int | None = None  # serve the body with the byte at this file offset flipped


@dataclass
class RequestRecord:
    method: str
    path: str  # raw path, without query
    query: dict
    headers: dict  # lower-cased names
    body_size: int
    sent: int = 0  # body bytes written back before the answer ended or the client hung up


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer that can cut its open connections, so ``stop()`` looks like the network going down."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, addr, handler, hub: HubServer):
        self.hub = hub
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(addr, handler)

    def process_request(self, request, client_address):
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def cut_connections(self):
        with self._conns_lock:
            conns = list(self._conns)
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class HubServer:
    """In-memory Hub. ``start()`` serves it on ``host:port`` (0 = free port) from a background thread.

    Inspect state through ``repos`` (key: ``"ns/name"``, ``"datasets/ns/name"`` for datasets),
    ``commits``, ``lfs_objects`` (sha256 -> :class:`StoredFile`), ``lfs_uploads`` and ``requests``
    (every request received).
    """

    def __init__(self, token: str = "hf_test_write_token", read_token: str = "hf_test_read_token",
                 host: str = "127.0.0.1", port: int = 0, lfs_threshold: int = 10 * 1024 * 1024,
                 lfs_redirect: bool = True, rate_down: float | None = None, rate_up: float | None = None,
                 ignore_range: bool = False, storage: str | os.PathLike | None = None):
        self.token, self.read_token = token, read_token
        self.host, self.port = host, port
        self.lfs_threshold = lfs_threshold  # files this big (or binary, or LFS suffix) go through LFS
        self.lfs_redirect = lfs_redirect  # resolve LFS files with a 302 to another origin, like the Hub's CDN
        self.down, self.up = Throttle(rate_down), Throttle(rate_up)
        self.ignore_range = ignore_range
        self.piece_bytes: int | None = None  # bytes per write of a response body (None: 1 MiB, 256 KiB throttled)
        self.storage = Path(storage) if storage is not None else None
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, StoredFile] = {}  # sha256 -> content (memory, or a file in ``storage``)
        self.lfs_uploads: collections.Counter = collections.Counter()  # sha256 -> completed uploads
        self.on_lfs_stored = None  # called with the sha256 after each completed upload
        self.verify_uploads = True  # hash each uploaded object against its oid
        self.seeded: set[str] = set()  # LFS objects seeded from local files (kept by forget_uploads)
        self.bytes_sent = self.bytes_received = 0
        self.requests: list[RequestRecord] = []
        self._failures: list[Failure] = []
        self._rewrites: list[tuple[str, str | None, object]] = []
        self._lock = threading.RLock()
        self._sha_counter = itertools.count()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._api = None

    # ---- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> HubServer:
        self._server = _Server((self.host, self.port), _Handler, self)
        self.port = self._server.server_address[1]  # keep the port so a restart comes back on it
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"hubserver:{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and cut open connections: clients then get connection errors ("network down")."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.cut_connections()
        self._server.server_close()  # joins the handler threads
        self._thread.join(timeout=5)
        self._server = self._thread = None

    @contextlib.contextmanager
    def offline(self):
        """``with hub.offline(): ...`` -- the server is unreachable inside the block, back afterwards."""
        self.stop()
        try:
            yield self
        finally:
            self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def cdn_endpoint(self) -> str:
        """Same server, different origin ("localhost" vs "127.0.0.1"), so the client treats it as a CDN."""
        return f"http://localhost:{self.port}" if self.lfs_redirect else self.endpoint

    @property
    def api(self):
        """An ``HfApi`` bound to this server and the write token."""
        from huggingface_hub import HfApi

        if self._api is None or self._api.endpoint != self.endpoint:
            self._api = HfApi(endpoint=self.endpoint, token=self.token)
        return self._api

    # ---- failure injection -----------------------------------------------------------------------------
    def fail_next(self, status: int | None = 500, path_contains: str = "", method: str | None = None,
                  times: int | None = 1, headers: dict | None = None, error_code: str | None = None,
                  message: str | None = None, drop: bool = False, truncate_after: int | None = None,
                  cut_body_after: int | None = None, ranged: bool | None = None,
                  corrupt_at: int | None = None) -> None:
        """Make the next ``times`` matching requests fail (``times=None``: until ``clear_failures()``).

        Match: ``path_contains`` is a substring of the raw request path, ``method`` (e.g. "HEAD") if given.
        Failure: answer ``status`` with ``X-Error-Code: error_code`` / ``X-Error-Message: message`` and any
        extra ``headers``; or ``drop=True``: close the connection without answering; or ``truncate_after=N``:
        serve the request normally but cut the body after N bytes (exercises download resume);
        or ``cut_body_after=N``: read N bytes of the request body, then drop the connection
        without answering (an upload that fails half way); or ``corrupt_at=N``: serve the
        request normally but flip the byte at file offset N of the body (when the body
        covers it), as a tampered mirror would. ``ranged=False`` matches only
        requests without a Range header (a whole-file download, not a header probe).
        Defaults: 401 says "Invalid credentials in Authorization header", 404 carries ``RepoNotFound``,
        429 and 503 say ``Retry-After: 0`` (as the Hub tells a client when to come back; the client
        then retries after about a second instead of its exponential back-off).
        """
        hdrs = dict(headers or {})
        if status in (429, 503):
            hdrs.setdefault("Retry-After", "0")
        if error_code is None and status == 404:
            error_code = "RepoNotFound"
        if message is None and status == 401:
            message = INVALID_CREDENTIALS
        if error_code:
            hdrs["X-Error-Code"] = error_code
        if message:
            hdrs["X-Error-Message"] = message
        with self._lock:
            self._failures.append(Failure(status, path_contains, method and method.upper(), times, hdrs,
                                          drop, truncate_after, cut_body_after, ranged, corrupt_at))

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def rewrite(self, path_pattern: str, fn, method: str | None = None) -> None:
        """Until ``clear_rewrites()``: a successful JSON answer to a matching request is ``fn(obj)`` (bytes).

        ``obj`` is the answer the route would send; ``fn`` may return any bytes at all (it
        runs on a server thread). Match: the regex ``path_pattern`` matches the whole raw
        path, and ``method`` if given.
        """
        with self._lock:
            self._rewrites.append((path_pattern, method and method.upper(), fn))

    def clear_rewrites(self) -> None:
        with self._lock:
            self._rewrites.clear()

    def _rewritten(self, method: str, path: str, obj) -> bytes | None:
        with self._lock:
            for pattern, m, fn in self._rewrites:
                if re.fullmatch(pattern, path) and m in (None, method):
                    return fn(obj)
        return None

    def _take_failure(self, method: str, path: str, ranged: bool = False) -> Failure | None:
        with self._lock:
            for f in self._failures:
                if f.path_contains in path and f.method in (None, method) and f.ranged in (None, ranged):
                    if f.times is not None:
                        f.times -= 1
                        if f.times <= 0:
                            self._failures.remove(f)
                    return f
        return None

    # ---- state helpers ---------------------------------------------------------------------------------
    @property
    def commits(self) -> list[Commit]:
        """Every commit, in every repo, oldest first (includes each repo's initial commit)."""
        with self._lock:
            return sorted((c for r in self.repos.values() for c in r.commits), key=lambda c: int(c.sha[-8:], 16))

    def repo_url(self, repo_id: str, repo_type: str = "model") -> str:
        return f"{self.endpoint}/{URL_PREFIX[repo_type]}{repo_id}"

    def add_repo(self, repo_id: str, files: dict[str, bytes | Path] | None = None, repo_type: str = "model",
                 private: bool = False, branch: str = "main") -> Repo:
        """Seed a repo directly (no HTTP); ``files`` are committed on ``branch`` (created from main).

        A value may be a local file (``Path``): with ``storage`` its bytes are copied there
        without being held in memory.
        """
        with self._lock:
            key = URL_PREFIX[repo_type] + repo_id
            repo = self.repos.get(key) or self._create_repo(key, repo_id, repo_type, private)
            if branch not in repo.refs:
                repo.refs[branch] = repo.head.sha
            if files:
                snap = dict(repo.resolve(branch).snapshot)
                for path, data in files.items():
                    if isinstance(data, Path):
                        size = data.stat().st_size
                        with open(data, "rb") as f:
                            sample = f.read(512)
                        if self._is_lfs(path, size, sample):
                            snap[path] = self._store_file(data, size)
                            continue
                        data = data.read_bytes()
                    lfs = self._is_lfs(path, len(data), data[:512])
                    snap[path] = self._store(io.BytesIO(data), len(data)) if lfs else StoredFile(data, False)
                self._commit(repo, branch, "seed files", "", snap)
            return repo

    def _store_file(self, path: Path, size: int) -> StoredFile:
        """Seed the LFS store with a local file: a hard link into ``storage`` when possible (no copy)."""
        if self.storage is None:
            with open(path, "rb") as f:
                return self._store(f, size)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while piece := f.read(8 * _CHUNK):
                h.update(piece)
        oid = h.hexdigest()
        final = self.storage / oid
        if not final.exists():
            try:
                os.link(path, final)
            except OSError:
                with open(path, "rb") as f:
                    return self._store(f, size)
        with self._lock:
            self.lfs_objects.setdefault(oid, StoredFile(None, True, final, size, oid))
            self.seeded.add(oid)
        return self.lfs_objects[oid]

    def forget_uploads(self) -> int:
        """Drop every LFS object that was uploaded (seeded ones stay); return how many. For benchmarks."""
        with self._lock:
            gone = [oid for oid in self.lfs_objects if oid not in self.seeded]
            for oid in gone:
                f = self.lfs_objects.pop(oid)
                if f.path is not None:
                    with contextlib.suppress(FileNotFoundError):
                        f.path.unlink()
            return len(gone)

    def _store(self, stream, size: int, expected: str | None = None, throttle: Throttle | None = None,
               count=None) -> StoredFile | None:
        """Read ``size`` bytes of ``stream`` into the LFS store (a file under ``storage``, or memory).

        Returns None when the content's sha256 is not ``expected`` (nothing is kept).
        """
        # An unverified store (benchmarks) trusts the client's oid, as if the Hub checked on its own machines.
        h = None if (expected is not None and not self.verify_uploads) else hashlib.sha256()
        tmp = None
        if self.storage is not None:
            fd, tmp = tempfile.mkstemp(dir=self.storage, prefix=".incoming-")
            sink = os.fdopen(fd, "wb")
        else:
            sink = io.BytesIO()
        try:
            left = size
            while left:
                piece = stream.read(min(_CHUNK, left))
                if not piece:
                    raise ConnectionError("body ended early")
                if throttle is not None:
                    throttle.take(len(piece))
                if count is not None:
                    count(len(piece))
                if h is not None:
                    h.update(piece)
                sink.write(piece)
                left -= len(piece)
            oid = h.hexdigest() if h is not None else expected
            if expected is not None and oid != expected:
                return None
            if self.storage is None:
                stored = StoredFile(sink.getvalue(), True, None, size, oid)
            else:
                sink.close()
                final = self.storage / oid
                os.replace(tmp, final)
                tmp = None
                stored = StoredFile(None, True, final, size, oid)
            with self._lock:
                self.lfs_objects.setdefault(oid, stored)
            return self.lfs_objects[oid]
        finally:
            if not sink.closed:
                sink.close()
            if tmp is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)

    def _create_repo(self, key: str, repo_id: str, repo_type: str, private: bool) -> Repo:
        repo = self.repos[key] = Repo(repo_id, repo_type, private)
        self._commit(repo, "main", "initial commit", "", {".gitattributes": StoredFile(GITATTRIBUTES, False)})
        return repo

    def _commit(self, repo: Repo, ref: str, message: str, description: str, snapshot: dict) -> Commit:
        parent = repo.refs.get(ref)
        n = next(self._sha_counter)
        digest = hashlib.sha1(f"{repo.repo_id}\n{parent}\n{message}\n{n}".encode()).hexdigest()
        commit = Commit(repo.repo_id, digest[:32] + f"{n:08x}", ref, message, description, parent, snapshot)
        repo.commits.append(commit)
        repo.refs[ref] = commit.sha
        return commit

    def _is_lfs(self, path: str, size: int, sample: bytes) -> bool:
        return size >= self.lfs_threshold or path.lower().endswith(LFS_SUFFIXES) or b"\0" in sample


# ---- HTTP layer ----------------------------------------------------------------------------------------
_REPO = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
_API = r"/api/(?P<type>models|datasets|spaces)/" + _REPO
_ROUTES = [  # (method, regex on the raw path, handler method name)
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("DELETE", r"/api/repos/delete", "delete_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", _API + r"(?:/revision/(?P<rev>[^/]+))?", "repo_info"),
    ("GET", _API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", "tree"),
    ("GET", _API + r"/refs", "refs"),
    ("POST", _API + r"/branch/(?P<branch>[^/]+)", "create_branch"),
    ("POST", _API + r"/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", _API + r"/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", r"/(?P<prefix>datasets/|spaces/)?" + _REPO + r"\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/_lfs/upload/(?P<oid>[0-9a-f]{64})", "lfs_put"),
    ("POST", r"/_lfs/verify", "lfs_verify"),
    ("GET", r"/_lfs/(?P<oid>[0-9a-f]{64})", "lfs_get"),
    ("GET", r"/(?P<prefix>datasets/|spaces/)?" + _REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("GET", r"/_test/stats", "stats"),
    ("POST", r"/_test/forget", "forget"),
]
_ROUTES = [(m, re.compile(rx), name) for m, rx, name in _ROUTES]
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", None: "model", "": "model",
          "datasets/": "dataset", "spaces/": "space"}


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # one request per connection: nothing lingers when the server stops
    timeout = 30
    server: _Server

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        self._handle()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    # ---- plumbing --------------------------------------------------------------------------------------
    def _handle(self):
        hub = self.server.hub
        parts = urlsplit(self.path)
        self.raw_path, self.query = parts.path, {k: v[-1] for k, v in parse_qs(parts.query).items()}
        # LFS object bodies are streamed by their route; every other body is read (drained) first,
        # so that errors reach the client intact.
        streamed = self.command == "PUT" and self.raw_path.startswith("/_lfs/upload/")
        self.body = b"" if streamed else self._read_body()
        self.record = RequestRecord(self.command, self.raw_path, self.query,
                                    {k.lower(): v for k, v in self.headers.items()},
                                    int(self.headers.get("Content-Length") or 0) if streamed else len(self.body))
        with hub._lock:
            hub.requests.append(self.record)
        self.truncate_after = None
        self.corrupt_at = None
        self.body_offset = 0  # file offset of the first byte of the body (a Range answer starts later)
        failure = hub._take_failure(self.command, self.raw_path, "Range" in self.headers)
        if failure is not None:
            if failure.cut_body_after is not None:
                with contextlib.suppress(OSError, ValueError):
                    left = min(failure.cut_body_after, self.record.body_size) if streamed else 0
                    while left:
                        piece = self.rfile.read(min(_CHUNK, left))
                        if not piece:
                            break
                        hub.up.take(len(piece))
                        left -= len(piece)
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if failure.drop:
                self.close_connection = True
                return
            if failure.corrupt_at is not None:
                self.corrupt_at = failure.corrupt_at
            elif failure.truncate_after is not None:
                self.truncate_after = failure.truncate_after
            else:
                return self._send_error(HubError(failure.status, failure.headers.get("X-Error-Message")
                                                 or f"Injected failure ({failure.status})", None, failure.headers))
        try:
            self.user = self._auth()
            method = "GET" if self.command == "HEAD" else self.command
            for route_method, rx, name in _ROUTES:
                m = rx.fullmatch(self.raw_path)
                if m and route_method == method:
                    args = {k: unquote(v) if v is not None else None for k, v in m.groupdict().items()}
                    return getattr(self, "r_" + name)(**args)
            raise HubError(404, f"Not found: {self.command} {self.raw_path}")
        except HubError as err:
            self._send_error(err)
        except Exception as exc:  # a bug here: answer 500 rather than a dropped connection
            self._send_error(HubError(500, f"hubserver crashed: {exc!r}"))

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None,
              content_type: str = "application/json", stream=None, length: int | None = None):
        """Answer; the body is ``body``, or ``length`` bytes read from ``stream`` (sent in throttled pieces)."""
        hub = self.server.hub
        length = len(body) if stream is None else length
        self.send_response(status)
        headers = {"Content-Type": content_type, "Content-Length": str(length),
                   "X-Request-Id": f"req-{len(hub.requests)}", **(headers or {})}
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            stream = io.BytesIO(body) if stream is None else stream
            left = length if self.truncate_after is None else min(length, self.truncate_after)
            step = hub.piece_bytes or (_CHUNK if hub.down.rate is None else 256 * 1024)  # throttled: smaller pieces
            pos = self.body_offset
            try:
                while left:
                    piece = stream.read(min(step, left))
                    if not piece:
                        break
                    if self.corrupt_at is not None and pos <= self.corrupt_at < pos + len(piece):
                        flipped = bytearray(piece)
                        flipped[self.corrupt_at - pos] ^= 0x01
                        piece = bytes(flipped)
                    pos += len(piece)
                    hub.down.take(len(piece))
                    self.wfile.write(piece)
                    left -= len(piece)
                    self.record.sent += len(piece)
                    with hub._lock:
                        hub.bytes_sent += len(piece)
            except (BrokenPipeError, ConnectionResetError):  # the client hung up (e.g. it had what it needed)
                self.close_connection = True
        if self.truncate_after is not None:
            self.close_connection = True

    def _json(self, obj, status: int = 200, headers: dict | None = None, content_type="application/json"):
        body = self.server.hub._rewritten(self.command, self.raw_path, obj) if status < 300 else None
        self._send(status, json.dumps(obj).encode() if body is None else body, headers, content_type)

    def _send_error(self, err: HubError):
        headers = dict(err.headers)
        if err.code:
            headers["X-Error-Code"] = err.code
        headers.setdefault("X-Error-Message", err.message)
        self._json({"error": err.message}, err.status, headers)

    def _auth(self) -> str | None:
        """Return "write", "read" or None (anonymous); 401 on an unknown Bearer token, like the Hub."""
        value = self.headers.get("Authorization")
        if not value:
            return None
        token = value[7:] if value.startswith("Bearer ") else None
        hub = self.server.hub
        if token == hub.token:
            return "write"
        if token == hub.read_token:
            return "read"
        raise HubError(401, INVALID_CREDENTIALS)

    def _require_write(self):
        if self.user is None:
            raise HubError(401, "You must be authenticated to access this endpoint.")
        if self.user != "write":
            raise HubError(403, "You don't have the rights to write to this repository (read-only token).")

    def _json_body(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except ValueError:
            raise HubError(400, "Invalid JSON body") from None

    def _repo(self, ns: str, name: str, type: str | None = None, prefix: str | None = None) -> Repo:
        repo_type = _TYPES[type if type is not None else prefix]
        repo = self.server.hub.repos.get(URL_PREFIX[repo_type] + f"{ns}/{name}")
        if repo is None or (repo.private and self.user is None):
            # The Hub answers 401 for private repos seen anonymously, 404 otherwise; both carry RepoNotFound.
            raise HubError(401 if repo is not None else 404, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _commit_or_404(repo: Repo, rev: str) -> Commit:
        commit = repo.resolve(rev)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    # ---- routes ----------------------------------------------------------------------------------------
    def r_whoami(self):
        """HfApi.whoami"""
        if self.user is None:
            raise HubError(401, INVALID_CREDENTIALS)
        self._json({"type": "user", "id": "0" * 24, "name": USER, "fullname": "Test User", "orgs": [],
                    "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": self.user}}})

    def r_create_repo(self):
        """HfApi.create_repo: 200 {"url"}; 409 (still with "url") if it exists, which exist_ok=True tolerates."""
        self._require_write()
        hub, body = self.server.hub, self._json_body()
        repo_type = body.get("type") or "model"
        if repo_type not in URL_PREFIX or not body.get("name"):
            raise HubError(400, "Invalid repo name or type")
        repo_id = f"{body.get('organization') or USER}/{body['name']}"
        url = hub.repo_url(repo_id, repo_type)
        with hub._lock:
            key = URL_PREFIX[repo_type] + repo_id
            if key in hub.repos:
                return self._json({"error": "You already created this repo", "url": url}, 409)
            private = body.get("visibility", "public") != "public" or bool(body.get("private"))
            hub._create_repo(key, repo_id, repo_type, private)
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def r_delete_repo(self):
        """HfApi.delete_repo"""
        self._require_write()
        hub, body = self.server.hub, self._json_body()
        repo_type = body.get("type") or "model"
        key = URL_PREFIX.get(repo_type, "") + f"{body.get('organization') or USER}/{body.get('name')}"
        with hub._lock:
            if hub.repos.pop(key, None) is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
        self._json({})

    def r_validate_yaml(self):
        """HfApi.create_commit calls this when README.md is in the commit."""
        self._json({"errors": [], "warnings": []})

    def r_repo_info(self, type, ns, name, rev=None):
        """HfApi.repo_info / model_info / dataset_info / repo_exists / revision_exists"""
        repo = self._repo(ns, name, type)
        commit = self._commit_or_404(repo, rev or "main")
        blobs = _truthy(self.query.get("blobs"))
        siblings = []
        for path, f in sorted(commit.snapshot.items()):
            s = {"rfilename": path}
            if blobs:
                s.update(size=f.size, blobId=f.blob_id)
                if f.lfs:
                    s["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": len(f.pointer)}
            siblings.append(s)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        self._json({"_id": repo.repo_id, "id": repo.repo_id, "author": ns, "sha": commit.sha,
                    "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
                    "tags": [], "lastModified": stamp, "createdAt": stamp, "siblings": siblings})

    def r_tree(self, type, ns, name, rev, path=None):
        """HfApi.list_repo_tree / list_repo_files (single page, no Link header)."""
        commit = self._commit_or_404(self._repo(ns, name, type), rev)
        base = (path or "").strip("/")
        recursive = _truthy(self.query.get("recursive"))
        if base and base in commit.snapshot:
            raise HubError(400, f"{base} is a file, not a directory")
        under = {p: f for p, f in commit.snapshot.items() if not base or p.startswith(base + "/")}
        if base and not under:
            raise HubError(404, f"Entry not found: {base}", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        entries: dict[str, dict] = {}
        for p, f in sorted(under.items()):
            rel = p[len(base) + 1:] if base else p
            parts = rel.split("/")
            for depth in range(1, len(parts)):  # intermediate directories
                d = "/".join(filter(None, [base, *parts[:depth]]))
                entries.setdefault(d, {"type": "directory", "oid": git_blob_sha1(d.encode()), "size": 0, "path": d})
                if not recursive:
                    break
            if recursive or len(parts) == 1:
                e = {"type": "file", "oid": f.blob_id, "size": f.size, "path": p}
                if f.lfs:
                    e["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(f.pointer)}
                entries[p] = e
        self._json(list(entries.values()))

    def r_refs(self, type, ns, name):
        """HfApi.list_repo_refs"""
        repo = self._repo(ns, name, type)
        branches = [{"name": r, "ref": f"refs/heads/{r}", "targetCommit": s}
                    for r, s in repo.refs.items() if not r.startswith("refs/")]
        prs = [{"name": r, "ref": r, "targetCommit": s} for r, s in repo.refs.items() if r.startswith("refs/pr/")]
        self._json({"branches": branches, "converts": [], "tags": [], "pullRequests": prs})

    def r_create_branch(self, type, ns, name, branch):
        """HfApi.create_branch: 409 if it exists (exist_ok=True tolerates that)."""
        self._require_write()
        repo = self._repo(ns, name, type)
        with self.server.hub._lock:
            if branch in repo.refs:
                raise HubError(409, "Reference already exists")
            start = self._commit_or_404(repo, self._json_body().get("startingPoint") or "main")
            repo.refs[branch] = start.sha
        self._json({})

    def r_preupload(self, type, ns, name, rev):
        """Commit step 1: decide "lfs" or "regular" per file; "oid" lets the client skip unchanged files."""
        self._require_write()
        hub, repo = self.server.hub, self._repo(ns, name, type)
        commit = self._commit_or_404(repo, rev)
        out = []
        for f in self._json_body().get("files", []):
            sample = base64.b64decode(f.get("sample", ""))
            lfs = hub._is_lfs(f["path"], int(f["size"]), sample)
            existing = commit.snapshot.get(f["path"])
            oid = None
            if existing is not None:
                oid = existing.sha256 if lfs else existing.etag
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        self._json({"files": out, "commitOid": commit.sha})

    def r_lfs_batch(self, ns, name, prefix=None):
        """Commit step 2 (LFS files): Git LFS batch API, "basic" transfer; already-stored objects get no actions."""
        self._require_write()
        hub = self.server.hub
        self._repo(ns, name, prefix=prefix)
        body = self._json_body()
        if body.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported")
        objects = []
        for obj in body.get("objects", []):
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if obj["oid"] not in hub.lfs_objects:
                entry["actions"] = {"upload": {"href": f"{hub.endpoint}/_lfs/upload/{obj['oid']}"},
                                    "verify": {"href": f"{hub.endpoint}/_lfs/verify"}}
            objects.append(entry)
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   content_type="application/vnd.git-lfs+json")

    def r_lfs_put(self, oid):
        """Commit step 2b: the pre-signed PUT of one LFS object (basic transfer: whole body, no auth).

        The body is streamed (throttled by ``rate_up``) into the store while it is hashed.
        """
        hub = self.server.hub
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            body = self._read_body()
            stream, size = io.BytesIO(body), len(body)
        else:
            stream, size = self.rfile, self.record.body_size

        def count(n):
            with hub._lock:
                hub.bytes_received += n

        try:
            stored = hub._store(stream, size, expected=oid, throttle=hub.up, count=count)
        except (ConnectionError, OSError):
            self.close_connection = True
            return
        if stored is None:
            raise HubError(400, "Uploaded content does not match the sha256 oid")
        with hub._lock:
            hub.lfs_uploads[oid] += 1
        if hub.on_lfs_stored is not None:
            hub.on_lfs_stored(oid)
        self._send(200, content_type="text/plain")

    def r_lfs_verify(self):
        """Commit step 2c: LFS verify action."""
        self._require_write()
        body = self._json_body()
        data = self.server.hub.lfs_objects.get(body.get("oid"))
        if data is None or data.size != body.get("size"):
            raise HubError(404, "LFS object not found")
        self._json({"success": True})

    def r_commit(self, type, ns, name, rev):
        """Commit step 3: NDJSON body (header, file, lfsFile, deletedFile, deletedFolder); ?create_pr=1 opens a PR."""
        self._require_write()
        hub, repo = self.server.hub, self._repo(ns, name, type)
        try:
            lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        except ValueError:
            raise HubError(400, "Invalid NDJSON body") from None
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "First NDJSON line must be the commit header")
        header = lines[0]["value"]
        create_pr = _truthy(self.query.get("create_pr"))
        with hub._lock:
            base = self._commit_or_404(repo, rev)
            if not create_pr and rev not in repo.refs:
                raise HubError(400, f"Can only commit to a branch or PR ref, not {rev}")
            if header.get("parentCommit") not in (None, base.sha):
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            snap = dict(base.snapshot)
            for op in lines[1:]:
                key, v = op.get("key"), op.get("value", {})
                if key == "file":
                    snap[v["path"]] = StoredFile(base64.b64decode(v["content"]), False)
                elif key == "lfsFile":
                    if v["oid"] not in hub.lfs_objects:
                        raise HubError(400, f"LFS object {v['oid']} was never uploaded for {v['path']}")
                    snap[v["path"]] = hub.lfs_objects[v["oid"]]
                elif key == "deletedFile":
                    if snap.pop(v["path"], None) is None:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    for p in [p for p in snap if p.startswith(v["path"].rstrip("/") + "/")]:
                        del snap[p]
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            if create_pr:
                repo.pr_count += 1
                ref = f"refs/pr/{repo.pr_count}"
                repo.refs[ref] = base.sha
            else:
                ref = rev
            commit = hub._commit(repo, ref, header.get("summary", ""), header.get("description", ""), snap)
        repo_url = hub.repo_url(repo.repo_id, repo.repo_type)
        out = {"success": True, "commitOid": commit.sha, "commitUrl": f"{repo_url}/commit/{commit.sha}",
               "hookOutput": ""}
        if create_pr:
            out["pullRequestUrl"] = f"{repo_url}/discussions/{repo.pr_count}"
        self._json(out)

    def r_resolve(self, ns, name, rev, path, prefix=None):
        """hf_hub_download / file_exists: HEAD for metadata, GET for bytes (Range supported).

        Headers: X-Repo-Commit, ETag (git sha1, or sha256 for LFS), X-Linked-Etag / X-Linked-Size for LFS.
        LFS files answer 302 to ``cdn_endpoint/_lfs/<sha256>`` when ``lfs_redirect`` is on.
        """
        hub, repo = self.server.hub, self._repo(ns, name, prefix=prefix)
        commit = self._commit_or_404(repo, rev)
        f = commit.snapshot.get(path)
        if f is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{f.etag}"', "Accept-Ranges": "bytes"}
        if f.lfs:
            headers.update({"X-Linked-Etag": f'"{f.sha256}"', "X-Linked-Size": str(f.size)})
            if hub.lfs_redirect:
                headers.update({"Location": f"{hub.cdn_endpoint}/_lfs/{f.sha256}", "ETag": f'"{f.blob_id}"'})
                return self._send(302, b"", headers, "text/plain")
        self._send_bytes(f, headers)

    def r_lfs_get(self, oid):
        """The "CDN" that LFS resolve redirects point to (no auth, like a pre-signed URL)."""
        data = self.server.hub.lfs_objects.get(oid)
        if data is None:
            raise HubError(404, "LFS object not found")
        self._send_bytes(data, {"ETag": f'"{oid}"', "Accept-Ranges": "bytes"})

    def _send_bytes(self, f: StoredFile, headers: dict):
        """The content of ``f`` (a Range of it, unless ``ignore_range``), streamed from memory or disk."""
        size = f.size
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "").strip())
        with f.open() as stream:
            if m is None or self.server.hub.ignore_range:
                return self._send(200, headers=headers, content_type="application/octet-stream", stream=stream,
                                  length=size)
            start, end = int(m[1]), int(m[2]) if m[2] else size - 1
            if start >= size:
                raise HubError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{size}"})
            end = min(end, size - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            stream.seek(start)
            self.body_offset = start
            self._send(206, headers=headers, content_type="application/octet-stream", stream=stream,
                       length=end - start + 1)

    def r_forget(self):
        """Drop the uploaded LFS objects (benchmarks: the next run uploads everything again)."""
        self._json({"forgotten": self.server.hub.forget_uploads()})

    def r_stats(self):
        """Counters, for a benchmark that runs the server in another process."""
        hub = self.server.hub
        with hub._lock:
            self._json({"bytes_sent": hub.bytes_sent, "bytes_received": hub.bytes_received,
                        "lfs_uploads": dict(hub.lfs_uploads),
                        "repos": {k: r.oids for k, r in hub.repos.items()}})


def main(argv: list[str] | None = None) -> None:
    """``python tests/hubserver.py --serve [--storage DIR] [--seed ORG/NAME=FOLDER] [--rate-down B/s] ...``

    Serves a loopback Hub in this process until stdin closes (or SIGTERM); prints one
    JSON line first: ``{"endpoint": ..., "token": ..., "pid": ...}``.
    """
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--serve", action="store_true", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--storage", type=Path, default=None, help="keep LFS objects as files here")
    ap.add_argument("--seed", action="append", default=[], metavar="ORG/NAME=FOLDER",
                    help="create a repo from the files of FOLDER (top level)")
    ap.add_argument("--rate-down", type=float, default=None, help="bytes/s the server sends, in total")
    ap.add_argument("--rate-up", type=float, default=None, help="bytes/s the server receives, in total")
    ap.add_argument("--no-verify-uploads", action="store_true",
                    help="store uploads without hashing them (the real Hub hashes on its own machines)")
    args = ap.parse_args(argv)
    server = HubServer(port=args.port, storage=args.storage, rate_down=args.rate_down, rate_up=args.rate_up)
    server.verify_uploads = not args.no_verify_uploads
    for seed in args.seed:
        repo_id, folder = seed.split("=", 1)
        server.add_repo(repo_id, {p.name: p for p in sorted(Path(folder).iterdir()) if p.is_file()})
    server.start()
    print(json.dumps({"endpoint": server.endpoint, "token": server.token, "pid": os.getpid()}), flush=True)
    try:
        sys.stdin.read()  # until the parent closes our stdin
    finally:
        server.stop()


if __name__ == "__main__":
    main()
