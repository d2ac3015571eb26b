"""A Hub base, one shard at a time.

:func:`open_remote_base` reads only the index, the small files and each shard's
*header* (HTTP range requests, read as a stream and hung up on when a server
ignores ``Range``: a header never costs a whole shard) and lays them out in a
staging folder as sparse stand-ins for the shards, so the ordinary
:func:`~gainsurgery.io.checkpoint.open_checkpoint` validates them and
:func:`~gainsurgery.merge.plan.make_plan` checks every gain key against every
header before anything is downloaded or written. During the apply,
:meth:`RemoteBase.fetch_shard` downloads each shard into the standard HF cache
(resumable) just before it is streamed; :meth:`RemoteBase.download_shard` streams
one into a private file instead (the Hub-to-Hub pipeline, which keeps no cache).
Every request goes through the explicit :class:`~gainsurgery.hub.client.HubClient`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection

from gainsurgery.errors import CheckpointError, HubError
from gainsurgery.hub.client import HubClient
from gainsurgery.hub.errors import hub_answer, hub_errors
from gainsurgery.hub.integrity import HubFileHash, download_checked
from gainsurgery.hub.refs import HubRef
from gainsurgery.hub.transfer import download_file, read_range
from gainsurgery.io import jsonsafe
from gainsurgery.io.checkpoint import (INDEX_NAME, MAX_INDEX_BYTES, SINGLE_NAME, WEIGHT_SUFFIXES, Checkpoint,
                                      open_checkpoint)
from gainsurgery.io.inputs import open_input, show_path
from gainsurgery.io.safetensors import MAX_HEADER_BYTES, Shard, is_plain_file_name
from gainsurgery.io.write_errors import no_room, no_room_errno, no_room_message

_COMMIT = re.compile(r"[0-9a-f]{40}", re.ASCII)
#: Longest file name, in bytes, a file system holds (a listing may name longer ones: never fetched).
_NAME_MAX = 255
#: Bytes asked for first when reading a shard header; most headers fit (one request).
HEADER_PROBE_BYTES = 100_000
#: Top-level non-weight files larger than this are not fetched with a Hub base.
MAX_SMALL_FILE_BYTES = 64 << 20
#: Files of a Hub base never fetched as "small files" (the index is read on its own; git plumbing).
_NOT_SMALL = (INDEX_NAME, ".gitattributes")


@dataclass
class RemoteBase:
    """A Hub base checkpoint, opened from headers; shards are fetched on demand.

    Attributes:
        ref: the repo and revision as given.
        client: the Hub client shards are downloaded with.
        commit: the commit the revision resolved to; every file comes from it.
        staging: local folder holding the index, small files and sparse
            stand-ins of the shards (headers only; they take no disk space).
        checkpoint: the validated checkpoint; ``shards[name].path`` points at the
            stand-in until :meth:`fetch_shard` replaces it with the download.
        skipped: top-level non-weight files not fetched (too big), in bytes.
        shard_sha256: shard name -> the sha256 the Hub lists for it (its LFS oid), when it lists one.
        expected: file name -> the size and hash the Hub lists for it: every file used is checked against it.
    """

    ref: HubRef
    client: HubClient
    commit: str
    staging: Path
    checkpoint: Checkpoint
    skipped: dict[str, int] = field(default_factory=dict)
    downloaded: list[Path] = field(default_factory=list)
    shard_sha256: dict[str, str] = field(default_factory=dict)
    expected: dict[str, HubFileHash] = field(default_factory=dict)

    def fetch_shard(self, shard: Shard) -> None:
        """Download ``shard`` (HF cache, resumable), check every byte, and point ``shard.path`` at it.

        The cached file is hashed and must be what the Hub lists (its LFS sha256),
        whether it was just downloaded or already cached (:func:`~gainsurgery.hub.integrity.download_checked`).

        Raises:
            CheckpointError: the download's bytes, size or header differ from what the Hub
                lists or the header the plan was made from (tampered, corrupt, or the repo changed).
        """
        what = f"{self.ref.repo_id}@{self.commit[:12]}:{shard.name}"
        local = download_checked(self.client, self.ref.repo_id, shard.name, self.commit,
                                 self.expected.get(shard.name))
        # The download sits in the HF cache (a snapshot link into blobs/): read it as an input of that folder.
        with open(shard.path, "rb") as a, open_input(local.parent, local.name, error=CheckpointError) as b:
            st = os.fstat(b.fileno())
            if st.st_size != shard.file_size:
                raise CheckpointError(f"{what}: downloaded {st.st_size} bytes, its header said "
                                      f"{shard.file_size}; try again (the file changed?)")
            if a.read(shard.data_start) != b.read(shard.data_start):
                raise CheckpointError(f"{what}: downloaded header differs from the one planned from")
        shard.path = local
        shard.identity = (st.st_dev, st.st_ino)
        self.downloaded.append(local)

    def download_shard(self, shard: Shard, dest: Path, **kwargs: Any) -> None:
        """Stream ``shard`` into the new file ``dest`` (not the HF cache), checked against the Hub's sha256.

        Keyword arguments go to :func:`~gainsurgery.hub.transfer.download_file`
        (``arrival``, ``progress``, ``stop``). The header is compared with the planned
        one as soon as it has arrived.

        Raises:
            HubError, CheckpointError: see :func:`~gainsurgery.hub.transfer.download_file`.
        """
        download_file(self.client, self.ref.repo_id, shard.name, self.commit, dest,
                      expected=self.expected.get(shard.name), **kwargs)

    def planned_header(self, shard: Shard) -> bytes:
        """The header bytes (length prefix included) the plan was made from."""
        with open(self.staging / shard.name, "rb") as f:
            return f.read(shard.data_start)

    def provenance(self) -> dict[str, Any]:
        """What to record about this base in ``gainsurgery.json``."""
        out = {"given": str(self.ref), "hub": self.ref.repo_id, "revision": self.ref.revision or "main",
               "commit": self.commit}
        if self.skipped:
            out["files_not_copied"] = self.skipped
        return out

    def close(self) -> None:
        """Remove the staging folder (the HF cache keeps its downloads)."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self) -> RemoteBase:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_remote_base(ref: HubRef, client: HubClient, skip: Collection[str] = ()) -> RemoteBase:
    """Open a Hub base from its index, small files and shard headers only.

    Resolves the revision to a commit once, so headers and shards come from the
    same snapshot. Every header and the index pass the same hostile-input checks
    as a local folder (:func:`~gainsurgery.io.checkpoint.open_checkpoint`).

    Raises:
        HubError: auth, not found, rate limit, network.
        CheckpointError: no safetensors weights, or a hostile index/header.

    Example:
        >>> with open_remote_base(HubRef("Qwen/Qwen2.5-0.5B"), HubClient.from_env()) as rb:  # doctest: +SKIP
        ...     len(rb.checkpoint.tensors)
    """
    from huggingface_hub.hf_api import RepoFile

    with hub_errors(str(ref), "read", client.endpoint), hub_answer(str(ref), "read", client.endpoint):
        commit = client.api.model_info(ref.repo_id, revision=ref.revision).sha
        if not isinstance(commit, str) or not _COMMIT.fullmatch(commit):
            raise HubError(f"the Hub answered {ref} with the commit {str(commit)[:60]!r}, not a commit id; "
                           "try again, or check HF_ENDPOINT")
        entries = [e for e in client.api.list_repo_tree(ref.repo_id, revision=commit) if isinstance(e, RepoFile)]
        sizes = _listed_sizes(entries, ref)
    # The Hub's word on each file's bytes (LFS sha256, or git blob id): every download is checked against it.
    expected = {e.path: h for e in entries if (h := HubFileHash.from_entry(e)) is not None}
    lfs_sha = {p: h.sha256 for p, h in expected.items() if h.sha256}
    with no_room(f"the headers and small files of {ref}", tempfile.gettempdir(), error=CheckpointError,
                 left="its staging folder was removed; set TMPDIR to a folder with room"):
        staging = Path(tempfile.mkdtemp(prefix="gainsurgery-hub-"))
        return _stage(ref, client, commit, staging, sizes, expected, lfs_sha, skip)


def _stage(ref: HubRef, client: HubClient, commit: str, staging: Path, sizes: dict[str, int],
           expected: dict[str, HubFileHash], lfs_sha: dict[str, str], skip: Collection[str]) -> RemoteBase:
    """Fill ``staging`` with the index, the small files and the shards' header stand-ins; remove it on failure."""
    remote = None
    try:
        if INDEX_NAME in sizes:
            if sizes[INDEX_NAME] > MAX_HEADER_BYTES:
                raise CheckpointError(f"{ref}: {INDEX_NAME} is absurdly large ({sizes[INDEX_NAME]} bytes)")
            index_path = download_checked(client, ref.repo_id, INDEX_NAME, commit, expected.get(INDEX_NAME))
            _copy_download(index_path, staging / INDEX_NAME)
            shard_names = _index_shards(staging, ref)
        elif SINGLE_NAME in sizes:
            shard_names = [SINGLE_NAME]
        else:
            kind = "pickle (.bin) weights only" if any(p.endswith(".bin") for p in sizes) else "no safetensors weights"
            raise CheckpointError(f"{ref}: {kind} ({INDEX_NAME} or {SINGLE_NAME} not found); "
                                  "gainsurgery reads safetensors checkpoints only")
        for name in shard_names:
            if name not in sizes:
                raise CheckpointError(f"{ref}: the index names shard {show_path(name)}, which the repo does not have")
            _write_header_stub(client, ref, commit, name, sizes[name], staging / name)
        skipped = {}
        for path, size in sorted(sizes.items()):
            if ("/" in path or path in _NOT_SMALL or path in skip or path.endswith(WEIGHT_SUFFIXES)
                    or path in shard_names or not is_plain_file_name(path) or path.startswith(".")
                    or len(path.encode("utf-8", "surrogatepass")) > _NAME_MAX):  # no file can have that name
                continue
            if size > MAX_SMALL_FILE_BYTES:
                skipped[path] = size
                continue
            local = download_checked(client, ref.repo_id, path, commit, expected.get(path))
            _copy_download(local, staging / path)
        remote = RemoteBase(ref, client, commit, staging, open_checkpoint(staging), skipped,
                            shard_sha256={n: lfs_sha[n] for n in shard_names if n in lfs_sha},
                            expected=expected)
        return remote
    finally:
        if remote is None:
            shutil.rmtree(staging, ignore_errors=True)


def _listed_sizes(entries: list[Any], ref: HubRef) -> dict[str, int]:
    """Path -> size in bytes of the files the Hub lists, each checked (a path string, a size >= 0, listed once)."""
    sizes: dict[str, int] = {}
    for e in entries:
        path, size = e.path, e.size
        if not isinstance(path, str) or isinstance(size, bool) or not isinstance(size, int) \
                or not 0 <= size < 2**63:  # a file size (off_t) of this system
            raise HubError(f"the Hub lists a file of {ref} as {show_path(str(path))} of {str(size)[:40]!r} bytes, "
                           "not a path and a size; try again, or check HF_ENDPOINT")
        if path in sizes:
            raise HubError(f"the Hub lists {show_path(path)} twice in {ref}; try again, or check HF_ENDPOINT")
        sizes[path] = size
    return sizes


def _copy_download(local: Path, dst: Path) -> None:
    """Copy a file downloaded into the HF cache into our staging folder, reading it safely."""
    with open_input(local.parent, local.name, error=CheckpointError) as src, open(dst, "xb") as out:
        shutil.copyfileobj(src, out)


def _index_shards(staging: Path, ref: HubRef) -> list[str]:
    with open_input(staging, INDEX_NAME, error=CheckpointError) as f:
        raw = jsonsafe.load(f, where=f"{ref}: {INDEX_NAME}", error=CheckpointError, max_bytes=MAX_INDEX_BYTES,
                            max_depth=8)
    weight_map = jsonsafe.Fields(raw, where=f"{ref}: {INDEX_NAME}", error=CheckpointError).str_map("weight_map")
    if not weight_map:
        raise CheckpointError(f"{ref}: {INDEX_NAME} has no tensors in its weight_map")
    names = list(dict.fromkeys(weight_map.values()))
    for name in names:  # before we create files named after them
        if not is_plain_file_name(name) or not str(name).endswith(".safetensors"):
            raise CheckpointError(f"{ref}: {INDEX_NAME} names shard {name[:80]!r}, not a plain .safetensors "
                                  "file name")
    return names


def _write_header_stub(client: HubClient, ref: HubRef, commit: str, name: str, size: int, dst: Path) -> None:
    """Fetch the header of shard ``name`` (range requests) and write it as a sparse file of ``size`` bytes.

    huggingface_hub's ``get_safetensors_metadata`` parses headers the same way
    but drops the header length and padding, which the byte offsets depend on;
    we keep the raw bytes and let :mod:`gainsurgery.io.checkpoint` validate them.
    """
    url = client.file_url(ref.repo_id, name, revision=commit)
    what = f"{ref}:{name}"
    head = read_range(client, url, 0, min(size, HEADER_PROBE_BYTES) - 1, what=what) if size else b""
    if len(head) < 8:
        raise CheckpointError(f"{what}: truncated (shorter than the 8-byte header length)")
    header_len = int.from_bytes(head[:8], "little")
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(f"{what}: header length {header_len} bytes is absurd (limit {MAX_HEADER_BYTES})")
    if 8 + header_len > size:
        raise CheckpointError(f"{what}: truncated (header claims {header_len} bytes, file has {size})")
    if len(head) < 8 + header_len:
        head += read_range(client, url, len(head), 8 + header_len - 1, what=what)
    if len(head) < 8 + header_len:
        raise CheckpointError(f"{what}: the Hub sent {len(head)} bytes of a {8 + header_len}-byte header; try again")
    with open(dst, "wb") as f:
        f.write(head[: 8 + header_len])
        try:
            f.truncate(size)  # sparse: the data stays on the Hub until fetch_shard
        except OSError as e:  # EFBIG: a size the Hub lists that no file here can have (or a file-size limit)
            code = no_room_errno(e)
            if code is None:
                raise
            raise CheckpointError(no_room_message(code, f"the header stand-in of {what} ({size} bytes, as the Hub "
                                                        "lists it)", dst.parent)) from None
