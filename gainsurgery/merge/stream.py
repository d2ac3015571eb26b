"""Streaming a plan into a folder in constant memory.

:func:`execute` writes every shard of the base into a folder (the temp folder of
a claimed OUT, see :func:`gainsurgery.io.outputs.claim_folder`): bytes no gain
touches are copied by the kernel (``copy_file_range``); target tensors are read,
scaled (:mod:`gainsurgery.merge.kernel`) and written back in bounded chunks while
a writer thread keeps file order, and a hasher thread follows the writer to
record each shard's sha256. Gains change neither shapes nor dtypes, so the
output mirrors the input: same shard names, same headers, same index.

In the same pass over the target tensors it also takes what the trust rules
need: the sha256 of each target's *input* bytes (the gain's base fingerprint is
checked from them, :mod:`gainsurgery.io.fingerprint`) and the kernel's
saturation counts (a weight that became ±inf or 0 is an error unless allowed).
Base shards are opened through the safe open and checked on the descriptor
(:func:`gainsurgery.io.safetensors.open_shard`).
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Collection

import numpy as np

from gainsurgery.errors import CheckpointError, PlanError
from gainsurgery.io.checkpoint import INDEX_NAME
from gainsurgery.io.fingerprint import TensorDigest
from gainsurgery.io.inputs import open_input
from gainsurgery.io.safetensors import Shard, open_shard
from gainsurgery.merge.kernel import (BLOCK_ELEMS, ITEMSIZE, NUMPY_DTYPES, Scratch, saturation_message, scale_block,
                                      segments)
from gainsurgery.merge.plan import Plan, TensorOp
from gainsurgery.merge.verify import DEFAULT_CHUNK_BYTES

_COPY_STEP = 64 << 20  # bytes per copy_file_range call; the hasher follows in steps this big
_MAX_PENDING_HASHES = 2  # shards whose hash may still be running while the next one streams

Progress = Callable[[int], None]


# --------------------------------------------------------------------------- streaming


class _Streamer:
    """Copies and scales one shard at a time with bounded buffers, in a pipeline.

    The main thread reads target tensors and scales them (on ``threads`` compute
    threads) while one writer thread performs every output operation in file
    order: kernel copies of untouched ranges and writes of scaled chunks. Two
    buffers of half the chunk size alternate, so reading and scaling chunk k+1
    overlaps writing chunk k, and peak memory stays at ``chunk_bytes``.
    """

    def __init__(self, chunk_bytes: int, threads: int, progress: Progress | None,
                 allow_saturation: bool = False, digest: Collection[str] = ()) -> None:
        if chunk_bytes < (1 << 20):
            raise PlanError("chunk size must be at least 1 MiB")
        self.buffers = [bytearray(chunk_bytes // 2), bytearray(chunk_bytes // 2)]
        self.pending: list[Future | None] = [None, None]
        self.turn = 0
        self.copy_buffer: bytearray | None = None  # only for filesystems without copy_file_range
        self.progress = progress or (lambda n: None)
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="gainsurgery-writer")
        self.scratch = [Scratch() for _ in range(self.threads)]
        self.queued: list[Future] = []
        self.allow_saturation = allow_saturation
        self.digest = frozenset(digest)
        #: tensor name -> sha256 of its input bytes, and -> (became inf, became zero)
        self.digests: dict[str, TensorDigest] = {}
        self.saturation: dict[str, tuple[int, int]] = {}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.writer.shutdown(wait=True)

    def stream_shard(self, fin: BinaryIO, dst: Path, shard: Shard, ops: list[TensorOp],
                     written: Callable[[int], None] = lambda end: None) -> None:
        """Write ``dst`` from the base shard open as ``fin``, in file order.

        ``written(end)`` reports that bytes [0, end) are final.
        """
        self.written = written
        file_size = shard.file_size
        with open(dst, "wb") as fout:
            fdi, fdo = fin.fileno(), fout.fileno()
            try:
                pos = 0
                for op in ops:
                    self._queue(self._copy, fdi, fdo, pos, op.info.start - pos)
                    self._scale(fdi, fdo, op)
                    pos = op.info.end
                self._queue(self._copy, fdi, fdo, pos, file_size - pos)
                self._drain()
            finally:
                self._drain(raise_errors=False)  # never close files under a running write
            # No fsync here: the kernel writes this shard back while the next one
            # streams; the claim fsyncs every file once before OUT is renamed.
        if dst.stat().st_size != file_size:
            raise PlanError(f"{shard.name}: wrote {dst.stat().st_size} bytes, expected {file_size} (base changed?)")
        with open(dst, "rb") as out:
            if os.pread(fdi, shard.data_start, 0) != out.read(shard.data_start):
                raise PlanError(f"{shard.name}: header of the written shard differs from the base (base changed?)")

    def _queue(self, fn: Callable, *args) -> Future:
        fut = self.writer.submit(fn, *args)
        self.queued.append(fut)
        # Surface a writer failure early instead of after the whole shard.
        done = [f for f in self.queued if f.done()]
        for f in done:
            self.queued.remove(f)
            f.result()
        return fut

    def _drain(self, raise_errors: bool = True) -> None:
        queued, self.queued = self.queued, []
        self.pending = [None, None]
        errors = []
        for f in queued:
            try:
                f.result()
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)
        if errors and raise_errors:
            raise errors[0]

    def _copy(self, fdi: int, fdo: int, offset: int, count: int) -> None:
        """(writer thread) Kernel copy of an untouched byte range, at the same offsets."""
        end = offset + count
        while offset < end:
            n = min(_COPY_STEP, end - offset)
            try:
                done = os.copy_file_range(fdi, fdo, n, offset, offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                done = self._copy_through_buffer(fdi, fdo, offset, n)
            if done == 0:
                raise PlanError("base shard ended early while copying (was it modified during apply?)")
            offset += done
            self.written(offset)
            self.progress(done)

    def _copy_through_buffer(self, fdi: int, fdo: int, offset: int, count: int) -> int:
        if self.copy_buffer is None:
            self.copy_buffer = bytearray(8 << 20)
        mv = memoryview(self.copy_buffer)[: min(count, len(self.copy_buffer))]
        got = os.preadv(fdi, [mv], offset)
        _pwrite_all(fdo, mv[:got], offset)
        return got

    def _write(self, fdo: int, mv: memoryview, offset: int) -> None:
        """(writer thread) Write a scaled chunk."""
        _pwrite_all(fdo, mv, offset)
        self.written(offset + len(mv))
        self.progress(len(mv))

    def _scale(self, fdi: int, fdo: int, op: TensorOp) -> None:
        info = op.info
        dtype = NUMPY_DTYPES[info.dtype]
        itemsize = ITEMSIZE[info.dtype]
        vector = np.ascontiguousarray(op.vector, dtype=np.float32)
        chunk_elems = len(self.buffers[0]) // itemsize
        # sha256 costs about as much CPU as the scaling itself: only for tensors a fingerprint covers.
        hasher = hashlib.sha256() if info.name in self.digest else None
        counts = [0, 0]
        batch: list = []
        batch_start = batch_stop = 0
        for seg in segments(info.shape, op.dim, BLOCK_ELEMS):
            if batch and seg.stop - batch_start > chunk_elems:
                self._scale_batch(fdi, fdo, info, dtype, vector, batch, batch_start, batch_stop, hasher, counts)
                batch = []
            if not batch:
                batch_start = seg.start
            batch.append(seg)
            batch_stop = seg.stop
        if batch:
            self._scale_batch(fdi, fdo, info, dtype, vector, batch, batch_start, batch_stop, hasher, counts)
        if hasher is not None:
            self.digests[info.name] = TensorDigest(info.dtype, tuple(info.shape), hasher.hexdigest())
        if counts[0] or counts[1]:
            self.saturation[info.name] = (counts[0], counts[1])
            if not self.allow_saturation:
                raise PlanError(saturation_message(info.name, info.dtype, counts[0], counts[1])
                                + "; nothing was written; pass --allow-saturation to write it anyway")

    def _scale_batch(self, fdi, fdo, info, dtype, vector, batch, start, stop, hasher, counts) -> None:
        itemsize = ITEMSIZE[info.dtype]
        nbytes = (stop - start) * itemsize
        offset = info.start + start * itemsize
        k = self.turn
        self.turn ^= 1
        if self.pending[k] is not None:  # the buffer's previous chunk must be on its way to disk
            self.pending[k].result()
        if nbytes > len(self.buffers[k]):  # one vector period longer than a chunk
            self.buffers[k] = bytearray(nbytes)
        mv = memoryview(self.buffers[k])[:nbytes]
        got = os.preadv(fdi, [mv], offset)
        if got != nbytes:
            _read_fully(fdi, mv, offset, got)
        if hasher is not None:  # the base fingerprint hashes the input bytes, before they are scaled in place
            hasher.update(mv)
        arr = np.frombuffer(mv, dtype=dtype)

        def work(t: int, stride: int) -> tuple[int, int]:
            scratch = self.scratch[t]
            inf = zero = 0
            for seg in batch[t::stride]:
                a, b = scale_block(arr[seg.start - start : seg.stop - start], info.dtype, seg, vector, scratch)
                inf, zero = inf + a, zero + b
            return inf, zero

        if self.pool is None or len(batch) == 1:
            results = [work(0, 1)]
        else:
            results = [fut.result() for fut in [self.pool.submit(work, t, self.threads) for t in range(self.threads)]]
        for a, b in results:
            counts[0] += a
            counts[1] += b
        self.pending[k] = self._queue(self._write, fdo, mv, offset)


def _read_fully(fd: int, mv: memoryview, offset: int, got: int) -> None:
    while got < len(mv):
        n = os.preadv(fd, [mv[got:]], offset + got)
        if n == 0:
            raise PlanError("base shard ended early while reading a tensor (truncated or modified?)")
        got += n


def _pwrite_all(fd: int, mv: memoryview, offset: int) -> None:
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)


class _FollowingHasher:
    """sha256 of a file that is being written front to back, hashed as it grows.

    The writer reports how far the file is final (:meth:`advance`); a thread
    hashes up to there, so hashing overlaps streaming instead of following it.
    Memory: one 8 MiB buffer.
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size
        self.final = 0
        self.cond = threading.Condition()
        self.failed = False
        self.result: str | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"sha256 {path.name}", daemon=True)
        self.thread.start()

    def advance(self, end: int) -> None:
        with self.cond:
            self.final = end
            self.cond.notify()

    def abort(self) -> None:
        with self.cond:
            self.failed = True
            self.cond.notify()

    def hexdigest(self) -> str:
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def _run(self) -> None:
        try:
            h = hashlib.sha256()
            mv = memoryview(bytearray(8 << 20))
            pos = 0
            fd = os.open(self.path, os.O_RDONLY)
            try:
                while pos < self.size:
                    with self.cond:
                        while self.final <= pos and not self.failed:
                            self.cond.wait()
                        if self.failed:
                            return
                        limit = self.final
                    while pos < limit:
                        n = os.preadv(fd, [mv[: min(len(mv), limit - pos)]], pos)
                        if n == 0:
                            raise PlanError(f"{self.path.name}: shorter than expected while hashing")
                        h.update(mv[:n])
                        pos += n
            finally:
                os.close(fd)
            self.result = h.hexdigest()
        except BaseException as exc:  # re-raised in the main thread by hexdigest()
            self.error = exc




@dataclass
class StreamResult:
    """What :func:`execute` wrote and measured.

    Attributes:
        shard_sha256: shard name -> sha256 of the written shard.
        tensor_digests: target tensor name -> dtype, shape and sha256 of its *base* bytes, for
            the tensors asked for (the gains' base fingerprints, :mod:`gainsurgery.io.fingerprint`).
        saturation: target tensor name -> (finite weights that became ±inf, non-zero
            weights that became 0); only tensors with any, and only when allowed.
    """

    shard_sha256: dict[str, str] = field(default_factory=dict)
    tensor_digests: dict[str, TensorDigest] = field(default_factory=dict)
    saturation: dict[str, tuple[int, int]] = field(default_factory=dict)


def execute(
    plan: Plan,
    folder: Path,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int | None = None,
    progress: Progress | None = None,
    fetch_shard: Callable[[Shard], None] | None = None,
    allow_saturation: bool = False,
    digest: Collection[str] = (),
) -> StreamResult:
    """Write the base's shards, with ``plan`` applied, and its index into the existing ``folder``.

    Args:
        plan: from :func:`~gainsurgery.merge.plan.make_plan`.
        folder: an empty folder (the temp folder of a claimed OUT).
        chunk_bytes: bytes of tensor data scaled per read (bounds peak memory).
        threads: compute threads for scaling (default: CPU count, at most 4).
        progress: called with the number of bytes handled, as they are.
        fetch_shard: called with each shard just before it is streamed, to make
            ``shard.path`` readable (a Hub base downloads it); one at a time.
        allow_saturation: write weights that scaling turns into ±inf or 0 instead
            of failing (they are counted in the result either way).
        digest: target tensors whose input bytes to hash (the tensors the gains'
            base fingerprints cover); the others are not hashed.

    Returns:
        A :class:`StreamResult`: per-shard sha256, per-target base digests, saturation counts.

    Raises:
        PlanError: the base changed under us (sizes or headers differ, a shard ended
            early), or a tensor saturates and ``allow_saturation`` is not set.
        CheckpointError: a base shard is no longer the file whose header was read.

    Example:
        >>> result = execute(make_plan(ckpt, gain), claim.tmp)  # doctest: +SKIP
        >>> sorted(result.shard_sha256)  # doctest: +SKIP
        ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """
    base = plan.base
    threads = threads or min(4, os.cpu_count() or 1)
    streamer = _Streamer(chunk_bytes, threads, progress, allow_saturation, digest)
    hashers: dict[str, _FollowingHasher] = {}
    try:
        for name, shard in base.shards.items():
            dst = folder / name
            dst.touch()
            # Hash each shard while it is written; a slow hash may run on into the
            # next shard, but no more than a couple at once (bounded memory).
            pending = [h for h in hashers.values() if h.thread.is_alive()]
            for h in pending[: max(0, len(pending) - _MAX_PENDING_HASHES + 1)]:
                h.thread.join()
            if fetch_shard is not None:
                fetch_shard(shard)
            hashers[name] = _FollowingHasher(dst, shard.file_size)
            with open_shard(shard, error=CheckpointError) as fin:
                streamer.stream_shard(fin, dst, shard, plan.ops[name], hashers[name].advance)
        if base.index is not None:
            with open_input(base.folder, INDEX_NAME, error=CheckpointError) as src, \
                    open(folder / INDEX_NAME, "xb") as index_out:
                shutil.copyfileobj(src, index_out)
        return StreamResult({name: h.hexdigest() for name, h in hashers.items()}, streamer.digests,
                            streamer.saturation)
    finally:
        for h in hashers.values():
            h.abort()
            h.thread.join()
        streamer.close()
