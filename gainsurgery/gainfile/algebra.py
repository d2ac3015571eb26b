"""The algebra of gains: stack (a product), invert, power, identity, and loading several at once.

Gains compose by elementwise product on the same (tensor, dim): W·diag(a)·diag(b) =
W·diag(a·b). Every operation works in float32 (power in float64, stored in float32)
and refuses a result that is not a valid gain (overflow to infinity, underflow to
zero), in one line naming the tensor. :func:`stack` also carries each parent's
provenance, so ``apply`` knows which base fingerprints vouch for which tensors.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from gainsurgery.errors import GainFileError
from gainsurgery.gainfile.format_v1 import BASE_TENSORS_KEY, GainFile, check_values, load
from gainsurgery.gainfile.provenance import base_checks, describe
from gainsurgery.io.fingerprint import is_fingerprint
from gainsurgery.io.inputs import show_name, show_path


def stack(gains: Iterable[GainFile], names: Iterable[str] | None = None, *,
          allow_base_mismatch: bool = False) -> GainFile:
    """Compose gain files: product on shared (key, dim), union otherwise.

    Products are taken in float32, in the order given. ``names`` (one per gain,
    e.g. file names) are recorded with each parent's summary in the ``parents``
    metadata for provenance, with the parent's base fingerprint
    (``base_tensors_sha256``) and its tensor list when it scales fewer tensors than
    the stack, so that ``apply`` can check each parent against the base and knows
    which tensors a parent without a fingerprint leaves unchecked (the stack carries
    the weakest provenance of its parents, see :func:`base_provenance`). When every
    parent records the same fingerprint over the same tensors, the stack records it
    as its own.

    Raises:
        GainFileError: two files scale the same key along different dims (the
            product is not a diagonal gain), or two parents covering the same
            tensors record different base fingerprints (trained on different
            bases) and ``allow_base_mismatch`` is not set.
    """
    gains = list(gains)
    if not gains:
        raise GainFileError("nothing to stack: give at least one gain file")
    names = list(names) if names is not None else [f"gain[{i}]" for i in range(len(gains))]
    vectors: dict[str, np.ndarray] = {}
    dims: dict[str, int] = {}
    for gain, name in zip(gains, names):
        for key, vec in gain.vectors.items():
            dim = gain.dims[key]
            if key not in vectors:
                vectors[key] = vec.astype(np.float32, copy=True)
                dims[key] = dim
                continue
            if dims[key] != dim:
                raise GainFileError(
                    f"{name}: {show_path(key)} is scaled along dim {dim} but an earlier file scales it along "
                    f"dim {dims[key]}"
                )
            if vectors[key].shape != vec.shape:
                raise GainFileError(
                    f"{name}: {show_path(key)} has length {vec.size} but an earlier file has {vectors[key].size}"
                )
            with np.errstate(over="ignore", under="ignore"):  # reported below, per key, in one line
                vectors[key] = np.multiply(vectors[key], vec, dtype=np.float32)
            if not np.all(np.isfinite(vectors[key])) or np.any(vectors[key] == 0):
                raise GainFileError(f"{name}: the product of the gains on {show_path(key)} overflows or underflows "
                                    "float32 (to infinity or zero); these files cannot be stacked")
    seen: dict[frozenset, tuple[str, str]] = {}
    for gain, name in zip(gains, names):
        for check in base_checks(gain, name):
            keys = frozenset(check.keys)
            if keys in seen and seen[keys][1] != check.expected and not allow_base_mismatch:
                raise GainFileError(
                    f"{name} and {seen[keys][0]} were trained on different bases (their base_tensors_sha256 differ "
                    f"on the same {len(keys)} tensors); stacking them is likely a mistake; pass "
                    "--allow-base-mismatch to stack them anyway")
            seen.setdefault(keys, (check.label, check.expected))
    parents = []
    for g, name in zip(gains, names):
        entry: dict[str, Any] = {"name": name, "method": g.metadata.get("method"), "side": g.metadata.get("side"),
                                 "parameters": g.num_parameters}
        own = g.metadata.get(BASE_TENSORS_KEY)
        if is_fingerprint(own):
            entry[BASE_TENSORS_KEY] = own
        # Every parent's tensors, fingerprinted or not: what it leaves unchecked is known exactly.
        if set(g.vectors) != set(vectors):
            entry["tensors"] = sorted(g.vectors)
        if "parents" in g.metadata:
            entry["parents"] = g.metadata["parents"]
        parents.append(entry)
    metadata: dict[str, Any] = {"parents": parents}
    for key in ("method", "side", "base_model", BASE_TENSORS_KEY):
        values = {g.metadata.get(key) for g in gains}
        if len(values) == 1 and None not in values:
            metadata[key] = values.pop()
    if BASE_TENSORS_KEY in metadata and any(set(g.vectors) != set(vectors) for g in gains):
        del metadata[BASE_TENSORS_KEY]  # it covers each parent's tensors, not the union
    if allow_base_mismatch and len({p.get(BASE_TENSORS_KEY) for p in parents}) > 1:
        metadata["base_mismatch_allowed"] = "true"
    return GainFile(vectors, dims, metadata)


def load_many(paths: Iterable[str | os.PathLike[str]], *, allow_negative: bool = False
              ) -> tuple[GainFile, list[dict[str, Any]]]:
    """Load gain files, stack them (in order) and describe each for provenance.

    Returns:
        (stacked gain, one :func:`describe` dict per file).
    """
    paths = [str(p) for p in paths]
    gains = [load(p, allow_negative=allow_negative) for p in paths]
    sources = [describe(g, Path(p).name, p) for p, g in zip(paths, gains)]
    stacked = gains[0] if len(gains) == 1 else stack(gains, [Path(p).name for p in paths])
    return stacked, sources


def invert(gain: GainFile) -> GainFile:
    """Return the gain whose product with ``gain`` is the identity (1/s in float32).

    Note that applying s then 1/s restores a bf16 checkpoint only up to rounding:
    each apply rounds once to the tensor's dtype.
    """
    for key, vec in gain.vectors.items():
        check_values(vec, key, allow_negative=True)
    with np.errstate(over="ignore"):  # overflow is reported below, per key
        vectors = {k: np.divide(np.float32(1.0), v, dtype=np.float32) for k, v in gain.vectors.items()}
    for key, vec in vectors.items():
        if not np.all(np.isfinite(vec)):
            raise GainFileError(f"{show_name(key)}: inverse overflows float32 (gains too close to zero)")
    metadata = dict(gain.metadata)
    metadata["description"] = "inverse of " + gain.metadata.get("description", "a gain file")
    return GainFile(vectors, dict(gain.dims), metadata)


#: Largest |α| accepted by :func:`power`: far beyond any useful strength (s^1000 overflows for s > 1.09).
MAX_POWER = 1000.0


def power(gain: GainFile, alpha: float) -> GainFile:
    """Return the gain s^α, computed in float64 and stored in float32: a post-hoc strength knob.

    α = 1 is ``gain`` itself, α = 0 the identity (the base unchanged), α = −1 its inverse,
    0 < α < 1 a weaker version of the same adaptation and α > 1 a stronger one. A negative
    gain (a sign flip) has a real power only for an integer α.

    Raises:
        GainFileError: α is not finite or beyond ±:data:`MAX_POWER`, a non-integer α meets a
            negative gain, or a power overflows float32 or reaches zero.

    Example:
        >>> g = GainFile({"w": np.array([4.0, 0.25], np.float32)}, {"w": 0})
        >>> power(g, 0.5).vectors["w"].tolist()
        [2.0, 0.5]
    """
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) \
            or abs(alpha) > MAX_POWER:
        raise GainFileError(f"power {alpha!r}: give a finite number between -{MAX_POWER:g} and {MAX_POWER:g}")
    alpha = float(alpha)
    vectors = {}
    for key, vec in gain.vectors.items():
        check_values(vec, key, allow_negative=True)
        v = vec.astype(np.float64)
        if np.any(v < 0) and not alpha.is_integer():
            raise GainFileError(f"{show_name(key)}: holds negative gains (sign flips), which have no real power "
                                f"{alpha:g}; use an integer power")
        with np.errstate(over="ignore", under="ignore"):
            out = (np.sign(v) ** alpha * np.abs(v) ** alpha).astype(np.float32)
        if not np.all(np.isfinite(out)) or np.any(out == 0):
            raise GainFileError(f"{show_name(key)}: s^{alpha:g} overflows float32 or reaches zero")
        vectors[key] = out
    metadata = dict(gain.metadata)
    metadata["description"] = f"s^{alpha:g} of " + gain.metadata.get("description", "a gain file")
    return GainFile(vectors, dict(gain.dims), metadata)


_POWER_SUFFIX = re.compile(r"(?P<file>.+\.safetensors)@(?P<alpha>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)",
                           re.ASCII | re.DOTALL)


def split_power(spec: str) -> tuple[str, float | None]:
    """``G.safetensors@α`` -> (``G.safetensors``, α); any other spec -> (spec, None).

    The suffix is a plain number after the last ``@`` of a name ending in ``.safetensors``,
    so it never reads a Hub revision (``ORG/NAME@REV:path.safetensors`` puts ``@REV`` before
    the ``:``, and ``ORG/NAME@REV:path.safetensors@0.5`` is that file at power 0.5). A file
    that exists under the full name, suffix included, is that file.

    Example:
        >>> split_power("legal.safetensors@0.5"), split_power("org/gains@v1.5:legal.safetensors")
        (('legal.safetensors', 0.5), ('org/gains@v1.5:legal.safetensors', None))
    """
    m = _POWER_SUFFIX.fullmatch(spec)
    if m is None or os.path.lexists(spec):
        return spec, None
    return m["file"], float(m["alpha"])


def identity(targets: Mapping[str, tuple[int, int]], metadata: Mapping[str, Any] | None = None) -> GainFile:
    """A gain file of ones: ``targets`` maps tensor name -> (dim, length)."""
    vectors = {k: np.ones(n, dtype=np.float32) for k, (_, n) in targets.items()}
    dims = {k: d for k, (d, _) in targets.items()}
    return GainFile(vectors, dims, dict(metadata or {}))
