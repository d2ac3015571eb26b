"""Verification of a merged checkpoint: every rescaled tensor recomputed, every other byte compared.

:func:`verify` checks an output against its plan: headers, shard names and the
index must be identical; every target tensor must equal the float32-compute,
round-once reference bit for bit; every other tensor must be byte-identical to
the base. Memory is bounded by ``chunk_bytes``. A target whose reference holds
weights that scaling turned into ±inf or 0 (saturation) is a problem too, unless
the caller allows it (as ``apply --allow-saturation`` did). Every file is opened
through the safe open (:func:`gainsurgery.io.safetensors.open_shard`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from gainsurgery.io.checkpoint import INDEX_NAME, Checkpoint
from gainsurgery.io.inputs import open_input
from gainsurgery.io.safetensors import open_shard
from gainsurgery.merge.kernel import (BLOCK_ELEMS, ITEMSIZE, NUMPY_DTYPES, Scratch, saturation_message, scale_block,
                                      segments)
from gainsurgery.merge.plan import Plan, TensorOp

DEFAULT_CHUNK_BYTES = 64 << 20

Progress = Callable[[int], None]


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`. ``ok`` only when ``problems`` is empty."""

    tensors_checked: int = 0
    tensors_scaled: int = 0
    bytes_compared: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "tensors_checked": self.tensors_checked, "tensors_scaled": self.tensors_scaled,
                "bytes_compared": self.bytes_compared, "problems": self.problems}


def verify(plan: Plan, out: Checkpoint, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
           progress: Progress | None = None, allow_saturation: bool = False) -> VerifyReport:
    """Check ``out`` against ``plan``: recompute targets, compare all other bytes.

    Headers, shard names and the index must be identical; every target tensor
    must equal the float32-compute, round-once reference bit for bit; every other
    tensor must be byte-identical to the base; and, unless ``allow_saturation``,
    no target may hold weights that scaling turned into ±inf or 0.

    Example:
        >>> verify(make_plan(base, gain), open_checkpoint("merged")).ok  # doctest: +SKIP
        True
    """
    progress = progress or (lambda n: None)
    report = VerifyReport()
    base = plan.base
    if list(out.shards) != list(base.shards):
        report.problems.append(f"shard files differ: base {list(base.shards)} vs output {list(out.shards)}")
        return report
    if (base.index is None) != (out.index is None) or (
        base.index is not None and _read_index_bytes(base) != _read_index_bytes(out)
    ):
        report.problems.append("index file differs from the base")
    scratch = Scratch()
    for name, shard in base.shards.items():
        out_shard = out.shards[name]
        if out_shard.file_size != shard.file_size:
            report.problems.append(f"{name}: size {out_shard.file_size} bytes, base has {shard.file_size}")
            continue
        with open_shard(shard) as fa, open_shard(out_shard) as fb:
            if fa.read(shard.data_start) != fb.read(shard.data_start):
                report.problems.append(f"{name}: header differs from the base")
                continue
            ops = {op.info.name: op for op in plan.ops[name]}
            for tname, info in shard.tensors.items():
                report.tensors_checked += 1
                op = ops.get(tname)
                if op is None:
                    same = _compare_ranges(fa, fb, info.start, info.nbytes, chunk_bytes, progress)
                    if not same:
                        report.problems.append(f"{tname}: bytes differ from the base but no gain targets it")
                else:
                    report.tensors_scaled += 1
                    same, inf, zero = _check_scaled(fa, fb, op, chunk_bytes, scratch, progress)
                    if not same:
                        report.problems.append(f"{tname}: differs from base x gain (float32, rounded once)")
                    if (inf or zero) and not allow_saturation:
                        report.problems.append(saturation_message(tname, info.dtype, inf, zero)
                                               + "; pass --allow-saturation if that was intended")
                report.bytes_compared += info.nbytes
    return report


def _compare_ranges(fa, fb, offset: int, count: int, chunk_bytes: int, progress: Progress) -> bool:
    end = offset + count
    while offset < end:
        n = min(chunk_bytes, end - offset)
        fa.seek(offset)
        fb.seek(offset)
        if fa.read(n) != fb.read(n):
            return False
        offset += n
        progress(n)
    return True


def _read_index_bytes(ckpt: Checkpoint) -> bytes:
    with open_input(ckpt.folder, INDEX_NAME) as f:
        return f.read()


def _check_scaled(fa, fb, op: TensorOp, chunk_bytes: int, scratch: Scratch,
                  progress: Progress) -> tuple[bool, int, int]:
    """(output equals the reference, weights that became ±inf, weights that became 0)."""
    info = op.info
    itemsize = ITEMSIZE[info.dtype]
    dtype = NUMPY_DTYPES[info.dtype]
    vector = np.ascontiguousarray(op.vector, dtype=np.float32)
    same, inf, zero = True, 0, 0
    for seg in segments(info.shape, op.dim, max(BLOCK_ELEMS, chunk_bytes // itemsize // 4)):
        offset = info.start + seg.start * itemsize
        n = (seg.stop - seg.start) * itemsize
        fa.seek(offset)
        fb.seek(offset)
        ref = np.frombuffer(bytearray(fa.read(n)), dtype=dtype)
        a, b = scale_block(ref, info.dtype, seg, vector, scratch)
        inf, zero = inf + a, zero + b
        if ref.tobytes() != fb.read(n):
            return False, inf, zero
        progress(n)
    return same, inf, zero
