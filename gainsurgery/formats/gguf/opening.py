"""Opening a GGUF file someone else made: a bounded pre-check, then the ``gguf`` library's reader.

A GGUF header is a list of counts and lengths that a hostile file can set to
anything: 2^64 tensors, a 2^60-byte string, an array of 2^40 items, nested
arrays. The ``gguf`` library's reader believes them (it walks every array item in
Python and builds a view per item), so before the library sees a file,
:func:`scan_header` walks the header once itself, *without building values*, and
refuses anything outside :class:`GGUFLimits`, within a bounded amount of work and
memory:

- magic ``GGUF``, version 2 or 3, little-endian (big-endian files are refused);
- at most ``max_kv`` key/values and ``max_tensors`` tensors; keys UTF-8, unique,
  at most ``max_key_bytes``; strings at most ``max_string_bytes``; arrays of a
  known item type (an array of arrays is refused: llama.cpp reads none), at most
  ``max_array_items`` items each and ``max_total_items`` in all; booleans 0 or 1;
  ``general.alignment`` a UINT32 power of two;
- tensor infos: a UTF-8 name shorter than 64 bytes (llama.cpp's limit), unique;
  1 to 4 dims, each >= 1, the first a multiple of the type's block size; a type the
  library knows; the data inside the file, aligned, and no two tensors overlapping;
- the whole header inside the file and at most ``max_header_bytes``.

Only then is the file handed to the library's reader (:mod:`.library`), through the
descriptor opened safely by :func:`gainsurgery.io.inputs.open_regular` (a regular
file, never a FIFO or ``/proc``, checked on the descriptor), and what the library
parsed is checked against the pre-check.

Example:
    >>> with open_gguf("model-Q4_K_M.gguf") as g:  # doctest: +SKIP
    ...     g.arch, len(g.tensors)
    ('gemma3', 236)
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from gainsurgery.errors import CheckpointError, GainSurgeryError
from gainsurgery.formats.gguf.library import gguf_module, reader_class
from gainsurgery.io.inputs import open_regular, show_path

#: The first four bytes of every GGUF file.
MAGIC = b"GGUF"
#: Versions the library reads (and the pre-check accepts); output files are version 3.
VERSIONS = (2, 3)
#: llama.cpp's GGML_MAX_NAME: a tensor name is at most 63 bytes.
MAX_NAME_BYTES = 63
#: llama.cpp's GGML_MAX_DIMS.
MAX_DIMS = 4
#: The alignment of tensor data when ``general.alignment`` is absent.
DEFAULT_ALIGNMENT = 32
#: Key/values the library's reader adds that are not in the file's key/value list.
PSEUDO_KEYS = ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count")

# GGUF value types (gguf.GGUFValueType): fixed sizes in bytes.
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _UINT64, _INT64, _FLOAT64 = \
    range(13)
_FIXED_SIZE = {_UINT8: 1, _INT8: 1, _UINT16: 2, _INT16: 2, _UINT32: 4, _INT32: 4, _FLOAT32: 4, _BOOL: 1,
               _UINT64: 8, _INT64: 8, _FLOAT64: 8}


@dataclass(frozen=True)
class GGUFLimits:
    """What the pre-check accepts (every real GGUF file is far inside these).

    Attributes:
        max_header_bytes: key/values plus tensor infos, in bytes.
        max_kv: key/value pairs.
        max_tensors: tensors.
        max_key_bytes: bytes of one key.
        max_string_bytes: bytes of one string value (a chat template, one token).
        max_array_items: items of one array (a vocabulary).
        max_total_items: items of all arrays together (the library builds a view per item,
            about 450 bytes each: 4 Mi items are about 1.9 GB; Gemma 3's vocabulary is 0.8 Mi).
        max_alignment: the largest ``general.alignment``, in bytes.
    """

    max_header_bytes: int = 1 << 30
    max_kv: int = 1 << 16
    max_tensors: int = 1 << 18
    max_key_bytes: int = 1 << 16
    max_string_bytes: int = 64 << 20
    max_array_items: int = 1 << 22
    max_total_items: int = 1 << 22
    max_alignment: int = 1 << 20


DEFAULT_LIMITS = GGUFLimits()


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a GGUF file, as its tensor info says (checked by the pre-check).

    Attributes:
        name: the GGUF tensor name (``blk.3.ffn_down.weight``).
        type: the ggml type number (``gguf.GGMLQuantizationType``).
        type_name: its name (``Q4_K``, ``F32``...).
        ne: the dims in GGUF order: ``ne[0]`` is the contiguous one (a weight's input features).
        offset: where its data starts in the file, in bytes (absolute).
        nbytes: its data size in bytes.
        index: its position in the file's tensor list.
    """

    name: str
    type: int
    type_name: str
    ne: tuple[int, ...]
    offset: int
    nbytes: int
    index: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The dims in numpy / PyTorch order (``ne`` reversed): a weight is ``(out, in)``."""
        return tuple(reversed(self.ne))

    @property
    def n_elements(self) -> int:
        """Number of weights."""
        n = 1
        for d in self.ne:
            n *= d
        return n

    @property
    def rows(self) -> int:
        """Rows of ``ne[0]`` weights each (all dims but the first, multiplied)."""
        return self.n_elements // self.ne[0] if self.ne[0] else 0

    @property
    def row_bytes(self) -> int:
        """Bytes of one row."""
        return self.nbytes // self.rows if self.rows else 0


@dataclass
class GGUFFile:
    """A GGUF file opened for reading: the pre-checked header and the library's reader over it.

    Attributes:
        path: the path as given (for messages only).
        file: the descriptor opened safely; tensor bytes are read from it with ``os.pread``.
        size: the file size in bytes when it was checked.
        version: the GGUF version (2 or 3).
        alignment: the data alignment in bytes.
        data_offset: where the tensor data section starts, in bytes.
        keys: the key/value keys, in file order.
        tensors: the tensors, in file order.
        reader: the ``gguf.GGUFReader`` (its ``fields`` hold the values).
    """

    path: str
    file: BinaryIO
    size: int
    version: int
    alignment: int
    data_offset: int
    keys: list[str]
    tensors: list[TensorEntry]
    reader: Any
    by_name: dict[str, TensorEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_name = {t.name: t for t in self.tensors}

    @property
    def name(self) -> str:
        """The file's name (never its folder: provenance is published)."""
        return Path(self.path).name

    @property
    def arch(self) -> str:
        """``general.architecture``."""
        return self.string("general.architecture") or ""

    def field(self, key: str) -> Any:
        """The library's ``ReaderField`` of ``key``, or None."""
        return self.reader.fields.get(key)

    def string(self, key: str) -> str | None:
        """A STRING value as text (undecodable bytes replaced), or None when absent or not a string."""
        f = self.field(key)
        if f is None or list(f.types) != [_gguf_type(_STRING)]:
            return None
        return bytes(f.parts[-1]).decode("utf-8", "replace")

    def number(self, key: str) -> int | float | None:
        """A scalar number value, or None when absent or not a scalar number."""
        f = self.field(key)
        if f is None or len(f.types) != 1 or int(f.types[0]) not in _FIXED_SIZE or int(f.types[0]) == _BOOL:
            return None
        return f.parts[-1].tolist()[0]

    def numbers(self, key: str) -> list[int | float] | None:
        """A scalar number as a one-item list, or a numeric array's items; None otherwise (per-layer values)."""
        f = self.field(key)
        if f is None:
            return None
        kinds = [int(t) for t in f.types]
        if kinds[0] == _ARRAY and len(kinds) == 2 and kinds[1] in _FIXED_SIZE and kinds[1] != _BOOL:
            return [v for i in f.data for v in f.parts[i].tolist()]
        value = self.number(key)
        return None if value is None else [value]

    def read(self, offset: int, nbytes: int) -> bytes:
        """``nbytes`` bytes at ``offset`` (a checked tensor range).

        Raises:
            CheckpointError: the file ended early (it changed after it was checked).
        """
        data = os.pread(self.file.fileno(), nbytes, offset)
        if len(data) != nbytes:
            raise CheckpointError(f"{show_path(self.path)}: ended early at byte {offset + len(data)} "
                                  "(it changed while it was read)")
        return data

    def close(self) -> None:
        """Release the reader's memory map and the descriptor."""
        self.reader = None
        self.file.close()

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _gguf_type(value: int) -> Any:
    return gguf_module().GGUFValueType(value)


@dataclass
class _Header:
    version: int
    alignment: int
    header_end: int
    keys: list[str]
    tensors: list[tuple[str, int, tuple[int, ...], int]]  # name, type, ne, relative offset


class _Cursor:
    """Reads a header forward through ``os.pread``, within ``end``, with a small read-ahead buffer."""

    def __init__(self, fd: int, end: int, where: str) -> None:
        self.fd, self.end, self.where = fd, end, where
        self.pos = 0
        self._buf = b""
        self._buf_at = 0

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.where}: not a GGUF file we can read safely: {what} (at byte {self.pos})")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise self.fail(f"{what} runs past the end of the header or file")
        start = self.pos - self._buf_at
        if start < 0 or start + n > len(self._buf):
            want = max(n, 1 << 20)
            self._buf = os.pread(self.fd, min(want, self.end - self.pos), self.pos)
            self._buf_at = self.pos
            start = 0
            if len(self._buf) < n:
                raise self.fail(f"{what}: the file ended early")
        self.pos += n
        return self._buf[start:start + n]

    def skip(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise self.fail(f"{what} runs past the end of the header or file")
        self.pos += n

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.take(8, what))[0]

    def text(self, what: str, limit: int) -> bytes:
        n = self.u64(f"the length of {what}")
        if n > limit:
            raise self.fail(f"{what} is {n} bytes (limit {limit})")
        return self.take(n, what)

    def utf8(self, what: str, limit: int, subject: str) -> tuple[bytes, str]:
        """:meth:`text`, raw and decoded; a string that is not UTF-8 fails as "``subject`` not UTF-8"."""
        raw = self.text(what, limit)
        try:
            return raw, raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{subject} not UTF-8 ({raw[:40]!r})") from None


def scan_header(fd: int, size: int, where: str, limits: GGUFLimits = DEFAULT_LIMITS) -> _Header:
    """Walk a GGUF header within ``limits`` without building its values (see the module docstring).

    Raises:
        CheckpointError: anything outside the limits or the format, in one line.
    """
    gguf = gguf_module()
    sizes = gguf.GGML_QUANT_SIZES
    known_types = {int(t): t.name for t in gguf.GGMLQuantizationType}
    cur = _Cursor(fd, min(size, 24 + limits.max_header_bytes), where)
    if size < 24 or cur.take(4, "the magic") != MAGIC:
        raise CheckpointError(f"{where}: not a GGUF file (no GGUF magic)")
    version = cur.u32("the version")
    if version & 0xFFFF == 0 and version != 0:
        raise CheckpointError(f"{where}: a big-endian GGUF file; only little-endian files are supported")
    if version not in VERSIONS:
        raise CheckpointError(f"{where}: GGUF version {version} is not supported (only 2 and 3)")
    n_tensors = cur.u64("the tensor count")
    n_kv = cur.u64("the key/value count")
    if n_tensors > limits.max_tensors:
        raise cur.fail(f"{n_tensors} tensors (limit {limits.max_tensors})")
    if n_kv > limits.max_kv:
        raise cur.fail(f"{n_kv} key/values (limit {limits.max_kv})")
    keys: list[str] = []
    seen: set[str] = set()
    items = 0
    alignment = DEFAULT_ALIGNMENT
    for _ in range(n_kv):
        _, key = cur.utf8("a key", limits.max_key_bytes, "a key is")
        if key in seen or key in PSEUDO_KEYS:
            raise cur.fail(f"the key {key[:80]!r} appears twice")
        seen.add(key)
        keys.append(key)
        vtype = cur.u32(f"the type of {key[:80]!r}")
        if key == "general.alignment":
            if vtype != _UINT32:
                raise cur.fail("general.alignment is not a UINT32")
            alignment = cur.u32("general.alignment")
            if alignment == 0 or alignment & (alignment - 1) or alignment > limits.max_alignment:
                raise cur.fail(f"general.alignment {alignment} is not a power of two up to {limits.max_alignment}")
            continue
        items += _skip_value(cur, vtype, key, limits)
        if items > limits.max_total_items:
            raise cur.fail(f"the arrays hold more than {limits.max_total_items} items in all")
    tensors = []
    names: set[str] = set()
    for i in range(n_tensors):
        raw, name = cur.utf8("a tensor name", limits.max_key_bytes, f"tensor {i} has a name that is")
        if len(raw) > MAX_NAME_BYTES:
            raise cur.fail(f"tensor name {name[:80]!r} is longer than {MAX_NAME_BYTES} bytes (llama.cpp's limit)")
        if name in names:
            raise cur.fail(f"the tensor {name!r} appears twice")
        names.add(name)
        n_dims = cur.u32(f"the dims of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"{name!r} has {n_dims} dims (1 to {MAX_DIMS})")
        ne = tuple(cur.u64(f"a dim of {name!r}") for _ in range(n_dims))
        ttype = cur.u32(f"the type of {name!r}")
        offset = cur.u64(f"the offset of {name!r}")
        if ttype not in known_types or known_types[ttype] not in {t.name for t in sizes}:
            raise cur.fail(f"{name!r} has tensor type {ttype}, which the gguf library does not know")
        block, _ = sizes[gguf.GGMLQuantizationType(ttype)]
        if any(d < 1 or d >= 1 << 62 for d in ne) or ne[0] % block:
            raise cur.fail(f"{name!r} has dims {list(ne)}; each must be >= 1 and the first a multiple of "
                           f"{block} ({known_types[ttype]})")
        tensors.append((name, ttype, ne, offset))
    return _Header(version, alignment, cur.pos, keys, tensors)


def _skip_value(cur: _Cursor, vtype: int, key: str, limits: GGUFLimits) -> int:
    """Skip one value of type ``vtype``; return the array items it holds (0 for a scalar)."""
    shown = repr(key[:80])
    if vtype in _FIXED_SIZE:
        raw = cur.take(_FIXED_SIZE[vtype], f"the value of {shown}")
        if vtype == _BOOL and raw[0] > 1:
            raise cur.fail(f"{shown} is a bool holding {raw[0]}")
        return 0
    if vtype == _STRING:
        n = cur.u64(f"the length of {shown}")
        if n > limits.max_string_bytes:
            raise cur.fail(f"{shown} is a string of {n} bytes (limit {limits.max_string_bytes})")
        cur.skip(n, f"the value of {shown}")
        return 0
    if vtype != _ARRAY:
        raise cur.fail(f"{shown} has value type {vtype}, which GGUF does not define")
    itype = cur.u32(f"the item type of {shown}")
    count = cur.u64(f"the length of {shown}")
    if count > limits.max_array_items:
        raise cur.fail(f"{shown} is an array of {count} items (limit {limits.max_array_items})")
    if itype in _FIXED_SIZE:
        if itype == _BOOL:
            raw = cur.take(count, f"the items of {shown}")
            if raw and max(raw) > 1:
                raise cur.fail(f"{shown} is an array of bools holding {max(raw)}")
        else:
            cur.skip(count * _FIXED_SIZE[itype], f"the items of {shown}")
        return count
    if itype == _STRING:
        for _ in range(count):
            n = cur.u64(f"an item length of {shown}")
            if n > limits.max_string_bytes:
                raise cur.fail(f"an item of {shown} is {n} bytes (limit {limits.max_string_bytes})")
            cur.skip(n, f"an item of {shown}")
        return count
    if itype == _ARRAY:
        raise cur.fail(f"{shown} is an array of arrays, which llama.cpp cannot read")
    raise cur.fail(f"{shown} has item type {itype}, which GGUF does not define")


def open_gguf(path: str | os.PathLike[str], *, limits: GGUFLimits = DEFAULT_LIMITS,
              error: type[GainSurgeryError] = CheckpointError) -> GGUFFile:
    """Open a GGUF file the user named: safely, pre-checked within ``limits``, then parsed by the library.

    The path may be a link (the user chose it), but what it resolves to must be a
    regular file outside ``/proc``, ``/sys`` and ``/dev``
    (:func:`gainsurgery.io.inputs.open_regular`). The caller closes the result (or
    uses it as a context manager).

    Raises:
        CheckpointError: not a GGUF file, outside the limits, or refused by the library.
        MissingExtraError: the ``gguf`` extra is not installed.
        UnsafeInputError: not a regular file, or under ``/proc``, ``/sys``, ``/dev``.
    """
    gguf = gguf_module()
    where = show_path(path)
    f = open_regular(path)
    try:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        head = scan_header(fd, size, where, limits)
        data_offset = -(-head.header_end // head.alignment) * head.alignment
        entries = []
        for i, (name, ttype, ne, rel) in enumerate(head.tensors):
            qtype = gguf.GGMLQuantizationType(ttype)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n = 1
            for d in ne:
                n *= d
            nbytes = n // block * type_size
            if rel % head.alignment:
                raise error(f"{where}: tensor {name!r} starts at offset {rel}, not a multiple of the alignment "
                            f"{head.alignment}")
            start = data_offset + rel
            if n >= 1 << 62 or start + nbytes > size:
                raise error(f"{where}: tensor {name!r} ({nbytes} bytes at {start}) lies beyond the end of the "
                            f"file ({size} bytes); the file is truncated or damaged")
            entries.append(TensorEntry(name, ttype, qtype.name, ne, start, nbytes, i))
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in entries if t.nbytes)
        for (_, end_a, a), (start_b, _, b) in zip(spans, spans[1:]):
            if start_b < end_a:
                raise error(f"{where}: the data of tensors {a!r} and {b!r} overlap")
        try:
            reader = reader_class()(f)
        except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError, OverflowError) as exc:
            raise error(f"{where}: the gguf library could not read it ({str(exc)[:200]})") from None
        _cross_check(reader, head, entries, data_offset, where, error)
        arch = reader.fields.get("general.architecture")
        if arch is None or [int(t) for t in arch.types] != [_STRING]:
            raise error(f"{where}: has no general.architecture string; every GGUF model file names its architecture")
        return GGUFFile(str(path), f, size, head.version, head.alignment, data_offset, head.keys, entries, reader)
    except BaseException:
        f.close()
        raise


def _cross_check(reader: Any, head: _Header, entries: list[TensorEntry], data_offset: int, where: str,
                 error: type[GainSurgeryError]) -> None:
    """The library must have parsed what the pre-check walked: same keys, tensors and data offset."""
    keys = [k for k in reader.fields if k not in PSEUDO_KEYS]
    if keys != head.keys or reader.data_offset != data_offset or len(reader.tensors) != len(entries):
        raise error(f"{where}: the gguf library read a different header than the pre-check (damaged file?)")
    for t, e in zip(reader.tensors, entries):
        if t.name != e.name or int(t.tensor_type) != e.type or tuple(int(d) for d in t.shape) != e.ne \
                or int(t.data_offset) != e.offset or int(t.n_bytes) != e.nbytes:
            raise error(f"{where}: the gguf library read tensor {e.name!r} differently than the pre-check")
