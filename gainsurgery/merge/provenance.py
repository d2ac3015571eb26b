"""The provenance record of a merged checkpoint: ``gainsurgery.json``.

Every apply writes it next to the shards: the base (as given, and where it was
read from), each gain file with its sha256, and the sha256 of every written
shard. ``push`` checks a folder against it before publishing, and the model card
is generated from it. This module is the one home of its name.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any, Mapping

from gainsurgery import __version__
from gainsurgery.errors import CheckpointError
from gainsurgery.hub.cards import CARD_NAME
from gainsurgery.io.hashing import sha256_file
from gainsurgery.io.safetensors import is_plain_file_name
from gainsurgery.merge.plan import Plan

#: The provenance file of a merged checkpoint.
PROVENANCE_NAME = "gainsurgery.json"
#: Files an apply writes itself; a base's own copies are never carried over.
OUTPUT_FILES = (PROVENANCE_NAME, CARD_NAME)


def build_provenance(plan: Plan, base: Mapping[str, Any], shard_sha256: Mapping[str, str]) -> dict[str, Any]:
    """The provenance record of an apply.

    Args:
        plan: what was applied.
        base: what to record about the base (see :meth:`gainsurgery.sources.OpenedBase.provenance`).
        shard_sha256: shard name -> sha256 of the written shard.
    """
    return {
        "tool": "gainsurgery",
        "version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base": dict(base),
        "gains": plan.sources,
        "gain_parameters": plan.gain.num_parameters,
        "method": plan.gain.metadata.get("method"),
        "side": plan.gain.metadata.get("side"),
        "tensors_scaled": plan.tensors_touched,
        "bytes_rewritten": plan.bytes_rewritten,
        "shards": {name: {"sha256": sha, "bytes": plan.base.shards[name].file_size}
                   for name, sha in shard_sha256.items()},
    }


def provenance_text(provenance: Mapping[str, Any]) -> str:
    """The text of ``gainsurgery.json`` for ``provenance`` (one format, whether written or uploaded)."""
    return json.dumps(provenance, indent=2) + "\n"


def write_provenance(folder: Path, provenance: Mapping[str, Any]) -> Path:
    """Write ``provenance`` into ``folder`` (a staging folder: it is fsynced with the rest)."""
    path = Path(folder) / PROVENANCE_NAME
    path.write_text(provenance_text(provenance), encoding="utf-8")
    return path


def read_provenance(folder: Path) -> dict[str, Any] | None:
    """The provenance record of ``folder``, None when it has none.

    Raises:
        CheckpointError: the file exists but is not a JSON object.
    """
    path = Path(folder) / PROVENANCE_NAME
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        value = None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: not valid JSON; refusing to push")
    return value


def check_recorded_shards(folder: Path, shard_names: list[str]) -> dict[str, Any] | None:
    """Check that every shard of ``folder`` is the one its provenance records (by sha256).

    Args:
        folder: a merged checkpoint folder.
        shard_names: the shards the folder's index names.

    Returns:
        The provenance record, or None when the folder has none (nothing to check).

    Raises:
        CheckpointError: a shard is missing from the record, missing on disk, or
            differs from its recorded sha256 (modified or partly written).
    """
    provenance = read_provenance(folder)
    if provenance is None:
        return None
    recorded = provenance.get("shards") or {}
    if not isinstance(recorded, dict):
        raise CheckpointError(f"{folder / PROVENANCE_NAME}: not valid JSON; refusing to push")
    for name in shard_names:
        if name not in recorded:
            raise CheckpointError(f"{folder}: {PROVENANCE_NAME} records no sha256 for {name}; refusing to push")
    for name, entry in recorded.items():
        path = Path(folder) / name
        if not is_plain_file_name(name) or not path.is_file():
            raise CheckpointError(f"{folder}: shard {name} recorded in {PROVENANCE_NAME} is missing; "
                                  "refusing to push an incomplete folder")
        if not isinstance(entry, dict) or sha256_file(path) != entry.get("sha256"):
            raise CheckpointError(f"{folder}: {name} does not match the sha256 in {PROVENANCE_NAME} "
                                  "(modified or partly written?); refusing to push")
    return provenance
