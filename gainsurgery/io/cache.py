"""The gainsurgery cache folder and the lock that guards what is built in it.

The embedded model's conversion and the corpus downloads of the lab package are
cached under :func:`cache_root`; each is built under :func:`exclusive_lock`, so
two processes never build the same thing at once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def cache_root() -> Path:
    """Return the gainsurgery cache root (not created).

    ``$GAINSURGERY_CACHE`` wins, then ``$XDG_CACHE_HOME/gainsurgery``, then
    ``~/.cache/gainsurgery``. Empty variables count as unset.
    """
    explicit = os.environ.get("GAINSURGERY_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "gainsurgery"
    return Path.home() / ".cache" / "gainsurgery"


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (blocking).

    Where ``fcntl`` is unavailable (Windows) we run unlocked: callers publish by
    rename and tolerate losing a race, so the worst case is duplicated work.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
