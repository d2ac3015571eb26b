"""Files that appear whole or not at all, and the renames and fsyncs that make them so.

Every file gainsurgery creates is created here, never through a link
(:func:`open_nofollow`): a checked output with :func:`atomic_file` /
:func:`write_file` / :func:`write_json` (a temp sibling with an unguessable name,
fsynced, renamed into place, the folder fsynced), a log written as it grows with
:func:`open_log_file`, and a file inside a folder the run already holds (a claimed
temp, a locked work folder) with :func:`open_nofollow` or :func:`replace_file`.

Renames never replace by accident: :func:`rename_noreplace` (``renameat2`` with
``RENAME_NOREPLACE``) and :func:`rename_exchange` (``RENAME_EXCHANGE``), with a
fallback where the filesystem refuses the flags. Folders are claimed and
published by :mod:`gainsurgery.io.claims`, which builds on these.

Example:
    >>> with atomic_file("report.json", inputs=["base"]) as f:  # doctest: +SKIP
    ...     f.write(b'{"ok": true}')
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import platform
import secrets
import stat
import sys
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator, TextIO

from gainsurgery.errors import GainSurgeryError, OutputError
from gainsurgery.io.checks import check_output, output_path
from gainsurgery.io.inputs import show_path

#: renameat2 flags (linux/fs.h).
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
#: renameat2 syscall numbers, for a libc without the wrapper (glibc < 2.28, musl < 1.2.?).
_SYS_RENAMEAT2 = {"x86_64": 316, "amd64": 316, "aarch64": 276, "arm64": 276}
#: errnos meaning "this kernel/filesystem cannot do that rename flag" (not "it exists").
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP,
                getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}

#: The word in every name gainsurgery gives its own siblings of an output.
TAG = "gainsurgery"
# Longest N used verbatim in our sibling names: ".N.gainsurgery-<32 hex>.claim.part" must fit NAME_MAX (255).
_MAX_STEM_BYTES = 180

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def sibling_stem(name: str) -> str:
    """N as used in the names of our siblings of output N: N itself, or a hash of it when N is too long.

    Example:
        >>> sibling_stem("merged"), len(sibling_stem("m" * 250))
        ('merged', 41)
    """
    if len(name.encode("utf-8", "surrogateescape")) <= _MAX_STEM_BYTES:
        return name
    return "h" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:40]


# --------------------------------------------------------------------------------
# Opening without following links

def open_nofollow(path: str | os.PathLike[str], flags: int, mode: int = 0o666, *, dir_fd: int | None = None,
                  regular: bool = True) -> int:
    """Open ``path`` never through a link (``O_NOFOLLOW``, ``O_CLOEXEC``); return the descriptor.

    The open does not block (``O_NONBLOCK``: a FIFO planted at the name cannot hang
    it); the descriptor is made blocking again before it is returned. ``regular``: the
    opened file must be a regular file (checked on the descriptor), else OSError
    (EINVAL). ``mode`` is for a file created here (the umask applies).

    Raises:
        OSError: ELOOP for a link, EEXIST with ``O_EXCL``, EINVAL for a non-regular file...

    Example:
        >>> fd = open_nofollow(claim.tmp / "config.json", os.O_WRONLY | os.O_CREAT | os.O_EXCL)  # doctest: +SKIP
    """
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC, mode, dir_fd=dir_fd)
    try:
        if regular and not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        if not flags & os.O_NONBLOCK:
            os.set_blocking(fd, True)
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_folder_nofollow(path: str | os.PathLike[str]) -> int:
    """Open the folder ``path`` itself, never through a link (ELOOP or ENOTDIR for one); return the descriptor.

    For ``*at`` calls inside a folder someone could swap for a link after it was checked.

    Example:
        >>> dir_fd = open_folder_nofollow("legal.checkpoints")  # doctest: +SKIP
    """
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC)


def create_file(path: str | os.PathLike[str], *, mode: int = 0o666, replace: bool = False,
                read: bool = False) -> BinaryIO:
    """Create a file inside a folder this run holds (a claimed temp); never through a link.

    ``replace``: an existing regular file at the name is emptied (else EEXIST);
    ``read``: open it read-write (a writer that reads back what it wrote). Permissions
    are ``mode & ~umask`` (what a plain ``open`` gives by default).

    Example:
        >>> with create_file(claim.tmp / "model.safetensors.index.json") as f:  # doctest: +SKIP
        ...     f.write(index_bytes)
    """
    flags = (os.O_RDWR if read else os.O_WRONLY) | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    return os.fdopen(open_nofollow(path, flags, mode), "rb+" if read else "wb")


# --------------------------------------------------------------------------------
# Renames that never replace by accident

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
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike[str]) -> None:
    """fsync every regular file and folder under ``folder`` (links not followed), deepest first."""
    for here, _dirs, files in os.walk(folder, topdown=False, followlinks=False):
        for name in files:
            p = os.path.join(here, name)
            if stat.S_ISREG(os.lstat(p).st_mode):
                fd = open_nofollow(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(here)


# --------------------------------------------------------------------------------
# Single files, whole or not at all

@contextlib.contextmanager
def _written_whole(target: Path, mode: int, cannot_create: Callable[[OSError], BaseException]) -> Iterator[BinaryIO]:
    """Yield a temp sibling of ``target``; after the block: fsync it, rename it over ``target``, fsync the folder."""
    tmp = target.parent / f".{sibling_stem(target.name)}.{TAG}-{secrets.token_hex(16)}.part"
    try:
        fd = open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as e:
        raise cannot_create(e) from None
    f = os.fdopen(fd, "wb")
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        # Closing flushes what is buffered, which fails again on a full disk: the temp goes regardless.
        with contextlib.suppress(OSError):
            f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_file(out: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str] | None] = (),
                what: str | None = None, error: type[GainSurgeryError] = OutputError) -> Iterator[BinaryIO]:
    """Write a file whole or not at all: ``with atomic_file(path, inputs=[...]) as f: f.write(...)``.

    Checks ``out`` with :func:`~gainsurgery.io.checks.check_output` (``kind="file"``),
    writes a temp sibling ``.NAME.gainsurgery-HEX.part`` (created exclusively, never
    through a link, with the permissions a plain ``open`` gives: 0666 & ~umask),
    fsyncs it, renames it over ``out`` (an existing regular file is replaced; a folder
    never) and fsyncs the folder. If the block raises, the temp is removed and ``out``
    is untouched.

    Example:
        >>> with atomic_file("report.json", inputs=[base]) as f:  # doctest: +SKIP
        ...     f.write(b'{"ok": true}')
    """
    target = check_output(out, inputs=inputs, kind="file", what=what, error=error)
    what = what or "output file"

    def cannot_create(e: OSError) -> BaseException:
        return error(f"{what} {show_path(out)}: cannot create a file in {show_path(target.parent)} ({e.strerror})")

    try:
        with _written_whole(target, 0o666, cannot_create) as f:
            yield f
    except IsADirectoryError:
        raise error(f"{what} {show_path(out)} became a folder while it was written; it was left untouched") from None


def replace_file(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path``, a file inside a folder this run holds (a locked work folder), whole or not at all.

    The same temp-fsync-rename as :func:`atomic_file`, without the output checks
    (the caller claimed the folder): a kill leaves the old file or the new one.

    Example:
        >>> replace_file(work.path / "state.json", b'{"done": 1}')  # doctest: +SKIP
    """
    target = Path(path)
    with _written_whole(target, mode, lambda e: e) as f:
        f.write(data)


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

    :func:`~gainsurgery.io.checks.check_output` first; then the file is created or
    truncated with ``O_NOFOLLOW`` (a link planted at the name is refused, never
    followed); ``append`` keeps what is there (a resumed run). Unlike
    :func:`atomic_file` the content is visible while it is written. The caller closes it.

    Example:
        >>> with open_log_file("run.train.jsonl", inputs=["base"]) as log:  # doctest: +SKIP
        ...     log.write('{"step": 1}\\n')
    """
    target = check_output(out, inputs=inputs, kind="file", what=what, error=error)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = open_nofollow(target, flags, regular=False)
    except OSError as e:
        raise error(f"{what or 'output file'} {show_path(out)} cannot be written ({e.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise error(f"{what or 'output file'} {show_path(out)} is not a regular file; name another file")
        return os.fdopen(fd, "w", encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise
