"""Locks that say "this run is writing here": ``flock`` on a plain file, never through a link.

An ``flock`` belongs to the open file in the kernel: runs in other processes *and
other PID namespaces* (a container sharing the volume) see it, and it vanishes with
a killed process, so a stale lock never blocks anyone. Process ids are never used.
Every lock of gainsurgery is taken here, with :func:`lock_file`:

- an output's lock beside it, ``P/.N.gainsurgery.lock`` (:func:`take_output_lock`,
  :func:`lock_output`, and :mod:`gainsurgery.io.claims` for folders): exclusive,
  unlinked by its holder on release, so after locking the name is checked to still
  name the locked file (a lock on an unlinked file would exclude nobody);
- a lock file inside a folder the run owns (:func:`hold_lock`: an experiment folder,
  a work folder, a checkpoint folder), never unlinked, so a shared holder is never
  outlived by a second inode;
- the cache's build locks (:func:`gainsurgery.io.cache.exclusive_lock`), which wait.

A lock file is opened with ``O_NOFOLLOW | O_NONBLOCK`` (a link planted at its name
is refused, a FIFO cannot hang the open) and must be a regular file.

Example:
    >>> with lock_output("legal.safetensors", what="-o"):  # doctest: +SKIP
    ...     train_for_an_hour()
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path
from typing import Any, Iterator

from gainsurgery.errors import GainSurgeryError, OutputError
from gainsurgery.io.atomic import TAG, open_nofollow, sibling_stem
from gainsurgery.io.checks import output_noun, output_path
from gainsurgery.io.inputs import show_path


class NotAPlainFile(OSError):
    """A lock file's name holds something other than a regular file (a folder, a FIFO...)."""


def lock_file(path: str | os.PathLike[str], *, shared: bool = False, wait: bool = False, create: bool = True,
              dir_fd: int | None = None, mode: int = 0o644) -> int | None:
    """Open the lock file ``path`` (created if missing and ``create``) and ``flock`` it; return the descriptor.

    Returns None when another holder has it and ``wait`` is false (the file is
    closed again). ``shared``: a shared lock (several holders; excludes exclusive
    ones). ``dir_fd``: ``path`` is relative to this open folder.

    Raises:
        NotAPlainFile: the name holds a folder, FIFO, device...
        OSError: it cannot be opened (a link: ELOOP; missing without ``create``...).

    Example:
        >>> fd = lock_file(folder / ".lock")  # doctest: +SKIP
    """
    fd = open_nofollow(path, os.O_RDONLY | (os.O_CREAT if create else 0), mode, dir_fd=dir_fd, regular=False)
    try:
        if not _is_regular(fd):
            raise NotAPlainFile(errno.EINVAL, "not a plain file", os.fspath(path))
        if not try_lock(fd, shared=shared, wait=wait):
            os.close(fd)
            return None
        return fd
    except BaseException:
        with contextlib.suppress(OSError):
            os.close(fd)
        raise


def try_lock(fd: int, *, shared: bool = False, wait: bool = False) -> bool:
    """``flock`` the open file ``fd``; False when another holder has it and ``wait`` is false.

    Example:
        >>> try_lock(marker_fd)  # doctest: +SKIP
        True
    """
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    return True


def _is_regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def _locked(path: Path, error: type[GainSurgeryError], failed: str, **how: Any) -> int | None:
    """:func:`lock_file` with its failures as one-line errors of type ``error`` (``failed``: what could not be done)."""
    try:
        return lock_file(path, **how)
    except NotAPlainFile:
        raise error(f"the lock file {show_path(path)} is not a plain file; remove it") from None
    except OSError as e:
        raise error(f"{failed} ({e.strerror}); remove it if it is not a plain file") from None


def output_lock_path(out: Path) -> Path:
    """``P/.N.gainsurgery.lock``, the lock of output ``out = P/N`` (its parent resolved)."""
    return out.parent / f".{sibling_stem(out.name)}.{TAG}.lock"


def take_output_lock(path: Path, *, what: str, shown: str, error: type[GainSurgeryError],
                     wait: bool = False) -> int:
    """Take the exclusive lock on ``path`` (created if needed); return its descriptor.

    Without ``wait`` a held lock is ``error`` at once ("being written by another
    gainsurgery run"). After locking, ``path`` must still name the locked file: a
    finishing run unlinks its lock file (:func:`release_output_lock`), and a lock
    taken on an unlinked file would exclude nobody; then the new file is taken.
    """
    for _ in range(20):
        fd = _locked(path, error, f"cannot create the lock file {show_path(path)} for {what} {shown}", wait=wait)
        if fd is None:
            raise error(f"{what} {shown} is being written by another gainsurgery run (it holds "
                        f"{show_path(path.name)}); wait for it to finish or choose another {output_noun(what)}")
        try:
            now = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        if now is not None and os.path.samestat(now, os.fstat(fd)):
            return fd
        os.close(fd)  # lost a race with a finishing run's unlink: take the new file
    raise error(f"could not lock {what} {shown}: its lock file keeps changing; try again")


def release_output_lock(path: Path, fd: int) -> None:
    """Unlink an output's lock file while still holding it, then close it (see :func:`take_output_lock`)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    os.close(fd)


@contextlib.contextmanager
def lock_output(out: str | os.PathLike[str], *, what: str = "output file",
                error: type[GainSurgeryError] = OutputError) -> Iterator[Path]:
    """Hold ``out``'s lock for a run that writes it at the end (a trained gain file) or as it goes (a log).

    The same lock :func:`gainsurgery.io.claims.claim_folder` takes
    (``P/.N.gainsurgery.lock``): a second run writing the same ``out`` fails at once
    instead of both writing it (two logs interleaved, one result silently replacing
    the other). Nothing is written to ``out`` here; write it with
    :func:`~gainsurgery.io.atomic.atomic_file` or
    :func:`~gainsurgery.io.atomic.open_log_file` while the lock is held. Yields
    ``out`` with its parent resolved.

    Example:
        >>> with lock_output("legal.safetensors", what="-o"):  # doctest: +SKIP
        ...     train_for_an_hour()
        ...     write_file("legal.safetensors", data)
    """
    target = output_path(out)
    lock_path = output_lock_path(target)
    fd = take_output_lock(lock_path, what=what, shown=show_path(out), error=error)
    try:
        yield target
    finally:
        release_output_lock(lock_path, fd)


@contextlib.contextmanager
def hold_lock(path: str | os.PathLike[str], *, shared: bool = False, what: str, busy_ok: bool = False,
              error: type[GainSurgeryError] = OutputError) -> Iterator[bool]:
    """Hold a lock file inside a folder this run owns, without waiting; fail at once if it is taken.

    For work that several processes share (an experiment folder, where parallel workers
    hold it ``shared`` and a plain run holds it exclusively). Unlike :func:`lock_output`
    the lock file is never unlinked, so a shared holder can never be outlived by a
    second inode: it is a small file of the folder's own. Yields True while the lock
    is held; with ``busy_ok`` a lock held elsewhere yields False (the caller skips the
    work) instead of raising ``error``.

    Example:
        >>> with hold_lock(out / ".experiment.lock", what=f"experiment {out}"):  # doctest: +SKIP
        ...     run_the_schedule()
    """
    p = Path(path)
    fd = _locked(p, error, f"cannot open the lock file {show_path(p)}", shared=shared)
    if fd is None:
        if busy_ok:
            yield False
            return
        raise error(f"{what} is in use by another process (it holds {show_path(p.name)}); wait for it to finish")
    try:
        yield True
    finally:
        os.close(fd)
