"""Streaming a plan into a folder in constant memory.

:func:`execute` writes every shard of the base into a folder (the temp folder of
a claimed OUT, see :func:`gainsurgery.io.claims.claim_folder`): bytes no gain
touches are copied by the kernel (``copy_file_range``); target tensors are read,
scaled (:mod:`gainsurgery.merge.kernel`) and written back in bounded chunks while
a writer thread keeps file order, and a hasher thread records each shard's
sha256 from the bytes being written (the scaled chunks in memory, the copied
ranges from the source), without reading the output back. Gains change neither
shapes nor dtypes, so the output mirrors the input: same shard names, same
headers, same index. :class:`ShardStreamer` streams one shard at a time (the Hub
pipeline uses it shard by shard, even while a shard is downloading).

In the same pass over the target tensors it also takes what the trust rules
need: the sha256 of each target's *input* bytes (the gain's base fingerprint is
checked from them, :mod:`gainsurgery.io.fingerprint`) and the kernel's
saturation counts (a weight that became ±inf or 0 is an error unless allowed).
Base shards are read from descriptors the caller opened safely
(:func:`gainsurgery.io.safetensors.open_shard` for a checkpoint's shards); output
shards are created inside the caller's claimed folder, never through a link.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Collection

import numpy as np

from gainsurgery.errors import CheckpointError, PlanError
from gainsurgery.io.atomic import create_file, open_nofollow
from gainsurgery.io.checkpoint import INDEX_NAME
from gainsurgery.io.fingerprint import TensorDigest
from gainsurgery.io.inputs import open_input
from gainsurgery.io.pausepoints import pause_point
from gainsurgery.io.safetensors import Shard, open_shard
from gainsurgery.merge.kernel import (BLOCK_ELEMS, DEFAULT_CHUNK_BYTES, ITEMSIZE, NUMPY_DTYPES, Scratch,
                                      saturation_message, scale_block, segments)
from gainsurgery.merge.plan import Plan, TensorOp

_COPY_STEP = 64 << 20  # bytes per copy_file_range call
#: Buffers the chunk is split into: scaling runs ahead of writing and hashing by up to this many.
_BUFFERS = 2
#: Shards whose sha256 may be computed at once (on as many threads): a shard's hash may
#: run on while the next shard streams, without holding up that shard's own hash.
_HASH_THREADS = 2
_HASH_STEP = 64 << 20  # bytes of a copied range mapped (from the page cache) per hash update

Progress = Callable[[int], None]


# --------------------------------------------------------------------------- streaming


#: Waits until the source file holds at least the given number of bytes (a shard still
#: being downloaded); raises if it never will. None: the source is complete.
SourceReady = Callable[[int], None]


class _HashJob:
    """The sha256 of one output shard, as the hasher thread builds it."""

    def __init__(self, fd: int, pool: ThreadPoolExecutor) -> None:
        self.h = hashlib.sha256()
        self.fd = fd  # the hasher's own descriptor of the source shard
        self.pool = pool  # the thread that hashes this shard, in order
        self.error: BaseException | None = None
        self.cancelled = False


class _ShardHasher:
    """sha256 of each output shard, from bytes the streamer already holds, in file order.

    One thread consumes, in the order the shard is written: scaled chunks (the
    writer's own buffers, hashed before they are reused) and the byte ranges the
    kernel copies. A copied range holds the same bytes in the source and in the
    output, so it is hashed from the source, mapped (``mmap``) a window at a time:
    sha256 reads the page cache directly (the kernel copy reads the same pages),
    with no copy into a buffer of ours and no read of the output. A shard's hash
    may still run while the next shard streams: consecutive shards are hashed on
    different threads (:data:`_HASH_THREADS`), each in its own file order.
    """

    def __init__(self) -> None:
        self.pools = [ThreadPoolExecutor(1, thread_name_prefix="gainsurgery-sha256")
                      for _ in range(_HASH_THREADS)]
        self.shards = 0

    def close(self) -> None:
        for pool in self.pools:
            pool.shutdown(wait=True)

    def job(self, fd: int) -> _HashJob:
        """A new shard's hash, on the next thread."""
        job = _HashJob(fd, self.pools[self.shards % len(self.pools)])
        self.shards += 1
        return job

    def source_range(self, job: _HashJob, offset: int, count: int, ready: SourceReady | None) -> Future:
        return job.pool.submit(self._guarded, job, self._hash_range, job, offset, count, ready)

    def chunk(self, job: _HashJob, mv: memoryview) -> Future:
        return job.pool.submit(self._guarded, job, job.h.update, mv)

    def finish(self, job: _HashJob) -> Future:
        """The hex digest once every queued update is done (or the first error); closes the job's fd."""

        def done() -> str:
            os.close(job.fd)
            if job.error is not None:
                raise job.error
            if job.cancelled:
                raise PlanError("hashing was cancelled")
            return job.h.hexdigest()

        return job.pool.submit(done)

    @staticmethod
    def _guarded(job: _HashJob, fn: Callable, *args) -> None:
        if job.error is not None or job.cancelled:
            return
        try:
            fn(*args)
        except BaseException as exc:  # kept for finish(), which raises it in the caller's thread
            job.error = exc

    @staticmethod
    def _hash_range(job: _HashJob, offset: int, count: int, ready: SourceReady | None) -> None:
        end = offset + count
        while offset < end:
            if job.cancelled:
                return
            n = min(_HASH_STEP, end - offset)
            if ready is not None:
                ready(offset + n)
            # Checked just before mapping: touching a mapped page past the end of a file
            # (truncated meanwhile) would be a SIGBUS, not an exception.
            if os.fstat(job.fd).st_size < offset + n:
                raise PlanError("base shard ended early while hashing (was it modified during apply?)")
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            with mmap.mmap(job.fd, offset + n - start, access=mmap.ACCESS_READ, offset=start) as m:
                if hasattr(m, "madvise"):
                    m.madvise(mmap.MADV_SEQUENTIAL)
                with memoryview(m) as view:
                    job.h.update(view[offset - start:])
            offset += n


class _Streamer:
    """Copies and scales one shard at a time with bounded buffers, in a pipeline.

    The main thread reads target tensors and scales them (on ``threads`` compute
    threads) while one writer thread performs every output operation in file
    order: kernel copies of untouched ranges and writes of scaled chunks. Two
    buffers of half the chunk size alternate, so reading and scaling chunk k+1
    overlaps writing chunk k, and peak memory stays at ``chunk_bytes``. A hasher
    thread (:class:`_ShardHasher`) follows in the same order.
    """

    def __init__(self, chunk_bytes: int, threads: int, progress: Progress | None,
                 allow_saturation: bool = False, digest: Collection[str] = ()) -> None:
        if chunk_bytes < (1 << 20):
            raise PlanError("chunk size must be at least 1 MiB")
        self.buffers = [bytearray(chunk_bytes // _BUFFERS) for _ in range(_BUFFERS)]
        # A buffer is free again once its chunk is written and hashed.
        self.pending: list[list[Future]] = [[] for _ in range(_BUFFERS)]
        self.turn = 0
        self.copy_buffer: bytearray | None = None  # only for filesystems without copy_file_range
        self.progress = progress or (lambda n: None)
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="gainsurgery-writer")
        self.hasher = _ShardHasher()
        self.scratch = [Scratch() for _ in range(self.threads)]
        self.queued: list[Future] = []
        self.ready: SourceReady | None = None
        self.written: Callable[[int], None] | None = None
        self.allow_saturation = allow_saturation
        self.digest = frozenset(digest)
        #: tensor name -> sha256 of its input bytes, and -> (became inf, became zero)
        self.digests: dict[str, TensorDigest] = {}
        self.saturation: dict[str, tuple[int, int]] = {}

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.writer.shutdown(wait=True)
        self.hasher.close()

    def stream_shard(self, fin: BinaryIO, dst: Path, shard: Shard, ops: list[TensorOp],
                     ready: SourceReady | None = None, written: Callable[[int], None] | None = None) -> Future:
        """Write ``dst`` from the base shard open as ``fin``, in file order; return a future of its sha256 (hex).

        The hash may still be running when this returns. ``ready``: see
        :data:`SourceReady` (the source is being downloaded as we go). ``written(end)``:
        told (on the writer thread) that bytes ``[0, end)`` of ``dst`` are final.
        """
        self.ready, self.written = ready, written
        file_size = shard.file_size
        with _create_output(dst) as fout:
            fdi, fdo = fin.fileno(), fout.fileno()
            job = self.hasher.job(os.dup(fdi))  # the hasher may still read after ``fin`` is closed
            digest = None
            try:
                pos = 0
                for op in ops:
                    self._copy_range(job, fdi, fdo, pos, op.info.start - pos)
                    self._scale(job, fdi, fdo, op)
                    pos = op.info.end
                self._copy_range(job, fdi, fdo, pos, file_size - pos)
                self._drain()
                digest = self.hasher.finish(job)
            finally:
                self._drain(raise_errors=False)  # never close files under a running write
                if digest is None:
                    job.cancelled = True
                    self.hasher.finish(job)  # closes the hasher's fd once it gets there
            # No fsync here: the kernel writes this shard back while the next one
            # streams; execute() fsyncs it then, and the claim every file before OUT is renamed.
            if os.fstat(fdo).st_size != file_size:
                raise PlanError(f"{shard.name}: wrote {os.fstat(fdo).st_size} bytes, expected {file_size} "
                                "(base changed?)")
            if os.pread(fdi, shard.data_start, 0) != os.pread(fdo, shard.data_start, 0):
                raise PlanError(f"{shard.name}: header of the written shard differs from the base (base changed?)")
        return digest

    def _copy_range(self, job: _HashJob, fdi: int, fdo: int, offset: int, count: int) -> None:
        if count > 0:
            self._queue(self._copy, fdi, fdo, offset, count)
            self.hasher.source_range(job, offset, count, self.ready)

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
        """Wait for every queued write (not for hashing: a buffer waits for its own hash before reuse)."""
        queued, self.queued = self.queued, []
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
            if self.ready is not None:
                self.ready(offset + n)
            try:
                done = os.copy_file_range(fdi, fdo, n, offset, offset)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
                done = self._copy_through_buffer(fdi, fdo, offset, n)
            if done == 0:
                raise PlanError("base shard ended early while copying (was it modified during apply?)")
            offset += done
            if self.written is not None:
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
        if self.written is not None:
            self.written(offset + len(mv))
        self.progress(len(mv))

    def _scale(self, job: _HashJob, fdi: int, fdo: int, op: TensorOp) -> None:
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
                self._scale_batch(job, fdi, fdo, info, dtype, vector, batch, batch_start, batch_stop, hasher, counts)
                batch = []
            if not batch:
                batch_start = seg.start
            batch.append(seg)
            batch_stop = seg.stop
        if batch:
            self._scale_batch(job, fdi, fdo, info, dtype, vector, batch, batch_start, batch_stop, hasher, counts)
        if hasher is not None:
            self.digests[info.name] = TensorDigest(info.dtype, tuple(info.shape), hasher.hexdigest())
        if counts[0] or counts[1]:
            self.saturation[info.name] = (counts[0], counts[1])
            if not self.allow_saturation:
                raise PlanError(saturation_message(info.name, info.dtype, counts[0], counts[1])
                                + "; nothing was written; pass --allow-saturation to write it anyway")

    def _scale_batch(self, job, fdi, fdo, info, dtype, vector, batch, start, stop, hasher, counts) -> None:
        itemsize = ITEMSIZE[info.dtype]
        nbytes = (stop - start) * itemsize
        offset = info.start + start * itemsize
        k = self.turn
        self.turn = (k + 1) % len(self.buffers)
        for fut in self.pending[k]:  # the buffer's previous chunk must be written and hashed
            fut.result()
        if nbytes > len(self.buffers[k]):  # one vector period longer than a chunk
            self.buffers[k] = bytearray(nbytes)
        mv = memoryview(self.buffers[k])[:nbytes]
        if self.ready is not None:
            self.ready(offset + nbytes)
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
        self.pending[k] = [self._queue(self._write, fdo, mv, offset), self.hasher.chunk(job, mv)]


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


def _create_output(dst: Path) -> BinaryIO:
    """Open an output shard for writing inside the caller's claimed folder: created or emptied, never through a link.

    Permissions are what a plain ``open`` gives (0666 & ~umask); a file the caller
    created beforehand keeps its own.
    """
    # Read-write: its header is read back through the same descriptor once written.
    return create_file(dst, replace=True, read=True)


@dataclass
class Streamed:
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


class ShardStreamer:
    """Streams the shards of one plan, one at a time: the per-shard entry point of :func:`execute`.

    Use as a context manager; :meth:`start` writes one shard and returns the future
    of its sha256 (computed from the bytes being written, see :class:`_ShardHasher`),
    so a shard's hash may finish while the next one streams. The base digests of the
    targets in ``digest`` and the saturation counts accumulate in :attr:`tensor_digests`
    and :attr:`saturation` (see :class:`Streamed`).

    Example:
        >>> with ShardStreamer(plan) as streamer, open_shard(shard) as src:  # doctest: +SKIP
        ...     sha = streamer.stream("model-00001-of-00002.safetensors", src, dst)
    """

    def __init__(self, plan: Plan, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, threads: int | None = None,
                 progress: Progress | None = None, allow_saturation: bool = False,
                 digest: Collection[str] = ()) -> None:
        self.plan = plan
        self._streamer = _Streamer(chunk_bytes, threads or min(4, os.cpu_count() or 1), progress,
                                   allow_saturation, digest)

    @property
    def tensor_digests(self) -> dict[str, TensorDigest]:
        """Target tensor name -> digest of its base bytes, for the tensors streamed so far that ``digest`` names."""
        return self._streamer.digests

    @property
    def saturation(self) -> dict[str, tuple[int, int]]:
        """Target tensor name -> (became ±inf, became 0), for the tensors streamed so far that had any."""
        return self._streamer.saturation

    def __enter__(self) -> ShardStreamer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the writer, compute and hasher threads (after their queued work)."""
        self._streamer.close()

    def start(self, name: str, src: BinaryIO, dst: Path, *, ready: SourceReady | None = None,
              written: Callable[[int], None] | None = None) -> Future:
        """Write shard ``name`` of the plan from the open base shard ``src`` to ``dst``; return the future of its sha256.

        ``src`` is opened by the caller, safely (:func:`~gainsurgery.io.safetensors.open_shard`,
        or the pipeline's own download); ``dst`` is created inside the caller's claimed
        folder (never through a link). ``ready``: waits until ``src`` holds a number of
        bytes (it is still being downloaded); ``written(end)``: told that bytes
        ``[0, end)`` of ``dst`` are final (a verifier may follow).

        Raises:
            PlanError: the source is shorter than its header says, its header differs
                from the planned one (the base changed), or a target saturates and
                saturation is not allowed.
        """
        shard = self.plan.base.shards[name]
        return self._streamer.stream_shard(src, dst, shard, self.plan.ops[name], ready, written)

    def stream(self, name: str, src: BinaryIO, dst: Path, **kwargs) -> str:
        """:meth:`start`, then wait for the hash: the sha256 (hex) of the written shard."""
        return self.start(name, src, dst, **kwargs).result()


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
) -> Streamed:
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
        A :class:`Streamed`: per-shard sha256, per-target base digests, saturation counts.

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
    digests: dict[str, Future] = {}
    synced: list[Future] = []
    with ShardStreamer(plan, chunk_bytes=chunk_bytes, threads=threads, progress=progress,
                       allow_saturation=allow_saturation, digest=digest) as streamer, \
            ThreadPoolExecutor(1, thread_name_prefix="gainsurgery-fsync") as syncer:
        for name, shard in base.shards.items():
            if fetch_shard is not None:
                fetch_shard(shard)
            with open_shard(shard, error=CheckpointError) as src:
                digests[name] = streamer.start(name, src, folder / name)
            pause_point("apply.shard-written", ready=digests[name].result)
            # Written: make it durable while the next shard streams, so that the fsync
            # before OUT is renamed finds little left to do.
            synced.append(syncer.submit(_fsync_path, folder / name))
        if base.index is not None:
            with open_input(base.folder, INDEX_NAME, error=CheckpointError) as src, \
                    create_file(folder / INDEX_NAME) as index_out:
                shutil.copyfileobj(src, index_out)
        for f in synced:
            f.result()
        return Streamed({name: d.result() for name, d in digests.items()}, dict(streamer.tensor_digests),
                            dict(streamer.saturation))


def _fsync_path(path: Path) -> None:
    fd = open_nofollow(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
