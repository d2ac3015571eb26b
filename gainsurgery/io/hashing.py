"""The one sha256 helper for files.

Provenance records the sha256 of gain files and shards, the gain file's
training metadata fingerprints its data files, and the corpus cache checks its
downloads: all of them hash files here.
"""

from __future__ import annotations

import hashlib
import os
from typing import BinaryIO, Iterable

from gainsurgery.io.inputs import open_regular

#: Bytes read per call while hashing.
CHUNK_BYTES = 8 << 20


def sha256_files(paths: Iterable[str | os.PathLike[str]], chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex sha256 of the contents of ``paths``, concatenated in order.

    Each file is opened with :func:`~gainsurgery.io.inputs.open_regular`: a FIFO, a
    device or anything under ``/proc`` is refused in one line, never read or waited on.

    Args:
        paths: files to hash.
        chunk_bytes: bytes read per call (bounds memory).

    Returns:
        The 64-character hex digest.

    Example:
        >>> sha256_files([])
        'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'
    """
    h = hashlib.sha256()
    for path in paths:
        with open_regular(path) as f:
            while block := f.read(chunk_bytes):
                h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex sha256 of one file (see :func:`sha256_files`)."""
    return sha256_files([path], chunk_bytes)


def sha256_fileobj(f: BinaryIO, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex sha256 of what remains to be read of the binary file object ``f`` (opened safely by the caller).

    Example:
        >>> import io
        >>> sha256_fileobj(io.BytesIO(b""))[:8]
        'e3b0c442'
    """
    h = hashlib.sha256()
    while block := f.read(chunk_bytes):
        h.update(block)
    return h.hexdigest()


def file_records(paths: Iterable[str | os.PathLike[str]]) -> list[dict[str, str]]:
    """``[{"name": ..., "sha256": ...}]`` for files recorded in something that is shared.

    The file's name and content hash identify it; its local path is left out (it
    says who and where the user is, and means nothing to anyone else).

    Example:
        >>> file_records(["/home/me/data/train.txt"])  # doctest: +SKIP
        [{'name': 'train.txt', 'sha256': '9f86d0...'}]
    """
    return [{"name": os.path.basename(os.fspath(p)), "sha256": sha256_file(p)} for p in paths]
