"""Where a BASE comes from: a local folder, an embedded model or a Hub repo.

``embedded:NAME`` names a model shipped through a PyPI package and converted
once into a local cache (see :mod:`gainsurgery.embedded`). ``ORG/NAME[@REV]``
that is not a local path names a Hub repo, opened from its headers and fetched
one shard at a time during the apply (see :mod:`gainsurgery.hub`).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from gainsurgery.io.checkpoint import Checkpoint, open_checkpoint

if TYPE_CHECKING:
    from gainsurgery.hub import RemoteBase

EMBEDDED_PREFIX = "embedded:"


def resolve_base(spec: str) -> Path:
    """Turn a BASE argument into a local folder (converting an embedded model once)."""
    if spec.startswith(EMBEDDED_PREFIX):
        from gainsurgery.embedded import resolve_base as resolve_embedded

        return resolve_embedded(spec)
    return Path(spec)


def open_base(spec: str) -> Checkpoint:
    """Resolve ``spec`` and open it as a checkpoint (headers validated)."""
    return open_checkpoint(resolve_base(spec))


@contextlib.contextmanager
def opened_base(spec: str) -> Iterator[tuple[Checkpoint, RemoteBase | None]]:
    """Open a local, embedded or Hub base: ``with opened_base(spec) as (ckpt, remote): ...``.

    ``remote`` is None for local and embedded bases. For a Hub base (``spec``
    is not a local path and reads ``org/name[@rev]``) only headers and small
    files are read here; pass ``remote.fetch_shard`` to
    :func:`~gainsurgery.surgery.execute` to download each shard as it is
    streamed. The staging folder is removed when the block ends.
    """
    from gainsurgery.hub import open_remote_base, parse_base_ref

    ref = parse_base_ref(spec)
    if ref is None:
        yield open_base(spec), None
        return
    with open_remote_base(ref) as remote:
        yield remote.checkpoint, remote
