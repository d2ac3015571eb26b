"""Stale-claim cleanup: what dead gainsurgery runs left beside an output, proved ours and removed.

A claimed output (:mod:`gainsurgery.io.claims`) leaves names of the form
``P/.N.gainsurgery-HEX.{claim,tmp,old}`` while its run lives. A run killed at any
point leaves its claim marker for everything it left; the next run on the same
output calls :func:`clean_leftovers` under the output's lock and removes exactly
what a dead run's marker proves is ours (the marker's content names N and HEX, and
its lock can be taken), puts an old OUT moved aside back, and leaves anything else
alone, however similar its name. :func:`read_claim` reads a marker, and the claim
names and marker format live here so that the writer and the cleaner agree on them.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from gainsurgery.errors import GainSurgeryError
from gainsurgery.io.atomic import TAG, fsync_dir, open_nofollow, rename_noreplace, sibling_stem
from gainsurgery.io.checks import output_path
from gainsurgery.io.jsonsafe import loads
from gainsurgery.io.locks import lock_file, try_lock
from gainsurgery.io.mounts import remove_tree

#: The ``format`` field of every claim marker.
CLAIM_FORMAT = "gainsurgery.claim/1"
#: Largest claim marker read back, in bytes (ours are about 150).
_MAX_CLAIM_BYTES = 4096


def claim_names(stem: str, token: str) -> dict[str, str]:
    """The names a claim on output stem ``stem`` with token ``token`` uses beside the output: claim, part, tmp, old."""
    base = f".{stem}.{TAG}-{token}"
    return {"claim": base + ".claim", "part": base + ".claim.part", "tmp": base + ".tmp", "old": base + ".old"}


def read_claim(fd: int) -> dict | None:
    """The content of the claim marker open at ``fd`` if it is one of ours (a JSON object of our format), else None.

    Reads at most 4 KiB from the start of the file; never raises on junk (binary,
    truncated, deeply nested, oversized).

    Example:
        >>> fd = os.open(".merged.gainsurgery-3f...a1.claim", os.O_RDONLY)  # doctest: +SKIP
        >>> read_claim(fd)["out"]  # doctest: +SKIP
        'merged'
    """
    try:
        data = os.pread(fd, _MAX_CLAIM_BYTES + 1, 0)
        if len(data) > _MAX_CLAIM_BYTES:
            return None
        value = loads(data, where="claim", max_bytes=_MAX_CLAIM_BYTES, max_depth=4)
    except (GainSurgeryError, OSError):
        return None
    return value if isinstance(value, dict) and value.get("format") == CLAIM_FORMAT else None


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_real_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def is_ours_to_remove(path: Path) -> bool:
    """A temp or aside of ours: a real folder or a regular file (never a link)."""
    return _is_real_dir(path) or _is_real_file(path)


def remove_ours(path: Path, **kwargs: object) -> None:
    """Delete our temp or aside: a folder through :func:`remove_tree` (never across a mount), a file by unlinking."""
    if _is_real_dir(path):
        remove_tree(path, **kwargs)  # type: ignore[arg-type]
    else:
        os.unlink(path)


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\x00" not in name


def clean_leftovers(out: str | os.PathLike[str]) -> list[str]:
    """Remove what dead gainsurgery runs left beside ``out``; return the names handled.

    Call only while holding ``out``'s lock (:func:`claim_folder` does). A leftover is
    removed only when it is provably ours: its name matches
    ``.N.gainsurgery-HEX.{claim,tmp,old}``, a claim file ``...HEX.claim`` exists, is a
    plain file whose content names N and HEX, and its lock can be taken (its run is
    dead: a live run, in any PID namespace, holds it). A ``.old`` folder (the old OUT
    moved aside by the fallback) is moved back to OUT when OUT is missing, else
    removed. A marker left under its temporary name (``...HEX.claim.part``: the run
    died while writing it; no temp folder exists yet) and an empty claim file are
    removed, lock free, nothing else with them. Anything else, however similar its
    name, is left alone; so is a leftover that cannot be deleted (a mount point
    inside), with its marker, for a later run.

    Example:
        >>> clean_leftovers("merged")  # doctest: +SKIP
        ['.merged.gainsurgery-3f...a1.tmp', '.merged.gainsurgery-3f...a1.claim']
    """
    target = output_path(out)
    return _clean(target.parent, sibling_stem(target.name), target.name)


def clean_leftovers_in(folder: str | os.PathLike[str]) -> list[str]:
    """:func:`clean_leftovers` for every output inside ``folder`` (a folder this run holds whole).

    For a folder whose outputs are claimed one by one under one lock of its own
    (a training checkpoint folder's ``step-*``): a killed run's leftovers are removed
    whichever output it was writing, and so are the outputs' lock files that nobody
    holds (a killed run leaves its lock file; a live one holds it).

    Example:
        >>> clean_leftovers_in("legal.checkpoints")  # doctest: +SKIP
        ['.step-00000006.gainsurgery-3f...a1.tmp', '.step-00000006.gainsurgery-3f...a1.claim']
    """
    return _clean(Path(os.path.realpath(folder)), None, None)


def _clean(parent: Path, stem: str | None, name: str | None) -> list[str]:
    """Remove provable leftovers in ``parent`` for output stem ``stem`` (None: every output)."""
    who = re.escape(stem) if stem is not None else r"(?P<stem>.+)"
    pattern = re.compile(rf"\.{who}\.{TAG}-(?P<token>[0-9a-f]{{32}})\.claim(?P<part>\.part)?", re.S)
    lock_pattern = re.compile(rf"\..+\.{TAG}\.lock", re.S)
    handled: list[str] = []
    try:
        entries = sorted(os.listdir(parent))
    except OSError:
        return handled
    for entry in entries:
        if stem is None and lock_pattern.fullmatch(entry) and _drop_free_lock(parent / entry):
            handled.append(entry)
            continue
        m = pattern.fullmatch(entry)
        if m is None:
            continue
        entry_stem = stem if stem is not None else m.group("stem")
        token = m.group("token")
        marker = parent / entry
        try:
            fd = open_nofollow(marker, os.O_RDONLY, regular=False)
        except OSError:
            continue  # a link, or gone: not provably ours
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                continue
            if not try_lock(fd):
                continue  # its run is alive
            content = read_claim(fd) if st.st_size else None
            out_name = content.get("out") if content is not None else None
            ours = (content is not None and content.get("token") == token and _plain_name(out_name)
                    and sibling_stem(out_name) == entry_stem and (name is None or out_name == name))
            if m.group("part") or not st.st_size:
                # Half made (never renamed into place) or empty: nothing else was made under it.
                if (ours or not st.st_size) and _still(marker, st):
                    os.unlink(marker)
                    handled.append(entry)
                continue
            if not ours:
                continue
            names = claim_names(entry_stem, token)
            tmp, old = parent / names["tmp"], parent / names["old"]
            try:
                if is_ours_to_remove(tmp):
                    remove_ours(tmp)
                    handled.append(names["tmp"])
                if is_ours_to_remove(old):
                    try:
                        rename_noreplace(old, parent / out_name)  # the fallback died mid-overwrite: put OUT back
                        handled.append(f"{names['old']} -> {out_name}")
                    except FileExistsError:
                        remove_ours(old)
                        handled.append(names["old"])
            except OSError:
                continue  # e.g. a mount point inside: leave it, and its marker, for a later run
            os.unlink(marker)
            handled.append(entry)
        finally:
            os.close(fd)
    if handled:
        fsync_dir(parent)
    return handled


def _drop_free_lock(path: Path) -> bool:
    """Unlink an output's lock file that nobody holds (empty, a plain file); True if it was.

    Taken first, then unlinked while held, as its own holder would: a run that opened
    it meanwhile finds the name gone and takes a new file (:func:`~gainsurgery.io.locks.take_output_lock`).
    """
    try:
        fd = lock_file(path, create=False)
    except OSError:
        return False  # a link, a folder, gone
    if fd is None:
        return False  # held: a live run's
    try:
        st = os.fstat(fd)
        if st.st_size or not _still(path, st):
            return False
        os.unlink(path)
        return True
    finally:
        os.close(fd)


def _still(path: Path, st: os.stat_result) -> bool:
    """``path`` still names the file ``st`` describes, and it is still empty or unchanged in size."""
    try:
        now = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return os.path.samestat(now, st) and now.st_size == st.st_size
