"""The gains of an apply: loaded (local, on the Hub, in memory), raised to a power, stacked, and checked.

:func:`load_gains` reads and stacks them; :func:`check_base_fingerprints` compares
each gain's recorded base fingerprint with the base tensors an apply just streamed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from gainsurgery import gainfile as gf
from gainsurgery.errors import GainFileError, PlanError
from gainsurgery.gainfile import BaseCheck, GainFile
from gainsurgery.io.fingerprint import combine
from gainsurgery.merge.provenance import PROVENANCE_NAME
from gainsurgery.merge.stream import Streamed
from gainsurgery.sources.base import resolve_gain_specs

if TYPE_CHECKING:
    from gainsurgery.hub.client import HubClient

#: Receives one-line warnings (a gain without a base fingerprint, an allowed mismatch...).
Warn = Callable[[str], None]


@dataclass
class LoadedGains:
    """The gains of an apply, loaded and stacked.

    Attributes:
        gain: the stacked gain (float32 product), applied in one pass.
        sources: one provenance entry per gain (name, sha256, hub reference, method...; no local paths).
        paths: the local files read (inputs an output must keep away from).
        checks: the base fingerprints the gains carry (see :func:`gainsurgery.gainfile.base_provenance`).
        unchecked: names of the gains whose fingerprints do not cover every tensor they scale
            (made before fingerprints, or stacked from such a file): they cannot be checked in full.
        notes: the one-line warning for each of ``unchecked``.
    """

    gain: GainFile
    sources: list[dict[str, Any]]
    paths: list[str] = field(default_factory=list)
    checks: list[BaseCheck] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load_gains(gains: Sequence[str | os.PathLike[str] | GainFile], *, allow_negative: bool = False,
               hub: HubClient | None = None) -> LoadedGains:
    """Load gain files (local paths, ``ORG/REPO[@REV]:path`` on the Hub, or in-memory :class:`GainFile`\\ s).

    Several are stacked in the order given (product in float32); each keeps its own
    base fingerprint checks (they are checked one by one against the base).

    Returns:
        A :class:`LoadedGains`.

    Raises:
        GainFileError: none given, or one is missing or invalid.
        HubError: a Hub gain file cannot be downloaded.

    Example:
        >>> loaded = load_gains(["legal.safetensors", "medical.safetensors"])  # doctest: +SKIP
        >>> loaded.gain.num_parameters, [s["name"] for s in loaded.sources]  # doctest: +SKIP
        (55296, ['legal.safetensors', 'medical.safetensors'])
    """
    gains = list(gains)
    if not gains:
        raise GainFileError("give at least one gain file")
    # GAIN.safetensors@α: that file at power α (gf.split_power; never read as a Hub revision)
    powers = [gf.split_power(str(g)) for g in gains if not isinstance(g, GainFile)]
    paths, refs = resolve_gain_specs([spec for spec, _ in powers], hub)
    alphas = iter(alpha for _, alpha in powers)
    local = iter(zip(paths, refs))
    loaded: list[GainFile] = []
    names: list[str] = []
    sources: list[dict[str, Any]] = []
    read: list[str] = []
    all_checks: list[BaseCheck] = []
    unchecked: list[str] = []
    notes: list[str] = []
    for i, g in enumerate(gains):
        if isinstance(g, GainFile):
            name = f"gain[{i}]"
            g.validate(allow_negative=allow_negative, source=name)
            source = gf.describe(g, name)
        else:
            path, ref = next(local)
            alpha = next(alphas)
            name = Path(path).name
            g = gf.load(path, allow_negative=allow_negative)
            source = gf.describe(g, name, path)
            read.append(path)
            if ref is not None:
                source["hub"] = str(ref)
            if alpha is not None:
                g = gf.power(g, alpha)
                g.validate(allow_negative=allow_negative, source=f"{name}@{alpha:g}")
                name = f"{name}@{alpha:g}"
                source["power"] = alpha
        # What is covered is checked; what is not counts as unfingerprinted and is warned about.
        provenance = gf.base_provenance(g, name)
        all_checks.extend(provenance.checks)
        note = provenance.warning(name)
        if note is not None:
            unchecked.append(name)
            notes.append(note)
        loaded.append(g)
        names.append(name)
        sources.append(source)
    # Each gain is checked against the base on its own, so stacking here never refuses.
    stacked = loaded[0] if len(loaded) == 1 else gf.stack(loaded, names, allow_base_mismatch=True)
    return LoadedGains(stacked, sources, read, all_checks, unchecked, notes)


def check_base_fingerprints(loaded: LoadedGains, stream: Streamed, *, allow_base_mismatch: bool,
                            warn: Warn, written: str = "nothing was written") -> list[str]:
    """Compare each gain's recorded base fingerprint with the base tensors just streamed.

    Returns the labels of the gains that did not match (only when allowed).

    Raises:
        PlanError: a mismatch, unless ``allow_base_mismatch``.

    Example:
        >>> check_base_fingerprints(loaded, streamed, allow_base_mismatch=False, warn=print)  # doctest: +SKIP
        []
    """
    mismatched = []
    for check in loaded.checks:
        found = combine(stream.tensor_digests, check.keys)
        if found == check.expected:
            continue
        text = (f"{check.label} was trained on other weights: it records base_tensors_sha256 "
                f"{check.expected[:19]}..., the base's {len(check.keys)} target tensors give {found[:19]}... "
                "(same names and shapes, different weights: another fine-tune, e.g. an instruct sibling)")
        if not allow_base_mismatch:
            raise PlanError(f"{text}; {written}; pass --allow-base-mismatch to apply it anyway")
        warn(text + "; applied anyway (--allow-base-mismatch), recorded in " + PROVENANCE_NAME)
        mismatched.append(check.label)
    return mismatched
