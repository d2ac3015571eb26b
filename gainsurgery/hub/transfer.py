"""Moving bytes to and from the Hub one file at a time, in bounded memory.

- :func:`read_range` reads a byte range of a Hub file with an HTTP Range request,
  streaming: a server or proxy that ignores ``Range`` (answers 200 with the whole
  file) is read only up to the range's end and then hung up on, so a shard header
  never costs a whole shard in memory or bandwidth.
- :func:`download_file` streams one file into a file of ours (not the HF cache),
  resuming with ``Range`` after a dropped connection, reporting each byte as it
  lands (an apply can follow the download) and checking size and sha256.
- :func:`preupload_file` uploads one generated file as an LFS object with
  ``HfApi.preupload_lfs_files``, passing the sha256 we already know.
- :func:`lfs_objects_present` asks the LFS batch endpoint which objects the Hub
  already stores.

**What huggingface_hub (2.4) lets us pass about a file we hashed ourselves.**
``CommitOperationAdd`` takes no hash argument: built from a path it reads only the
first 512 bytes into an ``UploadInfo`` whose ``sha256`` is lazy and has a public
setter (``UploadInfo.is_hashed`` tells whether it is known). Once it is set:
the LFS path (``HF_HUB_DISABLE_XET=1`` or no ``hf_xet``) skips
``_compute_missing_sha256s`` and sends it as the batch ``oid``; the Xet path passes
it to ``hf_xet`` (``start_upload_file(path, sha256=...)``) instead of
``COMPUTE_SHA256``, so hf_xet does not hash the file a second time either (it still
reads it once to cut it into chunks). The commit payload (``lfsFile``) uses the same
value. A file object instead of a path would make ``CommitOperationAdd`` read the
whole file to hash it, and makes the Xet path fall back to LFS with a warning.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator
from urllib.parse import quote

from gainsurgery.errors import CheckpointError, HubError
from gainsurgery.hub.client import HubClient
from gainsurgery.hub.errors import hub_answer, hub_errors
from gainsurgery.hub.integrity import ContentHasher
from gainsurgery.hub.internals import xet_uploads
from gainsurgery.io.atomic import open_nofollow

if TYPE_CHECKING:
    from gainsurgery.hub.integrity import HubFileHash

#: Bytes handed over per network read while streaming a download.
DOWNLOAD_CHUNK_BYTES = 1 << 20
#: Attempts at a download (the first try plus resumes after a dropped connection).
DOWNLOAD_ATTEMPTS = 5
#: Objects asked about per LFS batch request (huggingface_hub sends at most 256).
LFS_BATCH_OBJECTS = 100
#: Seconds a connection may stay silent before it counts as dropped.
READ_TIMEOUT_S = 60.0


class TransferAborted(Exception):
    """Raised inside a transfer when the pipeline it belongs to gave up (another stage failed)."""


def _timeout() -> Any:
    import httpx2

    return httpx2.Timeout(READ_TIMEOUT_S, connect=30.0)


def _transport_errors() -> tuple[type[BaseException], ...]:
    import httpx2

    return (httpx2.TransportError,)


#: HTTP statuses worth another try (rate limit, server busy), as huggingface_hub's own retries.
RETRY_STATUSES = (429, 500, 502, 503, 504)
#: Tries of one request on a retryable status or a failed connection.
REQUEST_ATTEMPTS = 5


@contextlib.contextmanager
def _streamed_get(client: HubClient, url: str, headers: dict[str, str]) -> Iterator[Any]:
    """A streamed GET through huggingface_hub's shared HTTP client (its proxies, its user agent).

    Retries a failed connection and the statuses of :data:`RETRY_STATUSES` (honouring
    ``Retry-After``), then raises like huggingface_hub (``hf_raise_for_status``).
    A failure while the caller reads the body is the caller's to handle: unlike
    ``http_stream_backoff``, nothing here retries behind its back.
    """
    from huggingface_hub.utils import get_session, hf_raise_for_status

    wait = 1.0
    for attempt in range(REQUEST_ATTEMPTS):
        last = attempt == REQUEST_ATTEMPTS - 1
        try:
            cm = get_session().stream("GET", url, headers=headers, timeout=_timeout(), follow_redirects=True)
            response = cm.__enter__()
        except _transport_errors():
            if last:
                raise
            time.sleep(wait)
            wait = min(8.0, wait * 2)
            continue
        try:
            if response.status_code in RETRY_STATUSES and not last:
                retry_after = response.headers.get("Retry-After", "")
                time.sleep(float(retry_after) + 1 if retry_after.isdigit() else wait)
                wait = min(8.0, wait * 2)
                continue
            if response.status_code >= 400:
                response.read()  # the error's message is in the body
                hf_raise_for_status(response)
            yield response
            return
        finally:
            cm.__exit__(None, None, None)


def read_range(client: HubClient, url: str, first: int, last: int, *, what: str) -> bytes:
    """Bytes ``first..last`` (inclusive) of the file at ``url``, at most ``last - first + 1`` of them.

    Asks for them with ``Range``; if the server sends the whole file instead (200),
    reads it only until ``last`` and closes the connection. Memory: the range plus
    one network read. A file shorter than ``last`` gives fewer bytes.

    Raises:
        HubError: the request failed (one line, naming ``what``).

    Example:
        >>> read_range(client, client.file_url("org/m", "model.safetensors"), 0, 7, what="org/m")  # doctest: +SKIP
        b'\\x90\\x1f\\x00\\x00\\x00\\x00\\x00\\x00'
    """
    want = last - first + 1
    out = bytearray()
    with hub_errors(what, "read the header of", client.endpoint):
        headers = {**client.headers(), "Range": f"bytes={first}-{last}"}
        with _streamed_get(client, url, headers) as response:
            skip = first if response.status_code == 200 else 0  # Range ignored: the body starts at byte 0
            for chunk in response.iter_bytes():  # as it arrives: stop as soon as we have the range
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                out += chunk[: want - len(out)]
                if len(out) >= want:
                    break  # stop reading: leaving the block closes the connection
    return bytes(out)


class Arrival:
    """How much of a file being written is there: other threads wait on it.

    ``ready(end)`` blocks until bytes ``[0, end)`` are written, ``wait_done()`` until
    the writer has checked the whole file; both raise :class:`TransferAborted` once
    the writer failed or was given up, so a reader never waits forever.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.have = 0
        self.done = False
        self.failed: BaseException | None = None
        self.cond = threading.Condition()

    def finish(self) -> None:
        with self.cond:
            self.done = True
            self.cond.notify_all()

    def wait_done(self) -> None:
        with self.cond:
            while not self.done and self.failed is None:
                self.cond.wait()
            if not self.done:
                raise TransferAborted(f"the download stopped ({self.failed})")

    def advance(self, have: int) -> None:
        with self.cond:
            self.have = have
            self.cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self.cond:
            if self.failed is None:
                self.failed = exc
            self.cond.notify_all()

    def ready(self, end: int) -> None:
        with self.cond:
            while self.have < min(end, self.size) and self.failed is None:
                self.cond.wait()
            if self.failed is not None and self.have < min(end, self.size):
                raise TransferAborted(f"the download stopped ({self.failed})")


def download_file(client: HubClient, repo_id: str, filename: str, revision: str, dest: Path, *,
                  expected: HubFileHash | None, arrival: Arrival | None = None,
                  progress: Callable[[int], Any] | None = None,
                  stop: threading.Event | None = None) -> None:
    """Stream ``filename`` of ``repo_id`` at ``revision`` into the new file ``dest``.

    Resumes with ``Range`` after a dropped connection (up to :data:`DOWNLOAD_ATTEMPTS`
    tries; a server that ignores ``Range`` on a resume is read again from the start,
    skipping what we have). The content is hashed as it arrives and must match what
    the Hub lists (``expected``: the LFS sha256, or the git blob id of a file not in
    LFS) and its size; a file the Hub lists no hash for is refused before any byte
    is fetched (:mod:`gainsurgery.hub.integrity`).

    Args:
        expected: the size and hash the Hub's tree listing gives for the file.
        arrival: told how many bytes are on disk, as they land.
        progress: called with each number of new bytes.
        stop: set by another thread to abort (raises :class:`TransferAborted`).

    Raises:
        HubError: the Hub refused or the network failed after the retries.
        CheckpointError: the file's size or sha256 differs from what the Hub lists.
        TransferAborted: ``stop`` was set.
    """
    url = client.file_url(repo_id, filename, revision=revision)
    what = f"{repo_id}@{revision[:12]}:{filename}"
    if expected is None:
        raise CheckpointError(f"{what}: the Hub lists no sha256 or git blob id for it; refusing to use bytes "
                              "that cannot be checked")
    size = expected.size
    h = ContentHasher(expected)
    have = 0
    # The file may exist, empty, created by the caller (so a reader can open it first); never a link.
    fd = open_nofollow(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with hub_errors(what, "download", client.endpoint):
            for attempt in range(DOWNLOAD_ATTEMPTS):
                headers = client.headers()
                if have:
                    headers["Range"] = f"bytes={have}-"
                try:
                    with _streamed_get(client, url, headers) as response:
                        skip = have if response.status_code == 200 else 0  # Range ignored: from byte 0 again
                        for chunk in response.iter_bytes():  # as it arrives: a reader may follow closely
                            if stop is not None and stop.is_set():
                                raise TransferAborted("download given up")
                            if skip:
                                cut = min(skip, len(chunk))
                                chunk, skip = chunk[cut:], skip - cut
                                if not chunk:
                                    continue
                            if have + len(chunk) > size:
                                raise CheckpointError(f"{what}: the Hub sent more than the {size} bytes it lists; "
                                                      "try again (the file changed?)")
                            _write_all(fd, chunk)
                            h.update(chunk)
                            have += len(chunk)
                            if arrival is not None:
                                arrival.advance(have)
                            if progress is not None:
                                progress(len(chunk))
                    if have >= size:
                        break
                except _transport_errors():
                    if attempt == DOWNLOAD_ATTEMPTS - 1:
                        raise  # hub_errors says: could not reach the Hub
                    time.sleep(min(8.0, 0.5 * 2 ** attempt))
        if have != size:
            raise CheckpointError(f"{what}: downloaded {have} bytes, the Hub lists {size}; try again "
                                  "(the file changed?)")
        h.check(what)
        if arrival is not None:
            arrival.finish()
    except BaseException as exc:
        if arrival is not None:
            arrival.fail(exc)
        raise
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    mv = memoryview(data)
    while mv:
        mv = mv[os.write(fd, mv):]


class ProgressReader(io.BufferedReader):
    """A file opened for an upload that reports the bytes read and can be aborted.

    ``on_read(n)`` gets each number of *new* bytes (a retry that reads the start
    again is not counted twice); once ``stop`` is set, the next read raises
    :class:`TransferAborted`, which ends the upload at the next chunk.
    """

    def __init__(self, path: Path, on_read: Callable[[int], Any] | None = None,
                 stop: threading.Event | None = None) -> None:
        # Our own output shard in the claimed work folder: never through a link.
        super().__init__(io.FileIO(open_nofollow(path, os.O_RDONLY), "rb", closefd=True), buffer_size=1 << 20)
        self._on_read = on_read
        self._stop = stop
        self._furthest = 0

    def read(self, size: int | None = -1) -> bytes:  # type: ignore[override]
        if self._stop is not None and self._stop.is_set():
            raise TransferAborted("upload given up")
        data = super().read(size)
        pos = self.tell()
        if pos > self._furthest:
            if self._on_read is not None:
                self._on_read(pos - self._furthest)
            self._furthest = pos
        return data


def preupload_file(client: HubClient, repo_id: str, path: Path, path_in_repo: str, sha256: str, *,
                   revision: str | None = None, create_pr: bool = False,
                   progress: Callable[[int], Any] | None = None, stop: threading.Event | None = None) -> Any:
    """Upload one local file as an LFS object for a later commit; return its ``CommitOperationAdd``.

    The sha256 (hex) is the one computed while the file was written; huggingface_hub
    does not hash the file again (see the module docstring). Through LFS, an object
    the Hub already stores is not sent again (the batch answer lists no action for
    it); through Xet, chunks the Hub already stores are not sent again. Without Xet
    the file is read through a :class:`ProgressReader` (byte progress, abortable);
    through Xet, ``hf_xet`` reads it itself and ``progress`` gets the size at the end.

    Raises:
        HubError: the Hub refused or the network failed after the client's retries.
    """
    from huggingface_hub import CommitOperationAdd

    size = path.stat().st_size
    op = CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(path))
    op.upload_info.sha256 = bytes.fromhex(sha256)
    reader = None
    if not xet_uploads():
        # Same bytes, read through our reader: set after construction, so that
        # CommitOperationAdd does not read the whole file to hash it.
        reader = ProgressReader(path, progress, stop)
        op.path_or_fileobj = reader
    try:
        with hub_errors(f"{repo_id}:{path_in_repo}", "upload to", client.endpoint):
            client.api.preupload_lfs_files(repo_id, [op], revision=revision, create_pr=create_pr, num_threads=1)
    except RuntimeError as exc:  # huggingface_hub wraps a failed LFS upload; find why
        cause = exc.__cause__
        if isinstance(cause, TransferAborted):
            raise cause from None
        raise
    finally:
        if reader is not None:
            reader.close()
    if reader is None and progress is not None:
        progress(size)
    if op.upload_info.sha256.hex() != sha256 or op.upload_info.size != size:  # pragma: no cover - a client change
        raise HubError(f"{path_in_repo}: huggingface_hub uploaded it under another hash; refusing to commit it")
    op.path_or_fileobj = b""  # the commit needs only the hash and the size; the file is about to go
    return op


class _NothingToSend(io.BufferedIOBase):
    """The content of an operation whose object the Hub already stores: reading it is a bug to stop."""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return 0

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def read(self, size: int | None = -1) -> bytes:
        raise HubError("the Hub no longer stores an object it listed a moment ago; run the command again")


def stored_lfs_operation(client: HubClient, repo_id: str, path_in_repo: str, sha256: str, size: int,
                         sample: bytes, *, revision: str | None = None, create_pr: bool = False) -> Any:
    """The ``CommitOperationAdd`` of a file whose LFS object the Hub already stores, made without the file.

    It goes through ``preupload_lfs_files`` like any upload: the batch answer lists
    the object without an action, so nothing is sent and the operation is marked
    uploaded. (Should the object have vanished since :func:`lfs_objects_present`,
    reading its content raises instead of uploading anything.) LFS path only: the
    Xet path does not ask the batch endpoint.

    Args:
        sample: the file's first 512 bytes (the Hub decides LFS or not from them and the size).
    """
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.lfs import UploadInfo

    op = CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=b"")
    op.upload_info = UploadInfo(size=size, sample=sample[:512], sha256=bytes.fromhex(sha256))
    op.path_or_fileobj = _NothingToSend()
    with hub_errors(f"{repo_id}:{path_in_repo}", "upload to", client.endpoint):
        client.api.preupload_lfs_files(repo_id, [op], revision=revision, create_pr=create_pr, num_threads=1)
    op.path_or_fileobj = b""
    return op


def lfs_objects_present(client: HubClient, repo_id: str, objects: dict[str, int], *,
                        revision: str | None = None) -> set[str]:
    """Which of ``objects`` (sha256 hex -> size in bytes) the Hub already stores for ``repo_id``.

    Asks the LFS batch endpoint, as an upload would: an object it lists without
    an upload action is already there.

    Raises:
        HubError: the request failed.
    """
    from huggingface_hub.lfs import UploadInfo, post_lfs_batch_info

    if not objects:
        return set()
    infos = [UploadInfo(size=size, sample=b"", sha256=bytes.fromhex(oid)) for oid, size in objects.items()]
    present: set[str] = set()
    for start in range(0, len(infos), LFS_BATCH_OBJECTS):
        with hub_errors(repo_id, "upload to", client.endpoint), \
                hub_answer(repo_id, "ask which LFS objects are stored for", client.endpoint):
            actions, errors, _ = post_lfs_batch_info(
                upload_infos=infos[start:start + LFS_BATCH_OBJECTS], token=None, repo_type="model",
                repo_id=repo_id, revision=quote(revision, safe="") if revision else None,
                endpoint=client.endpoint, headers=client.headers())
        # Only an object we asked about, listed by its oid string with no action, counts as stored.
        present |= {a["oid"] for a in actions if isinstance(a, dict) and isinstance(a.get("oid"), str)
                    and a["oid"] in objects and not a.get("actions")}
        # An object listed with an error (or not at all) counts as absent: it is simply made again.
    return present
