"""The steps every apply shares: plan, judge what was streamed, verify, write the card.

A sink (:mod:`~gainsurgery.applying.pipeline`) strings these together around the
part only it knows (where the bytes go): :func:`planned_checkpoint` opens the base,
loads the gains and plans; :func:`judge` checks what the stream measured (the gains'
base fingerprints, saturation) and makes the provenance record; :func:`verify_folder`
checks every byte written. :func:`~gainsurgery.applying.pipeline.verify_output` (the ``verify``
command) is made of the same steps.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

from gainsurgery.errors import OutputError
from gainsurgery.gainfile import GainFile
from gainsurgery.hub.cards import CARD_NAME, merged_model_card
from gainsurgery.io.checkpoint import open_checkpoint
from gainsurgery.io.inputs import show_path
from gainsurgery.io.write_errors import no_room
from gainsurgery.merge.plan import Plan, make_plan
from gainsurgery.merge.provenance import OUTPUT_FILES, PROVENANCE_NAME, build_provenance
from gainsurgery.merge.stream import Streamed
from gainsurgery.merge.verify import VerifyReport, check_files, verify
from gainsurgery.applying.gains import LoadedGains, check_base_fingerprints, load_gains
from gainsurgery.applying.options import ApplyOptions
from gainsurgery.sources.base import OpenedBase, opened_base
from gainsurgery.sources.spec import BaseSpec

if TYPE_CHECKING:
    from gainsurgery.hub.client import HubClient

class ProgressBar(Protocol):
    """What an apply needs of a progress bar (``tqdm`` fits)."""

    def update(self, n: int) -> Any: ...

    def close(self) -> None: ...


#: Makes a progress bar from a description and a total in bytes.
ProgressFactory = Callable[[str, int], ProgressBar]
#: Receives one-line warnings (a gain without a base fingerprint, an allowed mismatch...).
Warn = Callable[[str], None]


def default_warn(message: str) -> None:
    warnings.warn(message, stacklevel=4)


@dataclass
class Job:
    """One apply, as the sinks see it: what to apply, where, how, and what was said.

    Attributes:
        base: the BASE, classified once (:func:`gainsurgery.sources.spec.classify_base`).
        gains: the gain arguments, in order.
        out: the output folder (or GGUF file); None: straight to the Hub.
        options: the checked options.
        progress: makes progress bars, or None.
        hub: the Hub client for Hub bases and gain files (None: from the environment, when needed).
        publisher: the push target (:class:`~gainsurgery.hub.publish.HubPublisher`), or None.
        said: the one-line warnings, given once the result is published (a failed run prints only its error).
    """

    base: BaseSpec
    gains: Sequence[str | os.PathLike[str] | GainFile]
    out: str | os.PathLike[str] | None
    options: ApplyOptions
    progress: ProgressFactory | None = None
    hub: HubClient | None = None
    publisher: Any = None
    said: list[str] = field(default_factory=list)


@dataclass
class Planned:
    """A checkpoint-folder base opened, its gains loaded and the plan made (steps 1-3)."""

    opened: OpenedBase
    plan: Plan
    loaded: LoadedGains

    @property
    def inputs(self) -> list[Any]:
        """The local files and folders read: an output must keep away from them."""
        return [*self.opened.local_inputs(), *self.loaded.paths]

    @property
    def digest(self) -> set[str]:
        """The target tensors whose base bytes the gains' fingerprints cover (hashed while streaming)."""
        return {k for check in self.loaded.checks for k in check.keys}


@contextlib.contextmanager
def planned_checkpoint(base: BaseSpec | str | os.PathLike[str], gains: Sequence[str | os.PathLike[str] | GainFile],
                       *, allow_negative: bool, hub: HubClient | None) -> Iterator[Planned]:
    """Open the base, load and stack the gains, and plan (steps 1-3), for the length of the block."""
    with opened_base(base, hub, skip_files=OUTPUT_FILES) as opened:
        # Every file that will be copied beside the output is checked now, before any work
        # (a link to /proc/self/environ is one line here, never copied nor uploaded).
        opened.checkpoint.extra_files(skip=OUTPUT_FILES)
        loaded = load_gains(gains, allow_negative=allow_negative, hub=hub)
        yield Planned(opened, make_plan(opened.checkpoint, loaded.gain, loaded.sources,
                                        allow_negative=allow_negative), loaded)


@contextlib.contextmanager
def progress_bar(progress: ProgressFactory | None, desc: str, total: int) -> Iterator[Callable[[int], Any] | None]:
    """A bar's ``update`` for the block (None without a factory); the bar is closed however the block ends."""
    bar = progress(desc, total) if progress is not None else None
    try:
        yield bar.update if bar is not None else None
    finally:
        if bar is not None:
            bar.close()


def judge(job: Job, planned: Planned, streamed: Streamed, *, written: str) -> dict[str, Any]:
    """Check what streaming measured and make the provenance record (before anything is published).

    The cache snapshot's shards are confirmed, each gain's base fingerprint compared
    (a mismatch raises unless allowed; ``written`` says what was left: "nothing was
    written"), allowed saturation warned about; the warnings go to ``job.said``.

    Raises:
        PlanError: a gain's base fingerprint does not match, unless ``allow_base_mismatch``.
        CheckpointError: a cache snapshot's shard is not what its blob's name says.
    """
    opened, plan, loaded = planned.opened, planned.plan, planned.loaded
    opened.confirm()  # a cache snapshot's shards, checked while they streamed
    mismatched = check_base_fingerprints(loaded, streamed, allow_base_mismatch=job.options.allow_base_mismatch,
                                         warn=job.said.append, written=written)
    for tname, (inf, zero) in streamed.saturation.items():
        job.said.append(f"{tname}: {inf} weights became ±inf and {zero} became 0 (--allow-saturation), recorded in "
                        f"{PROVENANCE_NAME}")
    return build_provenance(plan, opened.provenance(), streamed.shard_sha256, saturation=streamed.saturation,
                            base_mismatch=mismatched, unchecked=loaded.unchecked)


def card_text(provenance: dict[str, Any], base_model: str | None) -> str:
    """The model card of a merged checkpoint (``base_model`` only for a Hub base, or as given)."""
    return merged_model_card(provenance, provenance_file=PROVENANCE_NAME, base_model=base_model)


def write_card(folder: Path, provenance: dict[str, Any], base_model: str | None) -> None:
    with open(folder / CARD_NAME, "x", encoding="utf-8") as f:
        f.write(card_text(provenance, base_model))


def verify_folder(plan: Plan, folder: Path, chunk_bytes: int, *, allow_saturation: bool,
                  progress: Callable[[int], None] | None = None) -> VerifyReport:
    """Every byte of ``folder`` against ``plan``, and its file set: exactly what an apply writes."""
    out = open_checkpoint(folder)
    files = check_files(plan, out, OUTPUT_FILES, chunk_bytes=chunk_bytes)
    report = verify(plan, out, chunk_bytes=chunk_bytes, allow_saturation=allow_saturation, progress=progress)
    report.problems[:0] = files
    return report


@contextlib.contextmanager
def writing(out: str | os.PathLike[str]) -> Iterator[None]:
    """Turn a failed write (full disk, file-size limit, permissions) into one line; the claim removes the temp."""
    try:
        with no_room(f"OUT {show_path(out)}", left="nothing was left behind (BASE and any old OUT are untouched)"):
            yield
    except OSError as exc:
        where = f" ({show_path(exc.filename)})" if exc.filename else ""
        raise OutputError(f"could not write {show_path(out)}: {exc.strerror or exc}{where}; "
                          "nothing was left behind") from None
