"""kill -9 at every step of ``apply --overwrite``: a sweep over the protocol's points, not chance.

Each run is stopped at one named step (:mod:`gainsurgery.io.pausepoints`, through
the real CLI) and killed there. Then OUT is the old folder or the new one, whole
(never a mix, never missing), what the dead run left is exactly what the claim
protocol says it leaves at that step, and the next run removes all of it and
publishes. The one step not on this path, ``claim.aside`` (filesystems without
``RENAME_EXCHANGE``), is swept in tests/test_io_outputs.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from conftest import random_gain
from gainsurgery.io.pausepoints import STEPS
from pausing import PausedRun
from fsfault import tree
from test_hostile import run

#: The steps of ``apply --overwrite`` on a filesystem with renameat2's flags (every step but the fallback's).
OVERWRITE_STEPS = [s for s in STEPS if s != "claim.aside"]
#: From this step on OUT is the new folder.
SWAPPED = STEPS.index("claim.swapped")

#: What a run killed at each step leaves beside OUT (besides OUT): our names' suffixes.
LEFT = {
    "claim.locked": {"lock"},
    "claim.marker-created": {"lock", "claim.part"},
    "claim.marker-written": {"lock", "claim.part"},
    "claim.marked": {"lock", "claim"},
    "claim.temp-made": {"lock", "claim", "tmp"},
    "apply.shard-written": {"lock", "claim", "tmp"},
    "claim.publishing": {"lock", "claim", "tmp"},
    "claim.swapped": {"lock", "claim", "tmp"},
    "claim.old-half-deleted": {"lock", "claim", "tmp"},
    "claim.published": {"lock", "claim"},
    "claim.unmarked": {"lock"},
}


def test_the_sweep_covers_every_step():
    assert set(LEFT) == set(OVERWRITE_STEPS)


def leftovers(parent: Path, out: str) -> dict[str, Path]:
    """Our siblings of ``parent/out`` by kind: lock, claim.part, claim, tmp, old."""
    found = {}
    for p in parent.iterdir():
        if p.name == f".{out}.gainsurgery.lock":
            found["lock"] = p
        elif m := re.fullmatch(rf"\.{out}\.gainsurgery-[0-9a-f]{{32}}\.(claim\.part|claim|tmp|old)", p.name):
            assert m.group(1) not in found, sorted(os.listdir(parent))
            found[m.group(1)] = p
    return found


@pytest.fixture(scope="module")
def world(tiny_ckpt, tmp_path_factory):
    base = tiny_ckpt("llama")
    assert len(list(base.glob("*.safetensors"))) > 1  # the shard step comes before the last shard
    gains = tmp_path_factory.mktemp("gains")
    return base, random_gain(base, seed=1).save(gains / "old.safetensors"), \
        random_gain(base, seed=2).save(gains / "new.safetensors")


def made_by(out: Path) -> str:
    """The name of the gain file OUT was made with, from its provenance."""
    return json.loads((out / "gainsurgery.json").read_text())["gains"][0]["name"]


@pytest.mark.parametrize("step", OVERWRITE_STEPS)
def test_kill_9_at_each_step_of_overwrite(world, tmp_path, step):
    base, g_old, g_new = world
    work = tmp_path / "work"
    work.mkdir()
    out = work / "merged"
    assert run("apply", base, g_old, out).returncode == 0
    old = tree(out)

    paused = PausedRun(["apply", base, g_new, out, "--overwrite"], step, tmp_path / "flags").wait_paused()
    left = leftovers(work, "merged")
    if "claim.part" in left:  # a marker is never empty at its own name, and empty only before it is written
        assert (left["claim.part"].stat().st_size == 0) == (step == "claim.marker-created")
    assert paused.kill() == -signal.SIGKILL

    if STEPS.index(step) < SWAPPED:
        assert tree(out) == old  # untouched, byte for byte
    else:
        assert made_by(out) == "new.safetensors" and run("verify", base, g_new, out).returncode == 0
        assert sorted(os.listdir(out)) == sorted(p for p in old if "/" not in p)
    assert set(leftovers(work, "merged")) == LEFT[step]

    res = run("apply", base, g_new, out, "--overwrite")
    assert res.returncode == 0, res.stderr
    assert os.listdir(work) == ["merged"]  # every leftover of the killed run is gone
    assert made_by(out) == "new.safetensors" and run("verify", base, g_new, out).returncode == 0


@pytest.mark.parametrize("step", ["claim.marker-created", "claim.marked", "apply.shard-written"])
def test_a_run_killed_before_out_exists_leaves_nothing_the_next_run_keeps(world, tmp_path, step):
    """Without --overwrite and without OUT: a kill leaves no OUT, and the next run still makes it."""
    base, _, g_new = world
    out = tmp_path / "merged"
    paused = PausedRun(["apply", base, g_new, out], step, tmp_path / "flags").wait_paused()
    assert paused.kill() == -signal.SIGKILL
    assert not out.exists()
    res = run("apply", base, g_new, out)
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(tmp_path)) == ["flags", "merged"]
