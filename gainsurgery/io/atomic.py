"""Writing outputs so that they appear whole or not at all; reading JSON inputs.

The one writer family: :func:`write_bytes`, :func:`write_text` and
:func:`write_json` write a temporary sibling, fsync it and rename it over the
target. Folders are built in a temporary sibling folder and renamed into place
by :func:`publish_folder`, an existing one being moved aside first and deleted
only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

from gainsurgery.errors import GainSurgeryError


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (creations, renames) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_files(folder: Path) -> None:
    """fsync every regular file directly inside ``folder``, then the folder itself."""
    for p in folder.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def publish_folder(tmp: Path, out: Path, *, trash_tag: str = "gainsurgery-old") -> None:
    """Rename the finished folder ``tmp`` to ``out``, replacing an existing ``out``.

    The old ``out`` is moved aside before the rename and removed after it, so at
    every moment ``out`` is either the old folder or the new one.
    """
    if out.exists():
        trash = out.parent / f".{out.name}.{trash_tag}-{os.getpid()}"
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, out)
    fsync_dir(out.parent)


def check_replaceable_folder(out: Path, *, overwrite: bool, protect: Iterable[str | os.PathLike[str]] = (),
                             what: str = "OUT", error: type[GainSurgeryError] = GainSurgeryError) -> Path:
    """Check that the folder ``out`` may be (re)written; return it resolved.

    Refuses an existing ``out`` without ``overwrite``, an existing non-folder, an
    ``out`` that holds any of ``protect`` (``--overwrite`` would delete them), and
    an ``out`` whose parent folder does not exist. ``what`` names it in messages.
    """
    out = Path(out)
    out_r = out.resolve()
    if out_r.exists() or out.is_symlink():
        if not overwrite:
            raise error(f"{what} already exists: {out} (pass --overwrite to replace it)")
        if not out_r.is_dir():
            raise error(f"{what} exists and is not a folder: {out}")
        for p in protect:
            if out_r in Path(p).resolve().parents:
                raise error(f"{what} ({out}) holds {p}, which --overwrite would delete")
    if not out_r.parent.is_dir():
        raise error(f"the folder that should hold {what} does not exist: {out_r.parent}")
    return out_r


def write_bytes(path: Path, data: bytes, error: type[GainSurgeryError] = GainSurgeryError) -> Path:
    """Write ``data`` to ``path`` via a fsynced temp file in the same folder + rename."""
    path = Path(path)
    if path.is_dir():
        raise error(f"output path is a folder: {path}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise error(f"output folder does not exist: {parent}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_text(path: Path, text: str, error: type[GainSurgeryError] = GainSurgeryError) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`write_bytes`)."""
    return write_bytes(path, text.encode("utf-8"), error)


def write_json(path: Path, value: Any, error: type[GainSurgeryError] = GainSurgeryError, *,
               indent: int | None = 2, sort_keys: bool = False) -> Path:
    """Write ``value`` as JSON (plus a final newline) to ``path`` atomically."""
    return write_text(path, json.dumps(value, indent=indent, sort_keys=sort_keys) + "\n", error)


def read_json_object(path: Path, error: type[GainSurgeryError], max_bytes: int | None = None) -> dict[str, Any]:
    """Parse a JSON file that must hold an object; ``error`` with a one-line message otherwise."""
    path = Path(path)
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise error(f"{path.name}: absurdly large ({path.stat().st_size} bytes)")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise error(f"{path}: not valid JSON") from None
    if not isinstance(value, dict):
        raise error(f"{path}: not a JSON object")
    return value


def iter_jsonl(path: Path, error: type[GainSurgeryError]):
    """Yield (line number, object) for each non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError:
                raise error(f"{path}:{lineno}: not a JSON object per line") from None
