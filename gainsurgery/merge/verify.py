"""Verification of a merged checkpoint: every rescaled tensor recomputed, every other byte compared.

:func:`verify` checks an output against its plan: headers, shard names and the
index must be identical; every target tensor must equal the float32-compute,
round-once reference bit for bit; every other tensor must be byte-identical to
the base. Memory is bounded by ``chunk_bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gainsurgery.io.checkpoint import INDEX_NAME, Checkpoint
from gainsurgery.merge.kernel import BLOCK_ELEMS, ITEMSIZE, NUMPY_DTYPES, Scratch, scale_block, segments
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
           progress: Progress | None = None) -> VerifyReport:
    """Check ``out`` against ``plan``: recompute targets, compare all other bytes.

    Headers, shard names and the index must be identical; every target tensor
    must equal the float32-compute, round-once reference bit for bit; every other
    tensor must be byte-identical to the base.
    """
    progress = progress or (lambda n: None)
    report = VerifyReport()
    base = plan.base
    if list(out.shards) != list(base.shards):
        report.problems.append(f"shard files differ: base {list(base.shards)} vs output {list(out.shards)}")
        return report
    if (base.index is None) != (out.index is None) or (
        base.index is not None and (base.folder / INDEX_NAME).read_bytes() != (out.folder / INDEX_NAME).read_bytes()
    ):
        report.problems.append("index file differs from the base")
    scratch = Scratch()
    for name in base.shards:
        out_shard = out.shards[name]
        report.problems += verify_shard(plan, name, out_shard.path, report=report, chunk_bytes=chunk_bytes,
                                        progress=progress, scratch=scratch)
    return report


def verify_shard(plan: Plan, name: str, out_path: Path, *, base_path: Path | None = None,
                 report: VerifyReport | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 progress: Progress | None = None, scratch: Scratch | None = None,
                 ready: Callable[[int], None] | None = None) -> list[str]:
    """Check one written shard against the base shard it came from; return the problems found.

    The size and header must be identical, every target tensor must equal the
    float32-compute, round-once reference bit for bit, every other tensor must be
    byte-identical. The Hub pipeline verifies each shard this way before uploading it.

    Args:
        plan: the plan the shard was written from.
        name: the shard's file name.
        out_path: the written shard.
        base_path: the base shard (default: ``plan.base.shards[name].path``).
        report: counts are added to it, if given.
        chunk_bytes: bytes compared per read (bounds memory).
        ready: waits until bytes ``[0, end)`` of the written shard are final, so the
            check can follow the writer (then the size is checked last).

    Example:
        >>> verify_shard(plan, "model-00001-of-00002.safetensors", Path("out/model-00001-of-00002.safetensors"))  # doctest: +SKIP
        []
    """
    progress = progress or (lambda n: None)
    report = report if report is not None else VerifyReport()
    scratch = scratch or Scratch()
    shard = plan.base.shards[name]
    base_path = base_path or shard.path
    if ready is None:
        size = Path(out_path).stat().st_size
        if size != shard.file_size:
            return [f"{name}: size {size} bytes, base has {shard.file_size}"]
        ready = _complete
    problems: list[str] = []
    with open(base_path, "rb") as fa, open(out_path, "rb") as fb:
        ready(shard.data_start)
        if fa.read(shard.data_start) != fb.read(shard.data_start):
            return [f"{name}: header differs from the base"]
        ops = {op.info.name: op for op in plan.ops[name]}
        for tname, info in shard.tensors.items():
            report.tensors_checked += 1
            op = ops.get(tname)
            if op is None:
                if not _compare_ranges(fa, fb, info.start, info.nbytes, chunk_bytes, progress, ready):
                    problems.append(f"{tname}: bytes differ from the base but no gain targets it")
            else:
                report.tensors_scaled += 1
                if not _check_scaled(fa, fb, op, chunk_bytes, scratch, progress, ready):
                    problems.append(f"{tname}: differs from base x gain (float32, rounded once)")
            report.bytes_compared += info.nbytes
    ready(shard.file_size)
    size = Path(out_path).stat().st_size
    if size != shard.file_size:
        problems.append(f"{name}: size {size} bytes, base has {shard.file_size}")
    return problems


def _complete(end: int) -> None:
    """The ``ready`` of a finished file: everything is there."""


def _compare_ranges(fa, fb, offset: int, count: int, chunk_bytes: int, progress: Progress,
                    ready: Callable[[int], None] = _complete) -> bool:
    end = offset + count
    while offset < end:
        n = min(chunk_bytes, end - offset)
        ready(offset + n)
        fa.seek(offset)
        fb.seek(offset)
        if fa.read(n) != fb.read(n):
            return False
        offset += n
        progress(n)
    return True


def _check_scaled(fa, fb, op: TensorOp, chunk_bytes: int, scratch: Scratch, progress: Progress,
                  ready: Callable[[int], None] = _complete) -> bool:
    info = op.info
    itemsize = ITEMSIZE[info.dtype]
    dtype = NUMPY_DTYPES[info.dtype]
    vector = np.ascontiguousarray(op.vector, dtype=np.float32)
    for seg in segments(info.shape, op.dim, max(BLOCK_ELEMS, chunk_bytes // itemsize // 4)):
        offset = info.start + seg.start * itemsize
        n = (seg.stop - seg.start) * itemsize
        ready(offset + n)
        fa.seek(offset)
        fb.seek(offset)
        ref = np.frombuffer(bytearray(fa.read(n)), dtype=dtype)
        scale_block(ref, info.dtype, seg, vector, scratch)
        if ref.tobytes() != fb.read(n):
            return False
        progress(n)
    return True
