"""Run the real CLI against a full disk or a file-size limit, and see what it leaves.

- :func:`run_limited`: the CLI in its own process under ``RLIMIT_FSIZE`` (``SIGXFSZ``
  ignored, so a write past the limit fails with ``EFBIG`` instead of killing it).
- :func:`run_on_small_fs`: the CLI in a private mount namespace (``unshare -m``) where a
  tmpfs of a given size is mounted; folders can be copied onto it first (an old OUT),
  and everything on it is listed (type, size, sha256) before and after the run, inside
  the namespace, before the tmpfs goes away with it. Needs root (or a user namespace
  that may mount); :func:`small_fs_or_skip` says why not where it is refused.

Both return a :class:`Outcome`. :func:`tree` lists a folder the same way on this side.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLI_CODE = "import sys; from gainsurgery.cli import main; sys.argv[0] = 'gainsurgery'; main()"

# Runs inside the mount namespace: mount, seed, list, run the CLI, list again; JSON on stdout.
_NAMESPACE_SCRIPT = r"""
import hashlib, json, os, shutil, stat, subprocess, sys
spec = json.loads(sys.argv[1])
mnt = spec["mnt"]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%d" % spec["size"], "tmpfs", mnt], check=True)
sys.path.insert(0, spec["tests"])
from fsfault import tree
for src, rel in spec["seed"]:
    shutil.copytree(src, os.path.join(mnt, rel), symlinks=True)
for rel in spec["mkdir"]:
    os.makedirs(os.path.join(mnt, rel), exist_ok=True)
before = tree(mnt)
p = subprocess.run(spec["cmd"], capture_output=True, text=True, env=spec["env"], cwd=spec["cwd"], timeout=600)
print(json.dumps({"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr, "before": before, "after": tree(mnt)}))
"""


@dataclass
class Outcome:
    """What a faulted run did: exit status, output, and (small fs) the tmpfs before and after."""

    rc: int
    stdout: str
    stderr: str
    before: dict[str, Any] = field(default_factory=dict)
    after: dict[str, Any] = field(default_factory=dict)

    @property
    def lines(self) -> list[str]:
        return self.stderr.strip().splitlines()


def tree(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything under ``root`` (links not followed, special files never opened): rel path -> description
    (a file: size, sha256 and permission bits). Lists, so that it survives a JSON round trip."""
    out: dict[str, Any] = {}
    root = os.fspath(root)
    if not os.path.lexists(root):
        return out
    for here, dirs, files in os.walk(root, followlinks=False):
        for name in sorted(dirs + files):
            p = os.path.join(here, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ["link", os.readlink(p)]
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    out[rel] = ["file", st.st_size, hashlib.sha256(f.read()).hexdigest(), stat.S_IMODE(st.st_mode)]
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ["dir"]
            else:
                out[rel] = ["special", stat.S_IFMT(st.st_mode)]
    return out


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI run: ours (the worktree's code, the test Hub), quiet libraries."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TRANSFORMERS_VERBOSITY": "error",
           "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.update(extra)
    return env


def run_limited(args: list[Any], limit: int, *, env: dict[str, str] | None = None,
                cwd: str | os.PathLike[str] | None = None, timeout: float = 600) -> Outcome:
    """The CLI with every file it writes limited to ``limit`` bytes (``RLIMIT_FSIZE``)."""

    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    p = subprocess.run([sys.executable, "-c", CLI_CODE, *map(str, args)], capture_output=True, text=True,
                       preexec_fn=limited, env=env or cli_env(), cwd=cwd, timeout=timeout)
    return Outcome(p.returncode, p.stdout, p.stderr)


def small_fs_or_skip() -> None:
    """Skip the calling test, with the reason, where a tmpfs cannot be mounted in a private namespace."""
    import pytest

    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("unshare(1) or mount(8) is not installed here")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"cannot mount a small tmpfs in a private mount namespace here: {probe.stderr.strip()[:160]}")


def run_on_small_fs(args: list[Any], size: int, mnt: str | os.PathLike[str], *,
                    seed: list[tuple[str | os.PathLike[str], str]] = (), mkdir: list[str] = (),
                    env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None) -> Outcome:
    """The CLI with a tmpfs of ``size`` bytes at ``mnt`` (an empty folder), in a private mount namespace.

    ``seed``: (folder, relative path) pairs copied onto the tmpfs first; ``mkdir``: folders made on it.
    """
    spec = {"mnt": os.fspath(mnt), "size": size, "tests": str(Path(__file__).parent),
            "seed": [[os.fspath(s), r] for s, r in seed], "mkdir": list(mkdir),
            "cmd": [sys.executable, "-c", CLI_CODE, *map(str, args)], "env": env or cli_env(),
            "cwd": os.fspath(cwd) if cwd is not None else None}
    p = subprocess.run(["unshare", "-m", "--propagation", "private", sys.executable, "-c", _NAMESPACE_SCRIPT,
                        json.dumps(spec)], capture_output=True, text=True, timeout=900)
    if p.returncode:
        raise RuntimeError(f"the namespace run failed: {p.stderr[-2000:]}")
    got = json.loads(p.stdout.strip().splitlines()[-1])
    return Outcome(got["rc"], got["stdout"], got["stderr"], got["before"], got["after"])
