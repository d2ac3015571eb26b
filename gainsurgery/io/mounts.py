"""Mount points, told by mount identity, and the one deletion that never crosses one.

A bind mount of a folder from the same filesystem has the same ``st_dev`` as its
parent, and ``os.path.ismount`` (which compares ``st_dev`` and inodes with ``..``)
does not see it; ``shutil.rmtree`` walks into it and deletes what is mounted there,
someone else's data. So a mount point is told by *mount identity*:

1. ``statx`` with ``STATX_MNT_ID`` (Linux 5.8+): an entry whose mount id differs
   from its folder's, or that carries ``STATX_ATTR_MOUNT_ROOT``, is a mount point;
2. where ``statx`` lacks those (older kernels), a different ``st_dev``, or a path
   listed as a mount point in ``/proc/self/mountinfo`` (read only then);
3. elsewhere (not Linux), a different ``st_dev`` or ``os.path.ismount``.

:func:`remove_tree` deletes a folder we may delete (our temp, an old OUT at our
marked name, a work folder's leftover) walking it by descriptors, never following a
link; it first looks through the whole tree and deletes nothing if a mount point
is inside, and it checks every folder again on the descriptor it descends into, so
a mount that appears meanwhile stops the deletion there.

Example:
    >>> remove_tree(".merged.gainsurgery-3fa1.tmp")  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from gainsurgery.io.pausepoints import pause_point

# linux/stat.h and linux/fcntl.h
_STATX_MNT_ID = 0x1000
_STATX_ATTR_MOUNT_ROOT = 0x2000
_AT_EMPTY_PATH = 0x1000
_AT_SYMLINK_NOFOLLOW = 0x100
_AT_NO_AUTOMOUNT = 0x800
#: statx syscall numbers, for a libc without the wrapper (glibc < 2.28).
_SYS_STATX = {"x86_64": 332, "amd64": 332, "aarch64": 291, "arm64": 291}
#: Largest /proc/self/mountinfo read, in bytes (a machine with tens of thousands of mounts).
_MAX_MOUNTINFO_BYTES = 64 << 20

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_PATH_FLAGS = getattr(os, "O_PATH", os.O_RDONLY) | getattr(os, "O_CLOEXEC", 0)


class MountPointError(OSError):
    """A deletion met a mount point and stopped there (errno EBUSY; ``filename`` is the mount point)."""

    def __init__(self, strerror: str, mount: str | os.PathLike[str]) -> None:
        super().__init__(errno.EBUSY, strerror, os.fspath(mount))


class _Timestamp(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_int64), ("tv_nsec", ctypes.c_uint32), ("reserved", ctypes.c_int32)]


class _Statx(ctypes.Structure):
    """struct statx (256 bytes), up to the mount id; the rest is padding here."""

    _fields_ = [("mask", ctypes.c_uint32), ("blksize", ctypes.c_uint32), ("attributes", ctypes.c_uint64),
                ("nlink", ctypes.c_uint32), ("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32),
                ("mode", ctypes.c_uint16), ("spare0", ctypes.c_uint16), ("ino", ctypes.c_uint64),
                ("size", ctypes.c_uint64), ("blocks", ctypes.c_uint64), ("attributes_mask", ctypes.c_uint64),
                ("atime", _Timestamp), ("btime", _Timestamp), ("ctime", _Timestamp), ("mtime", _Timestamp),
                ("rdev_major", ctypes.c_uint32), ("rdev_minor", ctypes.c_uint32),
                ("dev_major", ctypes.c_uint32), ("dev_minor", ctypes.c_uint32),
                ("mnt_id", ctypes.c_uint64), ("spare", ctypes.c_uint64 * 13)]


_statx_fn: list = []


def _statx_call():  # noqa: ANN202 - a ctypes function, or None
    """libc's statx, or a caller of the raw syscall; None where there is neither."""
    if not _statx_fn:
        fn = None
        libc = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
            except OSError:
                libc = None
        if libc is not None and getattr(libc, "statx", None) is not None:
            fn = libc.statx
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_Statx)]
            fn.restype = ctypes.c_int
        elif libc is not None and platform.machine().lower() in _SYS_STATX:
            fn = _raw_statx(libc, _SYS_STATX[platform.machine().lower()])
        _statx_fn.append(fn)
    return _statx_fn[0]


def _raw_statx(libc: ctypes.CDLL, nr: int):  # noqa: ANN202 - a function like libc's statx
    """statx through ``syscall(nr, ...)``, for a libc without the wrapper (glibc < 2.28)."""
    libc.syscall.restype = ctypes.c_long

    def statx(dirfd: int, path: bytes, flags: int, mask: int, buf) -> int:  # noqa: ANN001
        return libc.syscall(ctypes.c_long(nr), ctypes.c_int(dirfd), ctypes.c_char_p(path), ctypes.c_int(flags),
                            ctypes.c_uint(mask), buf)

    return statx


@dataclass(frozen=True)
class _Identity:
    dev: int
    mnt_id: int | None     # None: statx gave none (an old kernel, not Linux)
    mount_root: bool | None  # None: unknown


def _identity(fd: int, name: str | None = None) -> _Identity:
    """Where the object ``fd`` (or the entry ``name`` of folder ``fd``, not followed) lives."""
    st = os.stat(name, dir_fd=fd, follow_symlinks=False) if name is not None else os.fstat(fd)
    fn = _statx_call()
    if fn is None:
        return _Identity(st.st_dev, None, None)
    buf = _Statx()
    path = os.fsencode(name) if name is not None else b""
    flags = (_AT_SYMLINK_NOFOLLOW | _AT_NO_AUTOMOUNT) if name is not None else (_AT_EMPTY_PATH | _AT_NO_AUTOMOUNT)
    if fn(fd, path, flags, _STATX_MNT_ID, ctypes.byref(buf)) != 0:
        return _Identity(st.st_dev, None, None)  # ENOSYS (a kernel before statx), a seccomp filter...
    mnt = int(buf.mnt_id) if buf.mask & _STATX_MNT_ID else None
    root = bool(buf.attributes & _STATX_ATTR_MOUNT_ROOT) if buf.attributes_mask & _STATX_ATTR_MOUNT_ROOT else None
    return _Identity(st.st_dev, mnt, root)


def _unescape(field: bytes) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes are written as octal escapes."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field))


class _Mounts:
    """Tells whether a folder entry is a mount point, the best way this system allows (module docstring)."""

    def __init__(self) -> None:
        self._listed: frozenset[str] | None = None

    def listed(self) -> frozenset[str]:
        """Mount points of this mount namespace from /proc/self/mountinfo (empty where it cannot be read)."""
        if self._listed is None:
            points: set[str] = set()
            try:
                with open("/proc/self/mountinfo", "rb") as f:
                    data = f.read(_MAX_MOUNTINFO_BYTES)
            except OSError:
                data = b""
            for line in data.splitlines():
                fields = line.split(b" ")
                if len(fields) > 4:
                    points.add(_unescape(fields[4]))
            self._listed = frozenset(points)
        return self._listed

    def crosses(self, folder: _Identity, entry: _Identity, path: Path) -> bool:
        """True when ``entry`` (at ``path``, inside the folder ``folder``) is on another mount."""
        if entry.mount_root:
            return True
        if folder.mnt_id is not None and entry.mnt_id is not None:
            return entry.mnt_id != folder.mnt_id
        if entry.dev != folder.dev:
            return True
        if sys.platform.startswith("linux"):
            return os.fspath(path) in self.listed()
        return os.path.ismount(path)


def is_mount_point(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` (not followed if a link) is a mount point: a bind mount from the same filesystem too.

    Example:
        >>> is_mount_point("/")
        True
    """
    p = Path(os.path.abspath(path))
    if p.parent == p:
        return True
    parent = Path(os.path.realpath(p.parent))
    try:
        fd = os.open(parent, _PATH_FLAGS | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        return _Mounts().crosses(_identity(fd), _identity(fd, p.name), parent / p.name)
    except OSError:
        return False
    finally:
        os.close(fd)


def mount_inside(folder: str | os.PathLike[str]) -> Path | None:
    """The first mount point at or under ``folder`` (links not followed), or None.

    Example:
        >>> mount_inside(".merged.gainsurgery-3fa1.tmp")  # doctest: +SKIP
        PosixPath('/work/.merged.gainsurgery-3fa1.tmp/cache')
    """
    return _walk(Path(folder), delete=False, pause_step=None)


def remove_tree(folder: str | os.PathLike[str], *, pause_step: str | None = None) -> None:
    """Delete a folder we may delete (our temp, an old OUT, a dead run's leftover), never crossing a mount.

    The folder itself must be a real folder (a link is refused, ELOOP/ENOTDIR).
    If a mount point is at or under it, nothing is deleted and
    :class:`MountPointError` names it ("holds a mount point; not deleted"). If one
    appears while the folder is deleted, the deletion stops there and the error says
    so ("... deleted up to it"): what was already deleted is gone, the rest stays.
    ``pause_step``: a test pause point (:mod:`gainsurgery.io.pausepoints`) passed once
    the first file is deleted.

    Raises:
        MountPointError: a mount point inside (or ``folder`` is one).
        OSError: anything else that stops the deletion (permissions, I/O).

    Example:
        >>> remove_tree(".merged.gainsurgery-3fa1.tmp")  # doctest: +SKIP
    """
    mount = _walk(Path(folder), delete=False, pause_step=None)
    if mount is not None:
        raise MountPointError("holds a mount point; not deleted", mount)
    _walk(Path(folder), delete=True, pause_step=pause_step)


def _walk(folder: Path, *, delete: bool, pause_step: str | None) -> Path | None:
    """Look through (and with ``delete``, delete) ``folder`` by descriptors; return the first mount point met.

    Deleting, a mount point met raises :class:`MountPointError` instead.
    """
    folder = Path(os.path.abspath(folder))
    real_parent = Path(os.path.realpath(folder.parent))
    mounts = _Mounts()
    parent_fd = os.open(real_parent, _PATH_FLAGS | os.O_DIRECTORY)  # O_PATH: no read permission needed
    stack: list[tuple[int, Path, _Identity, list[os.DirEntry]]] = []
    paused = pause_step is None

    def met(where: Path) -> Path:
        if delete:
            raise MountPointError("holds a mount point that appeared while it was deleted; deleted up to it", where)
        return where

    try:
        top = os.open(folder.name, _DIR_FLAGS, dir_fd=parent_fd)
        top_id = _identity(top)
        stack.append((top, real_parent / folder.name, top_id, []))
        if mounts.crosses(_identity(parent_fd), top_id, real_parent / folder.name):
            return met(real_parent / folder.name)
        stack[-1][3].extend(os.scandir(top))
        while stack:
            fd, path, ident, entries = stack[-1]
            if not entries:
                stack.pop()
                os.close(fd)
                if delete and stack:
                    os.rmdir(path.name, dir_fd=stack[-1][0])
                continue
            entry = entries.pop()
            here = path / entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    child = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
                    child_id = _identity(child)
                    stack.append((child, here, child_id, []))
                    if mounts.crosses(ident, child_id, here):
                        return met(here)
                    stack[-1][3].extend(os.scandir(child))
                    continue
                if mounts.crosses(ident, _identity(fd, entry.name), here):  # a file bind-mounted here
                    return met(here)
                if delete:
                    os.unlink(entry.name, dir_fd=fd)
            except FileNotFoundError:
                continue  # gone meanwhile: nothing left to delete
            if delete and not paused:
                paused = True
                pause_point(pause_step)
        if delete:
            os.rmdir(folder.name, dir_fd=parent_fd)
        return None
    finally:
        for fd, *_ in stack:
            os.close(fd)
        os.close(parent_fd)
