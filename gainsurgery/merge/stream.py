"""Streaming a plan into a folder in constant memory, and claiming the output folder.

:func:`execute` writes every shard of the base into a staging folder: bytes no
gain touches are copied by the kernel (``copy_file_range``); target tensors are
read, scaled (:mod:`gainsurgery.merge.kernel`) and written back in bounded chunks
while a writer thread keeps file order, and a hasher thread records each
shard's sha256 from the bytes being written (the scaled chunks in memory, the
copied ranges from the source), without reading the output back. Gains change
neither shapes nor dtypes, so the output mirrors the input: same shard names,
same headers, same index. :class:`ShardStreamer` streams one shard at a time
(the Hub pipeline uses it shard by shard, even while a shard is downloading).

:func:`staged_output` claims OUT: it checks the location (never BASE, never
inside or around it), removes temporary folders of dead runs, and yields a
temporary sibling that is renamed into place only by :meth:`Staging.publish`;
on any failure the temporary folder is deleted, so OUT is whole or absent.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from gainsurgery.errors import PlanError
from gainsurgery.io.atomic import check_replaceable_folder, fsync_files, publish_folder
from gainsurgery.io.checkpoint import INDEX_NAME
from gainsurgery.io.safetensors import Shard
from gainsurgery.merge.kernel import BLOCK_ELEMS, ITEMSIZE, NUMPY_DTYPES, Scratch, scale_block, segments
from gainsurgery.merge.plan import Plan, TensorOp
from gainsurgery.merge.verify import DEFAULT_CHUNK_BYTES

_COPY_STEP = 64 << 20  # bytes per copy_file_range call
#: Buffers the chunk is split into: scaling runs ahead of writing and hashing by up to this many.
_BUFFERS = 2
#: Shards whose sha256 may be computed at once (on as many threads): a shard's hash may
#: run on while the next shard streams, without holding up that shard's own hash.
_HASH_THREADS = 2
_HASH_STEP = 64 << 20  # bytes of a copied range mapped (from the page cache) per hash update

Progress = Callable[[int], None]


# --------------------------------------------------------------------------- output location


def check_output(base_folder: Path, out: Path, *, overwrite: bool, protect: Iterable[Path] = ()) -> Path:
    """Validate the output folder location; return it resolved.

    Refuses OUT equal to or inside BASE, OUT containing BASE, an existing OUT
    without ``overwrite``, and (with ``overwrite``) an OUT that holds any of
    ``protect`` (e.g. the gain files being applied).
    """
    base_r = Path(base_folder).resolve()
    out_r = Path(out).resolve()
    if out_r == base_r:
        raise PlanError("OUT is the base folder; gainsurgery never writes into BASE")
    if base_r in out_r.parents:
        raise PlanError(f"OUT ({out}) is inside the base folder; choose a folder outside BASE")
    if out_r in base_r.parents:
        raise PlanError(f"OUT ({out}) contains the base folder; choose another OUT")
    return check_replaceable_folder(Path(out), overwrite=overwrite, protect=protect, what="OUT", error=PlanError)


def temp_name(out: Path) -> Path:
    """The temporary sibling this process builds ``out`` in (its pid marks it, for stale-temp cleanup)."""
    return out.parent / f".{out.name}.gainsurgery-tmp-{os.getpid()}"


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete temp folders for ``out`` left by processes that no longer exist."""
    removed = []
    for p in out.parent.glob(f".{out.name}.gainsurgery-tmp-*"):
        pid_text = p.name.rsplit("-", 1)[-1]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid != os.getpid() and _pid_alive(pid):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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

    def __init__(self, chunk_bytes: int, threads: int, progress: Progress | None) -> None:
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

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.writer.shutdown(wait=True)
        self.hasher.close()

    def stream_shard(self, src: Path, dst: Path, file_size: int, ops: list[TensorOp],
                     ready: SourceReady | None = None, written: Callable[[int], None] | None = None) -> Future:
        """Write ``dst`` in file order; return a future of its sha256 (hex), which may still be running.

        ``ready``: see :data:`SourceReady` (the source is being downloaded as we go).
        ``written(end)``: told (on the writer thread) that bytes ``[0, end)`` of ``dst`` are final.
        """
        self.ready, self.written = ready, written
        with open(src, "rb") as fin, open(dst, "wb") as fout:
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
            # streams; execute() fsyncs every file once before OUT is renamed.
        if dst.stat().st_size != file_size:
            raise PlanError(f"{src.name}: wrote {dst.stat().st_size} bytes, expected {file_size} (base changed?)")
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
        batch: list = []
        batch_start = batch_stop = 0
        for seg in segments(info.shape, op.dim, BLOCK_ELEMS):
            if batch and seg.stop - batch_start > chunk_elems:
                self._scale_batch(job, fdi, fdo, info, dtype, vector, batch, batch_start, batch_stop)
                batch = []
            if not batch:
                batch_start = seg.start
            batch.append(seg)
            batch_stop = seg.stop
        if batch:
            self._scale_batch(job, fdi, fdo, info, dtype, vector, batch, batch_start, batch_stop)

    def _scale_batch(self, job, fdi, fdo, info, dtype, vector, batch, start, stop) -> None:
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
        arr = np.frombuffer(mv, dtype=dtype)

        def work(t: int, stride: int) -> None:
            scratch = self.scratch[t]
            for seg in batch[t::stride]:
                scale_block(arr[seg.start - start : seg.stop - start], info.dtype, seg, vector, scratch)

        if self.pool is None or len(batch) == 1:
            work(0, 1)
        else:
            for fut in [self.pool.submit(work, t, self.threads) for t in range(self.threads)]:
                fut.result()
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


@dataclass
class Staging:
    """A claimed output: the final location and the temporary sibling it is built in.

    Attributes:
        out: where the output will appear (resolved).
        folder: the temporary folder being written.
    """

    out: Path
    folder: Path

    def sync(self) -> None:
        """fsync every file of the staging folder (once, after all are written)."""
        fsync_files(self.folder)

    def publish(self) -> None:
        """Rename the finished staging folder to OUT (replacing an old OUT atomically)."""
        publish_folder(self.folder, self.out)


@contextlib.contextmanager
def staged_output(base_folder: Path, out: str | os.PathLike[str], *, overwrite: bool = False,
                  protect: Iterable[Path] = ()) -> Iterator[Staging]:
    """Claim OUT and yield a :class:`Staging` to build it in; OUT appears only through ``publish()``.

    Checks the location first (:func:`check_output`), removes temporary folders of
    dead runs, and on any failure inside the block deletes the staging folder: a
    crash, a kill, a failed verification or push, or a full disk leave nothing.

    Raises:
        PlanError: OUT is unusable, or writing failed (disk full, permissions).
    """
    out_r = check_output(base_folder, Path(out), overwrite=overwrite, protect=protect)
    remove_stale_temporaries(out_r)
    tmp = temp_name(out_r)
    try:
        tmp.mkdir()
        yield Staging(out_r, tmp)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise PlanError(f"disk full while writing {out}; nothing was left behind") from None
        raise PlanError(f"could not write {out}: {exc.strerror or exc}; nothing was left behind") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardStreamer:
    """Streams the shards of one plan, one at a time: the per-shard entry point of :func:`execute`.

    Use as a context manager; :meth:`start` writes one shard and returns the future
    of its sha256 (computed from the bytes being written, see :class:`_ShardHasher`),
    so a shard's hash may finish while the next one streams.

    Example:
        >>> with ShardStreamer(plan) as streamer:  # doctest: +SKIP
        ...     sha = streamer.stream("model-00001-of-00002.safetensors", src, dst)
    """

    def __init__(self, plan: Plan, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, threads: int | None = None,
                 progress: Progress | None = None) -> None:
        self.plan = plan
        self._streamer = _Streamer(chunk_bytes, threads or min(4, os.cpu_count() or 1), progress)

    def __enter__(self) -> ShardStreamer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the writer, compute and hasher threads (after their queued work)."""
        self._streamer.close()

    def start(self, name: str, src: Path, dst: Path, *, ready: SourceReady | None = None,
              written: Callable[[int], None] | None = None) -> Future:
        """Write shard ``name`` of the plan from ``src`` to ``dst``; return the future of its sha256 (hex).

        ``ready``: waits until ``src`` holds a number of bytes (it is still being
        downloaded); ``written(end)``: told that bytes ``[0, end)`` of ``dst`` are final
        (a verifier may follow).

        Raises:
            PlanError: the source is shorter than its header says, or its header
                differs from the planned one (the base changed).
        """
        shard = self.plan.base.shards[name]
        digest = self._streamer.stream_shard(src, dst, shard.file_size, self.plan.ops[name], ready, written)
        _check_header(src, dst, shard.data_start)
        return digest

    def stream(self, name: str, src: Path, dst: Path, **kwargs) -> str:
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
) -> dict[str, str]:
    """Write the base's shards, with ``plan`` applied, and its index into the existing ``folder``.

    Args:
        plan: from :func:`~gainsurgery.merge.plan.make_plan`.
        folder: an empty folder (a :class:`Staging` folder).
        chunk_bytes: bytes of tensor data scaled per read (bounds peak memory).
        threads: compute threads for scaling (default: CPU count, at most 4).
        progress: called with the number of bytes handled, as they are.
        fetch_shard: called with each shard just before it is streamed, to make
            ``shard.path`` readable (a Hub base downloads it); one at a time.

    Returns:
        shard file name -> sha256 of the written shard.

    Raises:
        PlanError: the base changed under us (sizes or headers differ, a shard ended early).
    """
    base = plan.base
    digests: dict[str, Future] = {}
    synced: list[Future] = []
    with ShardStreamer(plan, chunk_bytes=chunk_bytes, threads=threads, progress=progress) as streamer, \
            ThreadPoolExecutor(1, thread_name_prefix="gainsurgery-fsync") as syncer:
        for name, shard in base.shards.items():
            if fetch_shard is not None:
                fetch_shard(shard)
            digests[name] = streamer.start(name, shard.path, folder / name)
            # Written: make it durable while the next shard streams, so that the fsync
            # before OUT is renamed finds little left to do.
            synced.append(syncer.submit(_fsync_path, folder / name))
        if base.index is not None:
            shutil.copyfile(base.folder / INDEX_NAME, folder / INDEX_NAME)
        for f in synced:
            f.result()
        return {name: d.result() for name, d in digests.items()}


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_header(src: Path, dst: Path, header_end: int) -> None:
    with open(src, "rb") as a, open(dst, "rb") as b:
        if a.read(header_end) != b.read(header_end):
            raise PlanError(f"{src.name}: header of the written shard differs from the base (base changed?)")
