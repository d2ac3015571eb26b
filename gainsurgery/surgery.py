"""Plan, stream, verify: applying gain files to a sharded safetensors checkpoint.

The flow is three steps, each usable on its own:

1. :func:`make_plan` (pure): match a (stacked) gain file against a checkpoint's
   headers and refuse anything that does not fit, before any output exists.
2. :func:`execute`: stream every shard into a temporary sibling of OUT. Bytes
   that no gain touches are copied by the kernel (``copy_file_range``), target
   tensors are read, scaled and written back in bounded chunks. OUT appears, by
   rename, only once every file is written, fsynced and checked.
3. :func:`verify`: recompute every target tensor and compare every other byte.

Gains change neither shapes nor dtypes, so the output mirrors the input: same
shard names, same headers, same index.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from gainsurgery import __version__
from gainsurgery.io.atomic import check_replaceable_folder, fsync_files, publish_folder
from gainsurgery.io.checkpoint import INDEX_NAME, Checkpoint, Shard, TensorInfo, refuse_unscalable
from gainsurgery.errors import PlanError
from gainsurgery.gainfile import GainFile, check_values, natural_key
from gainsurgery.scaling import BLOCK_ELEMS, ITEMSIZE, NUMPY_DTYPES, Scratch, scale_block, segments

DEFAULT_CHUNK_BYTES = 64 << 20
PROVENANCE_NAME = "gainsurgery.json"
_COPY_STEP = 64 << 20  # bytes per copy_file_range call; the hasher follows in steps this big
_MAX_PENDING_HASHES = 2  # shards whose hash may still be running while the next one streams

Progress = Callable[[int], None]


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
                f"gain key {key!r} is not a tensor of the base checkpoint"
                + (f" (closest: {hint!r}); was the gain trained on another model?" if hint else "")
            )
        if dim >= len(info.shape):
            raise PlanError(f"gain for {key!r} runs along dim {dim}, but the tensor has only {len(info.shape)} dims")
        if info.shape[dim] != vector.size:
            raise PlanError(
                f"gain for {key!r} has length {vector.size}, but dim {dim} of the tensor has size {info.shape[dim]}"
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


# --------------------------------------------------------------------------- output location


def check_output(base_folder: Path, out: Path, *, overwrite: bool, protect: list[Path] = ()) -> Path:
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


def _tmp_name(out: Path) -> Path:
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


@dataclass
class ApplyResult:
    """What :func:`execute` wrote."""

    out: Path
    shard_sha256: dict[str, str]
    seconds: float
    provenance: dict[str, Any] = field(default_factory=dict)


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


def execute(
    plan: Plan,
    out: str | os.PathLike[str],
    *,
    base_spec: str | None = None,
    overwrite: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int | None = None,
    progress: Progress | None = None,
    card: Callable[[dict[str, Any]], str] | None = None,
    extra_provenance: dict[str, Any] | None = None,
    check: Callable[[Path], None] | None = None,
    fetch_shard: Callable[[Shard], None] | None = None,
) -> ApplyResult:
    """Stream ``plan`` into the folder ``out``; OUT appears only when complete.

    Args:
        plan: from :func:`make_plan`.
        out: output folder; must not exist unless ``overwrite``.
        base_spec: the base as the user gave it (path, Hub id, ``embedded:...``),
            recorded in the provenance file.
        chunk_bytes: bytes of tensor data scaled per read (bounds peak memory).
        threads: compute threads for scaling (default: CPU count, at most 4).
        progress: called with the number of bytes handled, as they are.
        card: builds the model card text from the provenance dict.
        extra_provenance: merged into ``gainsurgery.json``.
        check: called with the finished temporary folder before it is moved into
            place (e.g. a full :func:`verify`); raise to abandon the output.
        fetch_shard: called with each shard just before it is streamed, to make
            ``shard.path`` readable (e.g. download it from the Hub and point
            ``shard.path`` at the download); shards are fetched one at a time.

    Raises:
        PlanError: output location unusable, disk full, base changed under us.
    """
    t0 = time.perf_counter()
    base = plan.base
    protect = [Path(s["path"]) for s in plan.sources if s.get("path")]
    out_r = check_output(base.folder, Path(out), overwrite=overwrite, protect=protect)
    remove_stale_temporaries(out_r)
    tmp = _tmp_name(out_r)
    threads = threads or min(4, os.cpu_count() or 1)
    streamer = _Streamer(chunk_bytes, threads, progress)
    hashers: dict[str, _FollowingHasher] = {}
    try:
        tmp.mkdir()
        for name, shard in base.shards.items():
            dst = tmp / name
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
            shutil.copyfile(base.folder / INDEX_NAME, tmp / INDEX_NAME)
        for extra in base.extra_files(skip=("README.md", PROVENANCE_NAME)):
            shutil.copyfile(extra, tmp / extra.name)
        shard_sha = {name: h.hexdigest() for name, h in hashers.items()}
        provenance = _provenance(plan, base_spec, shard_sha, extra_provenance)
        (tmp / PROVENANCE_NAME).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
        if card is not None:
            (tmp / "README.md").write_text(card(provenance), encoding="utf-8")
        fsync_files(tmp)
        if check is not None:
            check(tmp)
        publish_folder(tmp, out_r)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno == errno.ENOSPC:
            raise PlanError(f"disk full while writing {out}; nothing was left behind") from None
        raise PlanError(f"could not write {out}: {exc.strerror or exc}; nothing was left behind") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for h in hashers.values():
            h.abort()
            h.thread.join()
        streamer.close()
    return ApplyResult(out_r, shard_sha, time.perf_counter() - t0, provenance)


def _check_header(src: Path, dst: Path, header_end: int) -> None:
    with open(src, "rb") as a, open(dst, "rb") as b:
        if a.read(header_end) != b.read(header_end):
            raise PlanError(f"{src.name}: header of the written shard differs from the base (base changed?)")


def _provenance(plan: Plan, base_spec: str | None, shard_sha: dict[str, str], extra: dict | None) -> dict[str, Any]:
    return {
        "tool": "gainsurgery",
        "version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "base": {"given": base_spec or str(plan.base.folder), "folder": str(plan.base.folder.resolve())},
        "gains": plan.sources,
        "gain_parameters": plan.gain.num_parameters,
        "method": plan.gain.metadata.get("method"),
        "side": plan.gain.metadata.get("side"),
        "tensors_scaled": plan.tensors_touched,
        "bytes_rewritten": plan.bytes_rewritten,
        "shards": {name: {"sha256": sha, "bytes": plan.base.shards[name].file_size} for name, sha in shard_sha.items()},
        **(extra or {}),
    }


# --------------------------------------------------------------------------- verification


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
    for name, shard in base.shards.items():
        out_shard = out.shards[name]
        if out_shard.file_size != shard.file_size:
            report.problems.append(f"{name}: size {out_shard.file_size} bytes, base has {shard.file_size}")
            continue
        with open(shard.path, "rb") as fa, open(out_shard.path, "rb") as fb:
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
                    if not _check_scaled(fa, fb, op, chunk_bytes, scratch, progress):
                        report.problems.append(f"{tname}: differs from base x gain (float32, rounded once)")
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


def _check_scaled(fa, fb, op: TensorOp, chunk_bytes: int, scratch: Scratch, progress: Progress) -> bool:
    info = op.info
    itemsize = ITEMSIZE[info.dtype]
    dtype = NUMPY_DTYPES[info.dtype]
    vector = np.ascontiguousarray(op.vector, dtype=np.float32)
    for seg in segments(info.shape, op.dim, max(BLOCK_ELEMS, chunk_bytes // itemsize // 4)):
        offset = info.start + seg.start * itemsize
        n = (seg.stop - seg.start) * itemsize
        fa.seek(offset)
        fb.seek(offset)
        ref = np.frombuffer(bytearray(fa.read(n)), dtype=dtype)
        scale_block(ref, info.dtype, seg, vector, scratch)
        if ref.tobytes() != fb.read(n):
            return False
        progress(n)
    return True
