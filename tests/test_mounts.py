"""Mount points are never deleted through, bind mounts from the same filesystem included (issue 18, 3a).

A bind mount of a folder from the same filesystem has the parent's ``st_dev``, and
``os.path.ismount`` does not see it. Each scenario runs in a private mount
namespace (``unshare --mount``, as root, or in a user namespace otherwise), binds a
folder ``shared/`` holding someone's data somewhere gainsurgery may delete, and
runs the real CLI there (stopped at named steps where a mount must appear
mid-run). Back outside, the mount is gone: ``shared/`` must still hold its data,
every refusal must be one line that says truthfully what was left, and the next run
must clean up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import random_gain
from fsfault import tree
from test_hostile import refused, run

TESTS = Path(__file__).resolve().parent

INSIDE = r'''
import json, os, subprocess, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from pausing import PausedRun
from test_hostile import run

scenario, base, gain, work = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5])
shared = work / "shared"
flags = work.parent / "flags"
said = {}

def bind(where):
    where.mkdir(exist_ok=True)
    subprocess.run(["mount", "--bind", str(shared), str(where)], check=True)

def ours(kind):
    return [p for p in work.iterdir() if p.name.startswith(".merged.gainsurgery-") and p.name.endswith(kind)]

if scenario == "overwrite-refused":
    bind(work / "merged" / "mnt")
    res = run("apply", base, gain, work / "merged", "--overwrite")
    said = {"code": res.returncode, "stderr": res.stderr}
elif scenario == "out-is-a-mount":
    bind(work / "merged")
    res = run("apply", base, gain, work / "merged", "--overwrite")
    said = {"code": res.returncode, "stderr": res.stderr}
elif scenario == "appears-in-old-out":
    paused = PausedRun(["apply", base, gain, work / "merged", "--overwrite"], "claim.publishing", flags).wait_paused()
    bind(work / "merged" / "mnt")
    code, err = paused.resume()
    said = {"code": code, "stderr": err, "tmp": [p.name for p in ours(".tmp")]}
elif scenario == "appears-in-temp":
    paused = PausedRun(["apply", base, gain, work / "merged"], "apply.shard-written", flags).wait_paused()
    tmp = ours(".tmp")[0]
    bind(tmp / "mnt")
    (work / "merged").mkdir()  # and someone makes OUT meanwhile: the run fails, its temp must go
    code, err = paused.resume()
    said = {"code": code, "stderr": err, "tmp": tmp.name}
elif scenario == "in-a-dead-runs-temp":
    paused = PausedRun(["apply", base, gain, work / "merged"], "apply.shard-written", flags).wait_paused()
    paused.kill()
    tmp = ours(".tmp")[0]
    bind(tmp / "mnt")
    res = run("apply", base, gain, work / "merged")
    said = {"code": res.returncode, "stderr": res.stderr, "tmp": tmp.name,
            "names": sorted(os.listdir(work))}
elif scenario == "identity":
    from gainsurgery.io import mounts
    target = work / "merged" / "mnt"
    bind(target)
    fd = os.open(target, os.O_RDONLY)
    said["mnt_id"] = mounts._identity(fd).mnt_id is not None  # this kernel gives mount ids (Linux 5.8+)
    os.close(fd)
    said["ismount"] = os.path.ismount(target)
    said["same_dev"] = os.stat(target).st_dev == os.stat(target.parent).st_dev
    said["statx"] = mounts.is_mount_point(target)
    said["inside"] = str(mounts.mount_inside(work / "merged"))
    import ctypes, platform
    machine = platform.machine().lower()
    if machine in mounts._SYS_STATX:  # a libc without the statx wrapper: the raw syscall
        mounts._statx_fn[:] = [mounts._raw_statx(ctypes.CDLL(None, use_errno=True), mounts._SYS_STATX[machine])]
        fd = os.open(target, os.O_RDONLY)
        said["syscall"] = (mounts._identity(fd).mnt_id is not None and mounts.is_mount_point(target)
                           and not mounts.is_mount_point(work / "merged"))
        os.close(fd)
    mounts._statx_fn[:] = [None]  # a kernel without statx: /proc/self/mountinfo
    said["mountinfo"] = mounts.is_mount_point(target)
    said["mountinfo_inside"] = str(mounts.mount_inside(work / "merged"))
    said["plain_folder"] = mounts.is_mount_point(work / "merged")
    try:
        mounts.remove_tree(work / "merged")
        said["remove"] = "removed"
    except OSError as e:
        said["remove"] = f"{e.strerror}: {e.filename}"
print(json.dumps(said))
'''


def namespace() -> list[str]:
    """A command prefix that runs in a private mount namespace where ``mount --bind`` works; else skip."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("unshare(1) or mount(8) is not installed here")
    prefix = ["unshare", "--mount", "--propagation", "private"] if os.geteuid() == 0 else \
        ["unshare", "--user", "--map-root-user", "--mount"]
    probe = subprocess.run([*prefix, "sh", "-c", "d=$(mktemp -d) && mkdir $d/a $d/b && mount --bind $d/a $d/b "
                            "&& umount $d/b; rc=$?; rm -rf $d; exit $rc"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace with bind mounts here: {probe.stderr.strip()[:200]}")
    return prefix


def inside(scenario: str, base: Path, gain: Path, work: Path) -> dict:
    res = subprocess.run([*namespace(), sys.executable, "-c", INSIDE, str(TESTS), scenario, str(base), str(gain),
                          str(work)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


@pytest.fixture
def world(tiny_ckpt, tmp_path):
    """base, gain, and work/ holding merged/ (an earlier apply) and shared/ (someone's data)."""
    base = tiny_ckpt("llama")
    gain = random_gain(base, seed=3).save(tmp_path / "g.safetensors")
    work = tmp_path / "work"
    work.mkdir()
    assert run("apply", base, gain, work / "merged").returncode == 0
    (work / "merged" / "mnt").mkdir()
    (work / "shared").mkdir()
    (work / "shared" / "precious.txt").write_text("someone's data")
    return base, gain, work


def shared_intact(work: Path) -> None:
    assert (work / "shared" / "precious.txt").read_text() == "someone's data"


def test_mount_identity_sees_a_bind_mount_that_st_dev_and_ismount_miss(world):
    got = inside("identity", *world)
    work = world[2].resolve()
    assert got["same_dev"] is True and got["ismount"] is False  # why mount identity is needed
    assert got["statx"] is True and got["mountinfo"] is True and got["plain_folder"] is False
    if got["mnt_id"] and "syscall" in got:  # Linux 5.8+: the raw syscall gives mount ids as libc's wrapper does
        assert got["syscall"] is True
    assert got["inside"] == got["mountinfo_inside"] == str(work / "merged" / "mnt")
    assert got["remove"] == f"holds a mount point; not deleted: {work / 'merged' / 'mnt'}"
    shared_intact(world[2])
    assert (world[2] / "merged" / "config.json").is_file()  # nothing deleted at all


def test_overwrite_of_an_out_holding_a_bind_mount_is_refused_and_deletes_nothing(world):
    base, gain, work = world
    before = tree(work)
    got = inside("overwrite-refused", base, gain, work)
    assert got["code"] == 1
    refused(subprocess.CompletedProcess([], 1, "", got["stderr"]),
            f"OUT {work / 'merged'} holds a mount point ({work.resolve() / 'merged' / 'mnt'}); --overwrite would "
            "delete what is mounted there; unmount it or choose another OUT")
    shared_intact(work)
    assert tree(work) == before  # OUT, shared/ and no leftovers


def test_an_out_that_is_itself_a_bind_mount_is_never_replaced(world):
    base, gain, work = world
    before = tree(work)
    got = inside("out-is-a-mount", base, gain, work)
    refused(subprocess.CompletedProcess([], got["code"], "", got["stderr"]),
            f"OUT {work / 'merged'} is a mount point (a filesystem root), which is never replaced; name a new "
            "folder inside it")
    shared_intact(work)
    assert tree(work) == before


def test_a_mount_that_appears_in_the_old_out_mid_run_is_left_and_said(world):
    base, gain, work = world
    old = tree(work / "merged")
    got = inside("appears-in-old-out", base, gain, work)
    [tmp] = got["tmp"]
    kept = work.resolve() / tmp
    refused(subprocess.CompletedProcess([], got["code"], "", got["stderr"]),
            f"OUT {work / 'merged'} now holds this run's result, but the folder it replaced could not be deleted "
            f"(it holds a mount point, {kept / 'mnt'}, which is never deleted through); it was left at {kept} "
            "with its claim marker; fix that and the next run on OUT removes it")
    shared_intact(work)
    assert run("verify", base, gain, work / "merged").returncode == 0  # OUT is the new folder, whole
    assert tree(kept) == old  # the old one, whole, where the message says
    # Unmounted (the namespace is gone), the next run removes it with its marker.
    res = run("apply", base, gain, work / "merged", "--overwrite")
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(work)) == ["merged", "shared"]
    shared_intact(work)


def test_a_mount_that_appears_in_the_temp_is_left_and_said_when_the_run_fails(world):
    base, gain, work = world
    shutil.rmtree(work / "merged")
    got = inside("appears-in-temp", base, gain, work)
    kept = work.resolve() / got["tmp"]
    refused(subprocess.CompletedProcess([], got["code"], "", got["stderr"]),
            f"OUT {work / 'merged'} appeared while this run was writing it (made by someone else); it was left "
            "untouched and this run's result was discarded; choose another OUT or pass --overwrite; and this "
            f"run's temp folder {kept} could not be deleted (it holds a mount point, {kept / 'mnt'}, which is never "
            f"deleted through); it was left there with its claim marker; fix that and the next run on OUT "
            f"{work / 'merged'} removes it")
    shared_intact(work)
    assert os.listdir(work / "merged") == []  # theirs, untouched
    os.rmdir(work / "merged")
    res = run("apply", base, gain, work / "merged")
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(work)) == ["merged", "shared"]


def test_a_dead_runs_temp_holding_a_mount_is_left_alone_until_unmounted(world):
    base, gain, work = world
    shutil.rmtree(work / "merged")
    got = inside("in-a-dead-runs-temp", base, gain, work)
    assert got["code"] == 0, got["stderr"]
    # The leftover holding the mount stayed, with its marker; the run published beside it.
    claim = got["tmp"][: -len(".tmp")] + ".claim"
    assert got["names"] == sorted(["merged", "shared", got["tmp"], claim])
    shared_intact(work)
    res = run("apply", base, gain, work / "merged", "--overwrite")
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(work)) == ["merged", "shared"]
