"""The gain file: format version 1 (see docs/gain-format.md, normative).

A gain file is a safetensors file whose tensors are 1-D float32 vectors, one per
adapted base tensor, keyed by that tensor's exact name in the base checkpoint.
``__metadata__`` holds ``format = "gainsurgery.gain/1"`` and ``dims``, a JSON
object mapping each key to the dim of the base tensor the vector runs along.

This module loads, validates, saves, stacks and inverts gain files. It needs only
numpy and safetensors, so the apply path never imports torch.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from gainsurgery.errors import GainFileError, OutputError
from gainsurgery.io import jsonsafe
from gainsurgery.io.atomic import write_file
from gainsurgery.io.fingerprint import is_fingerprint
from gainsurgery.io.hashing import sha256_file
from gainsurgery.io.inputs import open_regular, show_name, show_path
from gainsurgery.io.safetensors import parse_header

FORMAT = "gainsurgery.gain/1"

#: Optional metadata keys whose values are JSON-encoded structures.
JSON_METADATA = ("parents", "training")
#: The optional key holding the content fingerprint of the base tensors the gain targets
#: (see :mod:`gainsurgery.io.fingerprint`).
BASE_TENSORS_KEY = "base_tensors_sha256"
#: Optional metadata keys whose values are plain strings.
TEXT_METADATA = ("method", "side", "base_model", "base_fingerprint", BASE_TENSORS_KEY, "description")
#: A gain file holds one float32 per channel of the adapted weights: a few million at most.
#: Larger files are refused before anything is read into memory, in bytes.
MAX_GAIN_FILE_BYTES = 1 << 30


@dataclass
class GainFile:
    """A set of gain vectors plus their metadata.

    Attributes:
        vectors: tensor name in the base checkpoint -> 1-D float32 vector.
        dims: tensor name -> dim of the base tensor the vector runs along.
        metadata: optional metadata (``method``, ``side``, ``base_model``,
            ``base_fingerprint``, ``parents``, ``training``, ``description``),
            decoded: structured values are Python objects, not JSON strings.

    Example:
        >>> g = GainFile({"h.0.attn.c_proj.weight": np.ones(8, np.float32)},
        ...              {"h.0.attn.c_proj.weight": 0}, {"method": "gain"})
        >>> g.num_parameters
        8
    """

    vectors: dict[str, np.ndarray]
    dims: dict[str, int]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        """Total number of gain values across all vectors."""
        return int(sum(v.size for v in self.vectors.values()))

    def validate(self, *, allow_negative: bool = False, source: str = "gain file") -> None:
        """Check the in-memory invariants of format v1; raise GainFileError if broken.

        Vectors must be 1-D float32, non-empty, finite and non-zero; negative values
        are refused unless ``allow_negative``. ``dims`` must name exactly the keys.
        """
        if not self.vectors:
            raise GainFileError(f"{source}: holds no gain vectors")
        if set(self.vectors) != set(self.dims):
            missing = sorted(set(self.vectors) ^ set(self.dims))
            raise GainFileError(
                f"{source}: 'dims' metadata and tensors disagree on keys ({missing[:3]}...)"
            )
        for key, vec in self.vectors.items():
            dim = self.dims[key]
            if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
                raise GainFileError(f"{source}: dim for {show_name(key)} must be a non-negative integer, "
                                    f"got {show_name(dim)}")
            if vec.ndim != 1 or vec.size == 0:
                raise GainFileError(f"{source}: {show_name(key)} must be a non-empty 1-D vector, got shape {vec.shape}")
            if vec.dtype != np.float32:
                raise GainFileError(f"{source}: {show_name(key)} must be float32, got {vec.dtype}")
            check_values(vec, key, allow_negative=allow_negative, source=source)

    def save(self, path: str | os.PathLike[str], *, inputs: Iterable[str | os.PathLike[str] | None] = ()) -> Path:
        """Write the file atomically (temp file, fsync, rename) and return its path.

        ``path`` is checked first (:func:`gainsurgery.io.checks.check_output`): it is
        never, never contains and never lies inside any of ``inputs`` (the files and
        folders the command read), and never an existing folder.
        """
        from safetensors.numpy import save

        self.validate(allow_negative=True)
        meta = {"format": FORMAT, "dims": json.dumps(self.dims, sort_keys=True)}
        for key, value in self.metadata.items():
            if value is None:
                continue
            meta[key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        data = save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.vectors.items()}, metadata=meta)
        return write_file(path, data, inputs=inputs, what="output file", error=OutputError)

    def scaled_keys_by_layer(self) -> dict[str, list[str]]:
        """Group keys by their layer label (see :func:`layer_label`)."""
        groups: dict[str, list[str]] = {}
        for key in sorted(self.vectors, key=natural_key):
            groups.setdefault(layer_label(key), []).append(key)
        return groups


def check_values(vec: np.ndarray, key: str, *, allow_negative: bool, source: str = "gain file") -> None:
    """Refuse non-finite, zero and (unless allowed) negative gain values."""
    if not np.all(np.isfinite(vec)):
        raise GainFileError(f"{source}: {show_name(key)} holds NaN or infinite gains")
    if np.any(vec == 0):
        raise GainFileError(f"{source}: {show_name(key)} holds zero gains (they would erase weights irreversibly)")
    if not allow_negative and np.any(vec < 0):
        raise GainFileError(
            f"{source}: {show_name(key)} holds negative gains; pass --allow-negative if that is intended"
        )


def load(path: str | os.PathLike[str], *, allow_negative: bool = False) -> GainFile:
    """Load and validate a v1 gain file.

    The file is opened without blocking (a FIFO or device is refused) and its
    header is held to safetensors' rules (:func:`gainsurgery.io.safetensors.parse_header`:
    no duplicate keys, contiguous tensors); every JSON metadata value is parsed
    within limits (:mod:`gainsurgery.io.jsonsafe`). Only 1-D float32 tensors are read.

    Raises:
        GainFileError: the file is missing, not safetensors, lacks v1 metadata, or
            holds invalid vectors or metadata.

    Example:
        >>> g = load("gain.safetensors")  # doctest: +SKIP
        >>> g.metadata.get("method")  # doctest: +SKIP
        'gain-ffn'
    """
    shown = show_path(path)
    if not os.path.lexists(path):
        raise GainFileError(f"gain file not found: {shown}")
    with open_regular(path, error=GainFileError) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_GAIN_FILE_BYTES:
            raise GainFileError(f"{shown}: {size} bytes, more than a gain file can hold "
                                f"({MAX_GAIN_FILE_BYTES} bytes); not a gain file?")
        _, tensors, raw_meta = parse_header(f, size, shown, error=GainFileError)
        if raw_meta.get("format") != FORMAT:
            found = raw_meta.get("format")
            raise GainFileError(f"{shown}: not a gain file (metadata 'format' is "
                                f"{found[:60] if found is not None else None!r}, expected {FORMAT!r})")
        vectors: dict[str, np.ndarray] = {}
        for key, info in tensors.items():
            if info.dtype != "F32" or len(info.shape) != 1:
                raise GainFileError(f"{shown}: {show_path(key)} must be a 1-D float32 vector, got "
                                    f"{info.dtype} of shape {list(info.shape)}")
            f.seek(info.start)
            raw = bytearray(info.nbytes)
            if f.readinto(raw) != info.nbytes:
                raise GainFileError(f"{shown}: ended early while reading {show_path(key)} (modified?)")
            vectors[key] = np.frombuffer(raw, dtype="<f4").astype(np.float32, copy=False)
    metadata = decode_metadata(raw_meta, shown)
    dims = metadata.pop("dims")
    gain = GainFile(vectors, dims, metadata)
    gain.validate(allow_negative=allow_negative, source=shown)
    return gain


def decode_metadata(raw_meta: Mapping[str, str], where: str) -> dict[str, Any]:
    """Decode a gain file's ``__metadata__`` (strings): ``dims``, the JSON keys, the fingerprint.

    Every JSON value is parsed within limits and type-checked; structured keys must
    hold what the format says (``dims`` an object of integers, ``parents`` a list of
    objects, ``training`` an object), and ``base_tensors_sha256`` must read
    ``sha256:`` + 64 hex. Returns the metadata with ``dims`` (and the JSON keys)
    decoded, in a fixed (sorted) order.

    Raises:
        GainFileError: one line naming the file and the key.

    Example:
        >>> decode_metadata({"format": FORMAT, "dims": '{"w": 1}', "training": '{"steps": 3}'}, "g")
        {'dims': {'w': 1}, 'training': {'steps': 3}}
    """
    if "dims" not in raw_meta:
        raise GainFileError(f"{where}: metadata 'dims' is missing")
    dims = jsonsafe.expect_object(
        jsonsafe.loads(raw_meta["dims"], where=f"{where}: metadata 'dims'", error=GainFileError, max_depth=4),
        where=f"{where}: metadata 'dims'", error=GainFileError)
    out: dict[str, Any] = {"dims": dims}
    for key, value in sorted(raw_meta.items()):  # safetensors hands metadata over in no fixed order
        if key in ("format", "dims"):
            continue
        label = f"{where}: metadata {show_name(key)}"
        if key in JSON_METADATA:
            parsed = jsonsafe.loads(value, where=label, error=GainFileError)
            if key == "parents":
                for i, item in enumerate(_expect_list(parsed, label)):
                    jsonsafe.expect_object(item, where=label, field=f"[{i}]", error=GainFileError)
            else:
                jsonsafe.expect_object(parsed, where=label, error=GainFileError)
            out[key] = parsed
        elif key == BASE_TENSORS_KEY and not is_fingerprint(value):
            raise GainFileError(f"{label} must read sha256:<64 hex digits>")
        else:
            out[key] = value
    return out


def _expect_list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise GainFileError(f"{where}: expected array, got {jsonsafe.type_name(value)}")
    return value


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


def summarize(values: np.ndarray) -> dict[str, float]:
    """min/max/mean/std and the fraction of gains above 1 for a float32 array."""
    v = values.astype(np.float64)
    return {
        "count": int(v.size),
        "min": float(v.min()),
        "max": float(v.max()),
        "mean": float(v.mean()),
        "std": float(v.std()),
        "frac_gt_1": float(np.mean(v > 1.0)),
    }


def stats(gain: GainFile) -> dict[str, Any]:
    """Statistics of a gain file: overall, per target tensor and per layer, and how many of its
    tensors its base fingerprints cover (``base_coverage``: ``tensors``, ``uncovered``)."""
    per_target = {k: {"dim": gain.dims[k], **summarize(gain.vectors[k])} for k in sorted(gain.vectors, key=natural_key)}
    per_layer = {
        layer: summarize(np.concatenate([gain.vectors[k] for k in keys]))
        for layer, keys in gain.scaled_keys_by_layer().items()
    }
    overall = summarize(np.concatenate([gain.vectors[k] for k in sorted(gain.vectors)]))
    try:
        covered = base_provenance(gain, "gain file")
        coverage: dict[str, Any] = {"tensors": covered.total, "uncovered": len(covered.uncovered)}
    except GainFileError as exc:  # shown, not refused: inspect is how one looks at a damaged file
        coverage = {"tensors": len(gain.vectors), "uncovered": len(gain.vectors), "problem": first_line(exc)}
    return {
        "parameters": gain.num_parameters,
        "tensors": len(gain.vectors),
        "overall": overall,
        "per_layer": per_layer,
        "per_target": per_target,
        "metadata": gain.metadata,
        "base_coverage": coverage,
    }


def layer_label(key: str) -> str:
    """The layer a tensor belongs to, e.g. ``layer 3`` for ``model.layers.3.mlp...``.

    The label is the first integer path component; tensors without one are ``other``.
    """
    for part in key.split("."):
        if part.isdigit():
            return f"layer {int(part)}"
    return "other"


def natural_key(name: str) -> tuple:
    """Sort key that orders ``layers.10`` after ``layers.9``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def first_line(exc: BaseException) -> str:
    """First line of an exception message, for one-line error reports."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def format_count(n: int) -> str:
    """Human-readable parameter count: 46080 -> '46.1K'."""
    if n < 1000:
        return str(n)
    exp = min(int(math.log10(n) // 3), 3)
    return f"{n / 10 ** (3 * exp):.1f}{' KMB'[exp]}"
