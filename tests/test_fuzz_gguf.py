"""Fuzzing the GGUF reader path: any bytes give an opened file whose every value our code reads, or one line.

A small valid GGUF (key/values of every kind, an array of strings, float and
quantized tensors) is mutated — bytes flipped, counts and lengths overwritten with
extreme values, bytes inserted, the file cut short — and opened with
:func:`~gainsurgery.formats.gguf.open_gguf` (the bounded pre-check, then the gguf
library's reader). What opens is then read the way apply, verify and inspect read it
(every key/value copied for the writer and compared raw, the summary, every tensor's
bytes), within the memory and time bounds of ``fuzzing.bounded``.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

pytest.importorskip("gguf")

from fuzzing import failed, fuzz_settings, outcome  # noqa: E402

from gainsurgery.errors import GainSurgeryError  # noqa: E402
from gainsurgery.formats.gguf import open_gguf  # noqa: E402


def _s(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def _seed() -> bytes:
    """A valid GGUF of every value kind, written byte by byte (so the header's layout is known)."""
    kvs = [
        _s(b"general.architecture") + struct.pack("<I", 8) + _s(b"llama"),
        _s(b"llama.block_count") + struct.pack("<II", 4, 1),
        _s(b"general.flag") + struct.pack("<IB", 7, 1),
        _s(b"general.scale") + struct.pack("<Id", 12, 0.5),
        _s(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 3) + b"".join(_s(t) for t in (b"a", b"bc", b"")),
        _s(b"tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 3) + struct.pack("<3f", 0.0, -1.0, 2.5),
    ]
    tensors = [_s(b"a.weight") + struct.pack("<IQIQ", 1, 32, 0, 0),
               _s(b"blk.0.attn_output.weight") + struct.pack("<IQQIQ", 2, 32, 2, 8, 128)]
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(tensors)
    head += b"\0" * (-len(head) % 32)
    q8 = (struct.pack("<e", 0.01) + bytes(range(32))) * 2
    return head + bytes(range(128)) + q8 + b"\0" * (-len(q8) % 32)


SEED = _seed()
HEADER = SEED.index(bytes(range(128)))
EXTREMES = [0, 1, 7, 9, 13, 255, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1]


@st.composite
def mutated_files(draw) -> bytes:
    raw = bytearray(SEED)
    for _ in range(draw(st.integers(1, 4))):
        if not raw:
            break
        kind = draw(st.sampled_from(["flip", "u32", "u64", "insert", "cut", "delete"]))
        at = draw(st.integers(0, min(HEADER, len(raw)) - 1))
        if kind == "flip":
            raw[at] ^= 1 << draw(st.integers(0, 7))
        elif kind in ("u32", "u64"):
            size = 4 if kind == "u32" else 8
            value = draw(st.sampled_from(EXTREMES)) % (1 << (8 * size))
            raw[at:at + size] = struct.pack("<I" if size == 4 else "<Q", value)
        elif kind == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del raw[at:at + draw(st.integers(1, 16))]
        else:
            del raw[draw(st.integers(0, len(raw))):]
    return bytes(raw)


def _read_everything(path: Path) -> int:
    """Open the file and read it the way apply, verify and inspect do; return how many values were read."""
    from gainsurgery.formats.gguf.writer import field_value, raw_value
    from gainsurgery.sources.gguf import _summary

    with open_gguf(path) as g:
        n = 0
        for key in g.keys:
            try:
                field_value(g, key)
            except GainSurgeryError:
                pass  # an empty array: one line, as the writer would say
            raw_value(g, key)
            _summary(g, key)
            n += 1
        for t in g.tensors:
            g.read(t.offset, t.nbytes)
        g.number("llama.block_count")
        g.numbers("llama.attention.head_count")
        return n


@fuzz_settings(300)
@given(raw=mutated_files())
@example(raw=SEED)
@example(raw=SEED[:HEADER])
def test_any_gguf_bytes_open_and_read_or_give_one_line(raw):
    folder = Path(tempfile.mkdtemp(prefix="gainsurgery-fuzz-gguf-"))
    try:
        path = folder / "x.gguf"
        path.write_bytes(raw)
        got = outcome(_read_everything, path)
        if not failed(got):
            assert got >= 1
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


def test_the_seed_opens():
    folder = Path(tempfile.mkdtemp(prefix="gainsurgery-fuzz-gguf-"))
    path = folder / "seed.gguf"
    path.write_bytes(SEED)
    assert _read_everything(path) == 6
