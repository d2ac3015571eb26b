"""Applying gain files to a checkpoint: plan -> kernel -> stream -> verify -> provenance and card.

:func:`apply` is the one orchestration every caller uses (the CLI, the Python
API, the demo, the lab experiments and ``apply --push``):

1. open the base (local folder, embedded model, or a Hub repo read from its headers);
2. load the gain files (local or ``ORG/REPO:path`` on the Hub) and stack them;
3. make the plan (:mod:`~gainsurgery.merge.plan`, pure: headers only);
4. claim OUT (:func:`~gainsurgery.merge.stream.staged_output`) and prepare the push target;
5. stream the shards into the staging folder (:mod:`~gainsurgery.merge.stream`,
   scaling with :mod:`~gainsurgery.merge.kernel`), copy the base's other files,
   write the provenance record and the model card, fsync;
6. optionally verify every byte (:mod:`~gainsurgery.merge.verify`);
7. optionally publish the verified folder (a failed push discards it too);
8. rename the staging folder into place.

With a push target and no OUT, steps 4-8 are the Hub-to-Hub pipeline instead
(:mod:`~gainsurgery.merge.hub_pipeline`): download, apply, verify and upload one
shard at a time, overlapped, in a bounded work folder, then one commit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

from gainsurgery import gainfile as gf
from gainsurgery.errors import GainFileError, GainSurgeryError, PlanError
from gainsurgery.gainfile import GainFile
from gainsurgery.io.checkpoint import open_checkpoint
from gainsurgery.merge.plan import Plan, TensorOp, make_plan
from gainsurgery.merge.provenance import (OUTPUT_FILES, PROVENANCE_NAME, build_provenance, provenance_text,
                                          write_provenance)
from gainsurgery.merge.stream import DEFAULT_CHUNK_BYTES, check_output, execute, staged_output
from gainsurgery.merge.verify import VerifyReport, verify
from gainsurgery.sources import OpenedBase, opened_base, resolve_gain_specs

if TYPE_CHECKING:
    from gainsurgery.hub.client import HubClient

#: Bytes scaled per read by the Hub-to-Hub pipeline: the network sets its pace, so it
#: keeps memory low (the streamer holds this much, the verifier a little more).
STREAM_CHUNK_BYTES = 16 << 20

__all__ = ["DEFAULT_CHUNK_BYTES", "ApplyResult", "Plan", "Publisher", "TensorOp", "VerifyReport", "apply",
           "load_gains", "make_plan", "verify", "verify_merged"]



class ProgressBar(Protocol):
    """What :func:`apply` needs of a progress bar (``tqdm`` fits)."""

    def update(self, n: int) -> Any: ...

    def close(self) -> None: ...


#: Makes a progress bar from a description and a total in bytes.
ProgressFactory = Callable[[str, int], ProgressBar]


class Publisher(Protocol):
    """The push step of an apply (see :class:`gainsurgery.hub.publish.HubPublisher`)."""

    @property
    def target(self) -> str:
        """Where it publishes (for plans and messages)."""

    def prepare(self) -> None:
        """Called before any work, so that a bad token fails first."""

    def publish(self, folder: Path) -> Any:
        """Publish the finished, verified output folder; raise to discard it."""


@dataclass
class ApplyResult:
    """What :func:`apply` did.

    Attributes:
        plan: the plan (tensors touched, bytes rewritten and copied).
        base: the base as plans show it (a Hub reference or the local folder).
        out: the output folder, resolved (None for a dry run).
        dry_run: True when nothing was written.
        seconds: wall time from claiming OUT to publishing it.
        shard_sha256: shard name -> sha256 of the written shard.
        provenance: the record written to ``gainsurgery.json``.
        verified: True when every byte was verified before OUT appeared (or, without OUT, before upload).
        pushed: what the publisher returned (a :class:`~gainsurgery.hub.publish.PushResult`), if any.
        transfer: without OUT, what the pipeline moves and the disk it needs
            (:meth:`~gainsurgery.merge.hub_pipeline.TransferPlan.as_dict`).
        streamed: without OUT, what the pipeline did (:class:`~gainsurgery.merge.hub_pipeline.StreamResult`).
    """

    plan: Plan
    base: str
    out: Path | None = None
    dry_run: bool = False
    seconds: float = 0.0
    shard_sha256: dict[str, str] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    verified: bool = False
    pushed: Any = None
    transfer: dict[str, Any] | None = None
    streamed: Any = None


def load_gains(gains: Sequence[str | os.PathLike[str] | GainFile], *, allow_negative: bool = False,
               hub: HubClient | None = None) -> tuple[GainFile, list[dict[str, Any]]]:
    """Load gain files (local paths, ``ORG/REPO[@REV]:path`` on the Hub, or in-memory :class:`GainFile`\\ s).

    Several are stacked in the order given (product in float32).

    Returns:
        (stacked gain, one provenance entry per gain: name, path, sha256, hub, method, ...).

    Raises:
        GainFileError: none given, or one is missing or invalid.
        HubError: a Hub gain file cannot be downloaded.
    """
    gains = list(gains)
    if not gains:
        raise GainFileError("give at least one gain file")
    specs = [g for g in gains if not isinstance(g, GainFile)]
    paths, refs = resolve_gain_specs(specs, hub)
    local = iter(zip(paths, refs))
    loaded: list[GainFile] = []
    names: list[str] = []
    sources: list[dict[str, Any]] = []
    for i, g in enumerate(gains):
        if isinstance(g, GainFile):
            name = f"gain[{i}]"
            g.validate(allow_negative=allow_negative, source=name)
            source = gf.describe(g, name)
        else:
            path, ref = next(local)
            name = Path(path).name
            g = gf.load(path, allow_negative=allow_negative)
            source = gf.describe(g, name, path)
            if ref is not None:
                source["hub"] = str(ref)
        loaded.append(g)
        names.append(name)
        sources.append(source)
    stacked = loaded[0] if len(loaded) == 1 else gf.stack(loaded, names)
    return stacked, sources


def apply(
    base: str | os.PathLike[str],
    gains: Sequence[str | os.PathLike[str] | GainFile],
    out: str | os.PathLike[str] | None,
    *,
    overwrite: bool = False,
    verify: bool = False,
    dry_run: bool = False,
    allow_negative: bool = False,
    chunk_bytes: int | None = None,
    threads: int | None = None,
    progress: ProgressFactory | None = None,
    publish: Publisher | None = None,
    hub: HubClient | None = None,
    work_dir: str | os.PathLike[str] | None = None,
) -> ApplyResult:
    """Apply (and stack) gain files onto ``base``, streaming into the folder ``out``.

    See the module docstring for the steps. OUT appears only when complete (and,
    with ``verify`` or ``publish``, verified; with ``publish``, published). With
    ``publish`` and ``out=None``, nothing is written but a bounded work folder: the
    Hub-to-Hub pipeline (:mod:`~gainsurgery.merge.hub_pipeline`).

    Args:
        base: a checkpoint folder, ``embedded:NAME`` or a Hub repo ``ORG/NAME[@REV]``.
        gains: gain files (paths, ``ORG/REPO[@REV]:path``, or :class:`GainFile` objects).
        out: the output folder; must not exist unless ``overwrite``. None (with
            ``publish``): stream to the push target, shard by shard.
        overwrite: replace an existing OUT (atomically, on success).
        verify: recompute every rescaled tensor and compare every other byte before OUT appears.
        dry_run: plan only (checks OUT too); write nothing.
        allow_negative: accept negative gains.
        chunk_bytes: bytes of tensor data scaled per read; bounds peak memory (default:
            64 MiB, or 16 MiB without OUT, where the network sets the pace).
        threads: compute threads (default: CPU count, at most 4).
        progress: makes a progress bar (``progress("apply", total_bytes)``).
        publish: the push step, run on the verified output before it is moved into place.
        hub: the Hub client for Hub bases and gain files (default: built from the environment).
        work_dir: without OUT, where the work folder goes (default: the system temporary folder).

    Returns:
        An :class:`ApplyResult`.

    Raises:
        GainSurgeryError: anything the user can fix (bad base, bad gain, unusable OUT,
            failed verification, Hub errors); OUT is then left untouched.
    """
    if out is None:
        chunk_bytes = chunk_bytes or STREAM_CHUNK_BYTES
        if publish is None:
            raise PlanError("give OUT (a folder to write), or a repo to push to (--push) to stream the result "
                            "to the Hub without one")
        return _apply_to_hub(base, gains, publish, dry_run=dry_run, allow_negative=allow_negative,
                             chunk_bytes=chunk_bytes, threads=threads, progress=progress, hub=hub, work_dir=work_dir)
    chunk_bytes = chunk_bytes or DEFAULT_CHUNK_BYTES
    with _planned(base, gains, allow_negative=allow_negative, hub=hub) as (opened, plan):
        ckpt = opened.checkpoint
        if dry_run:
            check_output(ckpt.folder, Path(out), overwrite=overwrite)
            return ApplyResult(plan, opened.label, dry_run=True)
        t0 = time.perf_counter()
        protect = [Path(s["path"]) for s in plan.sources if s.get("path")]
        with staged_output(ckpt.folder, out, overwrite=overwrite, protect=protect) as staging:
            if publish is not None:
                publish.prepare()
            bar = progress("apply", ckpt.total_bytes) if progress is not None else None
            try:
                shard_sha = execute(plan, staging.folder, chunk_bytes=chunk_bytes, threads=threads,
                                    progress=bar.update if bar is not None else None,
                                    fetch_shard=opened.fetch_shard)
                for extra in ckpt.extra_files(skip=OUTPUT_FILES):
                    shutil.copyfile(extra, staging.folder / extra.name)
                provenance = build_provenance(plan, opened.provenance(), shard_sha)
                write_provenance(staging.folder, provenance)
                _write_card(staging.folder, provenance)
                staging.sync()
                checked = verify or publish is not None
                if checked:
                    report = _verify(plan, staging.folder, chunk_bytes)
                    if not report.ok:
                        raise GainSurgeryError("verification failed, output discarded: " + report.problems[0])
                pushed = publish.publish(staging.folder) if publish is not None else None
                staging.publish()
            finally:
                if bar is not None:
                    bar.close()
    return ApplyResult(plan, opened.label, staging.out, seconds=time.perf_counter() - t0, shard_sha256=shard_sha,
                       provenance=provenance, verified=checked, pushed=pushed)


def _apply_to_hub(base: str | os.PathLike[str], gains: Sequence[str | os.PathLike[str] | GainFile],
                  publish: Any, *, dry_run: bool, allow_negative: bool, chunk_bytes: int, threads: int | None,
                  progress: ProgressFactory | None, hub: HubClient | None,
                  work_dir: str | os.PathLike[str] | None) -> ApplyResult:
    """Apply without OUT: the Hub-to-Hub pipeline into ``publish`` (see :mod:`~gainsurgery.merge.hub_pipeline`)."""
    from gainsurgery.hub.refs import parse_base_ref
    from gainsurgery.merge import hub_pipeline as hp

    if work_dir is not None and not str(work_dir).strip():
        raise PlanError("--work-dir is empty (an unset variable?); name a folder, e.g. /tmp")
    root = Path(work_dir) if work_dir is not None else hp.default_work_root()
    if dry_run:
        with _planned(base, gains, allow_negative=allow_negative, hub=hub) as (opened, plan):
            return ApplyResult(plan, opened.label, dry_run=True,
                               transfer=hp.transfer_plan(opened, plan, root).as_dict())
    client = hub if hub is not None else getattr(publish, "client", None)
    specs = [f"gain:{hp.gain_digest(g)}" if isinstance(g, GainFile) else str(g) for g in gains]
    name = hp.work_folder_name(publish, getattr(client, "endpoint", ""), str(base), specs)
    if parse_base_ref(str(base)) is None:  # the work folder is an output: never inside a local base
        from gainsurgery.io.outputs import check_output
        from gainsurgery.sources import resolve_base

        check_output(root / name, inputs=[resolve_base(base)], kind="folder", overwrite=True,
                     what="the work folder")
    t0 = time.perf_counter()
    with hp.claimed_work_folder(root, name, publish.target) as work:
        with _planned(base, gains, allow_negative=allow_negative, hub=hub) as (opened, plan):
            publish.prepare()
            records: dict[str, Any] = {}

            def provenance_of(shard_sha: dict[str, str]) -> dict[str, Any]:
                records["provenance"] = build_provenance(plan, opened.provenance(), shard_sha)
                return records["provenance"]

            streamed = hp.run(opened, plan, publish, work, make_items=_commit_items, provenance_of=provenance_of,
                              chunk_bytes=chunk_bytes, threads=threads, progress=progress)
            work.finish()
    return ApplyResult(plan, opened.label, None, seconds=time.perf_counter() - t0,
                       shard_sha256=streamed.shard_sha256, provenance=records["provenance"], verified=True,
                       pushed=streamed.pushed, streamed=streamed)


def _commit_items(plan: Plan, provenance: dict[str, Any]) -> list:
    """The small files of a Hub-to-Hub commit: what an apply writes next to the shards."""
    from gainsurgery.hub.cards import CARD_NAME, merged_model_card
    from gainsurgery.hub.publish import UploadItem, text_item
    from gainsurgery.io.checkpoint import INDEX_NAME

    items = []
    if plan.base.index is not None:
        index = plan.base.folder / INDEX_NAME
        items.append(UploadItem(INDEX_NAME, index.stat().st_size, local=index))
    items += [UploadItem(p.name, p.stat().st_size, local=p) for p in plan.base.extra_files(skip=OUTPUT_FILES)]
    items.append(text_item(PROVENANCE_NAME, provenance_text(provenance)))
    items.append(text_item(CARD_NAME, merged_model_card(provenance, provenance_file=PROVENANCE_NAME)))
    return items


@contextlib.contextmanager
def _planned(base: str | os.PathLike[str], gains: Sequence[str | os.PathLike[str] | GainFile], *,
             allow_negative: bool, hub: HubClient | None) -> Iterator[tuple[OpenedBase, Plan]]:
    """Open the base, load and stack the gains, and plan (steps 1-3), for the length of the block."""
    with opened_base(base, hub, skip_files=OUTPUT_FILES) as opened:
        gain, sources = load_gains(gains, allow_negative=allow_negative, hub=hub)
        yield opened, make_plan(opened.checkpoint, gain, sources, allow_negative=allow_negative)


def _verify(plan: Plan, folder: Path, chunk_bytes: int) -> VerifyReport:
    return verify(plan, open_checkpoint(folder), chunk_bytes=chunk_bytes)


def _write_card(folder: Path, provenance: dict[str, Any]) -> None:
    from gainsurgery.hub.cards import CARD_NAME, merged_model_card

    card = merged_model_card(provenance, provenance_file=PROVENANCE_NAME)
    (folder / CARD_NAME).write_text(card, encoding="utf-8")


def verify_merged(
    base: str | os.PathLike[str],
    gains: Sequence[str | os.PathLike[str] | GainFile],
    out: str | os.PathLike[str],
    *,
    allow_negative: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: ProgressFactory | None = None,
    hub: HubClient | None = None,
) -> VerifyReport:
    """Check that the folder ``out`` is exactly ``base`` with ``gains`` applied.

    Recomputes every target tensor (float32 product, rounded once) and compares
    every other tensor, header and the index byte for byte. A Hub base's shards
    are fetched into the HF cache first.

    Returns:
        A :class:`VerifyReport`; ``report.ok`` only if everything matches.
    """
    with _planned(base, gains, allow_negative=allow_negative, hub=hub) as (opened, plan):
        out_ckpt = open_checkpoint(out)
        for shard in opened.checkpoint.shards.values():
            opened.fetch_shard(shard)
        bar = progress("verify", opened.checkpoint.total_bytes) if progress is not None else None
        try:
            return verify(plan, out_ckpt, chunk_bytes=chunk_bytes, progress=bar.update if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
