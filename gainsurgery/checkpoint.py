"""Reading sharded safetensors checkpoints: index, headers, byte ranges.

Every header and index is treated as hostile and checked before any data is
touched: header length bound, JSON, known dtypes, shapes that match their byte
ranges, offsets inside the file and not overlapping, shard names that are plain
file names inside the base folder. Nothing here unpickles anything; ``.bin``
checkpoints are refused.

Only the standard library is needed: the apply path stays light.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gainsurgery.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

#: Bytes per element of the safetensors dtypes we can read headers of.
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}
#: Sub-byte dtypes: packed, never scaled; listed so headers can still be read.
PACKED_DTYPES = {"F4", "F6_E2M3", "F6_E3M2"}
#: The dtypes gains can be applied to.
SCALABLE_DTYPES = {"F32", "F16", "BF16"}

#: safetensors itself refuses headers over 100 MB; so do we.
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: Non-weight files that ship with a checkpoint and are copied next to the output.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry, with offsets resolved to absolute file positions.

    Attributes:
        name: tensor name in the header.
        dtype: safetensors dtype string (``BF16``...).
        shape: tensor shape.
        shard: file name of the shard holding it.
        start: absolute byte offset of its first byte in the shard file.
        end: absolute byte offset one past its last byte.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: str
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.start


@dataclass
class Shard:
    """A parsed safetensors file header.

    Attributes:
        name: file name inside the checkpoint folder.
        path: full path.
        data_start: absolute offset of the data buffer (8 + header length).
        file_size: size of the file in bytes.
        tensors: tensor name -> TensorInfo, in file order.
        metadata: the header's ``__metadata__`` (string -> string).
    """

    name: str
    path: Path
    data_start: int
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)


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

    def extra_files(self) -> list[Path]:
        """Top-level non-weight files (config, tokenizer, license, ...) to copy.

        The index, weight files of any format and the base's own model card
        (``README.md``, replaced by ours) are excluded.
        """
        out = []
        for p in sorted(self.folder.iterdir()):
            if not p.is_file():  # follows symlinks: HF cache snapshots link to blobs
                continue
            if p.name in (INDEX_NAME, "README.md", "gainsurgery.json") or p.name.endswith(WEIGHT_SUFFIXES):
                continue
            out.append(p)
        return out


def is_plain_file_name(name: str) -> bool:
    """True when ``name`` is a plain file name: no separators, not '.', '..' or hidden tricks."""
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not name.startswith("..")
    )


def read_shard_header(path: Path, name: str | None = None) -> Shard:
    """Parse and validate one safetensors file's header.

    Checks: the 8-byte length is sane and inside the file, the header is a JSON
    object, every entry has a known dtype, a shape of non-negative ints and
    offsets whose length matches shape × dtype size, offsets lie inside the file
    and no two tensors overlap.

    Raises:
        CheckpointError: any check fails, with the file and the broken rule named.
    """
    path = Path(path)
    name = name or path.name
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{name}: truncated (shorter than the 8-byte header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(f"{name}: header length {header_len} bytes is absurd (limit {MAX_HEADER_BYTES})")
            if 8 + header_len > file_size:
                raise CheckpointError(f"{name}: truncated (header claims {header_len} bytes, file has {file_size})")
            raw = f.read(header_len)
    except FileNotFoundError:
        raise CheckpointError(f"shard missing: {path}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{name}: is a folder, expected a safetensors file") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{name}: header is not valid JSON (not a safetensors file?)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: header is not a JSON object")
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{name}: __metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for tname, entry in header.items():
        tensors[tname] = _tensor_info(name, tname, entry, data_start, file_size)
    ordered = sorted(tensors.values(), key=lambda t: (t.start, t.end))
    for prev, cur in zip(ordered, ordered[1:]):
        if cur.start < prev.end:
            raise CheckpointError(f"{name}: tensors {prev.name!r} and {cur.name!r} overlap")
    data_end = max((t.end for t in ordered), default=data_start)
    if data_end != file_size:
        # safetensors requires the buffer to end exactly at the last tensor.
        if data_end > file_size:  # pragma: no cover - caught per tensor above
            raise CheckpointError(f"{name}: truncated")
        raise CheckpointError(f"{name}: {file_size - data_end} trailing bytes after the last tensor")
    return Shard(name, path, data_start, file_size, {t.name: t for t in ordered}, dict(metadata))


def _tensor_info(shard: str, tname: str, entry: object, data_start: int, file_size: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{shard}: header entry {tname!r} is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if dtype not in DTYPE_BYTES and dtype not in PACKED_DTYPES:
        raise CheckpointError(f"{shard}: tensor {tname!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{shard}: tensor {tname!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(f"{shard}: tensor {tname!r} has invalid data_offsets {offsets!r}")
    start, end = data_start + offsets[0], data_start + offsets[1]
    if end > file_size:
        raise CheckpointError(
            f"{shard}: tensor {tname!r} ends at byte {end} but the file has {file_size} bytes (truncated?)"
        )
    if dtype in DTYPE_BYTES:
        expected = math.prod(shape) * DTYPE_BYTES[dtype]
        if expected != end - start:
            raise CheckpointError(
                f"{shard}: tensor {tname!r} spans {end - start} bytes but shape {shape} x {dtype} needs {expected}"
            )
    return TensorInfo(tname, dtype, tuple(shape), shard, start, end)


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
    from gainsurgery.atomic import read_json_object

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
    import hashlib

    spec = {name: [info.dtype, list(info.shape)] for name, info in sorted(ckpt.tensors.items())}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return "sha256:" + digest[:16]
