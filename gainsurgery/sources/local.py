"""A BASE that names a folder on this machine: a local checkpoint, an HF cache snapshot or an embedded model.

What training, evaluation and the PEFT converters need of a BASE, with no Hub code:
this module never imports :mod:`gainsurgery.hub` (nor huggingface_hub), so a run on a
local or embedded model does not load them. Opening a Hub BASE is
:mod:`~gainsurgery.sources.base`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gainsurgery.errors import CheckpointError, GainSurgeryError
from gainsurgery.io.checkpoint import Checkpoint, open_checkpoint
from gainsurgery.io.inputs import show_path
from gainsurgery.sources.embedded import EMBEDDED_MODELS, EMBEDDED_PREFIX, embedded_dir, resolve_embedded
from gainsurgery.sources.spec import BaseSpec, classify_base_spec, hf_cache_repo


def spec_of(spec: str | os.PathLike[str] | BaseSpec) -> BaseSpec:
    """``spec`` classified as a checkpoint-folder BASE (a :class:`BaseSpec` is used as it is)."""
    return spec if isinstance(spec, BaseSpec) else classify_base_spec(os.fspath(spec))


def is_embedded(spec: str) -> bool:
    """True when ``spec`` uses the ``embedded:`` scheme."""
    return str(spec).startswith(EMBEDDED_PREFIX)


def resolve_base(spec: str | os.PathLike[str] | BaseSpec) -> Path:
    """Turn a local BASE argument into a folder (converting an embedded model once).

    ``embedded:NAME`` resolves to its cached folder; a local path to itself. A BASE
    that reads like a Hub repo id is refused: the commands that need a local folder
    (train, eval, export-peft, import-peft) never send it to the Hub.

    Raises:
        CheckpointError: empty, missing, or a Hub repo id.

    Example:
        >>> resolve_base("embedded:gemma-3-270m")  # doctest: +SKIP
        PosixPath('/home/me/.cache/gainsurgery/embedded/gemma-3-270m')
    """
    kind = spec_of(spec)
    if kind.kind == "embedded":
        return resolve_embedded(kind.name)  # type: ignore[arg-type]
    if kind.kind == "hub":
        raise CheckpointError(f"no such folder: {show_path(spec)} (this command reads a local folder or "
                              f"embedded:NAME; download a Hub model first, e.g. hf download {kind.repo_id})")
    return kind.path  # type: ignore[return-value]


def open_base(spec: str | os.PathLike[str]) -> Checkpoint:
    """Resolve a local or embedded ``spec`` and open it as a checkpoint (headers validated)."""
    return open_checkpoint(resolve_base(spec))


def local_folder_of(spec: str | os.PathLike[str] | None) -> Path | None:
    """The local folder a BASE/MODEL argument is read from, without converting or downloading anything.

    A local path as given; ``embedded:NAME``'s cache folder (whether converted yet or
    not); None for a Hub repo, an empty or unusable spec. For keeping outputs away
    from inputs before any work starts.

    Example:
        >>> local_folder_of("org/name") is None  # doctest: +SKIP
        True
    """
    if spec is None:
        return None
    try:
        kind = spec_of(spec)
    except GainSurgeryError:
        return None  # reported when the base is opened
    if kind.kind == "embedded":
        return embedded_dir(kind.name)  # type: ignore[arg-type]
    return kind.path if kind.kind == "local" else None


def base_model_name(spec: str | os.PathLike[str] | BaseSpec) -> str | None:
    """What a gain file made from the base ``spec`` records as ``base_model``: never a local path.

    A Hub repo id (a Hub base, or the repo of a Hugging Face cache snapshot), or
    ``embedded:NAME``; None for any other local folder (its content is identified
    by the gain's ``base_tensors_sha256`` instead; a path would say who and where
    the user is, and a relative one reads like a Hub repo id in a card).

    Example:
        >>> base_model_name("embedded:gemma-3-270m"), base_model_name("/data/my-base")  # doctest: +SKIP
        ('embedded:gemma-3-270m', None)
    """
    kind = spec_of(spec)
    if kind.kind == "embedded":
        return kind.spec
    if kind.kind == "hub":
        return kind.repo_id
    found = hf_cache_repo(kind.path)  # type: ignore[arg-type]
    return found[0] if found else None


def base_facts(spec: str | None) -> dict[str, Any] | None:
    """What is known about a non-Hub base for cards and provenance (license, upstream model), or None.

    Example:
        >>> base_facts("embedded:gemma-3-270m")["license"]
        'gemma'
    """
    if not spec or not is_embedded(str(spec)):
        return None
    model = EMBEDDED_MODELS.get(str(spec)[len(EMBEDDED_PREFIX):])
    return model.facts() if model is not None else None
