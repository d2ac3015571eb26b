"""Domain text -> packed token windows, formatted the way the model was pretrained.

Documents are tokenized without special tokens, joined with EOS, and cut into
windows of ``seq_len`` tokens. Every window starts with the tokenizer's BOS
token when the tokenizer adds one on its own (Gemma, Llama): the model never
saw text without it in pretraining, and without it adaptation mostly learns to
repair the missing BOS, which looks like an improvement on every domain.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from gainsurgery.errors import DataError
from gainsurgery.io import jsonsafe
from gainsurgery.io.hashing import sha256_files
from gainsurgery.io.inputs import open_regular, show_path

#: Documents inside a .txt file are separated by two blank lines (the corpora of gainsurgery_lab write them so).
DOC_SEPARATOR = "\n\n\n"


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """Read documents from .txt (split on two blank lines), .jsonl/.json (one
    object per line, ``text_field``) or .parquet (column ``text_field``).

    The file is opened without blocking (a FIFO or device is refused, see
    :func:`gainsurgery.io.inputs.open_regular`); each JSON line is parsed within
    limits (:func:`gainsurgery.io.jsonsafe.iter_jsonl`).

    Raises:
        DataError: missing, unreadable, malformed, or holding no text.

    Example:
        >>> len(read_documents("legal/train.txt"))  # doctest: +SKIP
        412
    """
    p = Path(path)
    shown = show_path(p)
    if not p.exists():
        raise DataError(f"data file not found: {shown}")
    suffix = p.suffix.lower()
    with open_regular(p, error=DataError) as f:
        if suffix in (".jsonl", ".json"):
            docs = []
            for lineno, obj in jsonsafe.iter_jsonl(f, where=shown, error=DataError):
                if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                    raise DataError(f"{shown}:{lineno}: no string field {text_field!r} (use --text-field)")
                docs.append(obj[text_field])
        elif suffix == ".parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:  # pragma: no cover - pyarrow is a dependency
                raise DataError("reading parquet needs pyarrow: pip install pyarrow") from None
            try:
                table = pq.read_table(f)
            except Exception as exc:  # pyarrow raises its own family for a corrupt file
                raise DataError(f"{shown}: not a readable parquet file ({str(exc).splitlines()[0][:120]})") from None
            if text_field not in table.column_names:
                raise DataError(f"{shown}: no column {text_field!r} (columns: {table.column_names}; use --text-field)")
            docs = [t for t in table.column(text_field).to_pylist() if isinstance(t, str)]
        else:
            try:
                text = f.read().decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{shown}: not UTF-8 text") from None
            # Lines end at \n, and carriage returns ending a line are dropped (a CRLF file splits into
            # the same documents), exactly as the streamed reader reads them: both find the same
            # documents in any file (a lone \r inside a line is text to both).
            text = "\n".join(line.rstrip("\r") for line in text.split("\n"))
            docs = [d for d in text.split(DOC_SEPARATOR)]
    docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise DataError(f"{shown}: holds no text")
    return docs


def fingerprint_files(paths: Iterable[str | Path]) -> str:
    """sha256 over the contents of data files, for the gain file's provenance."""
    return "sha256:" + sha256_files(paths)[:16]


def adds_bos(tokenizer: Any) -> bool:
    """True when the tokenizer itself puts BOS in front of encoded text."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


@dataclass
class Windows:
    """Packed token windows: ``ids[i]`` is a list of ``seq_len`` token ids."""

    ids: list[list[int]]
    seq_len: int
    bos: int | None

    @property
    def tokens(self) -> int:
        """Tokens that are predicted (targets): all but the first of each window."""
        return len(self.ids) * (self.seq_len - 1)


def pack(tokenizer: Any, documents: Iterable[str], seq_len: int, max_windows: int | None = None) -> Windows:
    """Cut documents into windows of exactly ``seq_len`` tokens, BOS first where the
    model expects it. The tail that does not fill a window is dropped.

    Deterministic: the same documents give the same windows, in document order.
    ``documents`` may be any iterable (a generator over a large file is read only
    as far as ``max_windows`` needs).
    """
    if seq_len < 8:
        raise DataError("--seq-len must be at least 8 tokens")
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    windows: list[list[int]] = []
    for window in iter_windows(tokenizer, documents, seq_len, bos):
        windows.append(window)
        if max_windows is not None and len(windows) >= max_windows:
            break
    if not windows:
        raise DataError(f"not enough text for one window of {seq_len} tokens")
    return Windows(windows, seq_len, bos)


def iter_windows(tokenizer: Any, documents: Iterable[str], seq_len: int, bos: int | None) -> Iterator[list[int]]:
    """Windows of ``seq_len`` tokens from documents joined with EOS, ``bos`` first when not None.

    Tokens are consumed as they come (a pointer into a buffer that is compacted),
    so a document of millions of tokens costs linear time.
    """
    eos = tokenizer.eos_token_id
    body = seq_len - (1 if bos is not None else 0)
    head = [bos] if bos is not None else []
    stream: list[int] = []
    at = 0
    for doc in documents:
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
        while len(stream) - at >= body:
            yield head + stream[at:at + body]
            at += body
        if at:
            del stream[:at]
            at = 0


class MemoryBatches:
    """This process's micro-batches from windows held in memory (the default data path).

    The global order is a fresh seeded permutation of all windows per epoch
    (``torch.randperm`` with a generator seeded by ``seed``); global batches are
    consecutive runs of ``global_batch`` windows of it, and process ``rank`` of
    ``world`` takes its contiguous slice of each. The place in the order is one
    number, the windows consumed, so resuming is exact and cheap.

    Example:
        >>> b = MemoryBatches(windows, global_batch=8, seed=0, rank=0, world=2)  # doctest: +SKIP
        >>> b.next().shape  # doctest: +SKIP
        torch.Size([4, 256])
    """

    def __init__(self, windows: Windows, global_batch: int, *, seed: int, rank: int = 0, world: int = 1) -> None:
        import torch

        self.data = torch.tensor(windows.ids, dtype=torch.long)
        self.global_batch, self.seed, self.rank, self.world = global_batch, seed, rank, world
        self.consumed = 0
        self._gen = torch.Generator().manual_seed(seed)
        self._order: list[int] = []
        self._epochs = 0

    def position(self) -> dict[str, int]:
        """Windows of the global order consumed so far."""
        return {"consumed": self.consumed}

    def restore(self, position: Any, *, max_windows: int) -> None:
        """Continue after ``position["consumed"]`` windows (a hostile checkpoint's word: checked).

        Raises:
            ValueError: the position is not a whole number of global batches within
                ``max_windows`` (the windows the whole run consumes: the order is
                built up to it, so a larger number would cost unbounded memory).
        """
        consumed = position.get("consumed") if isinstance(position, dict) else None
        if type(consumed) is not int or not 0 <= consumed <= max_windows or consumed % self.global_batch:
            raise ValueError(f"consumed must be a multiple of {self.global_batch} in 0..{max_windows}")
        self.consumed = consumed

    def next(self):
        """The next micro-batch of this process: ``[global_batch / world, seq_len]`` int64."""
        import torch

        start, end = self.consumed, self.consumed + self.global_batch
        while len(self._order) < end:  # one seeded permutation per epoch, as many as needed
            self._order.extend(torch.randperm(len(self.data), generator=self._gen).tolist())
        share = self.global_batch // self.world
        mine = self._order[start + self.rank * share:start + (self.rank + 1) * share]
        self.consumed = end
        return self.data[mine]
