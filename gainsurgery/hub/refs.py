"""References to repos and files on the Hub, parsed and checked without any request."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from gainsurgery.errors import HubError

#: ``org/name``: the shape of a Hub repo id.
REPO_ID_PATTERN = r"[A-Za-z0-9][\w.\-]*/[\w.\-]+"
_REPO_ID = re.compile(rf"^{REPO_ID_PATTERN}$")
_BASE_RE = re.compile(rf"^(?P<repo>{REPO_ID_PATTERN})(?:@(?P<rev>[^\s:@]+))?$")
_FILE_RE = re.compile(rf"^(?P<repo>{REPO_ID_PATTERN})(?:@(?P<rev>[^\s:@]+))?:(?P<path>[^\s]+)$")


@dataclass(frozen=True)
class HubRef:
    """A repo on the Hub, optionally at a revision and a file inside it.

    Attributes:
        repo_id: ``org/name``.
        revision: branch, tag or commit; None for the default branch.
        path: file inside the repo (gain references only).
    """

    repo_id: str
    revision: str | None = None
    path: str | None = None

    def __str__(self) -> str:
        text = self.repo_id + (f"@{self.revision}" if self.revision else "")
        return text + (f":{self.path}" if self.path else "")


def parse_base_ref(spec: str) -> HubRef | None:
    """``ORG/NAME[@REV]`` -> HubRef, else None.

    A spec is a Hub id only when it is not an existing local path: a folder
    called ``org/name`` always wins. (``embedded:NAME`` never matches: a repo id
    has no colon.)

    Example:
        >>> parse_base_ref("Qwen/Qwen2.5-0.5B@main")  # doctest: +SKIP
        HubRef(repo_id='Qwen/Qwen2.5-0.5B', revision='main', path=None)
    """
    if os.path.exists(spec):
        return None
    m = _BASE_RE.match(spec)
    return HubRef(m["repo"], m["rev"]) if m else None


def parse_file_ref(spec: str) -> HubRef | None:
    """``ORG/NAME[@REV]:path/in/repo`` -> HubRef with ``path``, else None (local paths win)."""
    if os.path.exists(spec):
        return None
    m = _FILE_RE.match(spec)
    if not m or m["path"].startswith("/") or ".." in m["path"].split("/"):
        return None
    return HubRef(m["repo"], m["rev"], m["path"])


def is_repo_id(value: str | None) -> bool:
    """True when ``value`` reads ``org/name`` (an optional ``@revision`` is not part of it)."""
    return bool(value) and _REPO_ID.match(value) is not None and not value.startswith((".", "/"))


def check_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` if it reads ``org/name``; raise HubError otherwise."""
    if not _REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise HubError(f"{repo_id!r} is not a Hub repo id; expected ORG/NAME (e.g. myname/my-model)")
    return repo_id
