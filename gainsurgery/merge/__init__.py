"""Applying gain files to a checkpoint: plan -> kernel -> stream -> verify -> provenance and card.

:func:`apply` is the one orchestration every caller uses (the CLI, the Python
API, the demo, the lab experiments and ``apply --push``):

1. open the base (local folder, embedded model, or a Hub repo read from its headers);
2. load the gain files (local or ``ORG/REPO:path`` on the Hub) and stack them;
3. make the plan (:mod:`~gainsurgery.merge.plan`, pure: headers only);
4. claim OUT (:func:`~gainsurgery.io.claims.claim_folder`: lock, marked temp folder)
   and prepare the push target;
5. stream the shards into the temp folder (:mod:`~gainsurgery.merge.stream`,
   scaling with :mod:`~gainsurgery.merge.kernel`, counting saturation and hashing
   the base's target tensors), check each gain's base fingerprint, copy the base's
   other files (safely), write the provenance record and the model card;
6. optionally verify every byte (:mod:`~gainsurgery.merge.verify`);
7. optionally publish the verified folder (a failed push discards it too);
8. publish the temp folder at OUT (fsync, then a no-replace rename, or an atomic
   exchange with ``overwrite``).

With a push target and no OUT, steps 4-8 are the Hub-to-Hub pipeline instead
(:mod:`~gainsurgery.merge.hub_pipeline`): download, apply, verify and upload one
shard at a time, overlapped, in a claimed, bounded work folder, then one commit
(the same checks: saturation, base fingerprints, the token, the card's ``base_model``).
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

from gainsurgery import gainfile as gf
from gainsurgery.errors import GainFileError, GainSurgeryError, OutputError, PlanError
from gainsurgery.gainfile import BaseCheck, GainFile
from gainsurgery.io.checkpoint import copy_extra_files, open_checkpoint
from gainsurgery.io.checks import check_output
from gainsurgery.io.claims import claim_folder
from gainsurgery.io.fingerprint import combine
from gainsurgery.io.inputs import show_path
from gainsurgery.io.write_errors import no_room
from gainsurgery.merge.plan import Plan, TensorOp, make_plan
from gainsurgery.merge.provenance import (OUTPUT_FILES, PROVENANCE_NAME, build_provenance, provenance_text,
                                          write_provenance)
from gainsurgery.merge.stream import DEFAULT_CHUNK_BYTES, StreamResult, execute
from gainsurgery.merge.verify import VerifyReport, check_files, verify
from gainsurgery.sources import OpenedBase, opened_base, resolve_gain_specs

if TYPE_CHECKING:
    from gainsurgery.hub.client import HubClient

#: Bytes scaled per read by the Hub-to-Hub pipeline: the network sets its pace, so it
#: keeps memory low (the streamer holds this much, the verifier a little more).
STREAM_CHUNK_BYTES = 16 << 20

__all__ = ["DEFAULT_CHUNK_BYTES", "ApplyResult", "LoadedGains", "Plan", "Publisher", "TensorOp", "VerifyReport",
           "apply", "check_base_fingerprints", "load_gains", "make_plan", "verify", "verify_merged"]


class ProgressBar(Protocol):
    """What :func:`apply` needs of a progress bar (``tqdm`` fits)."""

    def update(self, n: int) -> Any: ...

    def close(self) -> None: ...


#: Makes a progress bar from a description and a total in bytes.
ProgressFactory = Callable[[str, int], ProgressBar]
#: Receives one-line warnings (a gain without a base fingerprint, an allowed mismatch...).
Warn = Callable[[str], None]


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
        warnings: the one-line warnings given (gains without a base fingerprint, allowed mismatches).
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
    warnings: list[str] = field(default_factory=list)
    transfer: dict[str, Any] | None = None
    streamed: Any = None


@dataclass
class LoadedGains:
    """The gains of an apply, loaded and stacked.

    Attributes:
        gain: the stacked gain (float32 product), applied in one pass.
        sources: one provenance entry per gain (name, sha256, hub reference, method...; no local paths).
        paths: the local files read (inputs an output must keep away from).
        checks: the base fingerprints the gains carry (see :func:`gainsurgery.gainfile.base_provenance`).
        unchecked: names of the gains whose fingerprints do not cover every tensor they scale
            (made before fingerprints, or stacked from such a file): they cannot be checked in full.
        notes: the one-line warning for each of ``unchecked``.
    """

    gain: GainFile
    sources: list[dict[str, Any]]
    paths: list[str] = field(default_factory=list)
    checks: list[BaseCheck] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load_gains(gains: Sequence[str | os.PathLike[str] | GainFile], *, allow_negative: bool = False,
               hub: HubClient | None = None) -> LoadedGains:
    """Load gain files (local paths, ``ORG/REPO[@REV]:path`` on the Hub, or in-memory :class:`GainFile`\\ s).

    Several are stacked in the order given (product in float32); each keeps its own
    base fingerprint checks (they are checked one by one against the base).

    Returns:
        A :class:`LoadedGains`.

    Raises:
        GainFileError: none given, or one is missing or invalid.
        HubError: a Hub gain file cannot be downloaded.

    Example:
        >>> loaded = load_gains(["legal.safetensors", "medical.safetensors"])  # doctest: +SKIP
        >>> loaded.gain.num_parameters, [s["name"] for s in loaded.sources]  # doctest: +SKIP
        (55296, ['legal.safetensors', 'medical.safetensors'])
    """
    gains = list(gains)
    if not gains:
        raise GainFileError("give at least one gain file")
    # GAIN.safetensors@α: that file at power α (gf.split_power; never read as a Hub revision)
    powers = [gf.split_power(str(g)) for g in gains if not isinstance(g, GainFile)]
    paths, refs = resolve_gain_specs([spec for spec, _ in powers], hub)
    alphas = iter(alpha for _, alpha in powers)
    local = iter(zip(paths, refs))
    loaded: list[GainFile] = []
    names: list[str] = []
    sources: list[dict[str, Any]] = []
    read: list[str] = []
    all_checks: list[BaseCheck] = []
    unchecked: list[str] = []
    notes: list[str] = []
    for i, g in enumerate(gains):
        if isinstance(g, GainFile):
            name = f"gain[{i}]"
            g.validate(allow_negative=allow_negative, source=name)
            source = gf.describe(g, name)
        else:
            path, ref = next(local)
            alpha = next(alphas)
            name = Path(path).name
            g = gf.load(path, allow_negative=allow_negative)
            source = gf.describe(g, name, path)
            read.append(path)
            if ref is not None:
                source["hub"] = str(ref)
            if alpha is not None:
                g = gf.power(g, alpha)
                g.validate(allow_negative=allow_negative, source=f"{name}@{alpha:g}")
                name = f"{name}@{alpha:g}"
                source["power"] = alpha
        # What is covered is checked; what is not counts as unfingerprinted and is warned about.
        provenance = gf.base_provenance(g, name)
        all_checks.extend(provenance.checks)
        note = provenance.warning(name)
        if note is not None:
            unchecked.append(name)
            notes.append(note)
        loaded.append(g)
        names.append(name)
        sources.append(source)
    # Each gain is checked against the base on its own, so stacking here never refuses.
    stacked = loaded[0] if len(loaded) == 1 else gf.stack(loaded, names, allow_base_mismatch=True)
    return LoadedGains(stacked, sources, read, all_checks, unchecked, notes)


def check_base_fingerprints(loaded: LoadedGains, stream: StreamResult, *, allow_base_mismatch: bool,
                            warn: Warn, written: str = "nothing was written") -> list[str]:
    """Compare each gain's recorded base fingerprint with the base tensors just streamed.

    Returns the labels of the gains that did not match (only when allowed).

    Raises:
        PlanError: a mismatch, unless ``allow_base_mismatch``.

    Example:
        >>> check_base_fingerprints(loaded, streamed, allow_base_mismatch=False, warn=print)  # doctest: +SKIP
        []
    """
    mismatched = []
    for check in loaded.checks:
        found = combine(stream.tensor_digests, check.keys)
        if found == check.expected:
            continue
        text = (f"{check.label} was trained on other weights: it records base_tensors_sha256 "
                f"{check.expected[:19]}..., the base's {len(check.keys)} target tensors give {found[:19]}... "
                "(same names and shapes, different weights: another fine-tune, e.g. an instruct sibling)")
        if not allow_base_mismatch:
            raise PlanError(f"{text}; {written}; pass --allow-base-mismatch to apply it anyway")
        warn(text + "; applied anyway (--allow-base-mismatch), recorded in " + PROVENANCE_NAME)
        mismatched.append(check.label)
    return mismatched


def _default_warn(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def apply(
    base: str | os.PathLike[str],
    gains: Sequence[str | os.PathLike[str] | GainFile],
    out: str | os.PathLike[str] | None,
    *,
    overwrite: bool = False,
    verify: bool = False,
    dry_run: bool = False,
    allow_negative: bool = False,
    allow_saturation: bool = False,
    allow_base_mismatch: bool = False,
    base_model: str | None = None,
    chunk_bytes: int | None = None,
    threads: int | None = None,
    progress: ProgressFactory | None = None,
    publish: Publisher | None = None,
    hub: HubClient | None = None,
    warn: Warn | None = None,
    work_dir: str | os.PathLike[str] | None = None,
) -> ApplyResult:
    """Apply (and stack) gain files onto ``base``, streaming into the folder ``out``.

    See the module docstring for the steps. OUT appears only when complete (and,
    with ``verify`` or ``publish``, verified; with ``publish``, published). OUT is
    claimed with :func:`gainsurgery.io.claims.claim_folder`: it is never, never
    holds and never lies inside BASE or a gain file; a second run on the same OUT
    fails at once; without ``overwrite`` a folder that appears at OUT meanwhile is
    left alone and this run fails. With ``publish`` and ``out=None``, nothing is
    written but a claimed, bounded work folder: the Hub-to-Hub pipeline
    (:mod:`~gainsurgery.merge.hub_pipeline`).

    Args:
        base: a checkpoint folder, ``embedded:NAME`` or a Hub repo ``ORG/NAME[@REV]``.
        gains: gain files (paths, ``ORG/REPO[@REV]:path``, or :class:`GainFile` objects).
        out: the output folder; must not exist unless ``overwrite``. None (with
            ``publish``): stream to the push target, shard by shard.
        overwrite: replace an existing OUT (atomically, on success).
        verify: recompute every rescaled tensor and compare every other byte before OUT appears.
        dry_run: plan only (checks OUT too); write nothing.
        allow_negative: accept negative gains.
        allow_saturation: write weights that scaling turns into ±inf or 0 (recorded
            in ``gainsurgery.json``) instead of failing.
        allow_base_mismatch: apply a gain whose recorded base fingerprint differs
            from this base's target tensors (warned, recorded) instead of failing.
        base_model: the Hub repo id the model card names as ``base_model`` (default:
            the Hub base, or the repo of a Hugging Face cache snapshot; none for a local folder).
        chunk_bytes: bytes of tensor data scaled per read; bounds peak memory (default:
            64 MiB, or 16 MiB without OUT, where the network sets the pace).
        threads: compute threads (default: CPU count, at most 4).
        progress: makes a progress bar (``progress("apply", total_bytes)``).
        publish: the push step, run on the verified output before it is moved into place.
        hub: the Hub client for Hub bases and gain files (default: built from the environment).
        warn: receives one-line warnings (default: :func:`warnings.warn`).
        work_dir: without OUT, where the work folder goes (default: the system temporary folder).

    Returns:
        An :class:`ApplyResult`.

    Raises:
        GainSurgeryError: anything the user can fix (bad base, bad gain, unusable OUT,
            saturation, base mismatch, failed verification, Hub errors); OUT is then
            left untouched.

    Example:
        >>> apply("base/", ["legal.safetensors"], "merged/", verify=True).verified  # doctest: +SKIP
        True
    """
    said: list[str] = []  # given once the output is published: a failed run prints only its error

    def say(message: str) -> None:
        said.append(message)

    if base_model is not None:
        from gainsurgery.hub.refs import check_repo_id

        check_repo_id(base_model, what="--base-model")
    if out is None:
        if publish is None:
            raise PlanError("give OUT (a folder to write), or a repo to push to (--push) to stream the result "
                            "to the Hub without one")
        return _apply_to_hub(base, gains, publish, dry_run=dry_run, allow_negative=allow_negative,
                             allow_saturation=allow_saturation, allow_base_mismatch=allow_base_mismatch,
                             base_model=base_model, chunk_bytes=chunk_bytes or STREAM_CHUNK_BYTES, threads=threads,
                             progress=progress, hub=hub, warn=warn or _default_warn, work_dir=work_dir)
    chunk_bytes = chunk_bytes or DEFAULT_CHUNK_BYTES
    with _planned(base, gains, allow_negative=allow_negative, hub=hub) as (opened, plan, loaded):
        ckpt = opened.checkpoint
        inputs = [*opened.local_inputs(), *loaded.paths]
        if dry_run:
            check_output(out, inputs=inputs, kind="folder", overwrite=overwrite)
            return ApplyResult(plan, opened.label, dry_run=True)
        for note in loaded.notes:
            say(note)
        t0 = time.perf_counter()
        with _writing(out), claim_folder(out, inputs=inputs, overwrite=overwrite) as claim:
            if publish is not None:
                publish.prepare()
            bar = progress("apply", ckpt.total_bytes) if progress is not None else None
            try:
                streamed = execute(plan, claim.tmp, chunk_bytes=chunk_bytes, threads=threads,
                                   progress=bar.update if bar is not None else None,
                                   fetch_shard=opened.fetch_shard, allow_saturation=allow_saturation,
                                   digest={k for check in loaded.checks for k in check.keys})
            finally:
                if bar is not None:
                    bar.close()
            opened.confirm()  # a cache snapshot's shards, checked while they streamed
            mismatched = check_base_fingerprints(loaded, streamed, allow_base_mismatch=allow_base_mismatch, warn=say)
            for tname, (inf, zero) in streamed.saturation.items():
                say(f"{tname}: {inf} weights became ±inf and {zero} became 0 (--allow-saturation), recorded in "
                    f"{PROVENANCE_NAME}")
            copy_extra_files(ckpt, claim.tmp, skip=OUTPUT_FILES)
            provenance = build_provenance(plan, opened.provenance(), streamed.shard_sha256,
                                          saturation=streamed.saturation, base_mismatch=mismatched,
                                          unchecked=loaded.unchecked)
            write_provenance(claim.tmp, provenance)
            _write_card(claim.tmp, provenance, base_model or opened.hub_id)
            checked = verify or publish is not None
            if checked:
                report = _verify(plan, claim.tmp, chunk_bytes, allow_saturation=allow_saturation)
                if not report.ok:
                    raise GainSurgeryError("verification failed, output discarded: " + report.problems[0])
            pushed = publish.publish(claim.tmp) if publish is not None else None
            published = claim.publish()
    for message in said:
        (warn or _default_warn)(message)
    return ApplyResult(plan, opened.label, published, seconds=time.perf_counter() - t0,
                       shard_sha256=streamed.shard_sha256, provenance=provenance, verified=checked, pushed=pushed,
                       warnings=said)


def _apply_to_hub(base: str | os.PathLike[str], gains: Sequence[str | os.PathLike[str] | GainFile],
                  publish: Any, *, dry_run: bool, allow_negative: bool, allow_saturation: bool,
                  allow_base_mismatch: bool, base_model: str | None, chunk_bytes: int, threads: int | None,
                  progress: ProgressFactory | None, hub: HubClient | None, warn: Warn,
                  work_dir: str | os.PathLike[str] | None) -> ApplyResult:
    """Apply without OUT: the Hub-to-Hub pipeline into ``publish`` (see :mod:`~gainsurgery.merge.hub_pipeline`).

    The work folder is an output like OUT (:func:`~gainsurgery.io.checks.check_output`:
    never ``""``, ``/``, home, never a link, never in or around the base or a gain
    file) and is claimed for the run (:class:`~gainsurgery.io.workdir.WorkFolder`).
    """
    from gainsurgery.merge import hub_pipeline as hp

    root = hp.work_root(work_dir)
    said: list[str] = []
    with _planned(base, gains, allow_negative=allow_negative, hub=hub) as (opened, plan, loaded):
        if dry_run:
            return ApplyResult(plan, opened.label, dry_run=True,
                               transfer=hp.transfer_plan(opened, plan, root).as_dict())
        client = hub if hub is not None else getattr(publish, "client", None)
        specs = [f"gain:{hp.gain_digest(g)}" if isinstance(g, GainFile) else str(g) for g in gains]
        name = hp.work_folder_name(publish, getattr(client, "endpoint", ""), str(base), specs)
        check_output(root / name, inputs=[*opened.local_inputs(), *loaded.paths], kind="folder", overwrite=True,
                     what="the work folder")
        # The base's files go up with the commit: one carrying the token is refused now, before any work.
        publish.check(_base_items(plan))
        said.extend(loaded.notes)
        t0 = time.perf_counter()
        with hp.claimed_work_folder(root, name, publish.target) as work:
            publish.prepare()
            records: dict[str, Any] = {}

            def provenance_of(streamed: StreamResult) -> dict[str, Any]:
                # Every shard is uploaded and verified; nothing is committed before this passes.
                opened.confirm()  # a cache snapshot's shards, checked while they streamed
                mismatched = check_base_fingerprints(loaded, streamed, allow_base_mismatch=allow_base_mismatch,
                                                     warn=said.append, written="nothing was committed")
                for tname, (inf, zero) in streamed.saturation.items():
                    said.append(f"{tname}: {inf} weights became ±inf and {zero} became 0 (--allow-saturation), "
                                f"recorded in {PROVENANCE_NAME}")
                records["provenance"] = build_provenance(plan, opened.provenance(), streamed.shard_sha256,
                                                         saturation=streamed.saturation, base_mismatch=mismatched,
                                                         unchecked=loaded.unchecked)
                return records["provenance"]

            def commit_items(provenance: dict[str, Any]) -> list:
                return _commit_items(plan, provenance, base_model or opened.hub_id)

            streamed = hp.run(opened, plan, publish, work, make_items=commit_items, provenance_of=provenance_of,
                              chunk_bytes=chunk_bytes, threads=threads, progress=progress,
                              allow_saturation=allow_saturation,
                              digest={k for check in loaded.checks for k in check.keys})
            work.finish()
    for message in said:
        warn(message)
    return ApplyResult(plan, opened.label, None, seconds=time.perf_counter() - t0,
                       shard_sha256=streamed.shard_sha256, provenance=records["provenance"], verified=True,
                       pushed=streamed.pushed, warnings=said, streamed=streamed)


def _base_items(plan: Plan) -> list:
    """The base's files a Hub-to-Hub commit carries (the index, config, tokenizer...), from their checked folder.

    Each is opened again safely at upload time (:meth:`~gainsurgery.hub.publish.UploadItem.open`).
    """
    from gainsurgery.hub.publish import UploadItem
    from gainsurgery.io.checkpoint import INDEX_NAME
    from gainsurgery.io.inputs import resolve_input

    folder = plan.base.folder
    items = []
    if plan.base.index is not None:
        index = resolve_input(folder, INDEX_NAME)
        items.append(UploadItem(INDEX_NAME, index.stat().st_size, local=index, folder=folder, name=INDEX_NAME))
    items += [UploadItem(f.name, f.size, local=f.path, folder=folder, name=f.name)
              for f in plan.base.extra_files(skip=OUTPUT_FILES)]
    return items


def _commit_items(plan: Plan, provenance: dict[str, Any], base_model: str | None) -> list:
    """The small files of a Hub-to-Hub commit: what an apply writes next to the shards.

    The base's files (:func:`_base_items`), the provenance record and the card (which
    names ``base_model`` only for a Hub base).
    """
    from gainsurgery.hub.cards import CARD_NAME, merged_model_card
    from gainsurgery.hub.publish import text_item

    return [*_base_items(plan), text_item(PROVENANCE_NAME, provenance_text(provenance)),
            text_item(CARD_NAME, merged_model_card(provenance, provenance_file=PROVENANCE_NAME,
                                                   base_model=base_model))]


@contextlib.contextmanager
def _writing(out: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a failed write (full disk, file-size limit, permissions) into one line; the claim removes the temp."""
    try:
        with no_room(f"OUT {show_path(out)}", left="nothing was left behind (BASE and any old OUT are untouched)"):
            yield
    except OSError as exc:
        where = f" ({show_path(exc.filename)})" if exc.filename else ""
        raise OutputError(f"could not write {show_path(out)}: {exc.strerror or exc}{where}; "
                          "nothing was left behind") from None


@contextlib.contextmanager
def _planned(base: str | os.PathLike[str], gains: Sequence[str | os.PathLike[str] | GainFile], *,
             allow_negative: bool, hub: HubClient | None) -> Iterator[tuple[OpenedBase, Plan, LoadedGains]]:
    """Open the base, load and stack the gains, and plan (steps 1-3), for the length of the block."""
    with opened_base(base, hub, skip_files=OUTPUT_FILES) as opened:
        # Every file that will be copied beside the output is checked now, before any work
        # (a link to /proc/self/environ is one line here, never copied nor uploaded).
        opened.checkpoint.extra_files(skip=OUTPUT_FILES)
        loaded = load_gains(gains, allow_negative=allow_negative, hub=hub)
        yield opened, make_plan(opened.checkpoint, loaded.gain, loaded.sources, allow_negative=allow_negative), loaded


def _verify(plan: Plan, folder: Path, chunk_bytes: int, *, allow_saturation: bool,
            progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Every byte of ``folder`` against ``plan``, and its file set: exactly what an apply writes."""
    out = open_checkpoint(folder)
    files = check_files(plan, out, OUTPUT_FILES, chunk_bytes=chunk_bytes)
    report = verify(plan, out, chunk_bytes=chunk_bytes, allow_saturation=allow_saturation, progress=progress)
    report.problems[:0] = files
    return report


def _write_card(folder: Path, provenance: dict[str, Any], base_model: str | None) -> None:
    from gainsurgery.hub.cards import CARD_NAME, merged_model_card

    card = merged_model_card(provenance, provenance_file=PROVENANCE_NAME, base_model=base_model)
    with open(folder / CARD_NAME, "x", encoding="utf-8") as f:
        f.write(card)


def verify_merged(
    base: str | os.PathLike[str],
    gains: Sequence[str | os.PathLike[str] | GainFile],
    out: str | os.PathLike[str],
    *,
    allow_negative: bool = False,
    allow_saturation: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: ProgressFactory | None = None,
    hub: HubClient | None = None,
) -> VerifyReport:
    """Check that the folder ``out`` is exactly ``base`` with ``gains`` applied.

    Recomputes every target tensor (float32 product, rounded once) and compares
    every other tensor, header and the index byte for byte; a target whose weights
    scaling turned into ±inf or 0 is a problem unless ``allow_saturation``. The file
    set must be what apply writes (:func:`~gainsurgery.merge.verify.check_files`: no
    extra shard, file, folder or link; none missing; copied files identical). A Hub
    base's shards are fetched into the HF cache first. ``out`` is read as an input
    folder (no links out of it, no FIFOs).

    Returns:
        A :class:`VerifyReport`; ``report.ok`` only if everything matches.

    Example:
        >>> verify_merged("base/", ["legal.safetensors"], "merged/").ok  # doctest: +SKIP
        True
    """
    with _planned(base, gains, allow_negative=allow_negative, hub=hub) as (opened, plan, _):
        open_checkpoint(out)  # a hostile OUT is one line before any shard is fetched
        for shard in opened.checkpoint.shards.values():
            opened.fetch_shard(shard)
        bar = progress("verify", opened.checkpoint.total_bytes) if progress is not None else None
        try:
            report = _verify(plan, Path(out), chunk_bytes, allow_saturation=allow_saturation,
                             progress=bar.update if bar is not None else None)
            opened.confirm()  # a cache snapshot's shards, checked beside the comparison
            return report
        finally:
            if bar is not None:
                bar.close()
