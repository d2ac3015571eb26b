"""Reading input folders that someone else made.

A file is read from an input folder (BASE, an adapter folder, the folder beside a
gain file) only if, symlinks resolved, it is a regular file inside that folder. When
the folder is a Hugging Face cache snapshot (``.../models--ORG--NAME/snapshots/REV/``,
whose files are relative symlinks into ``../../blobs/``) the repo's own ``blobs/``
folder counts as inside too. Everything else is refused with one line naming the
file: a link out of the folder, a FIFO, a socket, a device, a folder where a file
is expected, anything under ``/proc``, ``/sys`` or ``/dev``.

Checking never blocks: types are judged with ``stat`` (which never opens the file)
before anything is opened, files are opened with ``O_NONBLOCK`` (a FIFO swapped in
after the check cannot hang the open) and ``O_NOFOLLOW``, and the opened descriptor
is checked again with ``fstat`` against the inode that was validated, so a swap
between check and use is caught.

What a BASE argument names (a local folder, an embedded model, a Hub repo) is
decided by :mod:`gainsurgery.sources.spec`, which shows paths with :func:`show_path`.

Example:
    >>> with open_input(base, "config.json") as f:   # doctest: +SKIP
    ...     raw = f.read(1 << 20)
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Literal

from gainsurgery.errors import GainSurgeryError, UnsafeInputError

#: Pseudo-filesystems: their "files" are kernel state (``/proc/self/environ`` holds
#: the token), never checkpoint data.
FORBIDDEN_ROOTS: tuple[Path, ...] = (Path("/proc"), Path("/sys"), Path("/dev"))

# huggingface_hub names a repo's cache folder "<type>s--<org>--<name>".
_REPO_CACHE_RE = re.compile(r"(?:models|datasets|spaces)--.+", re.ASCII | re.DOTALL)

_KIND_NAMES = {
    stat.S_IFREG: "a file",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a folder",
    stat.S_IFLNK: "a symbolic link",
}


#: Longest name or path a message shows whole, in characters; a longer one (a 5,000-character
#: tensor name in a hostile header) is shown by its two ends, so an error stays one short line.
MAX_SHOWN_CHARS = 512


def show_path(path: str | os.PathLike[str]) -> str:
    """How a path (or a name) someone else chose is shown in a one-line message.

    Printable paths are shown as they are; a path holding a newline or another
    control character is shown as a Python string literal, so it can neither
    break the one-line rule nor fake a second line. One longer than
    :data:`MAX_SHOWN_CHARS` is shown by its beginning and end.

    Example:
        >>> show_path("base/config.json"), show_path("a\\nb")
        ('base/config.json', "'a\\\\nb'")
        >>> len(show_path("x" * 100_000)) < 600
        True
    """
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if len(text) > MAX_SHOWN_CHARS:
        half = MAX_SHOWN_CHARS // 2 - 20
        text = f"{text[:half]}...({len(text) - 2 * half} characters)...{text[-half:]}"
    return text if text.isprintable() else repr(text)


def show_name(name: object) -> str:
    """A name or value someone else chose (a tensor key, a recorded setting), quoted for a one-line message.

    ``repr`` (control characters escaped), cut to its two ends past :data:`MAX_SHOWN_CHARS`.

    Example:
        >>> show_name("w\\n"), show_name(3), len(show_name("x" * 10_000)) < 600
        ("'w\\\\n'", '3', True)
    """
    text = repr(name)
    if len(text) > MAX_SHOWN_CHARS:
        half = MAX_SHOWN_CHARS // 2 - 20
        text = f"{text[:half]}...({len(text) - 2 * half} characters)...{text[-half:]}"
    return text


def _kind(mode: int) -> str:
    return _KIND_NAMES.get(stat.S_IFMT(mode), "not a regular file")


def _is_within(path: Path, root: Path) -> bool:
    """True when the resolved ``path`` is ``root`` or lies below it (both resolved)."""
    return path == root or root in path.parents


def _forbidden_root(resolved: Path) -> Path | None:
    for root in FORBIDDEN_ROOTS:
        if _is_within(resolved, root):
            return root
    return None


def _stat_resolved(path: str | os.PathLike[str], error: type[GainSurgeryError], *,
                   forbidden: Callable[[Path, Path], str], missing: str) -> tuple[Path, os.stat_result]:
    """``path`` resolved and stat'ed, refused under /proc, /sys or /dev (``forbidden(root, resolved)``
    gives that message) or when absent (``missing``); any other failure says it cannot be read."""
    resolved = Path(os.path.realpath(path))
    bad = _forbidden_root(resolved)
    if bad is not None:
        raise error(forbidden(bad, resolved))
    try:
        return resolved, os.stat(resolved)
    except FileNotFoundError:
        raise error(missing) from None
    except OSError as e:
        raise error(f"{show_path(path)}: cannot be read ({e.strerror})") from None


def allowed_roots(folder: str | os.PathLike[str], *,
                  error: type[GainSurgeryError] = UnsafeInputError) -> tuple[Path, ...]:
    """Resolved folders that files of the input folder ``folder`` may resolve into.

    That is ``folder`` itself (resolved) and, when ``folder`` is (or lies inside) a
    Hugging Face cache snapshot ``.../models--ORG--NAME/snapshots/REV/``, that repo's
    ``blobs/`` folder, provided ``blobs`` is a real folder and not itself a link
    (a ``blobs -> /`` link would otherwise let every file through).

    Raises ``error`` when ``folder`` does not exist, is not a folder, or lies under
    ``/proc``, ``/sys`` or ``/dev``.

    Example:
        >>> allowed_roots("~/.cache/huggingface/hub/models--gpt2--x/snapshots/abc")  # doctest: +SKIP
        (PosixPath('/home/me/.cache/huggingface/hub/models--gpt2--x/snapshots/abc'),
         PosixPath('/home/me/.cache/huggingface/hub/models--gpt2--x/blobs'))
    """
    shown = show_path(folder)
    root, st = _stat_resolved(
        folder, error,
        forbidden=lambda bad, _: f"{shown}: lies under {bad}, which holds kernel state, not files; refusing to read from it",
        missing=f"no such folder: {shown}")
    if not stat.S_ISDIR(st.st_mode):
        raise error(f"{shown}: is {_kind(st.st_mode)}, not a folder")
    roots = [root]
    for snapshot in (root, *root.parents):
        repo = snapshot.parent.parent
        if snapshot.parent.name == "snapshots" and _REPO_CACHE_RE.fullmatch(repo.name):
            blobs = repo / "blobs"
            # lstat: a blobs folder that is itself a link would widen the allowed area.
            try:
                if stat.S_ISDIR(os.lstat(blobs).st_mode):
                    roots.append(blobs)
            except OSError:
                pass
            break
    return tuple(roots)


def _is_cache_snapshot(folder: str | os.PathLike[str]) -> bool:
    """True when ``folder`` is itself a Hugging Face cache snapshot (``.../models--ORG--NAME/snapshots/REV``)."""
    root = Path(os.path.realpath(folder))
    return root.parent.name == "snapshots" and _REPO_CACHE_RE.fullmatch(root.parent.parent.name) is not None


def _check_name(name: str, shown_folder: str, error: type[GainSurgeryError]) -> None:
    if not isinstance(name, str) or not name or "\x00" in name:
        raise error(f"{shown_folder}: file name {name!r} is not a usable name")
    parts = Path(name).parts
    if Path(name).is_absolute() or ".." in parts:
        raise error(f"{shown_folder}: file name {show_path(name)} is not a plain relative name inside the folder")


def _resolve_in(roots: tuple[Path, ...], folder: Path, name: str, *, missing_ok: bool,
                error: type[GainSurgeryError]) -> tuple[Path, os.stat_result] | None:
    """Resolve ``folder/name``; check it lands inside ``roots``; return it with its stat.

    The stat follows symlinks but never opens the file, so a FIFO cannot block here.
    """
    candidate = folder / name
    shown = show_path(candidate)
    resolved = Path(os.path.realpath(candidate))
    bad = _forbidden_root(resolved)
    if bad is not None:
        raise error(f"{shown}: resolves to {show_path(resolved)} under {bad}; refusing to read it")
    if not any(_is_within(resolved, r) for r in roots):
        where = " or ".join(show_path(r) for r in roots)
        raise error(f"{shown}: resolves to {show_path(resolved)}, outside {where}; refusing to read it")
    try:
        st = os.stat(resolved)
    except FileNotFoundError:
        if missing_ok:
            return None
        link = " (a broken symbolic link)" if os.path.islink(candidate) else ""
        raise error(f"{shown}: no such file{link}") from None
    except OSError as e:  # ELOOP, EACCES, ...
        raise error(f"{shown}: cannot be read ({e.strerror})") from None
    return resolved, st


def resolve_input(folder: str | os.PathLike[str], name: str, *, missing_ok: bool = False,
                  error: type[GainSurgeryError] = UnsafeInputError) -> Path | None:
    """Validate the file ``name`` inside the input folder ``folder``; return its resolved path.

    ``name`` is a relative name (``config.json``, ``sub/tokenizer.model``); it may
    be a symlink, but what it resolves to must be a regular file inside ``folder``
    (or inside the repo's ``blobs/`` for a cache snapshot, see :func:`allowed_roots`).
    Never opens the file. With ``missing_ok`` a missing file gives None instead
    of an error (for optional files such as ``generation_config.json``).

    Raises ``error`` with one line naming the file otherwise.

    Example:
        >>> resolve_input(base, "config.json")  # doctest: +SKIP
        PosixPath('/data/base/config.json')
    """
    roots = allowed_roots(folder, error=error)
    _check_name(name, show_path(folder), error)
    found = _resolve_in(roots, Path(folder), name, missing_ok=missing_ok, error=error)
    if found is None:
        return None
    resolved, st = found
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{show_path(Path(folder) / name)}: is {_kind(st.st_mode)}, not a regular file; "
                    "refusing to read it")
    return resolved


def _open_checked(resolved: Path, expected: os.stat_result, shown: str,
                  error: type[GainSurgeryError]) -> BinaryIO:
    """Open a validated path without blocking and check the descriptor is the validated inode."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(resolved, flags)
    except OSError as e:
        # ELOOP: the last component became a symlink after the check.
        raise error(f"{shown}: cannot be opened ({e.strerror}); refusing to read it") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{shown}: is {_kind(st.st_mode)}, not a regular file; refusing to read it")
        if (st.st_dev, st.st_ino) != (expected.st_dev, expected.st_ino):
            raise error(f"{shown}: changed while it was being opened; refusing to read it")
        # Regular files ignore O_NONBLOCK, but clear it so the file object behaves plainly.
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_input(folder: str | os.PathLike[str], name: str, *,
               error: type[GainSurgeryError] = UnsafeInputError) -> BinaryIO:
    """Open the file ``name`` of the input folder ``folder`` for binary reading, safely.

    Validates as :func:`resolve_input`, then opens the resolved path with
    ``O_NONBLOCK | O_NOFOLLOW`` and checks, on the opened descriptor, that it is
    a regular file and the very inode that was validated. The caller closes it.

    Example:
        >>> with open_input(base, "model.safetensors") as f:  # doctest: +SKIP
        ...     n = int.from_bytes(f.read(8), "little")
    """
    roots = allowed_roots(folder, error=error)
    _check_name(name, show_path(folder), error)
    shown = show_path(Path(folder) / name)
    resolved, st = _resolve_in(roots, Path(folder), name, missing_ok=False, error=error)  # type: ignore[misc]
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{shown}: is {_kind(st.st_mode)}, not a regular file; refusing to read it")
    return _open_checked(resolved, st, shown, error)


def open_regular(path: str | os.PathLike[str], *,
                 error: type[GainSurgeryError] = UnsafeInputError) -> BinaryIO:
    """Open a file the user named directly (a gain file, a data file) for binary reading.

    The user chose this path, so a symlink is followed, but what it resolves to
    must be a regular file outside ``/proc``, ``/sys`` and ``/dev``; the check never
    blocks and is repeated on the opened descriptor.

    Example:
        >>> with open_regular("gains.safetensors") as f:  # doctest: +SKIP
        ...     header_len = int.from_bytes(f.read(8), "little")
    """
    shown = show_path(path)
    resolved, st = _stat_resolved(
        path, error, forbidden=lambda bad, where: f"{shown}: resolves to {show_path(where)} under {bad}; refusing to read it",
        missing=f"{shown}: no such file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{shown}: is {_kind(st.st_mode)}, not a regular file; refusing to read it")
    return _open_checked(resolved, st, shown, error)


@dataclass(frozen=True)
class InputFile:
    """A file found in an input folder by :func:`iter_input_files`.

    Attributes:
        name: its name relative to the folder, ``/``-separated (``tokenizer.json``).
        path: the resolved path to read (already validated).
        size: its size in bytes when it was checked.
    """

    name: str
    path: Path
    size: int


def iter_input_files(folder: str | os.PathLike[str], *, recursive: bool = False,
                     exclude: Callable[[str], bool] | None = None,
                     error: type[GainSurgeryError] = UnsafeInputError) -> Iterator[InputFile]:
    """Yield the non-hidden files of an input folder, in name order; raise on the first unsafe one.

    For copying a base's "extra files" (config, tokenizer, license) and for
    staging uploads. Names starting with ``.`` are skipped (``.git``, ``.cache``,
    our own temp folders), as are names for which ``exclude(name)`` is true.
    Real sub-folders are skipped unless ``recursive``; a symlink to a folder is
    never followed (it must still resolve inside the folder). Every other entry must
    pass :func:`resolve_input`: a link out of the folder, a FIFO, a socket or a
    device raises ``error`` with one line naming it, before anything is copied
    from it.

    Example:
        >>> [f.name for f in iter_input_files(base, exclude=lambda n: n.endswith(".safetensors"))]  # doctest: +SKIP
        ['config.json', 'tokenizer.json']
    """
    top = Path(folder)
    roots = allowed_roots(top, error=error)
    yield from _walk(top, "", roots, recursive, exclude, error)


def _walk(top: Path, prefix: str, roots: tuple[Path, ...], recursive: bool,
          exclude: Callable[[str], bool] | None, error: type[GainSurgeryError]) -> Iterator[InputFile]:
    here = top / prefix if prefix else top
    with os.scandir(here) as it:
        entries = sorted(it, key=lambda e: e.name)
    for entry in entries:
        name = f"{prefix}{entry.name}"
        if entry.name.startswith(".") or (exclude is not None and exclude(name)):
            continue
        try:
            lst = entry.stat(follow_symlinks=False)
        except OSError as e:
            raise error(f"{show_path(top / name)}: changed while the folder was read ({e.strerror})") from None
        if stat.S_ISDIR(lst.st_mode):
            if recursive:
                yield from _walk(top, name + "/", roots, recursive, exclude, error)
            continue
        resolved, st = _resolve_in(roots, top, name, missing_ok=False, error=error)  # type: ignore[misc]
        if stat.S_ISDIR(st.st_mode) and stat.S_ISLNK(lst.st_mode):
            continue  # a link to a folder inside: its files are reachable by their own names
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{show_path(top / name)}: is {_kind(st.st_mode)}, not a regular file; "
                        "refusing to read or copy it")
        yield InputFile(name=name, path=resolved, size=st.st_size)


@dataclass(frozen=True)
class FolderEntry:
    """One entry directly inside a folder, as :func:`folder_entries` judged it.

    Attributes:
        name: its name.
        kind: ``"file"`` (a regular file, or in a Hugging Face cache snapshot a link to
            one in the repo's ``blobs/``), ``"folder"`` (a real folder, not a link),
            ``"link"`` (any other symbolic link: never followed) or ``"special"`` (a FIFO,
            a socket, a device).
        what: how a message names it (``a FIFO (named pipe)``, ``a symbolic link``...).
    """

    name: str
    kind: Literal["file", "folder", "link", "special"]
    what: str


def folder_entries(folder: str | os.PathLike[str], *,
                   error: type[GainSurgeryError] = UnsafeInputError) -> list[FolderEntry]:
    """Every entry directly inside the input folder ``folder``, hidden ones too, in name order.

    Judged with ``lstat`` (nothing is opened or followed, so a FIFO cannot block). A
    link counts as a file only where reading allows links at all for what a tool
    wrote: a Hugging Face cache snapshot, whose files are links into the repo's
    ``blobs/`` (:func:`resolve_input` decides); anywhere else it is a ``"link"``.
    For checking that a folder holds exactly the files it should (``verify``).

    Raises:
        ``error``: the folder is missing, not a folder, under ``/proc``, or cannot be listed.

    Example:
        >>> [(e.name, e.kind) for e in folder_entries("merged")]  # doctest: +SKIP
        [('README.md', 'file'), ('config.json', 'file'), ('extra', 'folder')]
    """
    allowed_roots(folder, error=error)
    snapshot = _is_cache_snapshot(folder)
    try:
        with os.scandir(folder) as it:
            names = sorted(e.name for e in it)
    except OSError as e:
        raise error(f"{show_path(folder)}: cannot be listed ({e.strerror})") from None
    out = []
    for name in names:
        try:
            mode = os.lstat(Path(folder) / name).st_mode
        except FileNotFoundError:
            continue  # gone meanwhile: not there
        except OSError as e:
            raise error(f"{show_path(Path(folder) / name)}: cannot be checked ({e.strerror})") from None
        if stat.S_ISREG(mode):
            out.append(FolderEntry(name, "file", "a file"))
        elif stat.S_ISDIR(mode):
            out.append(FolderEntry(name, "folder", "a folder"))
        elif stat.S_ISLNK(mode):
            kind: Literal["file", "link"] = "link"
            if snapshot:
                try:
                    resolve_input(folder, name, error=error)
                    kind = "file"
                except GainSurgeryError:
                    pass
            out.append(FolderEntry(name, kind, "a file" if kind == "file" else "a symbolic link"))
        else:
            out.append(FolderEntry(name, "special", _kind(mode)))
    return out


def check_input_folder(folder: str | os.PathLike[str], *,
                       error: type[GainSurgeryError] = UnsafeInputError) -> list[InputFile]:
    """Check every non-hidden top-level file of ``folder`` before another library reads the folder itself.

    transformers and PEFT open ``config.json``, tokenizer files and weights by
    name, following links and blocking on FIFOs; a folder handed to them is
    checked here first (see :func:`iter_input_files`), so a link out of it or a
    FIFO is one line of error naming it, before anything is opened.

    Example:
        >>> [f.name for f in check_input_folder(base)]  # doctest: +SKIP
        ['config.json', 'model.safetensors', 'tokenizer.json']
    """
    return list(iter_input_files(folder, error=error))
