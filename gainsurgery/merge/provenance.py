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
from typing import Any, Iterable, Mapping

from gainsurgery import __version__
from gainsurgery.errors import CheckpointError
from gainsurgery.hub.cards import CARD_NAME
from gainsurgery.io import jsonsafe
from gainsurgery.io.hashing import sha256_fileobj
from gainsurgery.io.inputs import open_input, resolve_input, show_path
from gainsurgery.io.safetensors import is_plain_file_name
from gainsurgery.merge.plan import Plan

#: The provenance file of a merged checkpoint.
PROVENANCE_NAME = "gainsurgery.json"
#: Files an apply writes itself; a base's own copies are never carried over.
OUTPUT_FILES = (PROVENANCE_NAME, CARD_NAME)
#: Size limit of a provenance file we read back, in bytes.
MAX_PROVENANCE_BYTES = 16 << 20


def build_provenance(plan: Plan, base: Mapping[str, Any], shard_sha256: Mapping[str, str], *,
                     saturation: Mapping[str, tuple[int, int]] | None = None, base_mismatch: Iterable[str] = (),
                     unchecked: Iterable[str] = ()) -> dict[str, Any]:
    """The provenance record of an apply.

    It is published with the merged model, so it names files by name and sha256,
    never by local path.

    Args:
        plan: what was applied.
        base: what to record about the base (see :meth:`gainsurgery.sources.OpenedBase.provenance`).
        shard_sha256: shard name -> sha256 of the written shard.
        saturation: tensor -> (weights that became ±inf, weights that became 0), when allowed.
        base_mismatch: gains applied although their base fingerprint did not match (allowed).
        unchecked: gains that carry no base fingerprint.
    """
    record: dict[str, Any] = {
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
    if saturation:
        record["saturation_allowed"] = {name: {"became_inf": a, "became_zero": b}
                                        for name, (a, b) in sorted(saturation.items())}
    if list(base_mismatch):
        record["base_mismatch_allowed"] = list(base_mismatch)
    if list(unchecked):
        record["base_not_checked"] = list(unchecked)
    return record


def provenance_text(provenance: Mapping[str, Any]) -> str:
    """The text of ``gainsurgery.json`` for ``provenance`` (one format, whether written or uploaded)."""
    return json.dumps(provenance, indent=2) + "\n"


def write_provenance(folder: Path, provenance: Mapping[str, Any]) -> Path:
    """Write ``provenance`` into ``folder`` (a claimed temp folder: it is fsynced with the rest)."""
    path = Path(folder) / PROVENANCE_NAME
    with open(path, "x", encoding="utf-8") as f:
        f.write(provenance_text(provenance))
    return path


def read_provenance(folder: Path) -> dict[str, Any] | None:
    """The provenance record of ``folder``, None when it has none.

    Read as hostile input: a regular file inside the folder, JSON within limits.

    Raises:
        CheckpointError: the file is unsafe, not valid JSON or not an object.
    """
    if resolve_input(folder, PROVENANCE_NAME, missing_ok=True, error=CheckpointError) is None:
        return None
    with open_input(folder, PROVENANCE_NAME, error=CheckpointError) as f:
        value = jsonsafe.load(f, where=PROVENANCE_NAME, error=CheckpointError, max_bytes=MAX_PROVENANCE_BYTES)
    return jsonsafe.expect_object(value, where=PROVENANCE_NAME, error=CheckpointError)


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
    shown = show_path(folder)
    recorded = jsonsafe.Fields(provenance, where=PROVENANCE_NAME, error=CheckpointError).obj("shards", {})
    recorded = recorded.value if isinstance(recorded, jsonsafe.Fields) else recorded
    for name in shard_names:
        if name not in recorded:
            raise CheckpointError(f"{shown}: {PROVENANCE_NAME} records no sha256 for {name}; refusing to push")
    for name, entry in recorded.items():
        if not is_plain_file_name(name) or resolve_input(folder, name, missing_ok=True, error=CheckpointError) is None:
            raise CheckpointError(f"{shown}: shard {show_path(name)} recorded in {PROVENANCE_NAME} is missing; "
                                  "refusing to push an incomplete folder")
        with open_input(folder, name, error=CheckpointError) as f:
            actual = sha256_fileobj(f)
        if not isinstance(entry, dict) or actual != entry.get("sha256"):
            raise CheckpointError(f"{shown}: {name} does not match the sha256 in {PROVENANCE_NAME} "
                                  "(modified or partly written?); refusing to push")
    return provenance
