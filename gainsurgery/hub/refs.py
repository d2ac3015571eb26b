"""References to repos and files on the Hub, parsed and checked without any request."""

from __future__ import annotations

import re
from dataclasses import dataclass

from gainsurgery.errors import HubError
from gainsurgery.sources.spec import REPO_ID_PATTERN, split_file_ref

# The repo-id spelling has one home, the BASE grammar (:mod:`gainsurgery.sources.spec`).
_REPO_ID = re.compile(REPO_ID_PATTERN, re.ASCII)


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


def parse_file_ref(spec: str) -> HubRef | None:
    """``ORG/NAME[@REV]:path/in/repo`` -> HubRef with ``path``, else None.

    Local paths win: an existing path, or one spelled like a path (``./``, ``/``,
    ``~``...), is never sent to the Hub. The whole spec must match (no trailing newline).
    """
    found = split_file_ref(spec)
    return HubRef(*found) if found is not None else None


def is_repo_id(value: object) -> bool:
    """True when ``value`` is exactly ``org/name`` (an optional ``@revision`` is not part of it).

    Example:
        >>> is_repo_id("org/name"), is_repo_id("org/name\\n"), is_repo_id("./x/y")
        (True, False, False)
    """
    return (isinstance(value, str) and _REPO_ID.fullmatch(value) is not None and ".." not in value
            and "--" not in value and not value.endswith(".git"))


def check_repo_id(repo_id: str, *, what: str = "repo id") -> str:
    """Return ``repo_id`` if it is exactly ``org/name``; raise HubError otherwise.

    Example:
        >>> check_repo_id("org/name\\n")
        Traceback (most recent call last):
        ...
        gainsurgery.errors.HubError: 'org/name\\n' is not a Hub repo id; expected ORG/NAME (e.g. myname/my-model)
    """
    if not is_repo_id(repo_id):
        shown = repr(repo_id) if isinstance(repo_id, str) else type(repo_id).__name__
        label = "" if what == "repo id" else f" (given as {what})"
        raise HubError(f"{shown[:120]} is not a Hub repo id{label}; expected ORG/NAME (e.g. myname/my-model)")
    return repo_id
