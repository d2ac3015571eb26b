"""safetensors headers, read as hostile input and held to safetensors' own rules.

The safetensors format is an 8-byte little-endian header length, a JSON header
(tensor name -> dtype, shape, data_offsets; optional ``__metadata__``) and a data
buffer. :func:`parse_header` checks every rule of the format before any tensor
byte is touched:

- the header length fits the file and the 100 MB bound safetensors itself sets;
- the header is JSON within size and nesting limits (:mod:`gainsurgery.io.jsonsafe`),
  an object, with **no duplicate tensor names** (with duplicates, one byte range
  would silently go unscaled);
- ``__metadata__``, when present, maps strings to strings (not ``[]``, not ``false``);
- every tensor has a known dtype, a shape of non-negative integers and two integer
  offsets whose span is exactly shape × dtype size;
- the tensors tile the data buffer **from offset 0, with no holes and no overlap,
  up to the end of the file**.

Files are opened through :mod:`gainsurgery.io.inputs` (a FIFO never blocks, a link
out of the folder is refused), and the identity of the validated file is kept so
that :func:`open_shard` can check, on the descriptor, that the file streamed later
is the one whose header was read. Only the standard library is used, so the apply
path stays light.

Example:
    >>> shard = read_shard_header("base", "model-00001-of-00002.safetensors")  # doctest: +SKIP
    >>> shard.tensors["model.layers.0.self_attn.o_proj.weight"].dtype  # doctest: +SKIP
    'BF16'
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from gainsurgery.errors import CheckpointError, GainSurgeryError
from gainsurgery.io import jsonsafe
from gainsurgery.io.inputs import open_input, show_path

#: Bits per element of every dtype safetensors defines.
DTYPE_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16,
    "I64": 64, "I32": 32, "I16": 16, "I8": 8,
    "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "C64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}
#: Bytes per element of the whole-byte dtypes.
DTYPE_BYTES = {name: bits // 8 for name, bits in DTYPE_BITS.items() if bits % 8 == 0}
#: Sub-byte dtypes: packed, never scaled.
PACKED_DTYPES = {name for name, bits in DTYPE_BITS.items() if bits % 8}
#: The dtypes gains can be applied to.
SCALABLE_DTYPES = {"F32", "F16", "BF16"}

#: safetensors itself refuses headers over 100 MB; so do we.
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: A valid header is three levels deep (header -> tensor -> shape); leave some room.
MAX_HEADER_DEPTH = 8
#: Dimensions of one tensor (safetensors has no limit; no real tensor has more than a handful).
MAX_RANK = 64


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
        path: the path to open it by (``folder/name``, symlinks not resolved, so
            that :func:`open_shard` judges it against its folder).
        data_start: absolute offset of the data buffer (8 + header length).
        file_size: size of the file in bytes.
        tensors: tensor name -> TensorInfo, in file order.
        metadata: the header's ``__metadata__`` (string -> string).
        identity: ``(st_dev, st_ino)`` of the file whose header was validated, or None.
    """

    name: str
    path: Path
    data_start: int
    file_size: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] = field(default_factory=dict)
    identity: tuple[int, int] | None = None


def is_plain_file_name(name: object) -> bool:
    """True when ``name`` is a plain file name: no separators, not '.', '..' or hidden tricks.

    Example:
        >>> is_plain_file_name("model-00001-of-00002.safetensors"), is_plain_file_name("../x")
        (True, False)
    """
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not name.startswith("..")
        and name.isprintable()
    )


def parse_header(f: BinaryIO, file_size: int, name: str, *,
                 error: type[GainSurgeryError] = CheckpointError) -> tuple[int, dict[str, TensorInfo], dict[str, str]]:
    """Read and validate the header of the safetensors file open as ``f`` (at offset 0).

    Args:
        f: the file, opened safely (see :mod:`gainsurgery.io.inputs`).
        file_size: its size in bytes (from ``fstat`` of the same descriptor).
        name: how messages name it (the shard's file name).
        error: the error class to raise.

    Returns:
        (data_start, tensor name -> TensorInfo in file order, metadata).

    Raises:
        ``error`` with one line naming the file and the rule it breaks.

    Example:
        >>> import io, json, struct
        >>> h = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
        >>> raw = struct.pack("<Q", len(h)) + h + bytes(4)
        >>> parse_header(io.BytesIO(raw), len(raw), "x.safetensors")[1]["a"].nbytes
        4
    """
    prefix = f.read(8)
    if len(prefix) < 8:
        raise error(f"{name}: truncated (shorter than the 8-byte header length)")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES:
        raise error(f"{name}: header length {header_len} bytes is absurd (limit {MAX_HEADER_BYTES})")
    if 8 + header_len > file_size:
        raise error(f"{name}: truncated (header claims {header_len} bytes, file has {file_size})")
    raw = f.read(header_len)
    if len(raw) != header_len:
        raise error(f"{name}: truncated while reading its header (changed while it was read?)")
    where = f"{name}: header"
    header = jsonsafe.expect_object(
        jsonsafe.loads(raw, where=where, error=error, max_bytes=MAX_HEADER_BYTES, max_depth=MAX_HEADER_DEPTH,
                       unique_keys=True), where=where, error=error)
    data_start = 8 + header_len
    meta = header.pop("__metadata__", None)
    metadata = {} if meta is None else jsonsafe.expect_str_map(meta, where=where, field="__metadata__", error=error)
    infos = [_tensor_info(name, tname, entry, data_start, error) for tname, entry in header.items()]
    ordered = sorted(infos, key=lambda t: (t.start, t.end))
    expected = data_start
    prev: TensorInfo | None = None
    for cur in ordered:
        if cur.start < expected:
            assert prev is not None  # the first tensor starts at data_start, so only a later one overlaps
            raise error(f"{name}: tensors {show_path(prev.name)} and {show_path(cur.name)} overlap")
        if cur.start > expected:
            gap = cur.start - expected
            where_gap = f"between {show_path(prev.name)} and {show_path(cur.name)}" if prev is not None \
                else f"before the first tensor {show_path(cur.name)} (data must start at offset 0)"
            raise error(f"{name}: {gap} bytes {where_gap} belong to no tensor (a hole in the data buffer)")
        expected = cur.end
        prev = cur
    if expected > file_size:
        last = ordered[-1]
        raise error(f"{name}: tensor {show_path(last.name)} ends at byte {last.end} but the file has "
                    f"{file_size} bytes (truncated?)")
    if expected < file_size:
        # safetensors requires the buffer to end exactly at the last tensor.
        raise error(f"{name}: {file_size - expected} trailing bytes after the last tensor")
    return data_start, {t.name: t for t in ordered}, dict(metadata)


def _tensor_info(shard: str, tname: str, entry: object, data_start: int,
                 error: type[GainSurgeryError]) -> TensorInfo:
    shown = show_path(tname)
    where = f"{shard}: tensor {shown}"
    if not isinstance(entry, dict):
        raise error(f"{where}: header entry is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise error(f"{where} has unknown dtype {str(dtype)[:40]!r}")
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise error(f"{where} has an invalid shape (expected a list of non-negative integers)")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise error(f"{where} has invalid data_offsets (expected [start, end] with 0 <= start <= end)")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8:
        raise error(f"{where}: shape {shape} x {dtype} is not a whole number of bytes")
    if bits // 8 != offsets[1] - offsets[0]:
        raise error(f"{where} spans {offsets[1] - offsets[0]} bytes but shape {shape} x {dtype} needs {bits // 8}")
    return TensorInfo(tname, dtype, tuple(shape), shard, data_start + offsets[0], data_start + offsets[1])


def read_shard_header(folder: str | os.PathLike[str], name: str, *,
                      error: type[GainSurgeryError] = CheckpointError) -> Shard:
    """Open the shard ``name`` of the input folder ``folder`` safely and validate its header.

    The file must be a regular file inside ``folder`` (or, for a Hugging Face cache
    snapshot, inside the repo's ``blobs/``), see :func:`gainsurgery.io.inputs.open_input`.

    Raises:
        ``error``: the file is missing, unsafe or breaks a rule of the format.

    Example:
        >>> read_shard_header("base", "model.safetensors").file_size  # doctest: +SKIP
        1048584
    """
    if not is_plain_file_name(name):
        raise error(f"shard name {show_path(name)!r} is not a plain file name")
    path = Path(folder) / name
    if not os.path.lexists(path):
        raise error(f"shard missing: {show_path(path)}")
    with open_input(folder, name, error=error) as f:
        st = os.fstat(f.fileno())
        data_start, tensors, metadata = parse_header(f, st.st_size, name, error=error)
    return Shard(name, path, data_start, st.st_size, tensors, metadata, (st.st_dev, st.st_ino))


def open_shard(shard: Shard, *, error: type[GainSurgeryError] = CheckpointError) -> BinaryIO:
    """Open a shard for reading its data, safely, and check it is the file whose header was read.

    Opens ``shard.path`` through :func:`~gainsurgery.io.inputs.open_input` (judged
    against its folder), then checks on the descriptor that its size is
    ``shard.file_size`` and, when known, that it is the same inode.

    Raises:
        ``error``: the file is unsafe, or changed since its header was read.

    Example:
        >>> with open_shard(ckpt.shards["model.safetensors"]) as f:  # doctest: +SKIP
        ...     f.seek(ckpt.shards["model.safetensors"].data_start)
    """
    f = open_input(shard.path.parent, shard.path.name, error=error)
    try:
        st = os.fstat(f.fileno())
        if st.st_size != shard.file_size or (shard.identity is not None
                                             and (st.st_dev, st.st_ino) != shard.identity):
            raise error(f"{show_path(shard.path)}: changed since its header was read "
                        f"({st.st_size} bytes now, {shard.file_size} then); run the command again")
        return f
    except BaseException:
        f.close()
        raise
