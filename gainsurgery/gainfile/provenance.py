"""What a gain file says about its origin: its provenance entry and the base fingerprints it carries.

:func:`describe` is what a merged model's provenance records about one gain (name,
sha256, method, side, base model, parameter count; never a local path).
:func:`base_provenance` finds which of a gain's tensors its recorded base
fingerprints (``base_tensors_sha256``, its own or its parents') cover, so that
``apply`` can check each one against the base and warn about the rest.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from gainsurgery.errors import GainFileError
from gainsurgery.gainfile.format_v1 import BASE_TENSORS_KEY, GainFile
from gainsurgery.io.fingerprint import is_fingerprint
from gainsurgery.io.hashing import sha256_file
from gainsurgery.io.inputs import show_name


def describe(gain: GainFile, name: str, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """What provenance records about one gain: its file name and sha256 (for a file), method, side,
    base model, base fingerprint and parameter count.

    Never its local path: provenance is published with the merged model, and an
    absolute path says who and where the user is. The name and sha256 identify it.
    """
    entry: dict[str, Any] = {"name": name}
    if path is not None:
        entry["sha256"] = sha256_file(path)
    entry.update(method=gain.metadata.get("method"), side=gain.metadata.get("side"),
                 base_model=gain.metadata.get("base_model"), parameters=gain.num_parameters)
    if gain.metadata.get(BASE_TENSORS_KEY):
        entry[BASE_TENSORS_KEY] = gain.metadata[BASE_TENSORS_KEY]
    return entry


@dataclass(frozen=True)
class BaseCheck:
    """One fingerprint a gain carries: of which base tensors, and the expected value.

    Attributes:
        label: what carries it (the file, or ``name (parent of file)``), for messages.
        keys: the base tensors it covers.
        expected: the recorded ``base_tensors_sha256``.
    """

    label: str
    keys: tuple[str, ...]
    expected: str


@dataclass(frozen=True)
class BaseProvenance:
    """The base fingerprints a gain carries, and the tensors none of them covers.

    Attributes:
        checks: the fingerprints to check against the base (each over a non-empty set of tensors).
        uncovered: keys of the file that no fingerprint covers (sorted): a stacked parent recorded
            none, or a fingerprint was taken over fewer tensors than the file scales.
        total: the number of tensors the file scales.
    """

    checks: tuple[BaseCheck, ...]
    uncovered: tuple[str, ...]
    total: int

    @property
    def complete(self) -> bool:
        """True when every tensor the file scales is covered by a fingerprint."""
        return not self.uncovered

    def warning(self, label: str) -> str | None:
        """The one-line warning ``apply`` gives for this gain, or None when it is fully covered."""
        if self.complete:
            return None
        if not self.checks:
            return (f"{label} records no base_tensors_sha256 (made before gainsurgery checked it, or stacked "
                    "from such a file); it cannot be checked against this base's weights")
        return (f"{label} records no base_tensors_sha256 for {len(self.uncovered)} of its {self.total} tensors "
                "(a stacked parent recorded none); those cannot be checked against this base's weights")


def base_provenance(gain: GainFile, label: str) -> BaseProvenance:
    """Which of ``gain``'s tensors its recorded base fingerprints cover, and the checks they make.

    The file's own ``base_tensors_sha256`` covers every tensor it scales. Without
    one, each entry of ``parents`` contributes its own fingerprint over its
    ``tensors`` (all of the file's when absent), or, for a stacked parent without
    one, its own parents' (recursively). A tensor is covered only when every parent
    that scales it is: a parent without a fingerprint leaves its tensors uncovered
    (a stacked file carries the weakest provenance of its inputs), and a fingerprint
    over no tensors covers nothing (the sha256 of nothing matches every base).

    Raises:
        GainFileError: a parent's ``tensors`` is not a list of names, or names tensors the file does not scale.

    Example:
        >>> p = base_provenance(load("both.safetensors"), "both.safetensors")  # doctest: +SKIP
        >>> [c.label for c in p.checks], p.uncovered  # doctest: +SKIP
        (['legal.safetensors (parent of both.safetensors)'], ('model.layers.0.mlp.down_proj.weight', ...))
    """
    checks: list[BaseCheck] = []
    uncovered: set[str] = set()
    _cover(gain.metadata.get(BASE_TENSORS_KEY), gain.metadata.get("parents"), frozenset(gain.vectors), label,
           label, checks, uncovered)
    return BaseProvenance(tuple(checks), tuple(sorted(uncovered)), len(gain.vectors))


def _cover(own: Any, parents: Any, keys: frozenset[str], label: str, top: str, checks: list[BaseCheck],
           uncovered: set[str]) -> None:
    """Add the checks that cover ``keys`` (a file's or a parent's tensors) and the keys left uncovered."""
    if not keys:
        return
    if is_fingerprint(own):
        checks.append(BaseCheck(label, tuple(sorted(keys)), own))
        return
    if not isinstance(parents, list) or not parents:
        uncovered.update(keys)
        return
    reached: set[str] = set()
    for parent in parents:
        if not isinstance(parent, dict):  # nothing is known of what it scaled
            reached.update(keys)
            uncovered.update(keys)
            continue
        name = parent.get("name")
        tensors = parent.get("tensors")
        if tensors is None:
            pkeys = keys
        elif isinstance(tensors, list) and all(isinstance(k, str) for k in tensors):
            pkeys = frozenset(tensors)
        else:
            raise GainFileError(f"{top}: parent {show_name(name)}: 'tensors' must be a list of tensor names")
        if not pkeys <= keys:
            raise GainFileError(f"{top}: parent {show_name(name)} records tensors the file does not scale")
        reached.update(pkeys)
        _cover(parent.get(BASE_TENSORS_KEY), parent.get("parents"), pkeys, f"{name} (parent of {label})", top,
               checks, uncovered)
    uncovered.update(keys - reached)  # tensors no parent claims: nothing vouches for them


def base_checks(gain: GainFile, label: str) -> list[BaseCheck]:
    """The base fingerprints ``gain`` carries: its own, else those of its parents (see :func:`base_provenance`).

    An empty list means the gain records none (a file made before fingerprints, or
    an identity file for a Hub base): ``apply`` then warns instead of checking.

    Example:
        >>> [c.label for c in base_checks(load("both.safetensors"), "both.safetensors")]  # doctest: +SKIP
        ['legal.safetensors (parent of both.safetensors)', 'medical.safetensors (parent of both.safetensors)']
    """
    return list(base_provenance(gain, label).checks)
