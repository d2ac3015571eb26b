"""Writing the adapted GGUF: the ``gguf`` library's writer for the header, then the tensors streamed in.

The header (magic, counts, every key/value, every tensor info) is encoded by the
library's ``GGUFWriter``: the base's key/values in their order with their own types
(strings as their raw bytes), then the provenance keys (:mod:`.provenance`); the
tensor infos in the base's order, each with its output type. The writer is handed the
claimed temp file's descriptor (``writer.fout``), never a path to reopen.

Then the data section, tensor by tensor in the base's order, each at the offset the
writer recorded (padded to the alignment with the writer's own padding): untouched
tensors are copied by the kernel (``copy_file_range``, a plain read/write where the
filesystem refuses it), rewritten ones are streamed from :func:`.engine.output_chunks`.
Meanwhile a thread hashes the base file (for ``gainsurgery.base.sha256``), which is
written into the header's placeholder at the end. Memory stays bounded by the chunk
size whatever the model's size.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

import numpy as np

from gainsurgery.errors import CheckpointError
from gainsurgery.formats.gguf.engine import CHUNK_ELEMS, Measured, output_chunks
from gainsurgery.formats.gguf.library import gguf_module
from gainsurgery.formats.gguf.opening import PSEUDO_KEYS, GGUFFile
from gainsurgery.formats.gguf.provenance import is_ours

_COPY_STEP = 64 << 20
_HASH_STEP = 16 << 20
_ARRAY, _STRING, _BOOL = 9, 8, 7


@dataclass
class Written:
    """What :func:`write_gguf` wrote.

    Attributes:
        bytes: size of the output file.
        base_sha256: sha256 of the base file (hex).
        header_bytes: where the data section starts.
    """

    bytes: int
    base_sha256: str
    header_bytes: int


def field_value(g: GGUFFile, key: str) -> tuple[Any, Any, Any]:
    """A key/value of ``g`` as ``(value, GGUFValueType, item type)`` for ``GGUFWriter.add_key_value``.

    Strings are their raw bytes (kept byte for byte, UTF-8 or not); numbers keep their
    exact value and type.

    Raises:
        CheckpointError: an empty array (the library's writer cannot write one).
    """
    gguf = gguf_module()
    f = g.field(key)
    main = int(f.types[0])
    vt = gguf.GGUFValueType
    if main == _STRING:
        return bytes(f.parts[-1]), vt.STRING, None
    if main != _ARRAY:
        value = f.parts[-1].tolist()[0]
        return (bool(value) if main == _BOOL else value), vt(main), None
    item = int(f.parts[3][0])
    if not f.data:
        raise CheckpointError(f"{g.name}: {key!r} is an empty array, which the gguf library cannot write; "
                              "remove it from the base first")
    if item == _STRING:
        items: list[Any] = [bytes(f.parts[i]) for i in f.data]
    else:
        items = np.concatenate([f.parts[i] for i in f.data]).tolist()
        if item == _BOOL:
            items = [bool(v) for v in items]
    return items, vt.ARRAY, vt(item)


def raw_value(g: GGUFFile, key: str) -> bytes:
    """The bytes that encode a key's type and value in the file (for byte-exact comparisons)."""
    f = g.field(key)
    return b"".join(np.ascontiguousarray(p).view(np.uint8).tobytes() for p in f.parts[2:])


def make_writer(measured: Measured, added: list[tuple[str, Any, str, str | None]]) -> Any:
    """A ``GGUFWriter`` holding the output header: the base's key/values, ``added``, and the tensor infos."""
    gguf = gguf_module()
    g = measured.plan.base
    w = gguf.GGUFWriter(None, g.arch)
    # The writer adds general.architecture itself; it is re-added in the base's own place below.
    w.kv_data[0].clear()
    w.data_alignment = g.alignment
    for key in g.keys:
        if key in PSEUDO_KEYS or is_ours(key):
            continue
        value, vtype, item = field_value(g, key)
        w.add_key_value(key, value, vtype, sub_type=item)
    vt = gguf.GGUFValueType
    for key, value, vtype, item in added:
        w.add_key_value(key, value, vt[vtype], sub_type=vt[item] if item else None)
    qt = gguf.GGMLQuantizationType
    for entry in g.tensors:
        w.add_tensor_info(entry.name, list(entry.shape), np.dtype(np.float32), measured.out_nbytes(entry),
                          raw_dtype=qt[measured.out_type(entry.name)])
    return w


def write_gguf(measured: Measured, out: BinaryIO, added: list[tuple[str, Any, str, str | None]], *,
               sha_placeholder: str | None = None, chunk_elems: int = CHUNK_ELEMS,
               progress: Callable[[int], Any] | None = None) -> Written:
    """Write the adapted file into ``out`` (an empty, unbuffered file opened for reading and writing).

    ``sha_placeholder``: 64 hex digits in ``added`` to replace with the base's sha256
    once the base has been read (every occurrence, in place).
    """
    gguf = gguf_module()
    g = measured.plan.base
    w = make_writer(measured, added)
    w.fout = [out]
    w.state = gguf.gguf_writer.WriterState.EMPTY
    hasher = _BaseHasher(g)
    hasher.start()
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        header = out.tell()
        w.write_padding(out, out.tell())
        data_start = out.tell()
        fdi, fdo = g.file.fileno(), out.fileno()
        pos = data_start
        for entry in g.tensors:
            op = measured.plan.ops.get(entry.name)
            if op is None:
                _copy(fdi, fdo, entry.offset, pos, entry.nbytes, g)
                size = entry.nbytes
            else:
                size = 0
                for chunk in output_chunks(g, op, measured.out_type(entry.name), chunk_elems):
                    data = memoryview(np.ascontiguousarray(chunk)).cast("B")
                    _pwrite_all(fdo, data, pos + size)
                    size += len(data)
                if size != measured.out_nbytes(entry):
                    raise RuntimeError(f"{entry.name}: wrote {size} bytes, the header says "
                                       f"{measured.out_nbytes(entry)}")  # a bug
            pos += size
            out.seek(pos)
            w.write_padding(out, size)
            pos = out.tell()
            if progress is not None:
                progress(entry.nbytes)
    except BaseException:
        hasher.stop = True
        hasher.join()
        raise
    base_sha = hasher.result()
    if sha_placeholder is not None:
        _replace_in_header(fdo, header, sha_placeholder.encode("ascii"), base_sha.encode("ascii"))
    return Written(pos, base_sha, data_start)


def _copy(fdi: int, fdo: int, src: int, dst: int, count: int, g: GGUFFile) -> None:
    """Kernel copy of ``count`` bytes, a read/write where the filesystem refuses ``copy_file_range``."""
    done = 0
    buf: bytearray | None = None
    while done < count:
        n = min(_COPY_STEP, count - done)
        try:
            got = os.copy_file_range(fdi, fdo, n, src + done, dst + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                raise
            buf = buf if buf is not None else bytearray(min(_COPY_STEP, 8 << 20))
            mv = memoryview(buf)[: min(n, len(buf))]
            got = os.preadv(fdi, [mv], src + done)
            _pwrite_all(fdo, mv[:got], dst + done)
        if got == 0:
            raise CheckpointError(f"{g.name}: ended early while copying (was it modified during the apply?)")
        done += got


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n


def _replace_in_header(fd: int, header_bytes: int, old: bytes, new: bytes) -> None:
    """Replace every ``old`` in the first ``header_bytes`` bytes with ``new`` (same length), in place."""
    if len(old) != len(new):
        raise RuntimeError("placeholder and value differ in length")  # a bug
    text = os.pread(fd, header_bytes, 0)
    at = text.find(old)
    found = 0
    while at >= 0:
        _pwrite_all(fd, memoryview(new), at)
        found += 1
        at = text.find(old, at + len(old))
    if not found:
        raise RuntimeError("the base sha256 placeholder is not in the header")  # a bug


class _BaseHasher(threading.Thread):
    """Hashes the whole base file from its descriptor while the writer works (hashlib releases the GIL)."""

    def __init__(self, g: GGUFFile) -> None:
        super().__init__(daemon=True, name="gguf-base-sha256")
        self.g = g
        self.digest: str | None = None
        self.error: BaseException | None = None
        self.stop = False

    def run(self) -> None:
        try:
            h = hashlib.sha256()
            fd, size, pos = self.g.file.fileno(), self.g.size, 0
            while pos < size and not self.stop:
                data = os.pread(fd, min(_HASH_STEP, size - pos), pos)
                if not data:
                    raise CheckpointError(f"{self.g.name}: ended early while it was hashed (modified?)")
                h.update(data)
                pos += len(data)
            self.digest = h.hexdigest()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self.error = exc

    def result(self) -> str:
        """The hex digest, once the whole file is hashed."""
        if self.is_alive() or self.ident is not None:
            self.join()
        if self.error is not None:
            raise self.error
        if self.digest is None:
            raise RuntimeError("base hash missing")  # a bug
        return self.digest


def sha256_of(g: GGUFFile) -> str:
    """sha256 of a whole opened GGUF file (read through its descriptor)."""
    hasher = _BaseHasher(g)
    hasher.run()
    return hasher.result()
