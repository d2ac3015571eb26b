"""The content fingerprint of the base tensors a gain targets: ``base_tensors_sha256``.

A gain is learned for particular weights. Two checkpoints with the same tensor
names and shapes (a base model and its instruct sibling) accept the same gain
file, but a gain trained on one is wrong for the other. So a gain file records a
fingerprint of the *bytes* of the base tensors it targets, and ``apply`` computes
the same fingerprint while it streams those tensors (no second read).

Definition (docs/gain-format.md): for every key of the gain file, the line

    KEY <TAB> DTYPE <TAB> SHAPE <TAB> SHA256 <LF>

where KEY is the tensor name, DTYPE its safetensors dtype, SHAPE its dims joined
by ``x`` (empty for a 0-d tensor) and SHA256 the lowercase hex sha256 of the
tensor's raw bytes as stored in the base's safetensors file. The lines are
sorted by KEY (code point order) and concatenated as UTF-8; the fingerprint is
``"sha256:"`` + the hex sha256 of that text. Per-tensor digests make the result
independent of shard layout and of the order in which tensors are read.

Example:
    >>> combine({"a.weight": TensorDigest("BF16", (2, 3), "00" * 32)})
    'sha256:b3e576982e83772f7fa0a5305d212ddead8729c6fedc2e0e1449f3755f6f838c'
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from gainsurgery.errors import CheckpointError
from gainsurgery.io.inputs import show_name
from gainsurgery.io.safetensors import open_shard

#: How a fingerprint is spelled: ``sha256:`` and 64 lowercase hex digits.
FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}", re.ASCII)
#: Bytes read per call while hashing tensors from a file.
CHUNK_BYTES = 8 << 20


@dataclass(frozen=True)
class TensorDigest:
    """What the fingerprint knows of one base tensor: dtype, shape and the hex sha256 of its bytes."""

    dtype: str
    shape: tuple[int, ...]
    sha256: str


def is_fingerprint(value: object) -> bool:
    """True when ``value`` is spelled like a fingerprint (``sha256:`` + 64 hex).

    Example:
        >>> is_fingerprint("sha256:" + "ab" * 32), is_fingerprint("sha256:xyz")
        (True, False)
    """
    return isinstance(value, str) and FINGERPRINT_RE.fullmatch(value) is not None


def combine(digests: Mapping[str, TensorDigest], keys: Iterable[str] | None = None) -> str:
    """The fingerprint of the tensors ``keys`` (default: all of ``digests``), see the module docstring.

    A fingerprint over no tensors would be the sha256 of nothing, which every base
    matches: asking for one is a bug.

    Raises:
        KeyError: a key has no digest.
        ValueError: no keys.

    Example:
        >>> d = {"b": TensorDigest("F32", (4,), "ab" * 32), "a": TensorDigest("F32", (), "cd" * 32)}
        >>> combine(d) == combine(d, ["a", "b"]) != combine(d, ["a"])
        True
    """
    names = sorted(digests if keys is None else set(keys))
    if not names:
        raise ValueError("a fingerprint over no tensors identifies no base")
    h = hashlib.sha256()
    for name in names:
        d = digests[name]
        h.update(f"{name}\t{d.dtype}\t{'x'.join(map(str, d.shape))}\t{d.sha256}\n".encode("utf-8", "surrogatepass"))
    return "sha256:" + h.hexdigest()


def hash_tensors(ckpt, keys: Iterable[str], *, chunk_bytes: int = CHUNK_BYTES) -> dict[str, TensorDigest]:
    """Per-tensor digests of the tensors ``keys`` of the opened checkpoint ``ckpt``, read from its shards.

    Each shard is opened once through the safe open (:func:`~gainsurgery.io.safetensors.open_shard`)
    and its tensors are read in file order, ``chunk_bytes`` at a time.

    Raises:
        CheckpointError: a key is not a tensor of ``ckpt``, or a shard changed or ended early.

    Example:
        >>> keys = ["model.layers.0.self_attn.o_proj.weight"]
        >>> digests = hash_tensors(open_checkpoint("base"), keys)  # doctest: +SKIP
    """
    by_shard: dict[str, list] = {}
    for key in set(keys):
        info = ckpt.tensors.get(key)
        if info is None:
            raise CheckpointError(f"{show_name(key)} is not a tensor of the base checkpoint")
        by_shard.setdefault(info.shard, []).append(info)
    out: dict[str, TensorDigest] = {}
    buf = bytearray(chunk_bytes)
    mv = memoryview(buf)
    for shard_name, infos in by_shard.items():
        with open_shard(ckpt.shards[shard_name]) as f:
            fd = f.fileno()
            for info in sorted(infos, key=lambda i: i.start):
                h = hashlib.sha256()
                pos, end = info.start, info.end
                while pos < end:
                    n = os.preadv(fd, [mv[: min(chunk_bytes, end - pos)]], pos)
                    if n == 0:
                        raise CheckpointError(f"{shard_name}: ended early while reading {info.name} (modified?)")
                    h.update(mv[:n])
                    pos += n
                out[info.name] = TensorDigest(info.dtype, tuple(info.shape), h.hexdigest())
    return out


def base_tensors_sha256(ckpt, keys: Iterable[str]) -> str:
    """The fingerprint of the base tensors ``keys`` of ``ckpt`` (reads those tensors once).

    Example:
        >>> base_tensors_sha256(open_checkpoint("base"), gain.vectors)  # doctest: +SKIP
        'sha256:3b0c...'
    """
    keys = list(keys)
    return combine(hash_tensors(ckpt, keys), keys)
