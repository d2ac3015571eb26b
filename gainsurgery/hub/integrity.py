"""Every byte taken from the Hub is checked against the hash the Hub lists for it.

The Hub's tree listing names each file's content: an LFS file by its LFS pointer's
``oid`` (the sha256 of its bytes), any other file by its git blob id (the sha1 of
``"blob <size>\\0"`` + its bytes). Shards, the index, config and tokenizer files and
gain files are checked against those before anything is made from them, on every
path that reads them:

- streamed into a file of ours (the Hub-to-Hub pipeline): hashed as the bytes arrive
  (:class:`ContentHasher`, used by :func:`~gainsurgery.hub.transfer.download_file`);
- through the HF cache (a local apply or ``verify`` of a Hub base, the small files,
  a Hub gain file): the cached file is hashed when this run first uses it
  (:func:`download_checked`), whether ``hf_hub_download`` just fetched it or found
  it there. huggingface_hub checks sizes but not content, so a bad download (a
  tampered mirror, a corrupt disk, a file edited in the cache) would otherwise be
  used, and kept under the name of the content it is not.

A cached copy that does not match is removed from the cache (it is named after the
hash it fails, so no later run or other tool should use it) and downloaded once
more; if that one fails too, the run stops with one line. A header read by a range
request cannot be checked on its own: a plan made from it is checked against the
whole file before any byte of the file is used.

Example:
    >>> expected = HubFileHash.from_entry(entry)  # doctest: +SKIP
    >>> local = download_checked(client, "org/name", "model.safetensors", commit, expected)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gainsurgery.errors import CheckpointError
from gainsurgery.hub.errors import hub_errors
from gainsurgery.io.inputs import open_input, resolve_input, show_path
from gainsurgery.sources.spec import hf_cache_repo
from gainsurgery.io.write_errors import no_room

_HEX64 = re.compile(r"[0-9a-f]{64}", re.ASCII)
_HEX40 = re.compile(r"[0-9a-f]{40}", re.ASCII)
#: Bytes hashed per read of a cached file.
HASH_CHUNK_BYTES = 8 << 20
#: Downloads of one file through the HF cache: the first (maybe cached), then one fresh one.
CACHE_ATTEMPTS = 2


@dataclass(frozen=True)
class HubFileHash:
    """What the Hub's tree listing says one file's bytes are.

    Attributes:
        path: the file's path in the repo.
        size: its size in bytes.
        sha256: for an LFS file, the sha256 of its bytes (the pointer's ``oid``), hex.
        git_sha1: for any other file, its git blob id, hex.
    """

    path: str
    size: int
    sha256: str | None = None
    git_sha1: str | None = None

    @classmethod
    def from_entry(cls, entry: Any) -> HubFileHash | None:
        """The hash a ``huggingface_hub`` ``RepoFile`` lists, or None when it lists none we can check.

        The LFS sha256 when the file is in LFS (its git blob id then hashes the pointer,
        not the bytes), else the git blob id.
        """
        size = getattr(entry, "size", None)
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            return None
        lfs = getattr(entry, "lfs", None)
        if lfs is not None:
            sha = getattr(lfs, "sha256", None)
            return cls(entry.path, size, sha256=sha) if isinstance(sha, str) and _HEX64.fullmatch(sha) else None
        oid = getattr(entry, "blob_id", None)
        return cls(entry.path, size, git_sha1=oid) if isinstance(oid, str) and _HEX40.fullmatch(oid) else None

    @property
    def hexdigest(self) -> str:
        """The expected digest (sha256 or git sha1), hex: also the name the HF cache gives the blob."""
        return self.sha256 or self.git_sha1  # type: ignore[return-value]

    @property
    def algorithm(self) -> str:
        return "sha256" if self.sha256 else "git blob sha1"


class ContentHasher:
    """Hashes a file's bytes as they pass, the way ``expected`` names them; :meth:`check` at the end."""

    def __init__(self, expected: HubFileHash) -> None:
        self.expected = expected
        self.size = 0
        if expected.sha256:
            self._h = hashlib.sha256()
        else:
            self._h = hashlib.sha1(usedforsecurity=False)
            self._h.update(b"blob %d\0" % expected.size)  # git hashes the size first: a wrong size fails too

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)
        self.size += len(data)

    def matches(self) -> bool:
        return self.size == self.expected.size and self._h.hexdigest() == self.expected.hexdigest

    def check(self, what: str, *, advice: str = "try again", listed: str = "the Hub lists") -> None:
        """Raise :class:`~gainsurgery.errors.CheckpointError` (one line) unless the bytes were the listed ones.

        ``listed`` says where the expected hash comes from, in the message.
        """
        if self.size != self.expected.size:
            raise CheckpointError(f"{what}: {self.size} bytes, {listed} {self.expected.size}; {advice} "
                                  "(the file changed?)")
        if self._h.hexdigest() != self.expected.hexdigest:
            raise CheckpointError(f"{what}: its {self.expected.algorithm} is {self._h.hexdigest()}, {listed} "
                                  f"{self.expected.hexdigest}; {advice}")


def check_fileobj(f: Any, expected: HubFileHash) -> ContentHasher:
    """Hash the open file ``f`` from its start; return the hasher (call :meth:`ContentHasher.check`)."""
    hasher = ContentHasher(expected)
    f.seek(0)
    while chunk := f.read(HASH_CHUNK_BYTES):
        hasher.update(chunk)
    return hasher


def download_checked(client: Any, repo_id: str, filename: str, revision: str, expected: HubFileHash | None,
                     ) -> Path:
    """Download ``filename`` into the HF cache (or find it there) and check every byte before returning it.

    A cached copy that fails the check is removed from the cache and downloaded
    once more (:data:`CACHE_ATTEMPTS`); if that fails too, nothing is kept and the
    run stops.

    Args:
        client: the :class:`~gainsurgery.hub.client.HubClient`.
        revision: a commit (what the listing was made from).
        expected: what the listing says; None (the Hub lists no hash) is refused.

    Raises:
        CheckpointError: no hash listed, or the bytes differ from it (one line).
        HubError: the download failed.

    Example:
        >>> download_checked(client, "org/name", "config.json", commit, expected)  # doctest: +SKIP
        PosixPath('/home/me/.cache/huggingface/hub/models--org--name/snapshots/0a1b.../config.json')
    """
    what = f"{repo_id}@{revision[:12]}:{filename}"
    if expected is None:
        raise CheckpointError(f"{what}: the Hub lists no sha256 or git blob id for it; refusing to use bytes "
                              "that cannot be checked")
    for attempt in range(CACHE_ATTEMPTS):
        # huggingface_hub keeps a partial download (``.incomplete``) to resume it: it is the cache's, not ours.
        with no_room(f"{what} into the HF cache", getattr(client.config, "cache_dir", None),
                     left="huggingface_hub keeps what it downloaded so far, to resume it"), \
                hub_errors(what, "download", client.endpoint), warnings.catch_warnings():
            # Its warning that the disk looks too small comes true as the error above, in one line.
            warnings.filterwarnings("ignore", message="Not enough free disk space", category=UserWarning)
            local = client.download(repo_id, filename, revision=revision)
        # The download sits in the HF cache (a snapshot link into blobs/): read it as an input of that folder.
        with open_input(local.parent, local.name, error=CheckpointError) as f:
            hasher = check_fileobj(f, expected)
        if hasher.matches():
            return local
        removed = _drop_cached(local, expected)
        if attempt == CACHE_ATTEMPTS - 1 or not removed:
            left = ("the bad copy was removed from the HF cache; try again" if removed
                    else f"remove {show_path(local)} from the HF cache and try again")
            hasher.check(what, advice=left)
    raise AssertionError("unreachable")  # pragma: no cover


def _drop_cached(local: Path, expected: HubFileHash) -> bool:
    """Remove a cached copy that is not what its name says; True when it is gone.

    Only the HF cache's own blob (a regular file named after the hash it fails, which
    is how the cache names blobs) and the snapshot's link to it are removed: anything
    else is left for the user, named in the message.
    """
    try:
        if not stat.S_ISLNK(os.lstat(local).st_mode):
            return False
        blob = Path(os.path.realpath(local))
        if blob.name != expected.hexdigest or blob.parent.name != "blobs" or not stat.S_ISREG(os.lstat(blob).st_mode):
            return False
        os.unlink(blob)
        os.unlink(local)
        return True
    except OSError:
        return False


def check_snapshot_file(folder: str | os.PathLike[str], name: str) -> bool:
    """Check a file of a local Hugging Face cache snapshot against the hash its blob is named after.

    The cache names each blob after the hash the Hub gave for it (the LFS sha256, or
    the git blob id of a file not in LFS), so a snapshot used as a local BASE is
    checked offline: a corrupt or edited blob is refused before a byte of it is used.
    The snapshot is an input: nothing is removed here (the message says what to do).
    Returns False when ``folder`` is no snapshot or the file is not a named blob (nothing to check).

    Raises:
        CheckpointError: the blob's bytes are not what its name says.

    Example:
        >>> check_snapshot_file("~/.cache/huggingface/hub/models--o--n/snapshots/abc", "model.safetensors")  # doctest: +SKIP
        True
    """
    if hf_cache_repo(folder) is None:
        return False
    blob = resolve_input(folder, name, error=CheckpointError)
    if blob.parent.name != "blobs" or not (_HEX64.fullmatch(blob.name) or _HEX40.fullmatch(blob.name)):
        return False
    with open_input(folder, name, error=CheckpointError) as f:
        size = os.fstat(f.fileno()).st_size
        expected = HubFileHash(name, size, **({"sha256": blob.name} if len(blob.name) == 64
                                               else {"git_sha1": blob.name}))
        hasher = check_fileobj(f, expected)
    hasher.check(f"{show_path(Path(folder) / name)} (in the Hugging Face cache)", listed="its blob is named",
                 advice="the cached copy is corrupt; delete it from the cache and download it again")
    return True
