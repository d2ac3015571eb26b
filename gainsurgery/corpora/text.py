"""Documents as text: the normal form, cutting, de-duplication and the split into train and validation.

Pure functions (no I/O), shared by every source of :mod:`gainsurgery.corpora`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence

from gainsurgery.errors import DomainError
from gainsurgery.training.data import DOC_SEPARATOR  # how training reads split files


def normalize_document(text: str) -> str:
    """Canonical form of a document: ``\\n`` line ends, no trailing spaces,
    at most one blank line in a row, no blank lines at either end.

    Collapsing blank-line runs is what makes :data:`DOC_SEPARATOR` unambiguous.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n")


def truncate_at_line(text: str, limit: int) -> str:
    """At most ``limit`` characters of ``text``, cut at the last line break
    that fits (a hard cut only when the first line alone is too long)."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    cut = head.rfind("\n")
    return (head[:cut] if cut > 0 else head).rstrip()


def dedupe(docs: Iterable[str]) -> list[str]:
    """Drop empty and repeated documents, keeping first occurrences in order."""
    seen: set[str] = set()
    out: list[str] = []
    for doc in docs:
        if doc and doc not in seen:
            seen.add(doc)
            out.append(doc)
    return out


def split_documents(
    docs: Sequence[str], train_chars: int, val_chars: int, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Assign whole documents to (train, validation) at random with ``seed``.

    Validation is filled first (it is the smaller, and the one whose
    composition must not depend on the train budget). Each split receives
    documents until the next one would overflow its budget; that document is
    cut at a line boundary to fill the budget and the rest of it is dropped
    (or, when no line boundary fits, left for the next split).
    Budgets count characters of the joined split text, separators included.
    """
    if train_chars < 0 or val_chars < 0:
        raise DomainError("split sizes must be non-negative")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    pos = 0  # next document in ``order`` not yet given to a split

    def fill(budget: int) -> list[str]:
        nonlocal pos
        taken: list[str] = []
        used = 0
        while pos < len(order):
            doc = docs[order[pos]]
            sep = len(DOC_SEPARATOR) if taken else 0
            room = budget - used - sep
            if len(doc) <= room:
                taken.append(doc)
                used += sep + len(doc)
                pos += 1
                continue
            # Overflow: keep whole lines that fit and drop the rest, so no text
            # reaches the other split. A document that cannot be cut at a
            # line stays unused and goes first to the next split instead.
            head = doc[: max(room, 0)]
            cut = head.rfind("\n")
            if cut > 0 and head[:cut].strip():
                taken.append(head[:cut].rstrip())
                pos += 1
            break
        return taken

    validation = fill(val_chars)
    train = fill(train_chars)
    return train, validation


def join_documents(docs: Iterable[str]) -> str:
    """The split-file text for ``docs`` (see :data:`DOC_SEPARATOR`)."""
    return DOC_SEPARATOR.join(docs)


def split_joined(text: str) -> list[str]:
    """Inverse of :func:`join_documents` for normalized documents."""
    return [doc for doc in text.split(DOC_SEPARATOR) if doc.strip()]



def decode_text(data: bytes) -> str:
    """UTF-8, falling back to cp1252 (old news archives mix both)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")
