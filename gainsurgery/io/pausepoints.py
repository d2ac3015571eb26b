"""Named steps where a run can be told to wait: for tests only, and harmless.

Tests of what survives a kill, a second run or a folder made meanwhile need a run
stopped at a known step, not "somewhere, if it is slow enough". With
``GAINSURGERY_TEST_PAUSE=STEP`` and ``GAINSURGERY_TEST_PAUSE_FILE=PATH`` in its
environment, a run that reaches STEP (the first time, in each process) creates
PATH (holding its process id; never through a link, never replacing a file),
then waits until PATH is removed, and goes on. The test waits for PATH to appear, does what it tests
(kill -9, start a second run...), then removes PATH to let the run finish.

Harmless: the variables only make a run wait at a step it reaches anyway. They
skip no check, change no result and write nothing but PATH, which the caller
named; a run never told to go on is a run that does not finish (Ctrl-C and kill
work as usual, at a step where a kill is survived by design). Without the
variables the only cost is one environment lookup per step.

Every step is named in :data:`STEPS`, in the order a run passes them, so that a
test can sweep them all (tests/test_kill_sweep.py).

Example:
    >>> pause_point("claim.marked")  # does nothing unless GAINSURGERY_TEST_PAUSE=claim.marked
"""

from __future__ import annotations

import os
import time
from typing import Callable

ENV_STEP = "GAINSURGERY_TEST_PAUSE"
ENV_FILE = "GAINSURGERY_TEST_PAUSE_FILE"

#: Every step a run can wait at, in the order a folder claim and ``apply`` pass them.
STEPS = (
    "claim.locked",            # OUT's lock is held; leftovers of dead runs not yet removed
    "claim.marker-created",    # this run's claim marker exists under its temp name, empty
    "claim.marker-written",    # the marker is written, still under its temp name
    "claim.marked",            # the marker is at its own name; no temp folder yet
    "claim.temp-made",         # the empty temp folder exists
    "apply.shard-written",     # the first output shard is whole in the temp folder
    "claim.publishing",        # the temp is complete; nothing renamed yet
    "claim.aside",             # (filesystems without RENAME_EXCHANGE) the old OUT moved aside, the new not in
    "claim.swapped",           # OUT is the new folder; the old one waits at this run's temp name
    "claim.old-half-deleted",  # one file of the old OUT is deleted
    "claim.published",         # the old OUT is gone; the marker not yet removed
    "claim.unmarked",          # the marker is removed; OUT's lock is still held
)

_passed: set[str] = set()


def pause_point(step: str, *, ready: Callable[[], object] | None = None) -> None:
    """Wait at ``step`` if the environment asks for it (see the module docstring); else return at once.

    ``ready``: called before waiting (and only then), to finish what the step names
    (e.g. wait for a shard's last write), so that a test sees the step's state whole.

    Example:
        >>> pause_point("claim.swapped")
    """
    wanted = os.environ.get(ENV_STEP)
    if not wanted:
        return
    if step not in STEPS:
        raise ValueError(f"unknown pause step {step!r}")  # a bug: every step is listed in STEPS
    path = os.environ.get(ENV_FILE)
    if wanted != step or step in _passed or not path:
        return
    _passed.add(step)
    if ready is not None:
        ready()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    except FileExistsError:
        pass  # made already: it still says "reached", and removing it still says "go on"
    except OSError:
        return  # nowhere to say it: do not wait for a signal nobody can see
    else:
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)
    while os.path.lexists(path):
        time.sleep(0.01)
