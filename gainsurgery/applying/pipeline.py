"""The apply pipeline: classify BASE -> check the options -> plan -> sink (stream, judge, verify, provenance).

:func:`apply` is the one orchestration behind ``gainsurgery apply`` and
:func:`gainsurgery.api.apply`:

1. check the options against BASE's format and OUT
   (:meth:`~gainsurgery.applying.options.ApplyOptions.check_for`), classify BASE once
   (:func:`~gainsurgery.sources.spec.classify_base`: the typed spec every later step takes)
   and check the push target against it;
2. pick the sink: a GGUF file (:mod:`~gainsurgery.applying.gguf_sink`), a folder
   (:mod:`~gainsurgery.applying.folder_sink`), or, with ``push_to`` and no OUT, the
   Hub (:mod:`~gainsurgery.applying.hub_sink`); with ``push_to``, make the publisher;
3. ``sink.planned(job)``: open the base, load and stack the gains, plan (shared
   steps, :mod:`~gainsurgery.applying.steps`);
4. ``sink.dry_run(job, planned)`` or ``sink.write(job, planned)``: claim the output,
   stream, judge (base fingerprints, saturation), write provenance and card, verify,
   push, publish.
5. give the warnings, once the result is published.

:func:`verify_output` (the ``verify`` command) checks an output against BASE and
the gains with the same steps.

A new sink is one module with a class of those three methods (:class:`Sink`) and
one line in :func:`sink_for`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager, Protocol, Sequence

from gainsurgery.gainfile import GainFile
from gainsurgery.hub.client import HubClient
from gainsurgery.hub.publish import HubPublisher
from gainsurgery.applying.folder_sink import FolderSink
from gainsurgery.applying.hub_sink import HubSink
from gainsurgery.applying.options import ApplyOptions
from gainsurgery.applying.result import ApplyResult
from gainsurgery.applying.steps import (Job, ProgressFactory, Warn, default_warn, planned_checkpoint, progress_bar,
                                        verify_folder)
from gainsurgery.io.checkpoint import open_checkpoint
from gainsurgery.merge.kernel import DEFAULT_CHUNK_BYTES
from gainsurgery.merge.verify import VerifyReport
from gainsurgery.sources.local import base_model_name
from gainsurgery.sources.spec import BaseSpec, classify_base

if TYPE_CHECKING:
    from gainsurgery.formats.gguf import GGUFVerifyReport


class Sink(Protocol):
    """Where an apply's bytes go (a folder, the Hub, a GGUF file...)."""

    def planned(self, job: Job) -> ContextManager[Any]:
        """Open the base, load the gains and plan, for the length of the block."""

    def dry_run(self, job: Job, planned: Any) -> ApplyResult:
        """Check the output as a run would; write nothing."""

    def write(self, job: Job, planned: Any) -> ApplyResult:
        """Write (and verify, and publish) the result; warnings go to ``job.said``."""


def sink_for(base: BaseSpec, out: str | os.PathLike[str] | None) -> Sink:
    """The sink for this BASE and OUT."""
    if base.is_gguf:
        # The GGUF engine imports the gguf library (a third of a second): only when BASE is a GGUF file.
        from gainsurgery.applying.gguf_sink import GGUFSink

        return GGUFSink()
    return FolderSink() if out is not None else HubSink()


def publisher_for(base: BaseSpec, out: str | os.PathLike[str] | None, options: ApplyOptions,
                  hub: HubClient) -> HubPublisher:
    """The push target of ``options.push_to``; the commit title names folders by their name only."""
    # A local path says who and where the user is: only its last part goes into the title.
    name = Path(out).name if out is not None else (base_model_name(base) or Path(base.spec).name)
    return HubPublisher(hub, str(options.push_to), private=options.private, revision=options.revision,
                        create_pr=options.create_pr,
                        commit_message=options.commit_message or f"Upload {name} (gainsurgery apply)")


def apply(base: str | os.PathLike[str] | BaseSpec, gains: Sequence[str | os.PathLike[str] | GainFile],
          out: str | os.PathLike[str] | None, options: ApplyOptions, *, progress: ProgressFactory | None = None,
          hub: HubClient | None = None, warn: Warn | None = None) -> ApplyResult:
    """Apply (and stack) ``gains`` onto ``base`` into ``out`` (or the push target), as ``options`` say.

    See the module docstring for the steps and :func:`gainsurgery.api.apply` for the
    arguments (``options`` holds the rest, checked when it was made).

    Returns:
        An :class:`~gainsurgery.applying.result.ApplyResult`.

    Raises:
        GainSurgeryError: anything the user can fix; OUT (and the push target) is then left as it was.
    """
    options.check_for(base, out)
    spec = classify_base(base)
    options.check_push_target(spec)
    publisher = None
    if options.push_to:
        hub = hub if hub is not None else HubClient.from_env()
        publisher = publisher_for(spec, out, options, hub)
    job = Job(spec, list(gains), out, options, progress=progress, hub=hub, publisher=publisher)
    sink = sink_for(spec, out)
    with sink.planned(job) as planned:
        if options.dry_run:
            return sink.dry_run(job, planned)
        result = sink.write(job, planned)
    for message in job.said:
        (warn or default_warn)(message)
    return result


def verify_output(
    base: str | os.PathLike[str] | BaseSpec,
    gains: Sequence[str | os.PathLike[str] | GainFile],
    out: str | os.PathLike[str],
    *,
    allow_negative: bool = False,
    allow_saturation: bool = False,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: ProgressFactory | None = None,
    hub: HubClient | None = None,
) -> VerifyReport | GGUFVerifyReport:
    """Check that ``out`` is exactly ``base`` with ``gains`` applied, bit for bit (``gainsurgery verify``).

    A ``base`` ending in ``.gguf``: ``out`` is the adapted GGUF file
    (:func:`gainsurgery.applying.gguf_sink.verify_gguf`). Otherwise ``out`` is a folder:
    this recomputes every target tensor (float32 product, rounded once) and compares
    every other tensor, header and the index byte for byte; a target whose weights
    scaling turned into ±inf or 0 is a problem unless ``allow_saturation``. The file
    set must be what apply writes (:func:`~gainsurgery.merge.verify.check_files`: no
    extra shard, file, folder or link; none missing; copied files identical). A Hub
    base's shards are fetched into the HF cache first. ``out`` is read as an input
    folder (no links out of it, no FIFOs). ``chunk_bytes``: bytes compared per read.

    Args:
        base: the base (folder, ``embedded:NAME``, Hub repo, or a GGUF file).
        gains: the gain files that were applied, in order.
        out: the merged folder (or GGUF file) to check.
        allow_negative: accept negative gains.
        allow_saturation: accept targets whose weights scaling turned into ±inf or 0
            (as ``apply(..., allow_saturation=True)`` wrote them); a problem otherwise.
        chunk_bytes: bytes compared per read.
        progress: a progress-bar factory.
        hub: the Hub client for a Hub base (default: from the environment).

    Returns:
        A :class:`VerifyReport` (for a GGUF base a
        :class:`~gainsurgery.formats.gguf.GGUFVerifyReport`); ``report.ok`` only if everything matches.

    Example:
        >>> verify_output("base/", ["legal.safetensors"], "merged/").ok  # doctest: +SKIP
        True
    """
    spec = base if isinstance(base, BaseSpec) else classify_base(base)
    if spec.is_gguf:
        from gainsurgery.applying.gguf_sink import verify_gguf  # the gguf library: only for a GGUF base

        return verify_gguf(spec, gains, out, allow_negative=allow_negative, hub=hub, progress=progress)
    with planned_checkpoint(base, gains, allow_negative=allow_negative, hub=hub) as planned:
        opened = planned.opened
        open_checkpoint(out)  # a hostile OUT is one line before any shard is fetched
        for shard in opened.checkpoint.shards.values():
            opened.fetch_shard(shard)
        with progress_bar(progress, "verify", opened.checkpoint.total_bytes) as update:
            report = verify_folder(planned.plan, Path(out), chunk_bytes, allow_saturation=allow_saturation,
                                   progress=update)
        opened.confirm()  # a cache snapshot's shards, checked beside the comparison
        return report
