"""Hostile GGUF headers: each is refused in one line, before the gguf library parses the file.

The files are assembled byte by byte here (the library's writer refuses to write most
of them), from a valid minimal file that opens.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

pytest.importorskip("gguf")

from gainsurgery.errors import CheckpointError, GainSurgeryError  # noqa: E402
from gainsurgery.formats.gguf import GGUFLimits, open_gguf  # noqa: E402

U32, F32T, BOOL, STRING, ARRAY, U64 = 4, 6, 7, 8, 9, 10
F32_TYPE, Q8_0 = 0, 8


def s(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def kv(key: bytes, vtype: int, value: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + value


def tensor(name: bytes, dims: tuple[int, ...], ttype: int, offset: int) -> bytes:
    return s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) \
        + struct.pack("<IQ", ttype, offset)


def build(kvs: list[bytes] | None = None, tensors: list[bytes] | None = None, *, data: int = 64,
          version: int = 3, magic: bytes = b"GGUF", n_tensors: int | None = None, n_kv: int | None = None,
          alignment: int = 32) -> bytes:
    kvs = [kv(b"general.architecture", STRING, s(b"llama"))] if kvs is None else kvs
    tensors = [tensor(b"a.weight", (16,), F32_TYPE, 0)] if tensors is None else tensors
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    head += b"\0" * (-len(head) % alignment)
    return head + b"\0" * data


def write(tmp_path: Path, raw: bytes, name: str = "x.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(raw)
    return p


def test_the_minimal_file_opens(tmp_path):
    with open_gguf(write(tmp_path, build())) as g:
        assert g.arch == "llama" and [t.name for t in g.tensors] == ["a.weight"]
        assert g.tensors[0].nbytes == 64 and g.tensors[0].offset == g.data_offset


ARCH = kv(b"general.architecture", STRING, s(b"llama"))
CASES = {
    "not gguf": (dict(magic=b"GGML"), "not a GGUF file"),
    "big-endian": (dict(version=3 << 24), "big-endian"),
    "version 1": (dict(version=1), "version 1 is not supported"),
    "2^40 tensors": (dict(n_tensors=1 << 40), "tensors (limit"),
    "2^40 key/values": (dict(n_kv=1 << 40), "key/values (limit"),
    "a 2^60-byte string": (dict(kvs=[ARCH, s(b"k") + struct.pack("<IQ", STRING, 1 << 60)]), "limit"),
    "an array of 2^40 items": (dict(kvs=[ARCH, s(b"k") + struct.pack("<IIQ", ARRAY, U32, 1 << 40)]), "limit"),
    "an array of arrays": (dict(kvs=[ARCH, s(b"k") + struct.pack("<IIQ", ARRAY, ARRAY, 1)]), "array of arrays"),
    "a bool holding 2": (dict(kvs=[ARCH, kv(b"b", BOOL, b"\x02")]), "bool holding 2"),
    "an unknown value type": (dict(kvs=[ARCH, kv(b"b", 99, b"")]), "value type 99"),
    "a key twice": (dict(kvs=[ARCH, kv(b"k", U32, b"\0" * 4), kv(b"k", U32, b"\0" * 4)]), "appears twice"),
    "a key that is not UTF-8": (dict(kvs=[ARCH, kv(b"\xff\xfe", U32, b"\0" * 4)]), "not UTF-8"),
    "a tensor twice": (dict(tensors=[tensor(b"a", (16,), F32_TYPE, 0), tensor(b"a", (16,), F32_TYPE, 64)],
                            data=128), "appears twice"),
    "a 64-byte tensor name": (dict(tensors=[tensor(b"n" * 64, (16,), F32_TYPE, 0)]), "longer than 63"),
    "5 dims": (dict(tensors=[tensor(b"a", (1, 1, 1, 1, 16), F32_TYPE, 0)]), "5 dims"),
    "a zero dim": (dict(tensors=[tensor(b"a", (16, 0), F32_TYPE, 0)]), "must be >= 1"),
    "rows not whole blocks": (dict(tensors=[tensor(b"a", (16,), Q8_0, 0)]), "multiple of 32"),
    "an unknown tensor type": (dict(tensors=[tensor(b"a", (16,), 77, 0)]), "tensor type 77"),
    "data beyond the end": (dict(tensors=[tensor(b"a", (1 << 20,), F32_TYPE, 0)]), "beyond the end of the file"),
    "dims that overflow": (dict(tensors=[tensor(b"a", (1 << 31, 1 << 31, 1 << 31), F32_TYPE, 0)]), "beyond"),
    "overlapping tensors": (dict(tensors=[tensor(b"a", (16,), F32_TYPE, 0), tensor(b"b", (16,), F32_TYPE, 32)],
                                 data=128), "overlap"),
    "a misaligned tensor": (dict(tensors=[tensor(b"a", (8,), F32_TYPE, 4)]), "not a multiple of the alignment"),
    "alignment 3": (dict(kvs=[ARCH, kv(b"general.alignment", U32, struct.pack("<I", 3))]), "power of two"),
    "alignment as float": (dict(kvs=[ARCH, kv(b"general.alignment", F32T, struct.pack("<f", 32))]),
                           "not a UINT32"),
    "no architecture": (dict(kvs=[kv(b"general.name", STRING, s(b"x"))]), "general.architecture"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_headers_are_refused_in_one_line(tmp_path, case):
    kwargs, message = CASES[case]
    path = write(tmp_path, build(**kwargs))
    with pytest.raises(CheckpointError) as info:
        open_gguf(path)
    text = str(info.value)
    assert message in text and "\n" not in text and len(text) < 400, text


@pytest.mark.parametrize("cut", [30, 45, 60])
def test_a_truncated_header_is_refused(tmp_path, cut):
    raw = build(kvs=[ARCH, kv(b"general.name", STRING, s(b"a name long enough to be cut"))])
    with pytest.raises(CheckpointError, match="past the end|not a GGUF file"):
        open_gguf(write(tmp_path, raw[:cut]))


def test_limits_bound_the_work_before_the_library_reads(tmp_path):
    """A vocabulary-sized array is fine by default and refused under a lower limit, before parsing."""
    items = b"".join(s(b"tok%d" % i) for i in range(5000))
    raw = build(kvs=[ARCH, s(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", ARRAY, STRING, 5000) + items])
    path = write(tmp_path, raw)
    with open_gguf(path) as g:
        assert len(g.field("tokenizer.ggml.tokens").data) == 5000
    with pytest.raises(CheckpointError, match="5000 items"):
        open_gguf(path, limits=GGUFLimits(max_array_items=4999))
    with pytest.raises(CheckpointError, match="more than 4000 items in all"):
        open_gguf(path, limits=GGUFLimits(max_total_items=4000))


def test_a_fifo_or_proc_is_never_opened(tmp_path):
    import os

    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(GainSurgeryError, match="FIFO"):
        open_gguf(fifo)
    with pytest.raises(GainSurgeryError, match="/proc"):
        open_gguf("/proc/self/environ")
    link = tmp_path / "env.gguf"
    link.symlink_to("/proc/self/environ")
    with pytest.raises(GainSurgeryError, match="/proc"):
        open_gguf(link)
