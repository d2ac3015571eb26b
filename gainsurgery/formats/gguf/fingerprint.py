"""The base fingerprint of a GGUF file: ``base_tensors_sha256`` as the checkpoint it dequantizes to holds it.

A gain records ``base_tensors_sha256`` (docs/gain-format.md): for each key, the line
``KEY TAB DTYPE TAB SHAPE TAB SHA256`` of the base tensor's bytes as its safetensors
checkpoint stores them. A GGUF file is the same fingerprint taken over **the checkpoint
one gets by dequantizing the GGUF** — every tensor dequantized by the ``gguf`` library
to float32, laid out as the checkpoint lays it out (``[out, in]``, the GGUF numpy
shape), then stored as DTYPE:

- ``F32``: the float32 values themselves;
- ``BF16`` / ``F16``: rounded to nearest even (what ``torch.Tensor.to`` and numpy do).

Which DTYPE a gain was trained on is not recorded, so a GGUF base accepts a gain whose
fingerprint matches any of the three (each computed from one dequantization). This
is what makes a gain trained on ``embedded:gemma-3-270m`` (that Q4_K_M file,
dequantized by transformers into bf16) apply to the GGUF without an override, while
a gain for other weights is refused as for safetensors. ``targets --init`` on a GGUF
records the F32 variant.

Example:
    >>> d = DigestSet((2, 2)); d.update(np.ones((2, 2), np.float32))
    >>> sorted(d.digests())
    ['BF16', 'F16', 'F32']
"""

from __future__ import annotations

import hashlib
from typing import Iterable, Mapping

import numpy as np

from gainsurgery.io.fingerprint import TensorDigest, combine

#: The checkpoint dtypes a GGUF tensor is fingerprinted as, in the order they are tried.
VARIANTS = ("BF16", "F16", "F32")


class DigestSet:
    """Incremental sha256 of one dequantized tensor stored as each of :data:`VARIANTS`.

    Feed float32 rows in order with :meth:`update`; :meth:`digests` gives one
    :class:`~gainsurgery.io.fingerprint.TensorDigest` per dtype.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(int(d) for d in shape)
        self._hash = {v: hashlib.sha256() for v in VARIANTS}

    def update(self, values: np.ndarray) -> None:
        """Add the next float32 weights (any shape, C order)."""
        v = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
        self._hash["F32"].update(v.view(np.uint8))
        with np.errstate(over="ignore"):
            self._hash["F16"].update(v.astype("<f2").view(np.uint8))
        bits = v.view(np.uint32)
        bf16 = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
        nan = np.isnan(v)
        if nan.any():
            bf16[nan] = ((bits[nan] >> 16) | 0x40).astype("<u2")
        self._hash["BF16"].update(bf16.view(np.uint8))

    def digests(self) -> dict[str, TensorDigest]:
        """dtype -> the tensor's digest as stored in that dtype."""
        return {v: TensorDigest(v, self.shape, h.hexdigest()) for v, h in self._hash.items()}


def fingerprints(digests: Mapping[str, DigestSet], keys: Iterable[str]) -> dict[str, str]:
    """dtype -> ``base_tensors_sha256`` of the tensors ``keys`` dequantized to that dtype.

    Raises:
        KeyError: a key has no digest.
    """
    keys = list(keys)
    per_key = {k: digests[k].digests() for k in keys}
    return {v: combine({k: per_key[k][v] for k in keys}) for v in VARIANTS}


def matching_variant(digests: Mapping[str, DigestSet], keys: Iterable[str], expected: str) -> str | None:
    """The dtype whose fingerprint of ``keys`` equals ``expected``, or None."""
    for variant, value in fingerprints(digests, keys).items():
        if value == expected:
            return variant
    return None
