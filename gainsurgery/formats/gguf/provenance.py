"""Provenance of an adapted GGUF, kept in the file itself as GGUF metadata.

A GGUF file is one file: there is no folder to put ``gainsurgery.json`` in. An apply
keeps every key/value of the base as it was and adds these (all under
``gainsurgery.``), which any GGUF reader lists (``gguf-dump``, ``gainsurgery inspect``):

``gainsurgery.format``
    ``gainsurgery.gguf/1``.
``gainsurgery.base.name`` / ``gainsurgery.base.sha256``
    the base file's name (never its folder) and the sha256 of its bytes.
``gainsurgery.gains.name`` / ``gainsurgery.gains.sha256``
    arrays: each gain file's name and sha256, in the order applied.
``gainsurgery.record``
    JSON text: the tool and version, the base (name, size, sha256, and for a Hub or
    embedded base where it came from), the gains as ``gainsurgery.json`` describes them,
    the options, and per rewritten tensor its route, types and errors (the report of
    :mod:`.engine`), plus anything allowed (saturation, a base mismatch).

A base that is itself an adapted GGUF carries such keys already: they are replaced,
and its whole record is kept inside the new one as ``base_record`` (the chain of
adaptations stays readable).
"""

from __future__ import annotations

import datetime as _dt
import json
import secrets
from typing import Any

from gainsurgery import __version__
from gainsurgery.errors import CheckpointError, GainSurgeryError
from gainsurgery.formats.gguf.opening import GGUFFile
from gainsurgery.io import jsonsafe

PREFIX = "gainsurgery."
FORMAT = "gainsurgery.gguf/1"
KEY_FORMAT = PREFIX + "format"
KEY_BASE_NAME = PREFIX + "base.name"
KEY_BASE_SHA256 = PREFIX + "base.sha256"
KEY_GAIN_NAMES = PREFIX + "gains.name"
KEY_GAIN_SHA256 = PREFIX + "gains.sha256"
KEY_RECORD = PREFIX + "record"
#: Size limit of a record read back, in bytes.
MAX_RECORD_BYTES = 16 << 20


def placeholder() -> str:
    """64 random hex digits standing in for the base's sha256 until the base has been read through.

    The header is written before the data; the base's hash is known only after. The
    placeholder has the hash's length, so replacing it in place moves no byte.
    """
    return secrets.token_hex(32)


def read_record(g: GGUFFile) -> dict[str, Any] | None:
    """The ``gainsurgery.record`` of an adapted GGUF (parsed within limits), or None for a plain one.

    Raises:
        CheckpointError: the key is there but is not a JSON object within the limits.
    """
    field = g.field(KEY_RECORD)
    if field is None:
        return None
    text = g.string(KEY_RECORD)
    if text is None:
        raise CheckpointError(f"{g.name}: {KEY_RECORD} is not a string")
    try:
        value = jsonsafe.loads(text, where=f"{g.name}: {KEY_RECORD}", max_bytes=MAX_RECORD_BYTES, max_depth=32)
    except GainSurgeryError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{g.name}: {KEY_RECORD} is not a JSON object")
    return value


def build_record(*, base: dict[str, Any], gains: list[dict[str, Any]], options: dict[str, Any],
                 tensors: list[dict[str, Any]], routes: list[dict[str, Any]], extra: dict[str, Any] | None = None,
                 base_record: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of one apply (see the module docstring); published with the file, so no local paths."""
    record: dict[str, Any] = {
        "tool": "gainsurgery",
        "version": __version__,
        "format": FORMAT,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base": base,
        "gains": gains,
        "options": options,
        "routes": routes,
        "tensors": tensors,
    }
    if extra:
        record.update(extra)
    if base_record is not None:
        record["base_record"] = base_record
    return record


def metadata(record: dict[str, Any]) -> list[tuple[str, Any, str, str | None]]:
    """The key/values to add: ``(key, value, GGUF value type name, item type name)``."""
    base = record["base"]
    names = [str(g.get("name", "")) for g in record["gains"]]
    shas = [str(g.get("sha256", "")) for g in record["gains"]]
    out: list[tuple[str, Any, str, str | None]] = [
        (KEY_FORMAT, FORMAT, "STRING", None),
        (KEY_BASE_NAME, str(base.get("name", "")), "STRING", None),
        (KEY_BASE_SHA256, str(base.get("sha256", "")), "STRING", None),
    ]
    if names:
        out.append((KEY_GAIN_NAMES, names, "ARRAY", "STRING"))
        out.append((KEY_GAIN_SHA256, shas, "ARRAY", "STRING"))
    out.append((KEY_RECORD, json.dumps(record, sort_keys=True, ensure_ascii=True), "STRING", None))
    return out


def is_ours(key: str) -> bool:
    """True for the keys an apply writes (replaced when the base carries them)."""
    return key.startswith(PREFIX)
