"""Verification of a merged checkpoint: every rescaled tensor recomputed, every other byte compared.

:func:`verify` checks an output against its plan: headers, shard names and the
index must be identical; every target tensor must equal the float32-compute,
round-once reference bit for bit; every other tensor must be byte-identical to
the base. Memory is bounded by ``chunk_bytes``. A target whose reference holds
weights that scaling turned into ±inf or 0 (saturation) is a problem too, unless
the caller allows it (as ``apply --allow-saturation`` did). Every file is opened
through the safe open (:func:`gainsurgery.io.safetensors.open_shard`).
:func:`verify_shard` checks one shard from files the caller opened; the Hub
pipeline uses it to verify each shard as it is written, before uploading it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO, Callable

import numpy as np

from gainsurgery.errors import CheckpointError, GainSurgeryError
from gainsurgery.io.checkpoint import INDEX_NAME, Checkpoint
from gainsurgery.io.inputs import folder_entries, open_input, show_path
from gainsurgery.io.safetensors import open_shard
from gainsurgery.merge.kernel import (BLOCK_ELEMS, DEFAULT_CHUNK_BYTES, ITEMSIZE, NUMPY_DTYPES, Scratch,
                                      saturation_message, scale_block, segments)
from gainsurgery.merge.plan import Plan, TensorOp
from gainsurgery.reports import ProblemReport
from gainsurgery.sources.spec import hf_cache_repo

#: Problems listed one by one about a folder's file set (a folder of a million junk files
#: must not make a million lines); the rest are counted in one.
MAX_FILE_PROBLEMS = 1000
#: What the Hub adds to every repo (git plumbing, never read by a model loader): the one
#: name beyond apply's own files allowed in a Hugging Face cache snapshot of a pushed output.
HUB_PLUMBING = (".gitattributes",)

Progress = Callable[[int], None]


@dataclass
class VerifyReport(ProblemReport):
    """Outcome of :func:`verify`. ``ok`` only when ``problems`` is empty."""

    tensors_checked: int = 0
    tensors_scaled: int = 0
    bytes_compared: int = 0


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
    report = VerifyReport()
    base = plan.base
    if list(base.shards) != list(out.shards):
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
            report.problems += verify_shard(plan, name, fa, fb, report=report, chunk_bytes=chunk_bytes,
                                            progress=progress, scratch=scratch, allow_saturation=allow_saturation)
    return report


def check_files(plan: Plan, out: Checkpoint, generated: tuple[str, ...], *,
                chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> list[str]:
    """Check that the folder of ``out`` holds exactly the files an apply of ``plan`` writes.

    Those are the base's shards, its index (when it has one), its extra files
    (config, tokenizer, license...: :meth:`~gainsurgery.io.checkpoint.Checkpoint.extra_files`),
    each byte-identical to the base's, and the ``generated`` files (provenance and
    card, whose text holds times, so only their presence is checked). Anything else
    is a problem: an extra file (a shard the index does not name), a missing one, a
    folder, a symbolic link, a FIFO or device, hidden names included. In a Hugging
    Face cache snapshot (a download of a pushed output) the files are links into the
    repo's ``blobs/``, and the Hub's ``.gitattributes`` is allowed.

    Returns the problems (empty when the file set is right); the shards' and the
    index's bytes are compared by :func:`verify`.

    Example:
        >>> check_files(plan, open_checkpoint("merged"), OUTPUT_FILES)  # doctest: +SKIP
        ['extra file model-00004-of-00003.safetensors (apply writes no such file)']
    """
    base = plan.base
    copied = {f.name for f in base.extra_files(skip=generated)}
    expected = set(base.shards) | copied | set(generated) | ({INDEX_NAME} if base.index is not None else set())
    snapshot = hf_cache_repo(out.folder) is not None
    problems: list[str] = []
    present: set[str] = set()
    files: set[str] = set()
    for entry in folder_entries(out.folder, error=CheckpointError):
        shown = show_path(entry.name)
        if entry.name in expected:
            present.add(entry.name)
            if entry.kind == "file":
                files.add(entry.name)
            else:
                problems.append(f"{shown} is {entry.what}; apply writes a regular file there")
        elif snapshot and entry.name in HUB_PLUMBING and entry.kind == "file":
            continue
        elif entry.kind == "folder":
            problems.append(f"extra folder {shown} (apply writes no folders)")
        else:
            what = "file" if entry.kind == "file" else entry.what
            problems.append(f"extra {what} {shown} (apply writes no such file)")
    problems += [f"missing file {show_path(n)}" for n in sorted(expected - present)]
    for name in sorted(copied & files):
        problems += _compare_files(base, out, name, chunk_bytes)
    if len(problems) > MAX_FILE_PROBLEMS:
        problems = problems[:MAX_FILE_PROBLEMS] + [f"... and {len(problems) - MAX_FILE_PROBLEMS} more problems "
                                                   "with the folder's files"]
    return problems


def _compare_files(base: Checkpoint, out: Checkpoint, name: str, chunk_bytes: int) -> list[str]:
    """A copied file must be the base's, byte for byte (read safely on both sides)."""
    try:
        with open_input(base.folder, name, error=CheckpointError) as fa, \
                open_input(out.folder, name, error=CheckpointError) as fb:
            if os.fstat(fa.fileno()).st_size != os.fstat(fb.fileno()).st_size:
                return [f"{show_path(name)} differs from the base's (its size)"]
            while True:
                a, b = fa.read(chunk_bytes), fb.read(chunk_bytes)
                if a != b:
                    return [f"{show_path(name)} differs from the base's"]
                if not a:
                    return []
    except GainSurgeryError as exc:
        return [str(exc)]


def verify_shard(plan: Plan, name: str, base_file: BinaryIO, out_file: BinaryIO, *,
                 report: VerifyReport | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 progress: Progress | None = None, scratch: Scratch | None = None,
                 allow_saturation: bool = False, ready: Callable[[int], None] | None = None) -> list[str]:
    """Check one written shard against the base shard it came from; return the problems found.

    The size and header must be identical, every target tensor must equal the
    float32-compute, round-once reference bit for bit (and hold no weight that
    scaling turned into ±inf or 0, unless ``allow_saturation``), every other tensor
    must be byte-identical.

    Args:
        plan: the plan the shard was written from.
        name: the shard's file name.
        base_file: the base shard, opened by the caller (:func:`~gainsurgery.io.safetensors.open_shard`
            for a checkpoint's shard; the pipeline's own download otherwise).
        out_file: the written shard, opened by the caller.
        report: counts are added to it, if given.
        chunk_bytes: bytes compared per read (bounds memory).
        allow_saturation: a target with saturated weights is not a problem.
        ready: waits until bytes ``[0, end)`` of the written shard are final, so the
            check can follow the writer (then the size is checked last).

    Example:
        >>> with open_shard(base.shards[n]) as a, open_shard(out.shards[n]) as b:  # doctest: +SKIP
        ...     verify_shard(plan, n, a, b)
        []
    """
    progress = progress or (lambda n: None)
    report = report if report is not None else VerifyReport()
    scratch = scratch or Scratch()
    shard = plan.base.shards[name]
    fa, fb = base_file, out_file
    if ready is None:
        size = os.fstat(fb.fileno()).st_size
        if size != shard.file_size:
            return [f"{name}: size {size} bytes, base has {shard.file_size}"]
        ready = _complete
    problems: list[str] = []
    ready(shard.data_start)
    fa.seek(0)
    fb.seek(0)
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
            same, inf, zero = _check_scaled(fa, fb, op, chunk_bytes, scratch, progress, ready)
            if not same:
                problems.append(f"{tname}: differs from base x gain (float32, rounded once)")
            if (inf or zero) and not allow_saturation:
                problems.append(saturation_message(tname, info.dtype, inf, zero)
                                + "; pass --allow-saturation if that was intended")
        report.bytes_compared += info.nbytes
    ready(shard.file_size)
    size = os.fstat(fb.fileno()).st_size
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
        progress(n)
        offset += n
    return True


def _read_index_bytes(ckpt: Checkpoint) -> bytes:
    with open_input(ckpt.folder, INDEX_NAME) as f:
        return f.read()


def _check_scaled(fa, fb, op: TensorOp, chunk_bytes: int, scratch: Scratch, progress: Progress,
                  ready: Callable[[int], None] = _complete) -> tuple[bool, int, int]:
    """(output equals the reference, weights that became ±inf, weights that became 0)."""
    info = op.info
    itemsize = ITEMSIZE[info.dtype]
    dtype = NUMPY_DTYPES[info.dtype]
    vector = np.ascontiguousarray(op.vector, dtype=np.float32)
    inf = zero = 0
    for seg in segments(info.shape, op.dim, max(BLOCK_ELEMS, chunk_bytes // itemsize // 4)):
        offset = info.start + seg.start * itemsize
        n = (seg.stop - seg.start) * itemsize
        ready(offset + n)
        fa.seek(offset)
        fb.seek(offset)
        ref = np.frombuffer(bytearray(fa.read(n)), dtype=dtype)
        a, b = scale_block(ref, info.dtype, seg, vector, scratch)
        inf, zero = inf + a, zero + b
        if ref.tobytes() != fb.read(n):
            return False, inf, zero
        progress(n)
    return True, inf, zero
