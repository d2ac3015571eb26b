"""A write that fails for want of room is one line that says where and what to do.

A full disk (``ENOSPC``), a full quota (``EDQUOT``) and a file-size limit (``EFBIG``:
``ulimit -f``/``RLIMIT_FSIZE``, or the filesystem's largest file) can strike any write
of any command. The command's own cleanup (a claimed temp folder removed, a checkpoint's
temp folder removed, a work folder cleared) runs as the error unwinds; this module only
decides what the user reads: :func:`no_room` turns such a failure, raised by our code or
by a library that wraps it (safetensors reports ``I/O error: ... (os error 28)``), into a
:class:`~gainsurgery.errors.GainSurgeryError` naming what was being written and where.
Every other error passes through unchanged.

Example:
    >>> with no_room("the adapter folder", "adapter/"):  # doctest: +SKIP
    ...     write_adapter(tmp)
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from typing import Iterator

from gainsurgery.errors import GainSurgeryError, OutputError
from gainsurgery.io.inputs import show_path

#: errnos that mean "no room for these bytes" (not "not allowed" or "no such folder").
NO_ROOM_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)})
# How Rust's io::Error (safetensors) and Python's OSError print an errno inside a message.
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")


def no_room_errno(exc: BaseException) -> int | None:
    """The errno of ``exc`` (or of an error in its chain) when it is one of :data:`NO_ROOM_ERRNOS`, else None.

    Libraries that wrap an ``OSError`` in their own exception (safetensors' serializer)
    are recognised by the errno their message carries.

    Example:
        >>> no_room_errno(OSError(errno.ENOSPC, "No space left on device")) == errno.ENOSPC
        True
        >>> no_room_errno(RuntimeError("Error while serializing: I/O error: File too large (os error 27)"))
        27
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_ROOM_ERRNOS:
            return exc.errno
        for m in _ERRNO_IN_TEXT.finditer(str(exc)[:4096]):
            n = int(m.group(1) or m.group(2))
            if n in NO_ROOM_ERRNOS:
                return n
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def no_room_message(code: int, what: str, where: str | os.PathLike[str] | None) -> str:
    """One line for a write of ``what`` (in the folder ``where``) that failed with errno ``code``.

    Example:
        >>> no_room_message(errno.ENOSPC, "OUT merged", "/data")
        'disk full: no room to write OUT merged in /data (No space left on device); free some space or write elsewhere'
    """
    place = f" in {show_path(where)}" if where is not None and os.fspath(where) else ""
    if code == errno.EFBIG:
        return (f"file too large: writing {what}{place} hit the largest file allowed here (the file-size limit, "
                "`ulimit -f`, or the filesystem's); raise it or write elsewhere")
    if code != errno.ENOSPC and code == getattr(errno, "EDQUOT", None):
        return f"disk quota exceeded: no room to write {what}{place}; free some space or write elsewhere"
    return f"disk full: no room to write {what}{place} ({os.strerror(errno.ENOSPC)}); free some space or write elsewhere"


@contextlib.contextmanager
def no_room(what: str, where: str | os.PathLike[str] | None = None, *, left: str = "nothing was left behind",
            error: type[GainSurgeryError] = OutputError) -> Iterator[None]:
    """Turn a failed write for want of room inside the block into ``error`` (one line); pass anything else on.

    Args:
        what: what was being written (``"OUT"``, ``"a training checkpoint"``).
        where: the folder it was written in, shown in the message.
        left: what the user finds afterwards (the block's own cleanup must make it true).
        error: the error class raised.

    Example:
        >>> with no_room("the plot", "out/"):
        ...     raise OSError(errno.ENOSPC, "No space left on device")
        Traceback (most recent call last):
        ...
        gainsurgery.errors.OutputError: disk full: no room to write the plot in out/ (No space left on device); free some space or write elsewhere; nothing was left behind
    """
    try:
        yield
    except GainSurgeryError:
        raise
    except Exception as exc:
        code = no_room_errno(exc)
        if code is None:
            raise
        raise error(f"{no_room_message(code, what, where)}; {left}") from None
