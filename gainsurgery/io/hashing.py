"""The one sha256 helper for files.

Provenance records the sha256 of gain files and shards, the gain file's
training metadata fingerprints its data files, and the corpus cache checks its
downloads: all of them hash files here.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable

#: Bytes read per call while hashing.
CHUNK_BYTES = 8 << 20


def sha256_files(paths: Iterable[str | os.PathLike[str]], chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex sha256 of the contents of ``paths``, concatenated in order.

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
        with open(path, "rb") as f:
            while block := f.read(chunk_bytes):
                h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex sha256 of one file (see :func:`sha256_files`)."""
    return sha256_files([path], chunk_bytes)
