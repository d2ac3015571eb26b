"""Where a command may write: the one place that decides.

Every command that writes (a file or a folder) asks :func:`check_output` first. It
refuses an output that is, contains or lies inside any input (resolved paths, hard
links included), and refuses ``""``, ``.``, ``..``, the current folder, a filesystem
root, a mount point and the home folder even with ``--overwrite``. :func:`check_apart`
keeps a run's several outputs apart. How the output is then written is
:mod:`gainsurgery.io.atomic` (files) and :mod:`gainsurgery.io.claims` (folders).

Example:
    >>> check_output("merged", inputs=["base"], kind="folder")  # doctest: +SKIP
    PosixPath('/work/merged')
"""

from __future__ import annotations

import contextlib
import os
import pwd
import stat
from pathlib import Path
from typing import Iterable, Literal

from gainsurgery.errors import GainSurgeryError, OutputError
from gainsurgery.io.inputs import allowed_roots, show_path
from gainsurgery.io.mounts import is_mount_point

OutputKind = Literal["file", "folder"]


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


def output_noun(what: str) -> str:
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
        raise error(f"{what} {shown} cannot be checked ({e.strerror}); choose another {output_noun(what)}") from None
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
    if lst is not None and is_mount_point(target):
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
        raise error(f"cannot write into {show_path(parent)} (permission denied); choose another {output_noun(what)}")
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
