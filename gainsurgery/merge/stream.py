"""Streaming a plan into a folder in constant memory, and claiming the output folder.

:func:`execute` writes every shard of the base into a staging folder: bytes no
gain touches are copied by the kernel (``copy_file_range``); target tensors are
read, scaled (:mod:`gainsurgery.merge.kernel`) and written back in bounded chunks
while a writer thread keeps file order, and a hasher thread follows the writer
to record each shard's sha256. Gains change neither shapes nor dtypes, so the
output mirrors the input: same shard names, same headers, same index.

:func:`staged_output` claims OUT: it checks the location (never BASE, never
inside or around it), removes temporary folders of dead runs, and yields a
temporary sibling that is renamed into place only by :meth:`Staging.publish`;
on any failure the temporary folder is deleted, so OUT is whole or absent.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import threading
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

_COPY_STEP = 64 << 20  # bytes per copy_file_range call; the hasher follows in steps this big
_MAX_PENDING_HASHES = 2  # shards whose hash may still be running while the next one streams

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


class _Streamer:
    """Copies and scales one shard at a time with bounded buffers, in a pipeline.

    The main thread reads target tensors and scales them (on ``threads`` compute
    threads) while one writer thread performs every output operation in file
    order: kernel copies of untouched ranges and writes of scaled chunks. Two
    buffers of half the chunk size alternate, so reading and scaling chunk k+1
    overlaps writing chunk k, and peak memory stays at ``chunk_bytes``.
    """

    def __init__(self, chunk_bytes: int, threads: int, progress: Progress | None) -> None:
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

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.writer.shutdown(wait=True)

    def stream_shard(self, src: Path, dst: Path, file_size: int, ops: list[TensorOp],
                     written: Callable[[int], None] = lambda end: None) -> None:
        """Write ``dst`` in file order; ``written(end)`` reports that bytes [0, end) are final."""
        self.written = written
        with open(src, "rb") as fin, open(dst, "wb") as fout:
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
            # streams; execute() fsyncs every file once before OUT is renamed.
        if dst.stat().st_size != file_size:
            raise PlanError(f"{src.name}: wrote {dst.stat().st_size} bytes, expected {file_size} (base changed?)")

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
        batch: list = []
        batch_start = batch_stop = 0
        for seg in segments(info.shape, op.dim, BLOCK_ELEMS):
            if batch and seg.stop - batch_start > chunk_elems:
                self._scale_batch(fdi, fdo, info, dtype, vector, batch, batch_start, batch_stop)
                batch = []
            if not batch:
                batch_start = seg.start
            batch.append(seg)
            batch_stop = seg.stop
        if batch:
            self._scale_batch(fdi, fdo, info, dtype, vector, batch, batch_start, batch_stop)

    def _scale_batch(self, fdi, fdo, info, dtype, vector, batch, start, stop) -> None:
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
    threads = threads or min(4, os.cpu_count() or 1)
    streamer = _Streamer(chunk_bytes, threads, progress)
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
            streamer.stream_shard(shard.path, dst, shard.file_size, plan.ops[name], hashers[name].advance)
            _check_header(shard.path, dst, shard.data_start)
        if base.index is not None:
            shutil.copyfile(base.folder / INDEX_NAME, folder / INDEX_NAME)
        return {name: h.hexdigest() for name, h in hashers.items()}
    finally:
        for h in hashers.values():
            h.abort()
            h.thread.join()
        streamer.close()


def _check_header(src: Path, dst: Path, header_end: int) -> None:
    with open(src, "rb") as a, open(dst, "rb") as b:
        if a.read(header_end) != b.read(header_end):
            raise PlanError(f"{src.name}: header of the written shard differs from the base (base changed?)")
