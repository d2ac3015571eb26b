"""The Hub sink: no OUT, the merged model streamed straight to a Hub repo, shard by shard, in one commit.

``gainsurgery apply ORG/BASE G --push ORG/NEW`` (no OUT) never holds the model on
disk: the three-stage pipeline (download, apply and verify, upload) is
:mod:`~gainsurgery.applying.hub_stream`; this module is what surrounds it: the
transfer plan a dry run prints, the work folder (an output like OUT, checked with
:func:`~gainsurgery.io.checks.check_output` and claimed for the run with
:class:`~gainsurgery.io.workdir.WorkFolder`, named after the arguments so that a
rerun resumes), hf_xet's state kept inside it, and the small files of the commit
(the base's index, config and tokenizer, ``gainsurgery.json``, the model card).
The checks are the folder sink's (:func:`~gainsurgery.applying.steps.judge`), run
on every shard before the one commit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Iterator

from gainsurgery.errors import CheckpointError, OutputError
from gainsurgery.gainfile import GainFile
from gainsurgery.hub.internals import xet_uploads
from gainsurgery.hub.cards import CARD_NAME
from gainsurgery.hub.publish import UploadItem, text_item
from gainsurgery.io.checkpoint import INDEX_NAME
from gainsurgery.io.checks import check_output
from gainsurgery.io.inputs import resolve_input
from gainsurgery.io.workdir import WorkFolder, clean_stale
from gainsurgery.merge.plan import Plan
from gainsurgery.merge.provenance import OUTPUT_FILES, PROVENANCE_NAME, provenance_text
from gainsurgery.merge.stream import Streamed
from gainsurgery.applying import hub_stream
from gainsurgery.applying.hub_stream import DISK_SHARDS, WORK_PREFIX, ShardPublisher, gain_digest
from gainsurgery.applying.result import ApplyResult
from gainsurgery.applying.steps import Job, Planned, card_text, judge, planned_checkpoint
from gainsurgery.sources.base import OpenedBase

#: Bytes scaled per read without OUT: the network sets the pace, so it keeps memory low
#: (the streamer holds this much, the verifier a little more).
STREAM_CHUNK_BYTES = 16 << 20


@dataclass
class TransferPlan:
    """What a Hub-to-Hub apply moves, from headers alone (``--dry-run`` prints it).

    Attributes:
        shards: (name, bytes) in order.
        download_bytes: shard bytes to download (0 for a local base).
        upload_bytes: shard bytes to upload (the small files come on top).
        small_files_bytes: the index, config, tokenizer and other small files committed with them.
        peak_disk_bytes: the most the work folder will hold: the disk budget.
        work_root: where the work folder goes.
        xet: True when uploads go through Xet, False through classic LFS.
    """

    shards: list[tuple[str, int]]
    download_bytes: int
    upload_bytes: int
    small_files_bytes: int
    peak_disk_bytes: int
    work_root: Path
    xet: bool

    def as_dict(self) -> dict[str, Any]:
        return {"shards": len(self.shards), "download_bytes": self.download_bytes,
                "upload_bytes": self.upload_bytes, "small_files_bytes": self.small_files_bytes,
                "peak_disk_bytes": self.peak_disk_bytes, "work_root": str(self.work_root),
                "upload_path": "xet" if self.xet else "lfs"}


def transfer_plan(opened: OpenedBase, plan: Plan, work_root: Path) -> TransferPlan:
    """The bytes a Hub-to-Hub apply of ``plan`` will move, and the peak disk it needs."""
    shards = [(name, s.file_size) for name, s in plan.base.shards.items()]
    largest = max(size for _, size in shards)
    remote = opened.remote is not None
    small = sum(f.size for f in plan.base.extra_files(skip=OUTPUT_FILES))
    if plan.base.index is not None:
        small += resolve_input(plan.base.folder, INDEX_NAME, error=CheckpointError).stat().st_size
    return TransferPlan(shards, sum(s for _, s in shards) if remote else 0, sum(s for _, s in shards), small,
                        (DISK_SHARDS if remote else DISK_SHARDS - 1) * largest, work_root, xet_uploads())


def work_root(work_dir: str | os.PathLike[str] | None) -> Path:
    """The folder work folders go in: ``--work-dir`` (``~`` expanded), else the system temporary folder.

    Raises:
        OutputError: ``--work-dir`` is empty (an unset variable).

    Example:
        >>> work_root("/scratch")
        PosixPath('/scratch')
    """
    if work_dir is None:
        return default_work_root()
    text = os.fspath(work_dir)
    if not text.strip():
        raise OutputError("--work-dir is empty (an unset variable?); name a folder, e.g. /tmp")
    return Path(os.path.expanduser(text))


def work_folder_name(publisher: ShardPublisher, endpoint: str, base_spec: str, gain_specs: list[str]) -> str:
    """The work folder of a push: the same arguments give the same folder (that is how a rerun resumes)."""
    key = json.dumps([endpoint, publisher.target, publisher.revision, publisher.create_pr, base_spec, gain_specs])
    return WORK_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]


@contextlib.contextmanager
def xet_state_in(folder: Path) -> Iterator[None]:
    """Point hf_xet's on-disk state into ``folder`` for the block, unless the user chose where it goes.

    hf_xet reads these when huggingface_hub creates its Xet session (at the first
    Xet transfer of the process), so this must be entered before any.
    """
    changes = {}
    if "HF_XET_CACHE" not in os.environ:
        changes["HF_XET_CACHE"] = str(folder / "xet")
    if "HF_XET_CHUNK_CACHE_SIZE_BYTES" not in os.environ:
        changes["HF_XET_CHUNK_CACHE_SIZE_BYTES"] = "0"
    os.environ.update(changes)
    try:
        yield
    finally:
        for key in changes:
            os.environ.pop(key, None)


def default_work_root() -> Path:
    """Where work folders go by default: the system temporary folder (``$TMPDIR``)."""
    return Path(tempfile.gettempdir())


@contextlib.contextmanager
def claimed_work_folder(root: Path, name: str, target: str) -> Iterator[WorkFolder]:
    """Claim the work folder ``root/name`` for a push to ``target`` (dead runs' leftovers go first).

    On success (:meth:`WorkFolder.finish` called inside) it is gone; on failure its
    data is deleted and the journal stays for a rerun.
    """
    clean_stale(Path(root), WORK_PREFIX)
    work = WorkFolder.claim(Path(root), name, what=f"the same push to {target}")
    try:
        with xet_state_in(work.path):
            yield work
    except BaseException:
        with contextlib.suppress(OSError):
            work.clear()
        raise
    finally:
        work.release()


def base_items(plan: Plan) -> list[UploadItem]:
    """The base's files a Hub-to-Hub commit carries (the index, config, tokenizer...), from their checked folder.

    Each is opened again safely at upload time (:meth:`~gainsurgery.hub.publish.UploadItem.open`).
    """
    folder = plan.base.folder
    items = []
    if plan.base.index is not None:
        index = resolve_input(folder, INDEX_NAME)
        items.append(UploadItem(INDEX_NAME, index.stat().st_size, local=index, folder=folder, name=INDEX_NAME))
    items += [UploadItem(f.name, f.size, local=f.path, folder=folder, name=f.name)
              for f in plan.base.extra_files(skip=OUTPUT_FILES)]
    return items


def commit_items(plan: Plan, provenance: dict[str, Any], base_model: str | None) -> list[UploadItem]:
    """The small files of a Hub-to-Hub commit: what an apply writes next to the shards.

    The base's files (:func:`base_items`), the provenance record and the card (which
    names ``base_model`` only for a Hub base, or as given).
    """
    return [*base_items(plan), text_item(PROVENANCE_NAME, provenance_text(provenance)),
            text_item(CARD_NAME, card_text(provenance, base_model))]


class HubSink:
    """Streams the merged model to the push target, shard by shard, then commits once (no OUT)."""

    def planned(self, job: Job) -> ContextManager[Planned]:
        self.root = work_root(job.options.work_dir)  # an empty --work-dir is one line before the base is opened
        return planned_checkpoint(job.base, job.gains, allow_negative=job.options.allow_negative, hub=job.hub)

    def dry_run(self, job: Job, planned: Planned) -> ApplyResult:
        return ApplyResult(planned.plan, planned.opened.label, dry_run=True,
                           transfer=transfer_plan(planned.opened, planned.plan, self.root).as_dict())

    def write(self, job: Job, planned: Planned) -> ApplyResult:
        """The work folder is an output like OUT: never ``""``, ``/``, home, a link, or in or around an input."""
        options, publisher = job.options, job.publisher
        opened, plan = planned.opened, planned.plan
        client = job.hub if job.hub is not None else getattr(publisher, "client", None)
        specs = [f"gain:{gain_digest(g)}" if isinstance(g, GainFile) else str(g) for g in job.gains]
        name = work_folder_name(publisher, getattr(client, "endpoint", ""), job.base.spec, specs)
        check_output(self.root / name, inputs=planned.inputs, kind="folder", overwrite=True, what="the work folder")
        # The base's files go up with the commit: one carrying the token is refused now, before any work.
        publisher.check(base_items(plan))
        job.said.extend(planned.loaded.notes)
        t0 = time.perf_counter()
        records: dict[str, Any] = {}

        def provenance_of(streamed: Streamed) -> dict[str, Any]:
            # Every shard is uploaded and verified; nothing is committed before this passes.
            records["provenance"] = judge(job, planned, streamed, written="nothing was committed")
            return records["provenance"]

        with claimed_work_folder(self.root, name, publisher.target) as work:
            publisher.prepare()
            run = hub_stream.run(opened, plan, publisher, work,
                                 make_items=lambda p: commit_items(plan, p, options.base_model or opened.hub_id),
                                 provenance_of=provenance_of, chunk_bytes=options.chunk_bytes or STREAM_CHUNK_BYTES,
                                 threads=options.threads, progress=job.progress,
                                 allow_saturation=options.allow_saturation, digest=planned.digest)
            work.finish()
        return ApplyResult(plan, opened.label, None, seconds=time.perf_counter() - t0, shard_sha256=run.shard_sha256,
                           provenance=records["provenance"], verified=True, pushed=run.pushed, warnings=job.said,
                           resumed=run.resumed, peak_disk_bytes=run.peak_disk_bytes)
