"""Where a command may write, and how an output appears: the one place that decides.

Every command that writes (a file or a folder) asks :func:`check_output` first. It
refuses an output that is, contains or lies inside any input (resolved paths, hard
links included), and refuses ``""``, ``.``, ``..``, the current folder, a filesystem
root, a mount point and the home folder even with ``--overwrite``.

Files are written with :func:`atomic_file` / :func:`write_file`: a temp sibling with
an unguessable name, fsynced, renamed into place, the folder fsynced.

Folders (apply's OUT, export-peft's adapter folder) are claimed and published with
:func:`claim_folder`. The protocol, for ``OUT = P/N``:

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

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import platform
import pwd
import re
import secrets
import shutil
import socket
import stat
import sys
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Literal, TextIO

from gainsurgery.errors import GainSurgeryError, OutputError
from gainsurgery.io.inputs import allowed_roots, show_path

#: renameat2 flags (linux/fs.h).
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
#: renameat2 syscall numbers, for a libc without the wrapper (glibc < 2.28, musl < 1.2.?).
_SYS_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276}
#: errnos meaning "this kernel/filesystem cannot do that rename flag" (not "it exists").
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP,
                getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}

_CLAIM_FORMAT = "gainsurgery.claim/1"
_TAG = "gainsurgery"
# Longest N used verbatim in our sibling names: ".N.gainsurgery-<32 hex>.claim" must fit NAME_MAX (255).
_MAX_STEM_BYTES = 180

OutputKind = Literal["file", "folder"]


# --------------------------------------------------------------------------------
# Renames that never replace by accident.

_libc_cache: list[ctypes.CDLL | None] = []


def _libc() -> ctypes.CDLL | None:
    if not _libc_cache:
        try:
            _libc_cache.append(ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None)
        except OSError:
            _libc_cache.append(None)
    return _libc_cache[0]


def renameat2(src: str | os.PathLike[str], dst: str | os.PathLike[str], flags: int) -> None:
    """Linux ``renameat2(AT_FDCWD, src, AT_FDCWD, dst, flags)``; raise OSError on failure.

    Uses libc's wrapper, or the raw syscall on x86_64/aarch64 where libc lacks it.
    Raises ``OSError(ENOSYS)`` where neither exists (not Linux, other machines).

    Example:
        >>> renameat2("a.tmp", "a", RENAME_NOREPLACE)  # doctest: +SKIP
    """
    libc = _libc()
    a, b = os.fsencode(src), os.fsencode(dst)
    if libc is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available here", os.fsdecode(a), None, os.fsdecode(b))
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
        res = fn(_AT_FDCWD, a, _AT_FDCWD, b, flags)
    else:
        nr = _SYS_RENAMEAT2.get(platform.machine().lower())
        if nr is None:
            raise OSError(errno.ENOSYS, "renameat2 is not available here", os.fsdecode(a), None, os.fsdecode(b))
        libc.syscall.restype = ctypes.c_long
        res = libc.syscall(ctypes.c_long(nr), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(a),
                           ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(b), ctypes.c_uint(flags))
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fsdecode(a), None, os.fsdecode(b))


def rename_noreplace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename ``src`` to ``dst`` only if ``dst`` does not exist; FileExistsError otherwise.

    Atomic with ``RENAME_NOREPLACE``. Where the filesystem refuses the flag, falls
    back to "check, then rename", which is only safe while the caller holds the
    output's lock (other gainsurgery runs wait on it); a third party creating an
    *empty* folder at ``dst`` in that instant would be replaced by the rename.

    Example:
        >>> rename_noreplace(".out.gainsurgery-ab12.tmp", "out")  # doctest: +SKIP
    """
    try:
        renameat2(src, dst, RENAME_NOREPLACE)
        return
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, "already exists", os.fspath(dst)) from None
        if e.errno not in _UNSUPPORTED:
            raise
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "already exists", os.fspath(dst))
    os.rename(src, dst)


def rename_exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap ``a`` and ``b`` atomically (``RENAME_EXCHANGE``); return False where unsupported.

    Both must exist. Raises OSError for real failures (ENOENT when one is gone).

    Example:
        >>> rename_exchange(".out.gainsurgery-ab12.tmp", "out")  # doctest: +SKIP
        True
    """
    try:
        renameat2(a, b, RENAME_EXCHANGE)
        return True
    except OSError as e:
        if e.errno in _UNSUPPORTED:
            return False
        raise


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a folder's entries (creations, renames, removals) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike[str]) -> None:
    """fsync every regular file and folder under ``folder`` (links not followed), deepest first."""
    for here, dirs, files in os.walk(folder, topdown=False, followlinks=False):
        for name in files:
            p = os.path.join(here, name)
            if stat.S_ISREG(os.lstat(p).st_mode):
                fd = os.open(p, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(here)


def mount_inside(folder: str | os.PathLike[str]) -> Path | None:
    """The first folder under ``folder`` on another filesystem (a mount point), or None.

    ``shutil.rmtree`` crosses into mounted filesystems; deleting an old OUT that
    holds a bind mount would wipe whatever is mounted there.
    """
    root_dev = os.lstat(folder).st_dev
    for here, dirs, _files in os.walk(folder, followlinks=False):
        for name in dirs:
            p = os.path.join(here, name)
            with contextlib.suppress(OSError):
                if os.lstat(p).st_dev != root_dev or os.path.ismount(p):
                    return Path(p)
    return None


def remove_tree(folder: str | os.PathLike[str]) -> None:
    """Delete a folder we may delete (our temp, an old OUT), never crossing into a mount.

    Raises OSError (EBUSY) naming the mount point, deleting nothing, if one is inside.
    """
    mount = mount_inside(folder)
    if mount is not None:
        raise OSError(errno.EBUSY, "holds a mount point; not deleted", os.fspath(mount))
    shutil.rmtree(folder)


# --------------------------------------------------------------------------------
# check_output

def _real(p: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(p))


def _protected() -> list[tuple[Path, str]]:
    """Folders never replaced nor contained by an output: cwd, home (both spellings), root."""
    out: list[tuple[Path, str]] = [(Path("/"), "a filesystem root")]
    with contextlib.suppress(OSError):
        out.append((_real(os.getcwd()), "the current folder"))
    homes = {os.path.expanduser("~")}
    with contextlib.suppress(KeyError, OSError):
        homes.add(pwd.getpwuid(os.getuid()).pw_dir)
    out += [(_real(h), "your home folder") for h in homes if h and h != "~"]
    return out


def _input_areas(inputs: Iterable[str | os.PathLike[str] | None]) -> list[tuple[Path, str]]:
    """Resolved areas each input occupies: the path itself, plus a cache snapshot's blobs/."""
    areas: list[tuple[Path, str]] = []
    for item in inputs:
        if item is None or os.fspath(item) == "":
            continue
        shown = show_path(item)
        areas.append((_real(item), shown))
        if os.path.isdir(item):
            with contextlib.suppress(GainSurgeryError, OSError):
                areas += [(r, shown) for r in allowed_roots(item)[1:]]
    return areas


def _noun(what: str) -> str:
    """``what`` after "another": "the training log" reads "another training log"."""
    return what[4:] if what.startswith("the ") else what


def check_output(out: str | os.PathLike[str] | None, *, inputs: Iterable[str | os.PathLike[str] | None] = (),
                 kind: OutputKind, overwrite: bool = False, what: str | None = None,
                 error: type[GainSurgeryError] = OutputError) -> Path:
    """Decide whether a command may write ``out``; return its absolute path (parent resolved).

    Refuses, with one line that says what to do:

    - ``""`` (an unset variable), ``.``, ``..``, a filesystem root or mount point, the
      current folder and the home folder, or any folder holding one of them, *even
      with overwrite*;
    - an ``out`` that is, contains or lies inside any of ``inputs`` (files or folders;
      symlinks resolved; the same file by a hard link; a cache snapshot's ``blobs/``);
    - an ``out`` that is a symbolic link (name the real path);
    - for ``kind="file"``: an existing folder or non-regular file (an existing
      regular file may be replaced: ordinary ``-o`` behaviour);
    - for ``kind="folder"``: an existing non-folder, and an existing folder unless
      ``overwrite``;
    - a parent folder that does not exist or cannot be written.

    ``what`` names the output in messages (default ``OUT`` / ``output file``).

    Example:
        >>> check_output("", inputs=["base"], kind="folder", overwrite=True)
        Traceback (most recent call last):
        ...
        gainsurgery.errors.OutputError: OUT is empty (an unset variable?); name a new folder, e.g. ./merged
    """
    noun = "folder" if kind == "folder" else "file"
    what = what or ("OUT" if kind == "folder" else "output file")
    raw = "" if out is None else os.fspath(out)
    if not raw.strip():
        raise error(f"{what} is empty (an unset variable?); name a new {noun}, e.g. ./merged")
    shown = show_path(raw)
    if "\x00" in raw:
        raise error(f"{what} {shown} is not a usable path")
    # "~" that reached us unexpanded (quoted, or from a variable) means the home folder, as it
    # does for BASE; never a new folder literally named "~" beside the current one.
    raw = _expand_home(raw)
    p = Path(raw)
    stripped = raw.rstrip("/")
    if p.name in (".", "..") or stripped in (".", "..") or stripped.endswith(("/.", "/..")):
        raise error(f"{what} {shown} names the current or the parent folder, which is never replaced; "
                    f"name a new {noun}")
    if p.name == "":
        raise error(f"{what} {shown} is a filesystem root, which is never written; name a new {noun}")
    target = _real(p.parent) / p.name
    try:
        lst: os.stat_result | None = os.lstat(target)
    except (FileNotFoundError, NotADirectoryError):
        lst = None
    except OSError as e:
        raise error(f"{what} {shown} cannot be checked ({e.strerror}); choose another {_noun(what)}") from None
    if lst is not None and stat.S_ISLNK(lst.st_mode):
        raise error(f"{what} {shown} is a symbolic link (to {show_path(os.readlink(target))}); "
                    f"name the real path instead")

    for prot, label in _protected():
        if target == prot:
            raise error(f"{what} {shown} is {label}, which is never replaced, even with --overwrite; "
                        f"name a new {noun}")
        if prot.is_relative_to(target):
            raise error(f"{what} {shown} holds {label} ({show_path(prot)}), which is never replaced, "
                        f"even with --overwrite; name a new {noun}")
    if lst is not None and os.path.ismount(target):
        raise error(f"{what} {shown} is a mount point (a filesystem root), which is never replaced; "
                    f"name a new {noun} inside it")

    for area, label in _input_areas(inputs):
        if target == area:
            raise error(f"{what} {shown} is the input {label}; write to a new {noun}")
        if area.is_relative_to(target):
            raise error(f"{what} {shown} holds the input {label}; write to a {noun} outside it")
        if target.is_relative_to(area):
            raise error(f"{what} {shown} lies inside the input {label}; write to a {noun} outside it")
        if lst is not None:
            with contextlib.suppress(OSError):
                if os.path.samestat(lst, os.stat(area)):
                    raise error(f"{what} {shown} is the input {label} (a hard link to it); "
                                f"write to a new {noun}")

    if lst is not None:
        if kind == "file":
            if stat.S_ISDIR(lst.st_mode):
                raise error(f"{what} {shown} is an existing folder, but a file is written here; "
                            "name a file (or a path inside the folder)")
            if not stat.S_ISREG(lst.st_mode):
                raise error(f"{what} {shown} exists and is not a regular file; name another file")
        else:
            if not stat.S_ISDIR(lst.st_mode):
                raise error(f"{what} {shown} exists and is not a folder, but a folder is written here; "
                            "name a new folder")
            if not overwrite:
                raise error(f"{what} already exists: {shown} (pass --overwrite to replace it)")
    parent = target.parent
    if not parent.is_dir():
        if os.path.lexists(parent):
            raise error(f"the path that should hold {what} is not a folder: {show_path(parent)}")
        raise error(f"the folder that should hold {what} does not exist: {show_path(parent)} (create it first)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise error(f"cannot write into {show_path(parent)} (permission denied); choose another {_noun(what)}")
    return target


def check_apart(outputs: Iterable[tuple[str, str | os.PathLike[str] | None]], *,
                error: type[GainSurgeryError] = OutputError) -> None:
    """Refuse two outputs of one run that are the same path, or one inside the other.

    ``outputs`` are ``(what, path)`` pairs (None paths are skipped), e.g. a training
    run's ``-o``, its log and its checkpoint folder: each is written on its own terms
    (a file replaced atomically, a folder claimed and published, a folder written step
    by step), so one can never be, or hold, another. Paths are compared with their
    parent folders resolved (:func:`output_path`).

    Example:
        >>> check_apart([("-o", "run/g.safetensors"), ("--checkpoint-dir", "run/g.safetensors")])
        Traceback (most recent call last):
        ...
        gainsurgery.errors.OutputError: --checkpoint-dir run/g.safetensors is also -o; give each output its own path
    """
    named = [(what, output_path(p), p) for what, p in outputs if p is not None and os.fspath(p).strip()]
    for i, (what_a, a, shown_a) in enumerate(named):
        for what_b, b, shown_b in named[i + 1:]:
            if a == b:
                raise error(f"{what_b} {show_path(shown_b)} is also {what_a}; give each output its own path")
            for (w_in, inner, s_in), (w_out, outer, s_out) in (((what_b, b, shown_b), (what_a, a, shown_a)),
                                                             ((what_a, a, shown_a), (what_b, b, shown_b))):
                if inner.is_relative_to(outer):
                    raise error(f"{w_in} {show_path(s_in)} lies inside {w_out} {show_path(s_out)}; "
                                "give each output its own path")


# --------------------------------------------------------------------------------
# Single files

def _stem(name: str) -> str:
    """N as used in our sibling names: N itself, or a hash of it when N is too long."""
    if len(name.encode("utf-8", "surrogateescape")) <= _MAX_STEM_BYTES:
        return name
    return "h" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:40]


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str] | None] = (),
                what: str | None = None, error: type[GainSurgeryError] = OutputError) -> Iterator[BinaryIO]:
    """Write a file whole or not at all: ``with atomic_file(path, inputs=[...]) as f: f.write(...)``.

    Checks ``out`` with :func:`check_output` (``kind="file"``), writes a temp sibling
    ``.NAME.gainsurgery-HEX.part`` (created exclusively, never through a link, with
    the permissions a plain ``open`` gives: 0666 & ~umask), fsyncs it, renames it over
    ``out`` (an existing regular file is replaced; a folder never) and fsyncs the
    folder. If the block raises, the temp is removed and ``out`` is untouched.

    Example:
        >>> with atomic_file("report.json", inputs=[base]) as f:  # doctest: +SKIP
        ...     f.write(b'{"ok": true}')
    """
    target = check_output(out, inputs=inputs, kind="file", what=what, error=error)
    what = what or "output file"
    tmp = target.parent / f".{_stem(target.name)}.{_TAG}-{secrets.token_hex(16)}.part"
    try:
        # 0o666: open() applies the umask, so the file gets the permissions a plain open gives.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        raise error(f"{what} {show_path(out)}: cannot create a file in {show_path(target.parent)} "
                    f"({e.strerror})") from None
    f = os.fdopen(fd, "wb")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        try:
            os.replace(tmp, target)
        except IsADirectoryError:
            raise error(f"{what} {show_path(out)} became a folder while it was written; "
                        "it was left untouched") from None
        fsync_dir(target.parent)
    except BaseException:
        # Closing flushes what is buffered, which fails again on a full disk: the temp goes regardless.
        with contextlib.suppress(OSError):
            f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_file(out: str | os.PathLike[str], data: bytes | str, *,
               inputs: Iterable[str | os.PathLike[str] | None] = (), what: str | None = None,
               error: type[GainSurgeryError] = OutputError) -> Path:
    """Write ``data`` (``str`` as UTF-8) to ``out`` atomically (see :func:`atomic_file`); return the path.

    Example:
        >>> write_file("gains.json", '{"a": 1}\\n', inputs=["base"])  # doctest: +SKIP
        PosixPath('/work/gains.json')
    """
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_file(out, inputs=inputs, what=what, error=error) as f:
        f.write(payload)
    return output_path(out)


def write_json(out: str | os.PathLike[str], value: object, *, inputs: Iterable[str | os.PathLike[str] | None] = (),
               what: str | None = None, error: type[GainSurgeryError] = OutputError, indent: int | None = 2) -> Path:
    """Write ``value`` as JSON (plus a final newline) to ``out`` atomically (see :func:`write_file`).

    Example:
        >>> write_json("results.json", {"ppl": 12.5}, inputs=["model"])  # doctest: +SKIP
        PosixPath('/work/results.json')
    """
    return write_file(out, json.dumps(value, indent=indent) + "\n", inputs=inputs, what=what, error=error)


def open_log_file(out: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str] | None] = (),
                  what: str | None = None, error: type[GainSurgeryError] = OutputError,
                  append: bool = False) -> TextIO:
    """Open a file written as it grows (a training log): checked like any output, never through a link.

    :func:`check_output` first; then the file is created or truncated with
    ``O_NOFOLLOW`` (a link planted at the name is refused, never followed); ``append``
    keeps what is there (a resumed run). Unlike :func:`atomic_file` the content is
    visible while it is written. The caller closes it.

    Example:
        >>> with open_log_file("run.train.jsonl", inputs=["base"]) as log:  # doctest: +SKIP
        ...     log.write('{"step": 1}\\n')
    """
    target = check_output(out, inputs=inputs, kind="file", what=what, error=error)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
                     | os.O_NOFOLLOW | os.O_NONBLOCK
                     | getattr(os, "O_CLOEXEC", 0), 0o666)
    except OSError as e:
        raise error(f"{what or 'output file'} {show_path(out)} cannot be written ({e.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{what or 'output file'} {show_path(out)} is not a regular file; name another file")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "w", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise


def _expand_home(raw: str) -> str:
    return os.path.expanduser(raw) if raw == "~" or raw.startswith("~/") else raw


def output_path(out: str | os.PathLike[str]) -> Path:
    """``out`` with its parent folder resolved and its own name kept: what :func:`check_output` returns.

    Example:
        >>> output_path("/tmp/../tmp/merged")
        PosixPath('/tmp/merged')
    """
    p = Path(_expand_home(os.fspath(out)))
    return _real(p.parent) / p.name


# --------------------------------------------------------------------------------
# Folder claims

def _names(stem: str, token: str) -> dict[str, str]:
    base = f".{stem}.{_TAG}-{token}"
    return {"claim": base + ".claim", "tmp": base + ".tmp", "old": base + ".old"}


def _lock_name(stem: str) -> str:
    return f".{stem}.{_TAG}.lock"


def _open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0), mode)


def _take_lock(path: Path, what: str, shown: str, error: type[GainSurgeryError]) -> int:
    """Take the exclusive lock on ``path`` (created if needed) without waiting; return its fd.

    After locking, check that ``path`` still names the locked inode: a finishing run
    unlinks its lock file, and a lock taken on an unlinked inode would exclude nobody.
    """
    for _ in range(20):
        try:
            fd = _open_nofollow(path, os.O_RDONLY | os.O_CREAT)
        except OSError as e:
            raise error(f"cannot create the lock file {show_path(path)} for {what} {shown} ({e.strerror}); "
                        "remove it if it is not a plain file") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise error(f"the lock file {show_path(path)} is not a plain file; remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise error(f"{what} {shown} is being written by another gainsurgery run (it holds "
                            f"{show_path(path.name)}); wait for it to finish or choose another "
                            f"{_noun(what)}") from None
            try:
                now = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                now = None
            if now is not None and os.path.samestat(now, st):
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # lost a race with a finishing run's unlink: take the new file
    raise error(f"could not lock {what} {shown}: its lock file keeps changing; try again")


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


@contextlib.contextmanager
def lock_output(out: str | os.PathLike[str], *, what: str = "output file",
                error: type[GainSurgeryError] = OutputError) -> Iterator[Path]:
    """Hold ``out``'s lock for a run that writes it at the end (a trained gain file) or as it goes (a log).

    The same lock :func:`claim_folder` takes (``P/.N.gainsurgery.lock``, an exclusive
    ``flock`` seen across processes and PID namespaces, gone with a killed run): a
    second run writing the same ``out`` fails at once instead of both writing it (two
    logs interleaved, one result silently replacing the other). Nothing is written to
    ``out`` here; write it with :func:`atomic_file` or :func:`open_log_file` while the
    lock is held. Yields ``out`` with its parent resolved.

    Example:
        >>> with lock_output("legal.safetensors", what="-o"):  # doctest: +SKIP
        ...     train_for_an_hour()
        ...     write_file("legal.safetensors", data)
    """
    target = output_path(out)
    lock_path = target.parent / _lock_name(_stem(target.name))
    fd = _take_lock(lock_path, what, show_path(out), error)
    try:
        yield target
    finally:
        # Unlink while still holding it; a concurrent opener re-checks the inode (see _take_lock).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock_path)
        os.close(fd)


@contextlib.contextmanager
def hold_lock(path: str | os.PathLike[str], *, shared: bool = False, what: str, busy_ok: bool = False,
              error: type[GainSurgeryError] = OutputError) -> Iterator[bool]:
    """Hold a lock file inside a folder this run owns, without waiting; fail at once if it is taken.

    For work that several processes share (an experiment folder, where parallel workers
    hold it ``shared`` and a plain run holds it exclusively). Unlike :func:`lock_output`
    the lock file is never unlinked, so a shared holder can never be outlived by a
    second inode: it is a small file of the folder's own. It is opened with
    ``O_NOFOLLOW`` (a planted link is refused), must be a regular file, and the
    ``flock`` is seen across processes and PID namespaces and dies with its process.
    Yields True while the lock is held; with ``busy_ok`` a lock held elsewhere yields
    False (the caller skips the work) instead of raising ``error``.

    Example:
        >>> with hold_lock(out / ".experiment.lock", what=f"experiment {out}"):  # doctest: +SKIP
        ...     run_the_schedule()
    """
    p = Path(path)
    try:
        fd = _open_nofollow(p, os.O_RDONLY | os.O_CREAT)
    except OSError as e:
        raise error(f"cannot open the lock file {show_path(p)} ({e.strerror}); remove it if it is not a plain "
                    "file") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"the lock file {show_path(p)} is not a plain file; remove it")
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            if busy_ok:
                yield False
                return
            raise error(f"{what} is in use by another process (it holds {show_path(p.name)}); wait for it to "
                        "finish") from None
        yield True
    finally:
        os.close(fd)


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
    stem = _stem(name)
    pattern = re.compile(rf"\.{re.escape(stem)}\.{_TAG}-([0-9a-f]{{32}})\.claim")
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
            fd = _open_nofollow(claim, os.O_RDONLY)
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
        self._stem = _stem(out.name)
        self._lock_path = out.parent / _lock_name(self._stem)
        self._lock_fd: int | None = None
        self._claim_fd: int | None = None
        self.token = secrets.token_hex(16)
        names = _names(self._stem, self.token)
        self._claim_path = out.parent / names["claim"]
        self.tmp = out.parent / names["tmp"]
        self._old = out.parent / names["old"]

    # -- lifecycle -----------------------------------------------------------------

    def _start(self) -> None:
        self._lock_fd = _take_lock(self._lock_path, self.what, self._shown, self.error)
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
        fd = _open_nofollow(self._claim_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
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
            # Unlink while still holding it; a concurrent opener re-checks the inode (see _take_lock).
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._lock_path)
            os.close(self._lock_fd)
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
