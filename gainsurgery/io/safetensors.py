"""safetensors headers, read as hostile input.

The safetensors format is an 8-byte little-endian header length, a JSON header
(tensor name -> dtype, shape, data_offsets; optional ``__metadata__`` of strings)
and a data buffer that the tensors tile from offset 0. :func:`read_shard_header`
checks every one of those rules before any tensor byte is touched. Only the
standard library is used, so the apply path stays light.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path

from gainsurgery.errors import CheckpointError

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
