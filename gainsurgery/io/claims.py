"""Folder outputs, claimed at the start of a run and published whole: the one publish primitive.

Every folder gainsurgery writes appears whole or not at all through
:func:`claim_folder`: apply's OUT, export-peft's adapter folder, train's ``-o`` for
PEFT methods and its checkpoints, the embedded model's conversion, the lab's merged
models. (Single files: :mod:`gainsurgery.io.atomic`.) The protocol, for ``OUT = P/N``:

``P/.N.gainsurgery.lock``
    An exclusive ``flock`` held for the whole run. ``flock`` belongs to the open file
    in the kernel, so runs in other processes *and other PID namespaces* (a container
    sharing the volume) see it; a killed run's lock vanishes with it. A second run
    fails at once ("being written by another gainsurgery run").
``P/.N.gainsurgery-HEX.claim``
    The marker: a small JSON file naming N and HEX (``secrets.token_hex(16)``), locked
    by its run while the run lives. A claim whose lock can be taken belongs to a dead
    run. Process ids are recorded for people, never trusted.
``P/.N.gainsurgery-HEX.tmp``
    The folder the run fills. Created after its claim, removed before it, so a temp
    never exists without the marker that proves it is ours.
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
name, is deleted afterwards. Where the filesystem refuses those flags (EINVAL,
ENOSYS...), the fallback checks under the lock and uses plain renames: OUT is moved
aside to ``.old``, the new folder renamed in, ``.old`` deleted; a run killed between
the two renames is repaired by the next run, which moves ``.old`` back.

Before claiming, a run removes leftovers of dead runs for the same OUT: only names
that match the pattern above *and* have a claim file with matching content whose
lock it can take. A similar-looking folder without our claim is never touched.

Example:
    >>> with claim_folder("merged", inputs=["base"], overwrite=False) as claim:  # doctest: +SKIP
    ...     (claim.tmp / "config.json").write_bytes(b"{}")
    ...     claim.publish()
"""

from __future__ import annotations

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import socket
import stat
from pathlib import Path
from typing import Iterable

from gainsurgery.errors import GainSurgeryError, OutputError
from gainsurgery.io.atomic import (TAG, fsync_dir, fsync_tree, open_nofollow, rename_exchange, rename_noreplace,
                                   sibling_stem)
from gainsurgery.io.checks import check_output, output_path
from gainsurgery.io.inputs import show_path
from gainsurgery.io.locks import output_lock_path, release_output_lock, take_output_lock
from gainsurgery.io.mounts import mount_inside, remove_tree

_CLAIM_FORMAT = "gainsurgery.claim/1"


def _names(stem: str, token: str) -> dict[str, str]:
    base = f".{stem}.{TAG}-{token}"
    return {"claim": base + ".claim", "tmp": base + ".tmp", "old": base + ".old"}


def _read_claim(fd: int) -> dict | None:
    """The claim marker's content if it is one of ours, else None (never raises on junk)."""
    from gainsurgery.io.jsonsafe import loads

    try:
        data = os.pread(fd, 4097, 0)
        if len(data) > 4096:
            return None
        value = loads(data, where="claim", max_bytes=4096, max_depth=4)
    except (GainSurgeryError, OSError):
        return None
    return value if isinstance(value, dict) and value.get("format") == _CLAIM_FORMAT else None


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def clean_leftovers(out: str | os.PathLike[str]) -> list[str]:
    """Remove what dead gainsurgery runs left beside ``out``; return the names handled.

    Call only while holding ``out``'s lock (:func:`claim_folder` does). A leftover is
    removed only when it is provably ours: its name matches
    ``.N.gainsurgery-HEX.{claim,tmp,old}``, a claim file ``...HEX.claim`` exists, is a
    plain file whose content names N and HEX, and its lock can be taken (its run is
    dead: a live run, in any PID namespace, holds it). A ``.old`` folder (the old OUT
    moved aside by the fallback) is moved back to OUT when OUT is missing, else
    removed. Anything else, however similar its name, is left alone.

    Example:
        >>> clean_leftovers("merged")  # doctest: +SKIP
        ['.merged.gainsurgery-3f...a1.tmp', '.merged.gainsurgery-3f...a1.claim']
    """
    target = output_path(out)
    parent, name = target.parent, target.name
    stem = sibling_stem(name)
    pattern = re.compile(rf"\.{re.escape(stem)}\.{TAG}-([0-9a-f]{{32}})\.claim")
    handled: list[str] = []
    try:
        entries = sorted(os.listdir(parent))
    except OSError:
        return handled
    for entry in entries:
        m = pattern.fullmatch(entry)
        if m is None:
            continue
        token = m.group(1)
        names = _names(stem, token)
        claim = parent / names["claim"]
        try:
            fd = open_nofollow(claim, os.O_RDONLY, regular=False)
        except OSError:
            continue  # a link, or gone: not provably ours
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its run is alive
            content = _read_claim(fd)
            if content is None or content.get("token") != token or content.get("out") != name:
                continue
            tmp, old = parent / names["tmp"], parent / names["old"]
            try:
                if _is_real_dir(tmp):
                    remove_tree(tmp)
                    handled.append(names["tmp"])
                if _is_real_dir(old):
                    try:
                        rename_noreplace(old, target)  # the fallback died mid-overwrite: put the old OUT back
                        handled.append(f"{names['old']} -> {name}")
                    except FileExistsError:
                        remove_tree(old)
                        handled.append(names["old"])
            except OSError:
                continue  # e.g. a mount point inside: leave it, and its marker, alone
            os.unlink(claim)
            handled.append(names["claim"])
        finally:
            os.close(fd)
    if handled:
        fsync_dir(parent)
    return handled


class FolderClaim:
    """A claimed folder output. Fill :attr:`tmp`, then :meth:`publish`; see :func:`claim_folder`.

    Attributes:
        out: the output folder (parent resolved).
        tmp: the temp folder to fill; it becomes ``out`` on publish.
        overwrite: whether publishing may replace an existing ``out``.
        published: True once ``out`` holds this run's folder.
    """

    def __init__(self, out: Path, *, overwrite: bool, what: str, error: type[GainSurgeryError],
                 shown: str | None = None) -> None:
        self.out = out
        self.overwrite = overwrite
        self.what = what
        self.error = error
        self.published = False
        self._shown = shown or show_path(out)  # as the user wrote it, in messages
        self._stem = sibling_stem(out.name)
        self._lock_path = output_lock_path(out)
        self._lock_fd: int | None = None
        self._claim_fd: int | None = None
        self.token = secrets.token_hex(16)
        names = _names(self._stem, self.token)
        self._claim_path = out.parent / names["claim"]
        self.tmp = out.parent / names["tmp"]
        self._old = out.parent / names["old"]

    # -- lifecycle -----------------------------------------------------------------

    def _start(self) -> None:
        self._lock_fd = take_output_lock(self._lock_path, what=self.what, shown=self._shown, error=self.error)
        clean_leftovers(self.out)
        try:
            lst: os.stat_result | None = os.lstat(self.out)
        except FileNotFoundError:
            lst = None
        if lst is not None and not self.overwrite:
            raise self.error(f"{self.what} already exists: {self._shown} (pass --overwrite to replace it)")
        if lst is not None and not stat.S_ISDIR(lst.st_mode):
            raise self.error(f"{self.what} {self._shown} exists and is not a folder; name a new folder")
        if lst is not None:
            mount = mount_inside(self.out)
            if mount is not None:
                raise self.error(f"{self.what} {self._shown} holds a mount point ({show_path(mount)}); --overwrite "
                                 f"would delete what is mounted there; unmount it or choose another {self.what}")
        # The marker first, then the temp: a temp never exists without proof it is ours.
        fd = open_nofollow(self._claim_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._claim_fd = fd
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        marker = {"format": _CLAIM_FORMAT, "out": self.out.name, "token": self.token,
                  # For a person reading a leftover; never used to judge staleness.
                  "pid": os.getpid(), "host": socket.gethostname()}
        os.write(fd, json.dumps(marker).encode("utf-8"))
        os.fsync(fd)
        os.mkdir(self.tmp)
        fsync_dir(self.out.parent)

    def _release(self, *, keep_marker: bool = False) -> None:
        """Drop the locks; remove the marker unless something of ours is still left to clean."""
        if self._claim_fd is not None:
            if not keep_marker:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._claim_path)
            os.close(self._claim_fd)
            self._claim_fd = None
        if self._lock_fd is not None:
            release_output_lock(self._lock_path, self._lock_fd)
            self._lock_fd = None
        with contextlib.suppress(OSError):
            fsync_dir(self.out.parent)

    def discard(self) -> None:
        """Give up: remove this run's temp (and aside, if any) and release the claim. Idempotent.

        After a successful :meth:`publish` it only releases what is still held.
        """
        keep = False
        try:
            if not self.published:
                if _is_real_dir(self.tmp):
                    remove_tree(self.tmp)
                if _is_real_dir(self._old):
                    # Only the fallback creates it; if OUT is missing, put the old one back.
                    # If something else took OUT meanwhile, delete nothing now: the marker
                    # stays and a later run (which was asked to overwrite) removes it.
                    try:
                        rename_noreplace(self._old, self.out)
                    except FileExistsError:
                        keep = True
        except BaseException:
            keep = True  # a leftover remains: the marker lets the next run prove it is ours
            raise
        finally:
            self._release(keep_marker=keep)

    def __enter__(self) -> FolderClaim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    # -- publishing ----------------------------------------------------------------

    def publish(self, *, fsync: bool = True) -> Path:
        """Move the finished temp folder to ``out``; return ``out``.

        Without overwrite: a no-replace rename. If ``out`` appeared meanwhile, nothing
        of it is touched, this run's temp is removed and ``error`` says so.
        With overwrite: an atomic exchange, then the old folder (now at this run's
        marked temp name) is deleted; the fallback moves the old one aside first.
        If deleting the old folder fails, the new ``out`` stays published and the
        marker stays, so the next run removes the old one.
        ``fsync``: make the temp's files durable before the rename.
        """
        if self._lock_fd is None or self.published:
            raise RuntimeError("publish() on a claim that is released or already published")
        if fsync:
            fsync_tree(self.tmp)
        try:
            old = self._swap_in()
        except FileExistsError:
            self.discard()
            raise self.error(f"{self.what} {self._shown} appeared while this run was writing it (made by "
                             f"someone else); it was left untouched and this run's result was discarded; "
                             f"choose another {self.what} or pass --overwrite") from None
        except BaseException:
            self.discard()
            raise
        self.published = True
        fsync_dir(self.out.parent)
        if old is not None:
            try:
                remove_tree(old)
            except BaseException:
                self._release(keep_marker=True)
                raise
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
            if not stat.S_ISDIR(lst.st_mode):
                raise self.error(f"{self.what} {self._shown} became something other than a folder while this "
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
            try:
                rename_noreplace(self.tmp, self.out)
            except BaseException:
                with contextlib.suppress(OSError):
                    rename_noreplace(self._old, self.out)
                raise
            return self._old
        raise self.error(f"{self.what} {self._shown} keeps changing while this run publishes; try again")


def claim_folder(out: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str] | None] = (),
                 overwrite: bool = False, what: str = "OUT",
                 error: type[GainSurgeryError] = OutputError) -> FolderClaim:
    """Claim the folder output ``out`` for this run; use as a context manager.

    Checks ``out`` with :func:`check_output`, takes its lock (failing at once if
    another run, in any PID namespace, holds it), removes provable leftovers of dead
    runs (:func:`clean_leftovers`), refuses an existing ``out`` unless ``overwrite``,
    writes the claim marker and creates the temp folder :attr:`FolderClaim.tmp`. Leaving the ``with`` block without
    :meth:`FolderClaim.publish` (an error, Ctrl-C) removes the temp and the marker.

    Example:
        >>> with claim_folder(out, inputs=[base], overwrite=args.overwrite) as claim:  # doctest: +SKIP
        ...     write_shards(claim.tmp)
        ...     claim.publish()
    """
    # Existence is judged under the lock (in _start), after leftovers of dead runs are
    # removed, so even a run that stops at "already exists" cleans up after a killed one.
    target = check_output(out, inputs=inputs, kind="folder", overwrite=True, what=what, error=error)
    claim = FolderClaim(target, overwrite=overwrite, what=what, error=error, shown=show_path(out))
    try:
        claim._start()
    except BaseException:
        claim.discard()
        raise
    return claim
