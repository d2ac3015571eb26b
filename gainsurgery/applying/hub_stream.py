"""The Hub sink's engine: apply gains to a base and upload the result shard by shard, in constant disk.

``gainsurgery apply ORG/BASE G --push ORG/NEW`` (no OUT) never holds the model on
disk. For each shard, in order:

1. **download** it into a private work folder (not the HF cache), checked against
   the size and sha256 the Hub lists, its header against the planned one;
2. **apply**, following the download as its bytes land: the same streaming core as
   a local apply (:class:`~gainsurgery.merge.stream.ShardStreamer`), which hashes
   the output from the bytes it writes;
3. **verify**, following the writer: every target recomputed, every other byte
   compared (:func:`~gainsurgery.merge.verify.verify_shard`);
4. **upload** it as an LFS object (``HfApi.preupload_lfs_files``, with the sha256
   from step 2), then delete it.

The three stages run at once on consecutive shards (download i+1, apply and verify
i, upload i-1), on three threads linked by queues. A disk budget of
:data:`DISK_SHARDS` times the largest shard decides when a stage may create a file,
in shard order, so the work folder never holds more than that, whatever the
model's size (a local base needs no download: its budget is two shards). At the end
comes **one commit** with every shard, the index, the config and tokenizer files,
``gainsurgery.json`` and the model card. Any failure stops every stage, deletes the
shards and commits nothing.

**Resume.** The work folder is named after the arguments and keeps a small journal
of the shards uploaded (name, sha256, size, and what the trust checks need of it:
the digests of its base target tensors and its saturation counts) for the same
base commit and gains. A
rerun after a kill removes the dead run's files, asks the LFS batch endpoint which
journaled objects the Hub already stores, and skips those shards entirely (no
download, no apply, no upload). Without the journal (a fresh CI runner), every
shard is made again, but the upload still sends nothing the Hub has: through LFS
the batch answer lists no action for a stored object; through Xet, ``hf_xet``
sends only chunks the Hub does not have (its chunk-level dedup), after reading the
file once. Journal skipping is used only on the LFS path, where the batch answer is
the authority on what the Hub stores.

**Xet's disk.** When huggingface_hub uploads through Xet, ``hf_xet`` keeps state on
disk (a shard cache, session files, a chunk cache for downloads; under
``HF_XET_CACHE``, by default ``HF_HOME/xet``). Unless ``HF_XET_CACHE`` is set, the
pipeline points it into its work folder (and turns the chunk cache off unless
``HF_XET_CHUNK_CACHE_SIZE_BYTES`` is set), so that state counts against, and is
removed with, the work folder.

**Trust boundaries** (docs/security.md). The work folder is an output: checked
like OUT (:func:`~gainsurgery.io.checks.check_output`: never in or around the base
or a gain file, never a link, never ``""``, ``/`` or home) and claimed for the run
(:class:`~gainsurgery.io.workdir.WorkFolder`: ``0700``, ours, locked). The files in
it (downloads, output shards, the journal) are private temp files of that claimed
folder: created ``O_EXCL | O_NOFOLLOW``, mode ``0600``, removed by the run. A local
base's shards are read through :func:`~gainsurgery.io.safetensors.open_shard`; a
download is checked against the Hub's size and sha256 and its header against the
planned one (parsed under safetensors' rules) before it is applied. The journal is
read as hostile JSON, entry by entry. Each target is counted for saturation and
hashed for the gains' base fingerprints as it streams; both are checked, and every
uploaded shard's header and every small file scanned for the token, before the one
commit. The card names ``base_model`` only for a Hub base.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Protocol

import numpy as np

from gainsurgery import __version__
from gainsurgery.errors import CheckpointError, GainSurgeryError, PlanError
from gainsurgery.io.fingerprint import TensorDigest
from gainsurgery.io.safetensors import open_shard
from gainsurgery.hub.internals import xet_uploads
from gainsurgery.hub.transfer import Arrival, TransferAborted
from gainsurgery.io.workdir import WorkFolder, open_private
from gainsurgery.merge.plan import Plan
from gainsurgery.merge.stream import ShardStreamer, Streamed
from gainsurgery.merge.verify import verify_shard

if TYPE_CHECKING:
    from gainsurgery.gainfile import GainFile
    from gainsurgery.hub.publish import PushResult, UploadItem
    from gainsurgery.sources.base import OpenedBase

#: Shards the work folder may hold at once (a download, an output, an upload), in units of the largest shard.
DISK_SHARDS = 3
#: Prefix of work folder names under the work root.
WORK_PREFIX = "gainsurgery-push-"
#: Bytes compared per read while verifying (the streamer's buffers come on top).
VERIFY_CHUNK_BYTES = 16 << 20
_JOURNAL_FORMAT = "gainsurgery.push-journal/1"
_POLL_S = 0.2
#: Seconds the applier waits for a failed stage to record why, once the stop is set.
_STAGE_EXIT_S = 5.0


class ShardPublisher(Protocol):
    """What the pipeline needs of the push target (:class:`gainsurgery.hub.publish.HubPublisher` fits)."""

    @property
    def target(self) -> str: ...

    revision: str | None
    create_pr: bool

    def prepare(self) -> None: ...

    def check(self, items: list[UploadItem]) -> None: ...

    def upload_shard(self, path: Path, path_in_repo: str, sha256: str, **kwargs: Any) -> Any: ...

    def stored_shard(self, path_in_repo: str, sha256: str, size: int, sample: bytes) -> Any: ...

    def present(self, objects: dict[str, int]) -> set[str]: ...

    def commit(self, uploaded: list[Any], items: list[UploadItem]) -> PushResult: ...


ProgressFactory = Callable[[str, int], Any]


# --------------------------------------------------------------------------- disk budget


class DiskBudget:
    """Bytes the work folder may hold, handed out in a fixed order of tickets.

    Every file the pipeline creates asks first (:meth:`acquire` with its ticket) and
    gives back when deleted (:meth:`release`). Tickets are granted strictly in order
    (base 0, output 0, base 1, output 1, ...): the download of shard i+1 cannot take
    the room the output of shard i needs, so the stages never wait on each other in
    a circle. ``peak`` is the most ever held.
    """

    def __init__(self, limit: int, stop: threading.Event) -> None:
        self.limit = limit
        self.used = self.peak = 0
        self.next_ticket = 0
        self.stop = stop
        self.cond = threading.Condition()

    def acquire(self, ticket: int, nbytes: int) -> None:
        """Wait for ``ticket``'s turn and room for ``nbytes``; raise :class:`_Stopped` if the run stops."""
        with self.cond:
            while not self.stop.is_set() and (ticket != self.next_ticket or self.used + nbytes > self.limit):
                self.cond.wait(_POLL_S)
            if self.stop.is_set():
                raise _Stopped()
            self.used += nbytes
            self.peak = max(self.peak, self.used)
            self.next_ticket += 1
            self.cond.notify_all()

    def release(self, nbytes: int) -> None:
        with self.cond:
            self.used -= nbytes
            self.cond.notify_all()

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()


class _Stopped(Exception):
    """A stage noticed that another one failed; the first failure is what is reported."""


# --------------------------------------------------------------------------- work folder and journal


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1 << 62


def _journal_checks(entry: dict[str, Any], plan: Plan, name: str, digest: frozenset[str],
                    allow_saturation: bool) -> tuple[dict[str, TensorDigest], dict[str, tuple[int, int]]] | None:
    """The base digests and saturation counts a journal entry records for shard ``name``, if they hold up.

    The digests must be exactly those of the shard's targets the gains' fingerprints
    cover, each with the planned dtype and shape and a hex sha256; the counts must
    name targets of the shard, as two non-negative integers, and be allowed. Anything
    else: None (the shard is made again).
    """
    ops = {op.info.name: op.info for op in plan.ops[name]}
    tensors, saturation = entry.get("tensors", {}), entry.get("saturation", {})
    if not isinstance(tensors, dict) or not isinstance(saturation, dict):
        return None
    if set(tensors) != {t for t in ops if t in digest}:
        return None
    digests = {}
    for tname, d in tensors.items():
        info = ops[tname]
        if not (isinstance(d, dict) and d.get("dtype") == info.dtype and d.get("shape") == list(info.shape)
                and _is_sha256(d.get("sha256"))):
            return None
        digests[tname] = TensorDigest(info.dtype, tuple(info.shape), d["sha256"])
    counts = {}
    for tname, c in saturation.items():
        if tname not in ops or not (isinstance(c, list) and len(c) == 2 and all(map(_is_count, c))):
            return None
        counts[tname] = (c[0], c[1])
    if counts and not allow_saturation:
        return None
    return digests, counts


def gain_digest(gain: GainFile) -> str:
    """sha256 of a (stacked) gain's vectors and dims: what the output bytes depend on."""
    h = hashlib.sha256()
    for key in sorted(gain.vectors):
        h.update(json.dumps([key, int(gain.dims[key])]).encode("utf-8"))
        h.update(np.ascontiguousarray(gain.vectors[key], dtype="<f4").tobytes())
    return h.hexdigest()


def output_fingerprint(opened: OpenedBase, plan: Plan) -> str:
    """What the output shards depend on: the tool version, the base's shards and the gain."""
    shards = []
    for name, shard in plan.base.shards.items():
        if opened.remote is not None:
            ident: Any = opened.remote.shard_sha256.get(name) or opened.remote.commit
        else:
            st = os.stat(shard.path)
            ident = [st.st_size, st.st_mtime_ns, st.st_ino]
        shards.append([name, shard.file_size, ident])
    key = json.dumps([__version__, opened.label, shards, gain_digest(plan.gain)])
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- the pipeline


@dataclass
class HubRun:
    """What :func:`run` did: a record for the Hub sink, which reports it in its
    :class:`~gainsurgery.applying.result.ApplyResult`.

    Attributes:
        shard_sha256: shard name -> sha256 of the published shard.
        pushed: the commit (a :class:`~gainsurgery.hub.publish.PushResult`).
        resumed: shards a previous run had uploaded (skipped: nothing downloaded or sent).
        peak_disk_bytes: the most the work folder held (by the budget's count).
        seconds: wall time of the pipeline, in seconds.
    """

    shard_sha256: dict[str, str]
    pushed: Any
    resumed: list[str] = field(default_factory=list)
    peak_disk_bytes: int = 0
    seconds: float = 0.0


@dataclass
class _Item:
    name: str
    index: int
    size: int
    src: Path | None = None  # the base shard (downloading, or a local file)
    arrival: Any = None  # an Arrival while the source is being downloaded
    owned_src: bool = False  # the source is our download: delete it after verifying
    out: Path | None = None
    sha256: str | None = None


class _Pipeline:
    def __init__(self, opened: OpenedBase, plan: Plan, publisher: ShardPublisher, work: WorkFolder, *,
                 chunk_bytes: int, threads: int | None, progress: ProgressFactory | None,
                 make_items: Callable[[dict[str, Any]], list[UploadItem]],
                 provenance_of: Callable[[Streamed], dict[str, Any]],
                 allow_saturation: bool = False, digest: frozenset[str] = frozenset()) -> None:
        self.opened, self.plan, self.publisher, self.work = opened, plan, publisher, work
        self.chunk_bytes, self.threads = chunk_bytes, threads
        self.allow_saturation, self.digest = allow_saturation, frozenset(digest)
        #: per target tensor: the digest of its base bytes (fingerprinted ones), saturation counts
        self.tensor_digests: dict[str, TensorDigest] = {}
        self.saturation: dict[str, tuple[int, int]] = {}
        self.make_items, self.provenance_of = make_items, provenance_of
        self.remote = opened.remote
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.error_lock = threading.Lock()
        largest = max(s.file_size for s in plan.base.shards.values())
        self.budget = DiskBudget((DISK_SHARDS if self.remote is not None else DISK_SHARDS - 1) * largest, self.stop)
        self.to_apply: queue.Queue = queue.Queue()
        self.to_upload: queue.Queue = queue.Queue()
        self.uploaded: dict[str, Any] = {}
        self.sha: dict[str, str] = {}
        self.arrivals: list[Any] = []
        self.progress = progress
        self.bars: dict[str, Any] = {}
        self.fingerprint = output_fingerprint(opened, plan)
        self.journal: dict[str, dict[str, Any]] = {}

    # -- failure handling -----------------------------------------------------------

    def fail(self, exc: BaseException) -> None:
        with self.error_lock:
            if self.error is None and not isinstance(exc, (_Stopped, TransferAborted)):
                self.error = exc
        self.stop.set()
        self.budget.wake()
        for arrival in list(self.arrivals):
            arrival.fail(exc)

    def _get(self, q: queue.Queue) -> Any:
        while True:
            if self.stop.is_set():
                raise _Stopped()
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue

    def _bar(self, stage: str, total: int) -> Callable[[int], Any]:
        if self.progress is None or total <= 0:
            return lambda n: None
        bar = self.bars[stage] = self.progress(stage, total)
        return bar.update

    # -- journal -------------------------------------------------------------------

    def resume(self) -> list[str]:
        """Shards a killed run uploaded that the Hub still stores: they need no work at all."""
        state = self.work.read_state()
        if not state or state.get("format") != _JOURNAL_FORMAT or state.get("fingerprint") != self.fingerprint:
            return []
        shards = state.get("shards")
        if not isinstance(shards, dict) or xet_uploads():
            return []
        wanted, checks = {}, {}
        for name, entry in shards.items():
            shard = self.plan.base.shards.get(name)
            if (shard is not None and isinstance(entry, dict) and _is_sha256(entry.get("sha256"))
                    and entry.get("bytes") == shard.file_size):
                found = _journal_checks(entry, self.plan, name, self.digest, self.allow_saturation)
                if found is not None:
                    wanted[name], checks[name] = entry, found
        present = self.publisher.present({e["sha256"]: e["bytes"] for e in wanted.values()})
        done = [name for name in self.plan.base.shards if name in wanted and wanted[name]["sha256"] in present]
        for name in done:
            self.journal[name] = wanted[name]
            self.sha[name] = wanted[name]["sha256"]
            self.tensor_digests.update(checks[name][0])
            self.saturation.update(checks[name][1])
            self.uploaded[name] = self._stored_op(name, wanted[name])
        return done

    def _stored_op(self, name: str, entry: dict[str, Any]) -> Any:
        """The commit operation of a shard whose LFS object the Hub already stores."""
        shard = self.plan.base.shards[name]
        if self.remote is not None:
            header = self.remote.planned_header(shard)
        else:
            with open_shard(shard, error=CheckpointError) as f:
                header = f.read(512)
        # Gains change no header: the output's first bytes are the base's.
        return self.publisher.stored_shard(name, entry["sha256"], entry["bytes"], header[:512])

    def _record(self, name: str, sha: str, size: int) -> None:
        ops = [op.info.name for op in self.plan.ops[name]]
        tensors = {t: {"dtype": d.dtype, "shape": list(d.shape), "sha256": d.sha256}
                   for t in ops if (d := self.tensor_digests.get(t)) is not None}
        saturation = {t: list(self.saturation[t]) for t in ops if t in self.saturation}
        self.journal[name] = {"sha256": sha, "bytes": size, "tensors": tensors, "saturation": saturation}
        self.work.write_state({"format": _JOURNAL_FORMAT, "fingerprint": self.fingerprint,
                               "target": self.publisher.target, "shards": self.journal})

    # -- stages ----------------------------------------------------------------------

    def download_stage(self, items: list[_Item]) -> None:
        """(thread) Download each base shard into the work folder, in order; hand it to the applier at once."""
        try:
            for item in items:
                shard = self.plan.base.shards[item.name]
                if self.remote is None:
                    self.opened.fetch_shard(shard)  # a cache snapshot's blob is checked against its name
                    item.src = shard.path
                    self.to_apply.put(item)
                    continue
                self.budget.acquire(2 * item.index, item.size)
                item.src = self.work.path / f"base-{item.index + 1:05d}.safetensors"
                item.owned_src = True
                item.arrival = Arrival(item.size)
                self.arrivals.append(item.arrival)
                os.close(open_private(item.src, create=True))
                self.to_apply.put(item)
                self.remote.download_shard(shard, item.src, arrival=item.arrival, progress=self.bar_download,
                                           stop=self.stop)
        except BaseException as exc:
            self.fail(exc)

    def apply_stage(self, items: list[_Item]) -> None:
        """(main thread) Apply each shard as it arrives, verify it while it is written, queue it for upload."""
        with ShardStreamer(self.plan, chunk_bytes=self.chunk_bytes, threads=self.threads,
                           progress=self.bar_apply, allow_saturation=self.allow_saturation,
                           digest=self.digest) as streamer:
            for _ in items:
                item = self._get(self.to_apply)
                shard = self.plan.base.shards[item.name]
                ticket = 2 * item.index + 1 if self.remote is not None else item.index
                self.budget.acquire(ticket, item.size)
                item.out = self.work.path / f"out-{item.index + 1:05d}.safetensors"
                os.close(open_private(item.out, create=True))
                ready = item.arrival.ready if item.arrival is not None else None
                with contextlib.ExitStack() as files:
                    # A local base's shard through the safe open (the inode whose header was read);
                    # a download is our own file in the claimed work folder, checked as it lands.
                    if item.owned_src:
                        src = files.enter_context(os.fdopen(open_private(item.src), "rb"))
                        item.arrival.ready(shard.data_start)
                        if os.pread(src.fileno(), shard.data_start, 0) != self.remote.planned_header(shard):
                            raise CheckpointError(f"{self.remote.ref}:{item.name}: the downloaded header differs "
                                                  "from the one the plan was made from (the repo changed?)")
                        check_src = files.enter_context(os.fdopen(open_private(item.src), "rb"))
                    else:
                        src = files.enter_context(open_shard(shard, error=CheckpointError))
                        check_src = files.enter_context(open_shard(shard, error=CheckpointError))
                    written = Arrival(item.size)
                    self.arrivals.append(written)
                    checked: dict[str, Any] = {}

                    def check(item=item, written=written, checked=checked, check_src=check_src) -> None:
                        try:
                            with os.fdopen(open_private(item.out), "rb") as out:
                                checked["problems"] = verify_shard(
                                    self.plan, item.name, check_src, out, chunk_bytes=VERIFY_CHUNK_BYTES,
                                    ready=written.ready, allow_saturation=self.allow_saturation)
                        except BaseException as exc:  # reported by the main thread
                            checked["error"] = exc

                    verifier = threading.Thread(target=check, name=f"verify {item.name}", daemon=True)
                    verifier.start()
                    try:
                        digest = streamer.start(item.name, src, item.out, ready=ready, written=written.advance)
                        item.sha256 = digest.result()
                        if item.arrival is not None:
                            item.arrival.wait_done()
                    finally:
                        if item.sha256 is None:
                            written.fail(_Stopped())
                        verifier.join()
                        self.arrivals.remove(written)
                self.tensor_digests.update(streamer.tensor_digests)
                self.saturation.update(streamer.saturation)
                if "error" in checked:
                    raise checked["error"]
                if checked["problems"]:
                    raise GainSurgeryError(f"verification failed, nothing committed: {checked['problems'][0]}")
                if item.owned_src:
                    os.unlink(item.src)
                    self.arrivals.remove(item.arrival)
                    self.budget.release(item.size)
                self.sha[item.name] = item.sha256
                self.to_upload.put(item)

    def upload_stage(self, count: int) -> None:
        """(thread) Upload each verified shard as an LFS object, then delete it."""
        try:
            for _ in range(count):
                item = self._get(self.to_upload)
                op = self.publisher.upload_shard(item.out, item.name, item.sha256, progress=self.bar_upload,
                                                 stop=self.stop)
                os.unlink(item.out)
                self.budget.release(item.size)
                self.uploaded[item.name] = op
                self._record(item.name, item.sha256, item.size)
        except BaseException as exc:
            self.fail(exc)

    # -- the run -------------------------------------------------------------------

    def run(self) -> HubRun:
        try:
            return self._run()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)):
                raise PlanError(f"no room left in the work folder {self.work.path.parent} "
                                f"({exc.strerror}); it needs up to {self.budget.limit:,} bytes "
                                f"({DISK_SHARDS if self.remote is not None else DISK_SHARDS - 1} shards): free "
                                "some or choose another --work-dir; nothing was committed") from None
            raise

    def _run(self) -> HubRun:
        t0 = time.perf_counter()
        resumed = self.resume()
        todo = [_Item(name, i, shard.file_size)
                for i, (name, shard) in enumerate((n, s) for n, s in self.plan.base.shards.items()
                                                  if n not in resumed)]
        total = sum(item.size for item in todo)
        self.bar_download = self._bar("download", total if self.remote is not None else 0)
        self.bar_apply = self._bar("apply", total)
        self.bar_upload = self._bar("upload", total)
        threads = [threading.Thread(target=self.download_stage, args=(todo,), name="gainsurgery-download",
                                    daemon=True),
                   threading.Thread(target=self.upload_stage, args=(len(todo),), name="gainsurgery-upload",
                                    daemon=True)]
        try:
            for t in threads:
                t.start()
            try:
                self.apply_stage(todo)
            except BaseException as exc:
                self.fail(exc)
                if isinstance(exc, TransferAborted) and self.error is None:
                    # Only an echo of another stage's failure, which that stage records as it
                    # unwinds (it may not have yet): wait for it, so the first failure is what is said.
                    for t in threads:
                        t.join(_STAGE_EXIT_S)
                if self.error is not None and self.error is not exc:
                    raise self.error from None  # the stage that failed first says why
                raise
            while threads[1].is_alive() and not self.stop.is_set():
                threads[1].join(_POLL_S)
            if self.error is not None:
                raise self.error
            if self.stop.is_set():
                raise _Stopped()
            for bar in self.bars.values():
                bar.close()
            self.bars.clear()
            uploaded = [self.uploaded[name] for name in self.plan.base.shards]
            self.sha = {name: self.sha[name] for name in self.plan.base.shards}  # resumed or not: one order
            # The base fingerprints and saturation are judged here, on every shard, before anything is committed.
            provenance = self.provenance_of(Streamed(dict(self.sha), dict(self.tensor_digests),
                                                         dict(self.saturation)))
            pushed = self.publisher.commit(uploaded, self.make_items(provenance))
        except _Stopped:
            if self.error is not None:
                raise self.error from None
            raise
        finally:
            self.stop.set()
            self.budget.wake()
            for arrival in list(self.arrivals):
                arrival.fail(_Stopped())
            for t in threads:
                if t.ident is not None:
                    t.join(5.0)  # an upload inside hf_xet cannot be interrupted: it is left to die with us
            for bar in self.bars.values():
                bar.close()
        return HubRun(dict(self.sha), pushed, resumed, self.budget.peak, time.perf_counter() - t0)


def run(opened: OpenedBase, plan: Plan, publisher: ShardPublisher, work: WorkFolder, *,
        make_items: Callable[[dict[str, Any]], list[UploadItem]],
        provenance_of: Callable[[Streamed], dict[str, Any]],
        chunk_bytes: int, threads: int | None = None, progress: ProgressFactory | None = None,
        allow_saturation: bool = False, digest: Collection[str] = ()) -> HubRun:
    """Run the pipeline (see the module docstring) in the claimed work folder ``work``.

    Args:
        opened: the base (a Hub base is downloaded shard by shard; a local one is read in place).
        plan: the plan.
        publisher: the push target (:class:`~gainsurgery.hub.publish.HubPublisher`).
        work: the claimed work folder (:func:`~gainsurgery.applying.hub_sink.claimed_work_folder`).
        make_items: the small files of the commit, given the provenance record.
        provenance_of: the provenance record, given every shard's sha256, the base digests of the
            fingerprinted targets and the saturation counts; it checks them (and raises to commit nothing).
        chunk_bytes: bytes of tensor data scaled per read.
        threads: compute threads.
        progress: makes one bar per stage: ``progress("download" | "apply" | "upload", total_bytes)``.
        allow_saturation: a target whose weights scaling turns into ±inf or 0 is written (and counted)
            instead of stopping the run.
        digest: the target tensors whose base bytes to hash (the gains' base fingerprints cover them).

    Returns:
        A :class:`HubRun`.

    Raises:
        GainSurgeryError: any stage failed; nothing was committed.
    """
    return _Pipeline(opened, plan, publisher, work, chunk_bytes=chunk_bytes, threads=threads, progress=progress,
                     make_items=make_items, provenance_of=provenance_of, allow_saturation=allow_saturation,
                     digest=frozenset(digest)).run()


