"""What a training run writes, held from its start to its end: ``-o``, the log, the checkpoints.

:class:`RunOutputs` is the one place a run negotiates its outputs; the loop only says
what to write. Every output is held for the whole run, so a second run into the same
``-o``, log or checkpoint folder fails at once instead of interleaving with this one:

- a folder ``-o`` (a PEFT adapter, a fully fine-tuned checkpoint) is claimed
  (:func:`gainsurgery.io.claims.claim_folder`: lock, marker, temp folder) and
  published whole at the end; a gain file ``-o`` is locked
  (:func:`gainsurgery.io.locks.lock_output`) and written atomically at the end. A
  failed run leaves no ``-o``;
- the log is locked and written as training goes (a killed run's log ends at its last
  step); a resumed run's log first loses the steps it will write again;
- the checkpoint folder is locked (:class:`~gainsurgery.training.state.CheckpointLock`)
  and each checkpoint published whole (:func:`gainsurgery.training.state.save`).

Outputs are the main process's job. :meth:`RunOutputs.open`, :meth:`RunOutputs.save_checkpoint`
and :meth:`RunOutputs.save` are called on every process: the main process writes, and if
that fails every process stops with its one line
(:func:`gainsurgery.training.distributed.on_main_process`).

A full disk or a file-size limit is one line that names what was being written
(:func:`gainsurgery.io.write_errors.no_room`).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from gainsurgery.errors import TrainingError
from gainsurgery.gainfile import GainFile
from gainsurgery.io import jsonsafe
from gainsurgery.io.atomic import open_log_file, write_file, write_json
from gainsurgery.io.claims import FolderClaim, claim_folder
from gainsurgery.io.inputs import open_regular, show_path
from gainsurgery.io.locks import lock_output
from gainsurgery.io.write_errors import no_room
from gainsurgery.training import state
from gainsurgery.training.config import OutputPlan, check_checkpoint_folder
from gainsurgery.training.distributed import on_main_process

#: The file beside a folder output's model files that records how it was trained.
TRAINING_RECORD = "gainsurgery_training.json"


class RunOutputs:
    """A run's outputs (``-o``, the log, the checkpoint folder), from the checks of its plan to the saved result.

    Use as a context manager around the whole run: on the way out every lock is
    released and a claimed folder that was not published is removed; a write that
    fails for want of room is one :class:`~gainsurgery.errors.TrainingError`.

    Example:
        >>> with RunOutputs(plan.outputs) as outputs:  # doctest: +SKIP
        ...     outputs.open(resumed_at=0, is_main=True, device=device)
        ...     outputs.log({"step": 1, "loss": 3.2})
        ...     outputs.save(lambda: outputs.write_gain(gain))
    """

    def __init__(self, plan: OutputPlan) -> None:
        self.plan = plan
        self._guard = contextlib.ExitStack()
        self._held = contextlib.ExitStack()
        self._claim: FolderClaim | None = None
        self._log: Any = None
        self._is_main, self._device = True, None

    def __enter__(self) -> RunOutputs:
        # The log, written as training goes, is where a full disk strikes first; the sites that write
        # checkpoints and -o say more precisely what they were writing.
        self._guard.enter_context(no_room(
            f"the outputs of the run (-o {show_path(self.plan.output)}, the log {show_path(self.plan.log)})",
            None, error=TrainingError, left="no -o was written; a checkpoint folder keeps only complete checkpoints"))
        self._guard.enter_context(self._held)  # a claimed folder is released (or removed) inside the guard
        return self

    def __exit__(self, *exc: Any) -> bool:
        return self._guard.__exit__(*exc)

    def keep_apart_from(self, folder: Path) -> None:
        """Check the checkpoint folder again, now that the base's own folder is known (every process).

        Raises:
            TrainingError: the checkpoint folder is, holds or lies inside ``folder``.
        """
        if self.plan.checkpoints is not None:
            check_checkpoint_folder(self.plan.checkpoints, [*self.plan.checkpoint_inputs, folder])

    def open(self, *, resumed_at: int, is_main: bool, device: Any) -> None:
        """Take every output for the run (call on every process; the main process takes them).

        ``resumed_at``: the step a checkpoint resumed at (0: a fresh run), whose log is
        appended to after the steps past it are dropped.
        """
        self._is_main, self._device = is_main, device
        on_main_process(is_main, device, lambda: self._take(resumed_at))

    def _take(self, resumed_at: int) -> None:
        plan = self.plan
        if plan.folder:
            self._claim = self._held.enter_context(claim_folder(plan.output, inputs=plan.inputs,
                                                                overwrite=plan.overwrite, what="-o"))
        else:
            self._held.enter_context(lock_output(plan.output, what="-o"))
        self._held.enter_context(lock_output(plan.log, what="the training log"))
        if plan.checkpoints is not None:
            self._held.callback(state.CheckpointLock(plan.checkpoints).release)
        log_inputs = [*plan.inputs, plan.output]
        if resumed_at:
            trim_log(plan.log, resumed_at, log_inputs)
        self._log = self._held.enter_context(open_log_file(plan.log, inputs=log_inputs, what="the training log",
                                                           append=bool(resumed_at)))

    def log(self, row: Mapping[str, Any]) -> None:
        """Append one JSON line to the log, flushed: a killed run's log ends at its last row (main process)."""
        if self._log is not None:
            self._log.write(json.dumps(row) + "\n")
            self._log.flush()

    def close_log(self) -> None:
        """The log is complete (before the result is saved)."""
        if self._log is not None:
            self._log.close()

    def save_checkpoint(self, step: int, named_params: Sequence[tuple[str, Any]], optimizer: Any,
                        record: Mapping[str, Any]) -> None:
        """Write the checkpoint of ``step`` (:func:`gainsurgery.training.state.save`; call on every process)."""
        folder = self.plan.checkpoints
        assert folder is not None, "a checkpoint without --save-every"

        def write() -> None:
            # state.save removes its half-written temp folder; the checkpoints before it stay.
            with no_room(f"the training checkpoint of step {step}", folder, error=TrainingError,
                         left="the checkpoints written before it are kept; --resume continues from the last one"):
                state.save(folder, step, named_params, optimizer, record)

        on_main_process(self._is_main, self._device, write)

    def save(self, write: Callable[[], None]) -> None:
        """Run ``write`` on the main process (call on every process), a full disk told as ``-o``'s.

        ``write`` makes the result and writes it with :meth:`write_gain` or
        :meth:`write_folder`. A gain file is written atomically, a folder in its claimed
        temp folder: either way a failure leaves no ``-o`` behind.
        """
        def guarded() -> None:
            with no_room(f"-o {show_path(self.plan.output)}", error=TrainingError,
                         left=f"no -o was written; the log {show_path(self.plan.log)} says how far training went"):
                write()

        on_main_process(self._is_main, self._device, guarded)

    def write_gain(self, gain: GainFile) -> None:
        """Write the trained gain file to ``-o`` (atomically; checked against every input)."""
        gain.save(self.plan.output, inputs=self.plan.inputs)

    def write_folder(self, fill: Callable[[Path], None], training: Mapping[str, Any]) -> None:
        """Fill the claimed ``-o`` folder (``fill(folder)``), record ``training`` beside it, publish it whole."""
        assert self._claim is not None, "a folder output that was not claimed"
        fill(self._claim.tmp)
        write_json(self._claim.tmp / TRAINING_RECORD, training)
        self._claim.publish()


def trim_log(path: Path, step: int, inputs: Sequence[str | os.PathLike[str]]) -> None:
    """Drop the log lines of steps after ``step`` (a killed run went past its last checkpoint).

    The resumed run writes those steps again; without this they would appear twice. The
    old log is read like any file someone else may have swapped (no FIFO, nothing under
    ``/proc``) and rewritten through the output helper (checked against ``inputs``,
    atomic, never through a link). A link at the log's name is left for
    :func:`~gainsurgery.io.atomic.open_log_file` to refuse.
    """
    if not os.path.lexists(path) or os.path.islink(path):
        return
    with open_regular(path, error=TrainingError) as f:
        text = f.read().decode("utf-8", errors="replace")
    kept = []
    for line in text.splitlines():
        try:
            row = jsonsafe.loads(line, where="the training log", error=TrainingError)
        except TrainingError:  # a line cut by the kill
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or row["step"] <= step:
            kept.append(line)
    write_file(path, "".join(line + "\n" for line in kept), inputs=inputs, what="the training log",
               error=TrainingError)
