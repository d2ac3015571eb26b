"""The plan of an apply: which tensors of the base are scaled by which vector, from headers alone.

:func:`make_plan` is pure: it matches a (stacked) gain file against a
checkpoint's headers and refuses anything that does not fit, before any output
exists or any tensor byte is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gainsurgery.errors import PlanError
from gainsurgery.io.inputs import show_name
from gainsurgery.gainfile import GainFile, check_values, natural_key
from gainsurgery.io.checkpoint import Checkpoint, refuse_unscalable
from gainsurgery.io.safetensors import TensorInfo


@dataclass(frozen=True)
class TensorOp:
    """Scale one tensor of the base by ``vector`` along ``dim``."""

    info: TensorInfo
    vector: np.ndarray
    dim: int


@dataclass
class Plan:
    """What an apply will do; computed from headers alone.

    Attributes:
        base: the opened base checkpoint.
        gain: the stacked gain applied in one pass.
        sources: provenance of each gain file (name, path, sha256, ...).
        ops: shard name -> tensor operations sorted by file offset.
    """

    base: Checkpoint
    gain: GainFile
    sources: list[dict[str, Any]]
    ops: dict[str, list[TensorOp]]

    @property
    def tensors_touched(self) -> int:
        """Number of tensors that will be rewritten."""
        return sum(len(v) for v in self.ops.values())

    @property
    def bytes_rewritten(self) -> int:
        """Bytes of tensor data read, scaled and written by Python."""
        return sum(op.info.nbytes for ops in self.ops.values() for op in ops)

    @property
    def bytes_copied(self) -> int:
        """Bytes copied unchanged by the kernel (headers included)."""
        return self.base.total_bytes - self.bytes_rewritten

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description of the plan, for --dry-run and provenance."""
        return {
            "base": str(self.base.folder),
            "shards": len(self.base.shards),
            "tensors_total": len(self.base.tensors),
            "tensors_touched": self.tensors_touched,
            "gain_parameters": self.gain.num_parameters,
            "bytes_total": self.base.total_bytes,
            "bytes_rewritten": self.bytes_rewritten,
            "bytes_copied": self.bytes_copied,
            "touched": [
                {"tensor": op.info.name, "shard": op.info.shard, "dtype": op.info.dtype,
                 "shape": list(op.info.shape), "dim": op.dim, "bytes": op.info.nbytes}
                for ops in self.ops.values() for op in ops
            ],
        }


def make_plan(
    base: Checkpoint,
    gain: GainFile,
    sources: list[dict[str, Any]] | None = None,
    *,
    allow_negative: bool = False,
) -> Plan:
    """Match ``gain`` against ``base``; raise PlanError on anything that does not fit.

    Every key must name a tensor of the base, its dim must exist, the vector
    length must equal that dim's size, and the tensor must be float32, float16
    or bfloat16. Nothing is read beyond headers.
    """
    ops: dict[str, list[TensorOp]] = {name: [] for name in base.shards}
    for key in sorted(gain.vectors, key=natural_key):
        vector = gain.vectors[key]
        dim = gain.dims[key]
        info = base.tensors.get(key)
        if info is None:
            hint = _closest(key, base.tensors)
            raise PlanError(
                f"gain key {show_name(key)} is not a tensor of the base checkpoint"
                + (f" (closest: {show_name(hint)}); was the gain trained on another model?" if hint else "")
            )
        if dim >= len(info.shape):
            raise PlanError(f"gain for {show_name(key)} runs along dim {dim}, but the tensor has only "
                            f"{len(info.shape)} dims")
        if info.shape[dim] != vector.size:
            raise PlanError(
                f"gain for {show_name(key)} has length {vector.size}, but dim {dim} of the tensor has size "
                f"{info.shape[dim]}"
            )
        refuse_unscalable(info)
        check_values(vector, key, allow_negative=allow_negative)
        ops[info.shard].append(TensorOp(info, vector, dim))
    for shard_ops in ops.values():
        shard_ops.sort(key=lambda op: op.info.start)
    return Plan(base, gain, list(sources or []), ops)


def _closest(key: str, names) -> str | None:
    import difflib

    found = difflib.get_close_matches(key, list(names), n=1, cutoff=0.6)
    return found[0] if found else None
