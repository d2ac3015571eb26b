"""The gainsurgery cache folder and the lock that guards what is built in it.

The embedded model's conversion and the corpus downloads of the lab package are
cached under :func:`cache_root`; each is built under a lock that waits
(:func:`exclusive_lock`, or :func:`gainsurgery.io.claims.claim_folder` with
``wait=True``), so two processes never build the same thing at once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from gainsurgery.errors import OutputError
from gainsurgery.io.inputs import show_path
from gainsurgery.io.locks import lock_file


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
    """Hold an exclusive lock on the lock file ``path``, waiting for another holder to finish.

    :func:`gainsurgery.io.locks.lock_file`: never through a link, a plain file (else
    :class:`~gainsurgery.errors.OutputError`), seen across processes and PID
    namespaces, gone with a killed holder.

    Example:
        >>> with exclusive_lock(cache_root() / "domains" / ".lock"):  # doctest: +SKIP
        ...     build_the_splits()
    """
    try:
        fd = lock_file(path, wait=True)
    except OSError as e:
        raise OutputError(f"cannot lock {show_path(path)} ({e.strerror}); remove it if it is not a plain file") \
            from None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)
