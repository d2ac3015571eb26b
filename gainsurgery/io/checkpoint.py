"""Sharded safetensors checkpoints: the index, every shard's header, config.json.

A checkpoint is a folder with ``model.safetensors.index.json`` and its shards, or
one ``model.safetensors``. :func:`open_checkpoint` validates the index and every
header (see :mod:`gainsurgery.io.safetensors`) before any data is read. Nothing
here unpickles anything; ``.bin`` checkpoints are refused.

Only the standard library is needed: the apply path stays light.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Collection

from gainsurgery.errors import CheckpointError
from gainsurgery.io.atomic import read_json_object
from gainsurgery.io.safetensors import (
    MAX_HEADER_BYTES,
    PACKED_DTYPES,
    SCALABLE_DTYPES,
    Shard,
    TensorInfo,
    is_plain_file_name,
    read_shard_header,
)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

#: Non-weight files that ship with a checkpoint and are copied next to the output.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


@dataclass
class Checkpoint:
    """A base checkpoint: a folder of safetensors shards (+ index) or one file.

    Attributes:
        folder: the checkpoint folder.
        shards: shard file name -> Shard, in index order.
        tensors: every tensor name -> TensorInfo.
        index: the parsed index JSON, or None for a single ``model.safetensors``.
        config: the parsed ``config.json``, or {} when there is none.
    """

    folder: Path
    shards: dict[str, Shard]
    tensors: dict[str, TensorInfo]
    index: dict | None
    config: dict

    @property
    def total_bytes(self) -> int:
        """Size of all shard files together, in bytes."""
        return sum(s.file_size for s in self.shards.values())

    def extra_files(self, skip: Collection[str] = ()) -> list[Path]:
        """Top-level non-weight files (config, tokenizer, license, ...) to copy.

        The index, weight files of any format and the names in ``skip`` (the
        files an output replaces, such as its model card) are excluded.
        """
        out = []
        for p in sorted(self.folder.iterdir()):
            if not p.is_file():  # follows symlinks: HF cache snapshots link to blobs
                continue
            if p.name == INDEX_NAME or p.name in skip or p.name.endswith(WEIGHT_SUFFIXES):
                continue
            out.append(p)
        return out


def open_checkpoint(folder: str | os.PathLike[str]) -> Checkpoint:
    """Open a local checkpoint folder and validate every header and the index.

    Accepts a folder with ``model.safetensors.index.json`` and its shards, or a
    folder with a single ``model.safetensors``. Reads headers only.

    Raises:
        CheckpointError: missing folder, ``.bin``-only checkpoint, hostile index
            or header, missing or truncated shard.

    Example:
        >>> ckpt = open_checkpoint("path/to/base")  # doctest: +SKIP
        >>> ckpt.tensors["model.layers.0.self_attn.o_proj.weight"].shape  # doctest: +SKIP
        (576, 1024)
    """
    folder = Path(folder)
    if not folder.exists():
        raise CheckpointError(f"base checkpoint not found: {folder}")
    if not folder.is_dir():
        raise CheckpointError(f"base must be a checkpoint folder, got a file: {folder}")
    index_path = folder / INDEX_NAME
    single_path = folder / SINGLE_NAME
    index: dict | None = None
    if index_path.is_file():
        index = _read_index(index_path)
        weight_map: dict[str, str] = index["weight_map"]
        shard_names = list(dict.fromkeys(weight_map.values()))
    elif single_path.is_file():
        weight_map = {}
        shard_names = [SINGLE_NAME]
    else:
        bins = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        if bins:
            raise CheckpointError(
                f"{folder}: only pickle checkpoints ({bins[0]}) found; gainsurgery reads safetensors only "
                "(convert with `model.save_pretrained(out, safe_serialization=True)` from a trusted source)"
            )
        raise CheckpointError(f"{folder}: no {INDEX_NAME} or {SINGLE_NAME} found")
    shards: dict[str, Shard] = {}
    tensors: dict[str, TensorInfo] = {}
    for sname in shard_names:
        shard = read_shard_header(folder / sname, sname)
        shards[sname] = shard
        for tname, info in shard.tensors.items():
            if tname in tensors:
                raise CheckpointError(f"tensor {tname!r} appears in both {tensors[tname].shard} and {sname}")
            tensors[tname] = info
    for tname, sname in weight_map.items():
        if tname not in shards[sname].tensors:
            raise CheckpointError(f"{INDEX_NAME}: maps {tname!r} to {sname}, but that shard has no such tensor")
    if index is not None:
        unindexed = sorted(set(tensors) - set(weight_map))
        if unindexed:
            raise CheckpointError(f"{INDEX_NAME}: tensor {unindexed[0]!r} is in a shard but not in the index")
    return Checkpoint(folder, shards, tensors, index, read_config(folder))


def _read_index(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path.name}: index is absurdly large")
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path.name}: not valid JSON") from None
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict) or not index["weight_map"]:
        raise CheckpointError(f"{path.name}: has no 'weight_map' object")
    base = path.parent.resolve()
    for tname, sname in index["weight_map"].items():
        if not is_plain_file_name(sname):
            raise CheckpointError(f"{path.name}: shard name {sname!r} for {tname!r} is not a plain file name")
        target = (path.parent / sname).resolve()
        if target.parent != base:
            raise CheckpointError(f"{path.name}: shard {sname!r} resolves outside the base folder")
        if not sname.endswith(".safetensors"):
            raise CheckpointError(f"{path.name}: shard {sname!r} is not a .safetensors file")
    return index


def read_config(folder: Path) -> dict:
    """Parse ``config.json`` in ``folder``; {} when absent."""
    path = Path(folder) / "config.json"
    return read_json_object(path, CheckpointError) if path.is_file() else {}


_QUANT_NAME = re.compile(r"(^|\.)(qweight|qzeros|scales|g_idx|weight_scale|weight_scale_inv|input_scale|absmax|quant_map|SCB|weight_format)$")


def refuse_unscalable(info: TensorInfo) -> None:
    """Raise a clear error when ``info`` is a tensor gains must not touch."""
    if info.dtype in SCALABLE_DTYPES:
        return
    kind = "quantized" if info.dtype.startswith("F8") or info.dtype in PACKED_DTYPES or info.dtype in ("I8", "U8") else "non-float"
    raise CheckpointError(
        f"{info.name} in {info.shard} is {kind} ({info.dtype}); gains are applied to float32/float16/bfloat16 "
        "tensors only (dequantize the checkpoint first)"
    )


def quantization_note(ckpt: Checkpoint) -> str | None:
    """Name of a quantization scheme the checkpoint declares, if any."""
    qc = ckpt.config.get("quantization_config")
    if isinstance(qc, dict):
        return str(qc.get("quant_method") or "unknown")
    for name in ckpt.tensors:
        if _QUANT_NAME.search(name):
            return "packed tensors (" + name.rsplit(".", 1)[-1] + ")"
    return None


def fingerprint(ckpt: Checkpoint) -> str:
    """A short identity of a checkpoint's structure: tensor names, dtypes and shapes.

    Two checkpoints with the same fingerprint accept the same gain files. Weights
    are not read, so this is cheap (headers only) but does not tell fine-tunes of
    one architecture apart.
    """
    spec = {name: [info.dtype, list(info.shape)] for name, info in sorted(ckpt.tensors.items())}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return "sha256:" + digest[:16]
