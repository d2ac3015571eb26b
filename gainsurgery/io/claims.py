"""Folder outputs, claimed at the start of a run and published whole: the one publish primitive.

Every folder gainsurgery writes appears whole or not at all through
:func:`claim_folder`: apply's OUT, export-peft's adapter folder, train's ``-o`` for
PEFT methods and its checkpoints, the embedded model's conversion, the lab's merged
models. (Single files: :mod:`gainsurgery.io.atomic`; a large file written for minutes,
apply's GGUF OUT, with :func:`claim_file`: the same protocol with a temp *file*.) The
protocol, for ``OUT = P/N``:

``P/.N.gainsurgery.lock``
    An exclusive ``flock`` held for the whole run (:mod:`gainsurgery.io.locks`). It
    belongs to the open file in the kernel, so runs in other processes *and other PID
    namespaces* (a container sharing the volume) see it; a killed run's lock vanishes
    with it. A second run fails at once ("being written by another gainsurgery run").
``P/.N.gainsurgery-HEX.claim``
    The marker: a small JSON file naming N and HEX (``secrets.token_hex(16)``), locked
    by its run while the run lives. A claim whose lock can be taken belongs to a dead
    run. Process ids are recorded for people, never trusted. It is written and locked
    under a temporary name, ``...HEX.claim.part``, and renamed into place whole, so a
    claim is never empty.
``P/.N.gainsurgery-HEX.tmp``
    The folder (or file) the run fills. Created after its claim, removed before it, so a
    temp never exists without the marker that proves it is ours.
``P/.N.gainsurgery-HEX.old``
    Only in the fallback below: the old OUT moved aside.

The marker sits beside the temp rather than inside it so that the published folder
holds nothing of ours, and so that it outlives the temp while an old OUT (swapped to
the temp name) is being deleted: a run killed at any point leaves a marker for
everything it left.

(When N is long, a hash of it stands in for N in these names; the claim records N.)

Publishing without overwrite is a no-replace rename (``renameat2(RENAME_NOREPLACE)``):
if OUT appeared meanwhile the run fails and deletes nothing of it, only its own temp.
With overwrite, ``renameat2(RENAME_EXCHANGE)`` swaps the new folder and the old OUT in
one step, so OUT is always either old or new; the old one, now at our marked temp
name, is deleted afterwards (:func:`~gainsurgery.io.mounts.remove_tree`: never across
a mount point). Where the filesystem refuses those flags (EINVAL, ENOSYS...), the
fallback checks under the lock and uses plain renames: OUT is moved aside to
``.old``, the new folder renamed in, ``.old`` deleted; a run killed between the two
renames is repaired by the next run, which moves ``.old`` back.

Before claiming, a run removes leftovers of dead runs for the same OUT
(:func:`~gainsurgery.io.leftovers.clean_leftovers`): only names that match the pattern above *and* have a
claim file with matching content whose lock it can take. A similar-looking folder
without our claim is never touched. An *empty* file with a claim's name is no claim
(gainsurgery never makes one; a run of an older version killed while creating its
marker, or someone else, did): it proves nothing and holds nothing, so the next run
removes that file (still empty, a plain file, its lock free) and nothing else.

Example:
    >>> with claim_folder("merged", inputs=["base"], overwrite=False) as claim:  # doctest: +SKIP
    ...     (claim.tmp / "config.json").write_bytes(b"{}")
    ...     claim.publish()
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import stat
from pathlib import Path
from typing import BinaryIO, Iterable

from gainsurgery.errors import GainSurgeryError, OutputError
from gainsurgery.io.atomic import fsync_dir, fsync_tree, open_nofollow, rename_exchange, rename_noreplace, sibling_stem
from gainsurgery.io.checks import check_output
from gainsurgery.io.inputs import show_path
from gainsurgery.io.leftovers import (CLAIM_FORMAT, claim_names, clean_leftovers, clean_leftovers_in, is_ours_to_remove,
                                      read_claim, remove_ours)
from gainsurgery.io.locks import output_lock_path, release_output_lock, take_output_lock, try_lock
from gainsurgery.io.mounts import MountPointError, mount_inside, remove_tree
from gainsurgery.io.pausepoints import pause_point

#: Re-exported: callers reach the cleanup through the claim module, as before the split.
__all__ = ["FolderClaim", "LeftBehind", "claim_file", "claim_folder", "clean_leftovers", "clean_leftovers_in",
           "read_claim"]


def _why(e: OSError) -> str:
    """Why a deletion stopped, for a message."""
    if isinstance(e, MountPointError):
        return f"it holds a mount point, {show_path(e.filename)}, which is never deleted through"
    return f"{e.strerror or e}" + (f": {show_path(e.filename)}" if e.filename else "")


class LeftBehind(OutputError):
    """A run could not delete something of its own (a mount point inside, permissions); the message says what."""


class FolderClaim:
    """A claimed folder (or file) output. Fill :attr:`tmp`, then :meth:`publish`; see :func:`claim_folder`.

    Attributes:
        out: the output folder or file (parent resolved).
        tmp: the temp folder (or file) to fill; it becomes ``out`` on publish.
        file: for a file claim (:func:`claim_file`), the temp file opened for reading and
            writing (unbuffered): write through it, never by reopening :attr:`tmp` by name.
            Closed by :meth:`publish` and :meth:`discard`.
        kind: ``folder`` or ``file``.
        overwrite: whether publishing may replace an existing ``out``.
        published: True once ``out`` holds this run's output.
    """

    def __init__(self, out: Path, *, overwrite: bool, what: str, error: type[GainSurgeryError],
                 shown: str | None = None, mode: int = 0o777, kind: str = "folder") -> None:
        self.out = out
        self.kind = kind
        self.file: BinaryIO | None = None
        self.overwrite = overwrite
        self.what = what
        self.error = error
        self.published = False
        self._discarded = False
        self._shown = shown or show_path(out)  # as the user wrote it, in messages
        self._mode = mode
        self._stem = sibling_stem(out.name)
        self._lock_path = output_lock_path(out)
        self._lock_fd: int | None = None
        self._marker_fd: int | None = None
        self.token = secrets.token_hex(16)
        names = claim_names(self._stem, self.token)
        self._claim_path = out.parent / names["claim"]
        self._marker_path = out.parent / names["part"]  # where the marker is now: its temp name, then its own
        self.tmp = out.parent / names["tmp"]
        self._old = out.parent / names["old"]

    # -- lifecycle -----------------------------------------------------------------

    def _start(self, *, wait: bool = False) -> None:
        self._lock_fd = take_output_lock(self._lock_path, what=self.what, shown=self._shown, error=self.error,
                                         wait=wait)
        pause_point("claim.locked")
        clean_leftovers(self.out)
        try:
            lst: os.stat_result | None = os.lstat(self.out)
        except FileNotFoundError:
            lst = None
        if lst is not None and not self.overwrite:
            raise self.error(f"{self.what} already exists: {self._shown} (pass --overwrite to replace it)")
        if lst is not None and not self._right_kind(lst.st_mode):
            raise self.error(f"{self.what} {self._shown} exists and is not a {self.kind}; name a new {self.kind}")
        if lst is not None and self.kind == "folder":
            mount = mount_inside(self.out)
            if mount is not None:
                raise self.error(f"{self.what} {self._shown} holds a mount point ({show_path(mount)}); --overwrite "
                                 f"would delete what is mounted there; unmount it or choose another {self.what}")
        # The marker first, then the temp: a temp never exists without proof it is ours. The
        # marker is written and locked under its temp name, then renamed into place whole.
        fd = open_nofollow(self._marker_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._marker_fd = fd
        try_lock(fd)  # a new file of ours, with a name nobody can guess: free
        pause_point("claim.marker-created")
        marker = {"format": CLAIM_FORMAT, "out": self.out.name, "token": self.token,
                  # For a person reading a leftover; never used to judge staleness.
                  "pid": os.getpid(), "host": socket.gethostname()}
        os.write(fd, json.dumps(marker).encode("utf-8"))
        os.fsync(fd)
        pause_point("claim.marker-written")
        rename_noreplace(self._marker_path, self._claim_path)
        self._marker_path = self._claim_path
        pause_point("claim.marked")
        if self.kind == "folder":
            os.mkdir(self.tmp, self._mode)
        else:
            # mode & ~umask, like a plain open; created exclusively, never through a link.
            tmp_fd = open_nofollow(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, self._mode & 0o666)
            self.file = os.fdopen(tmp_fd, "r+b", buffering=0)
        fsync_dir(self.out.parent)
        pause_point("claim.temp-made")

    def _right_kind(self, mode: int) -> bool:
        return stat.S_ISDIR(mode) if self.kind == "folder" else stat.S_ISREG(mode)

    def _close_file(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _release(self, *, keep_marker: bool = False) -> None:
        """Drop the locks; remove the marker unless something of ours is still left to clean."""
        if self._marker_fd is not None:
            if not keep_marker:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._marker_path)
            os.close(self._marker_fd)
            self._marker_fd = None
            pause_point("claim.unmarked")
        if self._lock_fd is not None:
            release_output_lock(self._lock_path, self._lock_fd)
            self._lock_fd = None
        with contextlib.suppress(OSError):
            fsync_dir(self.out.parent)

    def discard(self) -> None:
        """Give up: remove this run's temp (and aside, if any) and release the claim. Idempotent.

        After a successful :meth:`publish` it only releases what is still held; a
        second call does nothing.

        Raises:
            LeftBehind: the temp could not be deleted (a mount point inside it,
                permissions); it stays, with its marker, and the message says where.
        """
        if self._discarded:
            return
        self._discarded = True
        keep = False
        try:
            self._close_file()
            if not self.published:
                if is_ours_to_remove(self.tmp):
                    try:
                        remove_ours(self.tmp)
                    except OSError as e:
                        keep = True
                        raise LeftBehind(f"this run's temp {self.kind} {show_path(self.tmp)} could not be deleted "
                                         f"({_why(e)}); it was left there with its claim marker; fix that and "
                                         f"the next run on {self.what} {self._shown} removes it") from None
                if is_ours_to_remove(self._old):
                    # Only the fallback creates it; if OUT is missing, put the old one back.
                    # If something else took OUT meanwhile, delete nothing now: the marker
                    # stays and a later run (which was asked to overwrite) removes it.
                    try:
                        rename_noreplace(self._old, self.out)
                    except FileExistsError:
                        keep = True
                        raise LeftBehind(f"the folder {self.what} {self._shown} held was moved aside to "
                                         f"{show_path(self._old)} and could not be put back (something else is "
                                         f"at {self.what} now); it was left there with its claim marker") from None
        except BaseException:
            keep = True  # a leftover remains: the marker lets the next run prove it is ours
            raise
        finally:
            self._release(keep_marker=keep)

    def __enter__(self) -> FolderClaim:
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        self._discard_after(exc)

    def _discard_after(self, exc: BaseException | None) -> None:
        """:meth:`discard` after ``exc`` (None: no failure); if something is left behind, say both."""
        try:
            self.discard()
        except LeftBehind as left:
            if exc is None or isinstance(exc, LeftBehind):
                raise
            # Both halves are true, and the user needs both: why the run failed, and what it left.
            first = str(exc) if isinstance(exc, GainSurgeryError) else _failure(exc)
            raise LeftBehind(f"{first}; and {left}") from exc

    # -- publishing ----------------------------------------------------------------

    def publish(self, *, fsync: bool = True) -> Path:
        """Move the finished temp folder to ``out``; return ``out``.

        Without overwrite: a no-replace rename. If ``out`` appeared meanwhile, nothing
        of it is touched, this run's temp is removed and ``error`` says so.
        With overwrite: an atomic exchange, then the old folder (now at this run's
        marked temp name) is deleted; the fallback moves the old one aside first.
        ``fsync``: make the temp's files durable before the rename.

        Raises:
            LeftBehind: ``out`` holds the new folder but the old one could not be
                deleted (a mount point appeared in it, permissions); it stays at this
                run's temp name with its marker, so the next run on ``out`` removes it.
        """
        if self._lock_fd is None or self.published:
            raise RuntimeError("publish() on a claim that is released or already published")
        pause_point("claim.publishing")
        if self.file is not None:
            if fsync:
                os.fsync(self.file.fileno())
            self._close_file()
        elif fsync:
            fsync_tree(self.tmp)
        try:
            old = self._swap_in()
        except FileExistsError:
            appeared = self.error(f"{self.what} {self._shown} appeared while this run was writing it (made by "
                                  f"someone else); it was left untouched and this run's result was discarded; "
                                  f"choose another {self.what} or pass --overwrite")
            self._discard_after(appeared)
            raise appeared from None
        except BaseException as exc:
            self._discard_after(exc)
            raise
        self.published = True
        fsync_dir(self.out.parent)
        if old is not None:
            pause_point("claim.swapped")
            try:
                if self.kind == "folder":
                    remove_tree(old, pause_step="claim.old-half-deleted")
                else:
                    os.unlink(old)
            except OSError as e:
                self._release(keep_marker=True)
                raise LeftBehind(f"{self.what} {self._shown} now holds this run's result, but the folder it "
                                 f"replaced could not be deleted ({_why(e)}); it was left at {show_path(old)} with "
                                 f"its claim marker; fix that and the next run on {self.what} removes it") from None
            except BaseException:
                self._release(keep_marker=True)
                raise
        pause_point("claim.published")
        self._release()
        return self.out

    def _swap_in(self) -> Path | None:
        """Put the temp at ``out``; return where the old ``out`` now lies (ours to delete), if any."""
        if not self.overwrite:
            rename_noreplace(self.tmp, self.out)
            return None
        for _ in range(3):
            try:
                lst = os.lstat(self.out)
            except FileNotFoundError:
                try:
                    rename_noreplace(self.tmp, self.out)
                    return None
                except FileExistsError:
                    continue  # appeared just now: replace it, as --overwrite asks
            if not self._right_kind(lst.st_mode):
                raise self.error(f"{self.what} {self._shown} became something other than a {self.kind} while this "
                                 "run was writing; it was left untouched and this run's result was discarded")
            try:
                if rename_exchange(self.tmp, self.out):
                    # The old OUT now sits at our marked temp name: provably ours to delete.
                    return self.tmp
            except FileNotFoundError:
                continue  # OUT vanished between lstat and exchange
            # Fallback (no RENAME_EXCHANGE here): move aside to a marked name, rename in.
            # A kill between the two renames leaves .old, which the next run moves back.
            os.rename(self.out, self._old)
            pause_point("claim.aside")
            try:
                rename_noreplace(self.tmp, self.out)
            except BaseException:
                with contextlib.suppress(OSError):
                    rename_noreplace(self._old, self.out)
                raise
            return self._old
        raise self.error(f"{self.what} {self._shown} keeps changing while this run publishes; try again")


def _failure(exc: BaseException) -> str:
    """One line for an exception that is not ours (a full disk, a signal)."""
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f" ({show_path(exc.filename)})" if exc.filename else "")
    return type(exc).__name__


def claim_folder(out: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str] | None] = (),
                 overwrite: bool = False, what: str = "OUT", error: type[GainSurgeryError] = OutputError,
                 wait: bool = False, mode: int = 0o777) -> FolderClaim:
    """Claim the folder output ``out`` for this run; use as a context manager.

    Checks ``out`` with :func:`~gainsurgery.io.checks.check_output`, takes its lock
    (failing at once if another run, in any PID namespace, holds it; with ``wait``,
    waiting for it instead), removes provable leftovers of dead runs
    (:func:`clean_leftovers`), refuses an existing ``out`` unless ``overwrite`` (and
    one that holds a mount point), writes the claim marker and creates the temp
    folder :attr:`FolderClaim.tmp` (permissions ``mode & ~umask``). Leaving the
    ``with`` block without :meth:`FolderClaim.publish` (an error, Ctrl-C) removes the
    temp and the marker.

    Example:
        >>> with claim_folder(out, inputs=[base], overwrite=args.overwrite) as claim:  # doctest: +SKIP
        ...     write_shards(claim.tmp)
        ...     claim.publish()
    """
    # Existence is judged under the lock (in _start), after leftovers of dead runs are
    # removed, so even a run that stops at "already exists" cleans up after a killed one.
    target = check_output(out, inputs=inputs, kind="folder", overwrite=True, what=what, error=error)
    claim = FolderClaim(target, overwrite=overwrite, what=what, error=error, shown=show_path(out), mode=mode)
    return _started(claim, wait=wait)


def claim_file(out: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str] | None] = (),
               overwrite: bool = False, what: str = "OUT", error: type[GainSurgeryError] = OutputError,
               wait: bool = False) -> FolderClaim:
    """Claim the file output ``out`` for a run that writes it for minutes (a GGUF model); use as a context manager.

    :func:`claim_folder`'s protocol with a temp *file*: ``out`` is checked with
    :func:`~gainsurgery.io.checks.check_output` (``kind="file"``: never an input, a hard
    link to one, a link, a folder), its lock taken, leftovers of dead runs removed, an
    existing ``out`` refused unless ``overwrite`` (a model file is not replaced by
    accident), the claim marker written, and the temp ``P/.N.gainsurgery-HEX.tmp``
    created exclusively and opened as :attr:`FolderClaim.file`.
    :meth:`FolderClaim.publish` fsyncs it and renames it into place without replacing
    (an atomic exchange with ``overwrite``); leaving the block without publishing
    removes it: ``out`` is whole or absent. ``wait``: wait for another run's lock
    instead of failing (a cache file two processes may want at once).

    Example:
        >>> with claim_file("adapted.gguf", inputs=["base.gguf"]) as claim:  # doctest: +SKIP
        ...     claim.file.write(b"GGUF...")
        ...     claim.publish()
    """
    target = check_output(out, inputs=inputs, kind="file", what=what, error=error)
    claim = FolderClaim(target, overwrite=overwrite, what=what, error=error, shown=show_path(out), kind="file")
    return _started(claim, wait=wait)


def _started(claim: FolderClaim, *, wait: bool) -> FolderClaim:
    """Take ``claim`` (lock, cleanup, marker, temp); on any failure release what was taken, then re-raise."""
    try:
        claim._start(wait=wait)
    except BaseException as exc:
        claim._discard_after(exc)
        raise
    return claim
