"""Training text streamed from files larger than memory, sharded across processes, resumable.

``--streaming`` replaces "read every document, pack every window, shuffle them
all" (:mod:`gainsurgery.training.data`, the default for corpora that fit in
memory) with blocks:

- **Blocks.** Each data file is cut into blocks: a ``.parquet`` file by its row
  groups, a ``.jsonl``/``.txt`` file by byte ranges of ``--stream-block-bytes``
  (8 MiB by default). A block owns the documents that *start* inside it (a JSON
  line whose first byte lies in its range; a text document whose first line does),
  so every document belongs to exactly one block, and a block can be read by
  seeking to it, without reading the file before it.
- **Order and sharding.** Each epoch, the blocks of all files are put in a seeded
  order (numpy, from ``(seed, epoch)``), and process ``r`` of ``N`` takes blocks
  ``r, r+N, r+2N...`` of it: every process reads only its share of the bytes.
- **Windows.** A block's documents are tokenized and packed into windows exactly
  like the in-memory path (BOS first where the model expects it, EOS between
  documents; a block's tail that does not fill a window is dropped), then shuffled
  within the block (seed ``(seed, epoch, block)``). At most one block's text and
  windows are in memory per process.
- **Position.** A process's place is ``(epoch, block, window)``; a checkpoint
  records every process's place and ``--resume`` continues from it, reading only
  the current block again.

The windows a run sees depend on the number of processes (each reads other
blocks); the same process count, seed and files give the same run, and a resumed
run continues it exactly.

Text files: documents are separated by two or more empty lines (what
``DOC_SEPARATOR`` splits on), lines end in ``\\n`` or ``\\r\\n``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np

from gainsurgery.errors import DataError
from gainsurgery.io import jsonsafe
from gainsurgery.io.inputs import open_regular
from gainsurgery.training.data import adds_bos, iter_windows

#: Default block size for .txt/.jsonl files, in bytes.
DEFAULT_BLOCK_BYTES = 8 << 20
#: Longest line (one JSON document, or one line of text) read, in bytes.
MAX_LINE_BYTES = 64 << 20
#: Longest document of a .txt file, in bytes: one document is tokenized at once.
MAX_DOCUMENT_BYTES = 64 << 20
#: Most blocks a run may plan (the list is held in memory by every process).
MAX_BLOCKS = 1 << 22
_NEWLINES = b"\r\n"


@dataclass(frozen=True)
class Block:
    """A piece of a data file: bytes ``[start, end)`` (.txt/.jsonl) or row group ``start`` (.parquet)."""

    path: str
    kind: str
    start: int
    end: int


def file_kind(path: str | os.PathLike[str]) -> str:
    """``jsonl``, ``parquet`` or ``txt``, from the file name (as the in-memory reader decides)."""
    suffix = Path(path).suffix.lower()
    return "jsonl" if suffix in (".jsonl", ".json") else "parquet" if suffix == ".parquet" else "txt"


def plan_blocks(paths: Sequence[str | os.PathLike[str]], block_bytes: int = DEFAULT_BLOCK_BYTES,
                text_field: str = "text") -> list[Block]:
    """Every block of ``paths``, in file order then offset order (headers only; no text is read).

    Raises:
        DataError: a missing or empty file, a parquet file without ``text_field``.

    Example:
        >>> [(b.start, b.end) for b in plan_blocks(["big.txt"], block_bytes=4 << 20)]  # doctest: +SKIP
        [(0, 4194304), (4194304, 8388608), (8388608, 9000000)]
    """
    if block_bytes < 1:
        raise DataError("--stream-block-bytes must be at least 1")
    blocks: list[Block] = []
    for path in paths:
        p = Path(path)
        with open_regular(p, error=DataError):  # a regular file outside /proc, /sys, /dev; never blocks
            pass
        kind = file_kind(p)
        if kind == "parquet":
            pf = _parquet(p)
            if text_field not in pf.schema_arrow.names:
                raise DataError(f"{p}: no column {text_field!r} (columns: {pf.schema_arrow.names}; use --text-field)")
            blocks.extend(Block(str(p), kind, i, i + 1) for i in range(pf.metadata.num_row_groups))
        else:
            size = p.stat().st_size
            if len(blocks) + size // block_bytes > MAX_BLOCKS:
                raise DataError(f"{p}: {size} bytes in blocks of {block_bytes} makes more than {MAX_BLOCKS} blocks; "
                                f"raise --stream-block-bytes")
            blocks.extend(Block(str(p), kind, s, min(s + block_bytes, size)) for s in range(0, size, block_bytes))
    if not blocks:
        raise DataError("the data files hold no text")
    return blocks


def block_documents(block: Block, text_field: str = "text") -> Iterator[str]:
    """The documents that start in ``block``, stripped, empty ones skipped.

    Raises:
        DataError: a JSON line without the text field, text that is not UTF-8.
    """
    if block.kind == "parquet":
        pf = _parquet(Path(block.path))
        for batch in pf.iter_batches(batch_size=256, row_groups=[block.start], columns=[text_field]):
            for text in batch.column(0).to_pylist():
                if isinstance(text, str) and text.strip():
                    yield text.strip()
        return
    with open_regular(block.path, error=DataError) as f:
        if block.kind == "jsonl":
            yield from _jsonl_documents(f, block, text_field)
        else:
            yield from _text_documents(f, block)


def iter_documents(path: str | os.PathLike[str], text_field: str = "text") -> Iterator[str]:
    """Every document of one file, read lazily (for evaluation files in streaming runs)."""
    for block in plan_blocks([path], 1 << 62, text_field):
        yield from block_documents(block, text_field)


def _first_line_at_or_after(f: BinaryIO, start: int) -> int:
    """Seek to the first line that begins at or after ``start``; return its offset."""
    if start == 0:
        f.seek(0)
        return 0
    f.seek(start - 1)
    if f.read(1) != b"\n":
        _skip_line(f)
    return f.tell()


def _skip_line(f: BinaryIO) -> None:
    while True:
        piece = f.readline(1 << 20)
        if not piece or piece.endswith(b"\n"):
            return


def _jsonl_documents(f: BinaryIO, block: Block, text_field: str) -> Iterator[str]:
    where = Path(block.path).name
    offset = _first_line_at_or_after(f, block.start)
    while offset < block.end:
        raw = f.readline(MAX_LINE_BYTES + 2)
        if not raw:
            return
        if len(raw) > MAX_LINE_BYTES + 1 and not raw.endswith(b"\n"):
            raise DataError(f"{where} at byte {offset}: a line longer than {MAX_LINE_BYTES} bytes")
        body = raw.rstrip(_NEWLINES)
        if body.strip():
            obj = jsonsafe.loads(body, where=f"{where} at byte {offset}", error=DataError, max_bytes=MAX_LINE_BYTES)
            if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                raise DataError(f"{where} at byte {offset}: no string field {text_field!r} (use --text-field)")
            if obj[text_field].strip():
                yield obj[text_field].strip()
        offset += len(raw)


def _text_documents(f: BinaryIO, block: Block) -> Iterator[str]:
    """Documents are runs of lines separated by two or more empty lines; a document belongs
    to the block where its first line starts, and may run past the block's end."""
    where = Path(block.path).name
    offset = _first_line_at_or_after(f, block.start)
    seen_text, empties = _context_before(f, offset)
    f.seek(offset)
    lines: list[str] | None = None  # the document being read (None: not ours, or none yet)
    size = doc_start = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 2)
        if not raw:
            break
        if len(raw) > MAX_LINE_BYTES + 1 and not raw.endswith(b"\n"):
            raise DataError(f"{where} at byte {offset}: a line longer than {MAX_LINE_BYTES} bytes")
        try:
            content = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise DataError(f"{where} at byte {offset}: not UTF-8 text") from None
        line_start, offset = offset, offset + len(raw)
        if content == "":
            empties += 1
            if lines is not None:
                lines.append("")
            continue
        if not seen_text or empties >= 2:  # a document starts here
            if lines is not None:
                text = "\n".join(lines).strip()
                if text:
                    yield text
            if line_start >= block.end:
                return
            lines, size, doc_start = [content], len(raw), line_start
        elif lines is not None:
            lines.append(content)
            size += len(raw)
            if size > MAX_DOCUMENT_BYTES:
                raise DataError(f"{where}: the document at byte {doc_start} is longer than {MAX_DOCUMENT_BYTES} "
                                f"bytes; split it (two empty lines separate documents)")
        seen_text, empties = True, 0
    if lines is not None:
        text = "\n".join(lines).strip()
        if text:
            yield text


def _context_before(f: BinaryIO, offset: int) -> tuple[bool, int]:
    """(is there text before ``offset``, how many empty lines directly precede it).

    Reads backwards over the run of line-end bytes just before ``offset``.
    """
    newlines, pos = 0, offset
    while pos > 0:
        step = min(pos, 4096)
        f.seek(pos - step)
        chunk = f.read(step)
        stripped = chunk.rstrip(_NEWLINES)
        newlines += chunk[len(stripped):].count(b"\n")
        if stripped:
            return True, max(newlines - 1, 0)  # the first newline ends the text line itself
        pos -= step
    return False, 0


def _parquet(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow comes with the experiments extra
        raise DataError("reading parquet needs pyarrow: pip install pyarrow") from None
    try:
        with open_regular(path, error=DataError):
            pass
        return pq.ParquetFile(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0][:200]})") from None


def fingerprint_streamed(paths: Sequence[str | os.PathLike[str]]) -> str:
    """A cheap fingerprint of large data files: name, size, first and last MiB of each.

    Hashing every byte of a corpus larger than memory would take minutes at every
    start and resume; this catches a different, grown or rewritten file.
    """
    h = hashlib.sha256()
    for path in paths:
        p = Path(path)
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\0".encode())
        with open_regular(p, error=DataError) as f:
            h.update(f.read(1 << 20))
            f.seek(max(size - (1 << 20), 0))
            h.update(f.read(1 << 20))
    return "sha256-headtail:" + h.hexdigest()[:16]


class StreamedBatches:
    """This process's micro-batches, streamed from blocks (see the module docstring).

    Args:
        tokenizer: the model's tokenizer.
        paths: data files.
        seq_len: tokens per window.
        batch: windows per micro-batch on this process (the global batch / processes).
        seed: the run's seed.
        rank, world: this process and the process count.
        text_field: the .jsonl field / .parquet column.
        block_bytes: block size for .txt/.jsonl.

    Example:
        >>> batches = StreamedBatches(tok, ["big.jsonl"], 256, 4, seed=0, rank=0, world=1)  # doctest: +SKIP
        >>> batches.next().shape, batches.position()  # doctest: +SKIP
        ((4, 256), {'epoch': 0, 'block': 0, 'window': 4})
    """

    def __init__(self, tokenizer: Any, paths: Sequence[str], seq_len: int, batch: int, *, seed: int, rank: int,
                 world: int, text_field: str = "text", block_bytes: int = DEFAULT_BLOCK_BYTES) -> None:
        if seq_len < 8:
            raise DataError("--seq-len must be at least 8 tokens")
        self.tokenizer, self.seq_len, self.batch = tokenizer, seq_len, batch
        self.seed, self.rank, self.world, self.text_field = seed, rank, world, text_field
        self.blocks = plan_blocks(paths, block_bytes, text_field)
        if len(self.blocks) < world:
            raise DataError(f"{len(self.blocks)} data blocks for {world} processes: every process needs one "
                            f"(lower --stream-block-bytes, or use fewer processes)")
        self.bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
        self.epoch, self.block, self.window = 0, 0, 0
        self._mine: list[int] = []
        self._windows: Any = None
        self._load()

    def position(self) -> dict[str, int]:
        """This process's place: the next window is ``window`` of its ``block``-th block of ``epoch``."""
        return {"epoch": self.epoch, "block": self.block, "window": self.window}

    def restore(self, position: Any, *, max_windows: int | None = None) -> None:
        """Continue from a :meth:`position` (reads that block again, nothing before it).

        ``max_windows`` bounds ``window`` (a block never holds more windows than the run consumes).

        Raises:
            ValueError: the position (a hostile checkpoint's word) is not one of this process's places.
        """
        values = [position.get(k) if isinstance(position, dict) else None for k in ("epoch", "block", "window")]
        if not all(type(v) is int and v >= 0 for v in values) or values[1] >= len(self._mine) \
                or (max_windows is not None and values[2] > max_windows):
            raise ValueError(f"expected epoch >= 0, block in 0..{len(self._mine) - 1}, window >= 0")
        self.epoch, self.block, self.window = values
        self._load()

    def next(self):
        """The next micro-batch: a ``[batch, seq_len]`` int64 tensor."""
        import torch

        rows = []
        empty_blocks = 0
        while len(rows) < self.batch:
            if self.window < len(self._windows):
                take = min(self.batch - len(rows), len(self._windows) - self.window)
                rows.append(self._windows[self.window:self.window + take])
                self.window += take
                empty_blocks = 0
                continue
            empty_blocks += 1
            if empty_blocks > 4 * len(self.blocks):  # several epochs in a row without one window
                raise DataError(f"process {self.rank}'s blocks hold no window of {self.seq_len} tokens "
                                f"(lower --seq-len or raise --stream-block-bytes)")
            self.block, self.window = self.block + 1, 0
            if self.block >= len(self._mine):
                self.epoch, self.block = self.epoch + 1, 0
            self._load()
        return torch.from_numpy(np.concatenate(rows)[: self.batch].astype(np.int64))

    def _load(self) -> None:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.blocks))
        self._mine = [int(i) for i in order[self.rank::self.world]]
        index = self._mine[self.block]
        windows = list(iter_windows(self.tokenizer, block_documents(self.blocks[index], self.text_field),
                                    self.seq_len, self.bos))
        array = np.array(windows, dtype=np.int64).reshape(len(windows), self.seq_len)
        shuffle = np.random.default_rng([self.seed, self.epoch, index]).permutation(len(array))
        self._windows = array[shuffle]
