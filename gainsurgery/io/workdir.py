"""A private, resumable work folder inside a shared temporary folder.

The Hub-to-Hub pipeline keeps its shards (a download, an output) in a folder of
its own under ``$TMPDIR`` (or ``--work-dir``), which other users may share:

- the folder ``ROOT/NAME`` is created ``0700``; an existing one is used only if it
  is a real folder (not a link) owned by us, else the run stops with one line;
- ``ROOT/NAME/.lock`` is held with ``flock`` for the whole run (visible across
  processes and PID namespaces; a killed run's lock vanishes with it), so a second
  run with the same NAME fails at once instead of sharing the files;
- a small state file (``state.json``, written atomically) survives a killed run, so
  a rerun can resume; everything else in the folder is a leftover of a dead run and
  is removed when the folder is claimed (only plain files and folders, links are
  unlinked, never followed);
- :func:`clean_stale` removes the data of *other* dead runs (same prefix, lock
  free, owned by us), keeping their state files;
- the files a run keeps in it are private temp files of that claimed folder, made
  and opened with :func:`open_private` (``O_EXCL`` / ``O_NOFOLLOW``, mode ``0600``):
  nobody else can create or swap anything in a ``0700`` folder of ours, and a link
  is never followed even so. (The folder itself is an output the caller checks with
  :func:`gainsurgery.io.checks.check_output` before claiming it.)

Example:
    >>> with WorkFolder.claim(Path("/tmp"), "gainsurgery-push-1a2b") as work:  # doctest: +SKIP
    ...     (work.path / "out-00001.safetensors").write_bytes(b"...")
    ...     work.write_state({"done": 1})
    ...     work.finish()
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from gainsurgery.errors import GainSurgeryError, OutputError
from gainsurgery.io.atomic import open_nofollow, replace_file
from gainsurgery.io.inputs import show_path
from gainsurgery.io.jsonsafe import loads
from gainsurgery.io.locks import lock_file
from gainsurgery.io.mounts import remove_tree

LOCK_NAME = ".lock"
STATE_NAME = "state.json"
#: Largest state file read back, in bytes.
MAX_STATE_BYTES = 1 << 20


def open_private(path: str | os.PathLike[str], *, create: bool = False) -> int:
    """Open a file of a claimed work folder; return its descriptor.

    ``create``: make a new file (``O_EXCL``, mode ``0600``) for writing; else open an
    existing one for reading. Never through a link; the descriptor must be a regular file.

    Raises:
        OSError: the file exists (``create``), is missing, is a link or not a regular file.

    Example:
        >>> fd = open_private(work.path / "out-00001.safetensors", create=True)  # doctest: +SKIP
    """
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL) if create else os.O_RDONLY
    return open_nofollow(path, flags, 0o600)


def _remove_entry(path: Path) -> None:
    """Remove a file, link or folder inside a work folder, never following a link."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(OSError):
            remove_tree(path)  # never crossing into a mount point
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _clear(folder: Path, keep: tuple[str, ...]) -> list[str]:
    removed = []
    for entry in sorted(os.listdir(folder)):
        if entry in keep:
            continue
        _remove_entry(folder / entry)
        removed.append(entry)
    return removed


def _own_folder(path: Path, error: type[GainSurgeryError]) -> None:
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise error(f"the work folder {show_path(path)} exists and is not a folder (a link?); remove it or "
                    "choose another --work-dir")
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        raise error(f"the work folder {show_path(path)} belongs to another user; choose another --work-dir")


class WorkFolder:
    """A claimed work folder (see the module docstring); use :meth:`claim`.

    Attributes:
        path: the folder.
        removed: leftovers of a dead run removed when it was claimed.
    """

    def __init__(self, path: Path, lock_fd: int, removed: list[str]) -> None:
        self.path = path
        self._lock_fd: int | None = lock_fd
        self.removed = removed

    @classmethod
    def claim(cls, root: Path, name: str, *, what: str = "this run",
              error: type[GainSurgeryError] = OutputError) -> WorkFolder:
        """Create or take over ``root/name``: lock it, remove a dead run's leftovers (its state stays).

        Raises:
            ``error``: ``root`` is not a folder, the folder is not ours, or another
                run holds it.
        """
        root = Path(root)
        if not root.is_dir():
            if root.exists():
                raise error(f"the work folder {show_path(root)} is not a folder; choose another --work-dir")
            raise error(f"the work folder {show_path(root)} does not exist; create it or choose another --work-dir")
        path = root / name
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise error(f"cannot create a work folder in {show_path(root)} ({e.strerror}); "
                        "choose another --work-dir") from None
        _own_folder(path, error)
        try:
            fd = lock_file(path / LOCK_NAME, mode=0o600)
        except OSError as e:
            raise error(f"cannot lock the work folder {show_path(path)} ({e.strerror}); remove it") from None
        if fd is None:
            raise error(f"another gainsurgery run is doing {what} (it holds {show_path(path / LOCK_NAME)}); "
                        "wait for it to finish")
        try:
            removed = _clear(path, (LOCK_NAME, STATE_NAME))
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, removed)

    def __enter__(self) -> WorkFolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def read_state(self) -> dict[str, Any] | None:
        """The state a previous run left, or None (missing, unreadable or not a JSON object)."""
        try:
            fd = open_private(self.path / STATE_NAME)  # a link or a FIFO is no state of ours
        except OSError:
            return None
        try:
            data = os.read(fd, MAX_STATE_BYTES + 1)
        finally:
            os.close(fd)
        if len(data) > MAX_STATE_BYTES:
            return None
        try:
            value = loads(data, where=STATE_NAME, max_bytes=MAX_STATE_BYTES, max_depth=8)
        except GainSurgeryError:
            return None
        return value if isinstance(value, dict) else None

    def write_state(self, state: dict[str, Any]) -> None:
        """Replace the state file atomically (a kill leaves the old one or the new one)."""
        replace_file(self.path / STATE_NAME, json.dumps(state, indent=1).encode("utf-8"), mode=0o600)

    def clear(self) -> None:
        """Remove everything but the lock and the state (a failed run keeps only what lets a rerun resume)."""
        _clear(self.path, (LOCK_NAME, STATE_NAME))

    def finish(self) -> None:
        """The job is done: remove the folder entirely (state included) and release it."""
        with contextlib.suppress(OSError):
            _clear(self.path, (LOCK_NAME,))
        with contextlib.suppress(OSError):
            os.unlink(self.path / LOCK_NAME)  # still locked by us: a concurrent claimer re-checks
        with contextlib.suppress(OSError):
            os.rmdir(self.path)
        self.release()

    def release(self) -> None:
        """Drop the lock (the folder and its state stay)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def clean_stale(root: Path, prefix: str) -> list[str]:
    """Remove the data of dead runs' folders ``root/prefix*`` (lock free, ours); keep their state.

    Returns the folder names cleaned. A folder whose lock is held (a live run, in
    any process) or that is not ours is left alone.
    """
    cleaned = []
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return cleaned
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        path = Path(root) / entry
        try:
            _own_folder(path, GainSurgeryError)
            fd = lock_file(path / LOCK_NAME, create=False)
        except (GainSurgeryError, OSError):
            continue
        if fd is None:
            continue  # a live run holds it
        try:
            if _clear(path, (LOCK_NAME, STATE_NAME)):
                cleaned.append(entry)
        finally:
            os.close(fd)
    return cleaned
