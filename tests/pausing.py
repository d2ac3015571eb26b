"""Runs of the real CLI stopped at a named step, for tests that kill, race or resume them.

A run started by :class:`PausedRun` waits at its step (``GAINSURGERY_TEST_PAUSE``,
:mod:`gainsurgery.io.pausepoints`) and says so by creating a flag file; the test
then does what it tests and kills the run or lets it go on. No test depends on a
run being slow enough to be caught mid-way.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gainsurgery.io.pausepoints import ENV_FILE, ENV_STEP, STEPS

CLI = [sys.executable, "-m", "gainsurgery.cli"]
SAFETY_S = 120  # only so a regression cannot hang the suite
_ids = itertools.count()


class PausedRun:
    """``gainsurgery ARGS`` in its own process, told to wait at ``step``; flags go in ``flags`` (a folder).

    ``prefix``: a command the CLI runs under (``unshare ...``); ``env``: more variables.
    """

    def __init__(self, args: list, step: str, flags: Path, *, prefix: list[str] = (), env: dict | None = None,
                 cwd: Path | None = None) -> None:
        assert step in STEPS, step
        flags.mkdir(exist_ok=True)
        self.step = step
        self.flag = flags / f"paused-{os.getpid()}-{next(_ids)}"
        env = {**os.environ, **(env or {}), ENV_STEP: step, ENV_FILE: str(self.flag)}
        self.proc = subprocess.Popen([*prefix, *CLI, *map(str, args)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)

    def wait_paused(self) -> PausedRun:
        """Return once the run waits at its step; fail if it ends first."""
        deadline = time.monotonic() + SAFETY_S
        while not self.flag.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"the run ended (exit {self.proc.returncode}) before {self.step}: "
                                     f"{self.proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"the run never reached {self.step}")
            time.sleep(0.005)
        return self

    def resume(self) -> tuple[int, str]:
        """Let the run go on; return its exit status and stderr once it ends."""
        self.flag.unlink()
        return self.finish()

    def finish(self) -> tuple[int, str]:
        try:
            _, err = self.proc.communicate(timeout=SAFETY_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        return self.proc.returncode, err

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` (kill -9 by default) while it waits; return its exit status."""
        self.proc.send_signal(sig)
        code, _ = self.finish()
        self.flag.unlink(missing_ok=True)
        return code
