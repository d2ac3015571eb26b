"""Sharded safetensors checkpoints: the index, every shard's header, config.json.

A checkpoint is a folder with ``model.safetensors.index.json`` and its shards, or
one ``model.safetensors``. :func:`open_checkpoint` validates the index and every
header (see :mod:`gainsurgery.io.safetensors`) before any data is read. Every file
is read through :mod:`gainsurgery.io.inputs` (a regular file inside the folder, or
inside the repo's ``blobs/`` for a Hugging Face cache snapshot) and every JSON
through :mod:`gainsurgery.io.jsonsafe`. Nothing here unpickles anything; ``.bin``
checkpoints are refused.

Only the standard library is needed: the apply path stays light.

Example:
    >>> ckpt = open_checkpoint("path/to/base")  # doctest: +SKIP
    >>> len(ckpt.shards), ckpt.config["model_type"]  # doctest: +SKIP
    (2, 'llama')
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection

from gainsurgery.errors import CheckpointError
from gainsurgery.io import jsonsafe
from gainsurgery.io.atomic import create_file
from gainsurgery.io.inputs import InputFile, allowed_roots, iter_input_files, open_input, resolve_input, show_path
from gainsurgery.io.safetensors import (
    PACKED_DTYPES,
    SCALABLE_DTYPES,
    Shard,
    TensorInfo,
    is_plain_file_name,
    read_shard_header,
)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

#: Weight files of any format: never copied as "extra files" (shards are streamed; pickles never read).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
#: Size limit of the index, in bytes (a 1T-parameter model's index is a few MB).
MAX_INDEX_BYTES = 64 << 20
#: Size limit of config.json, in bytes.
MAX_CONFIG_BYTES = 4 << 20


@dataclass
class Checkpoint:
    """A base checkpoint: a folder of safetensors shards (+ index) or one file.

    Attributes:
        folder: the checkpoint folder, as given (not resolved).
        shards: shard file name -> Shard, in index order.
        tensors: every tensor name -> TensorInfo.
        index: the parsed index JSON, or None for a single ``model.safetensors``.
        config: the parsed ``config.json`` (its fields checked), or {} when there is none.
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

    def extra_files(self, skip: Collection[str] = ()) -> list[InputFile]:
        """Top-level non-weight files (config, tokenizer, license, ...) to copy beside an output.

        The index, weight files of any format, hidden files and the names in ``skip``
        (the files an output writes itself, such as its model card) are left out.
        Every other entry must be a regular file inside the folder (or the cache
        repo's ``blobs/``): a link out of it, a FIFO or a device raises
        :class:`~gainsurgery.errors.CheckpointError` naming it, before anything is copied.
        """
        def excluded(name: str) -> bool:
            return name == INDEX_NAME or name in skip or name.lower().endswith(WEIGHT_SUFFIXES)

        return list(iter_input_files(self.folder, exclude=excluded, error=CheckpointError))


def copy_extra_files(ckpt: Checkpoint, dest: str | os.PathLike[str], *, skip: Collection[str] = (),
                     keep_existing: bool = False) -> list[str]:
    """Copy the checkpoint's extra files (see :meth:`Checkpoint.extra_files`) into the folder ``dest``.

    Each file is read through the safe open (checked again on the descriptor) and
    written as a new regular file (never through a link). ``keep_existing``: leave a
    file ``dest`` already has (else an existing name is an error). Returns the names copied.

    Example:
        >>> copy_extra_files(ckpt, claim.tmp, skip=OUTPUT_FILES)  # doctest: +SKIP
        ['config.json', 'generation_config.json', 'tokenizer.json']
    """
    copied = []
    for item in ckpt.extra_files(skip):
        target = Path(dest) / item.name
        if keep_existing and os.path.lexists(target):
            continue
        with open_input(ckpt.folder, item.name, error=CheckpointError) as src:
            with create_file(target) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
        copied.append(item.name)
    return copied


def open_checkpoint(folder: str | os.PathLike[str]) -> Checkpoint:
    """Open a local checkpoint folder and validate every header and the index.

    Accepts a folder with ``model.safetensors.index.json`` and its shards, or a
    folder with a single ``model.safetensors`` (a Hugging Face cache snapshot too,
    whose files link into the repo's ``blobs/``). Reads headers only.

    Raises:
        CheckpointError: missing folder, ``.bin``-only checkpoint, hostile index,
            config or header, a file that is not a regular file inside the folder,
            missing or truncated shard.

    Example:
        >>> ckpt = open_checkpoint("path/to/base")  # doctest: +SKIP
        >>> ckpt.tensors["model.layers.0.self_attn.o_proj.weight"].shape  # doctest: +SKIP
        (576, 1024)
    """
    folder = Path(folder)
    allowed_roots(folder, error=CheckpointError)  # exists, is a folder, not under /proc
    index: dict | None = None
    if resolve_input(folder, INDEX_NAME, missing_ok=True, error=CheckpointError) is not None:
        index = _read_index(folder)
        weight_map: dict[str, str] = index["weight_map"]
        shard_names = list(dict.fromkeys(weight_map.values()))
    elif resolve_input(folder, SINGLE_NAME, missing_ok=True, error=CheckpointError) is not None:
        weight_map = {}
        shard_names = [SINGLE_NAME]
    else:
        try:
            names = sorted(os.listdir(folder))
        except OSError as e:
            raise CheckpointError(f"{show_path(folder)}: cannot be listed ({e.strerror})") from None
        pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        if pickles:
            raise CheckpointError(
                f"{show_path(folder)}: only pickle checkpoints ({show_path(pickles[0])}) found; gainsurgery reads "
                "safetensors only (convert with `model.save_pretrained(out, safe_serialization=True)` from a "
                "trusted source)"
            )
        raise CheckpointError(f"{show_path(folder)}: no {INDEX_NAME} or {SINGLE_NAME} found")
    shards: dict[str, Shard] = {}
    tensors: dict[str, TensorInfo] = {}
    for sname in shard_names:
        shard = read_shard_header(folder, sname)
        shards[sname] = shard
        for tname, info in shard.tensors.items():
            if tname in tensors:
                raise CheckpointError(f"tensor {show_path(tname)} appears in both {tensors[tname].shard} and {sname}")
            tensors[tname] = info
    for tname, sname in weight_map.items():
        if tname not in shards[sname].tensors:
            raise CheckpointError(f"{INDEX_NAME}: maps {show_path(tname)} to {sname}, but that shard has no such "
                                  "tensor")
    if index is not None:
        unindexed = sorted(set(tensors) - set(weight_map))
        if unindexed:
            raise CheckpointError(f"{INDEX_NAME}: tensor {show_path(unindexed[0])} is in a shard but not in the index")
    return Checkpoint(folder, shards, tensors, index, read_config(folder))


def _read_index(folder: Path) -> dict:
    with open_input(folder, INDEX_NAME, error=CheckpointError) as f:
        raw = jsonsafe.load(f, where=INDEX_NAME, error=CheckpointError, max_bytes=MAX_INDEX_BYTES, max_depth=8,
                            unique_keys=True)  # a tensor named twice would be mapped to two shards
    index = jsonsafe.Fields(raw, where=INDEX_NAME, error=CheckpointError)
    weight_map = index.str_map("weight_map")
    index.obj("metadata", None)  # optional, but an object when present
    if not weight_map:
        raise CheckpointError(f"{INDEX_NAME}: weight_map names no tensors")
    for tname, sname in weight_map.items():
        if not is_plain_file_name(sname):
            raise CheckpointError(f"{INDEX_NAME}: shard name {sname[:80]!r} for {show_path(tname)} is not a plain "
                                  "file name")
        if not sname.endswith(".safetensors"):
            raise CheckpointError(f"{INDEX_NAME}: shard {sname[:80]!r} is not a .safetensors file")
    return index.value


#: config.json fields gainsurgery reads, and the JSON type each must have when present.
_CONFIG_TYPES = {
    "model_type": "str", "num_hidden_layers": "int", "n_layer": "int", "num_layers": "int",
    "dtype": "str", "torch_dtype": "str", "quantization_config": "obj",
}


def check_config(value: Any, where: str = CONFIG_NAME) -> dict[str, Any]:
    """Check the fields of a parsed ``config.json`` that gainsurgery reads; return it.

    The config must be an object; ``model_type``, the layer counts, ``dtype``,
    ``quantization_config`` and a nested ``text_config`` (an object, itself checked)
    must have their JSON types when present, so a ``model_type`` that is a list or
    a ``text_config`` that is a string is one line of error, not a traceback.

    Example:
        >>> check_config({"model_type": ["llama"]})
        Traceback (most recent call last):
        ...
        gainsurgery.errors.CheckpointError: config.json: model_type: expected string, got array
    """
    fields = jsonsafe.Fields(value, where=where, error=CheckpointError)
    _check_fields(fields)
    text = fields.obj("text_config", None)
    if text is not None:
        _check_fields(text)
    return fields.value


def _check_fields(fields: jsonsafe.Fields) -> None:
    for key, kind in _CONFIG_TYPES.items():
        if kind == "str":
            fields.str(key, None)
        elif kind == "int":
            fields.int(key, None)
        else:
            fields.obj(key, None)


def read_config(folder: str | os.PathLike[str]) -> dict:
    """Parse and check ``config.json`` in ``folder`` (see :func:`check_config`); {} when absent.

    Example:
        >>> read_config("base")["model_type"]  # doctest: +SKIP
        'llama'
    """
    if resolve_input(folder, CONFIG_NAME, missing_ok=True, error=CheckpointError) is None:
        return {}
    with open_input(folder, CONFIG_NAME, error=CheckpointError) as f:
        raw = jsonsafe.load(f, where=CONFIG_NAME, error=CheckpointError, max_bytes=MAX_CONFIG_BYTES)
    return check_config(raw)


_QUANT_NAME = re.compile(r"(^|\.)(qweight|qzeros|scales|g_idx|weight_scale|weight_scale_inv|input_scale|absmax|quant_map|SCB|weight_format)$")


def refuse_unscalable(info: TensorInfo) -> None:
    """Raise a clear error when ``info`` is a tensor gains must not touch."""
    if info.dtype in SCALABLE_DTYPES:
        return
    kind = "quantized" if info.dtype.startswith("F8") or info.dtype in PACKED_DTYPES or info.dtype in ("I8", "U8") else "non-float"
    raise CheckpointError(
        f"{show_path(info.name)} in {info.shard} is {kind} ({info.dtype}); gains are applied to "
        "float32/float16/bfloat16 tensors only (dequantize the checkpoint first)"
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
    one architecture apart (see :mod:`gainsurgery.io.fingerprint` for that).
    """
    spec = {name: [info.dtype, list(info.shape)] for name, info in sorted(ckpt.tensors.items())}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return "sha256:" + digest[:16]
