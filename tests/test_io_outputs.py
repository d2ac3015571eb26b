"""Outputs: where a command may write; single-file atomic writes; folder claims and publishing.

Nothing here writes outside tmp_path: protected folders (cwd, home) are tmp folders
made current / HOME with monkeypatch, and the checks refuse before touching anything.
Concurrency tests run real processes (and, where ``unshare`` works, a second PID
namespace); waits poll status files with a generous safety timeout, and every
assertion is on files, names and messages, never on time.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gainsurgery.errors import GainFileError, OutputError
from gainsurgery.io import atomic, checks, claims, locks
from gainsurgery.io.atomic import atomic_file, rename_exchange, rename_noreplace, write_file
from gainsurgery.io.checks import check_output
from gainsurgery.io.claims import claim_folder, clean_leftovers
from gainsurgery.io.pausepoints import ENV_FILE, ENV_STEP

SAFETY_S = 120  # only so a regression cannot hang the suite


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder`` (names relative) with file bytes or link targets."""
    out: dict[str, bytes | str] = {}
    for here, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(here) / name
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = "-> " + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = p.read_bytes()
    return out


@pytest.fixture
def ws(tmp_path, monkeypatch):
    """A workspace: cwd = tmp/work, HOME = tmp/home, a base folder and a gain file."""
    work = tmp_path / "work"
    home = tmp_path / "home"
    work.mkdir()
    home.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    base = work / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"weights")
    gain = work / "g.safetensors"
    gain.write_bytes(b"gain")
    return work


# -- check_output: never-replaced folders ----------------------------------------------------

@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("kind", ["folder", "file"])
def test_empty_and_dot_refused_even_with_overwrite(ws, kind, overwrite):
    before = snapshot(ws)
    noun = "folder" if kind == "folder" else "file"
    what = "OUT" if kind == "folder" else "output file"
    for empty in ("", None, "  "):
        with pytest.raises(OutputError) as e:
            check_output(empty, inputs=["base"], kind=kind, overwrite=overwrite)
        assert one_line(e) == f"{what} is empty (an unset variable?); name a new {noun}, e.g. ./merged"
    for dot in (".", "..", "./", "../", "./.", "base/..", "base/.", "base/./"):
        with pytest.raises(OutputError) as e:
            check_output(dot, inputs=["base"], kind=kind, overwrite=overwrite)
        assert one_line(e) == (f"{what} {dot} names the current or the parent folder, which is never replaced; "
                               f"name a new {noun}")
    for root in ("/", "//"):
        with pytest.raises(OutputError) as e:
            check_output(root, kind=kind, overwrite=overwrite)
        assert one_line(e) == f"{what} {root} is a filesystem root, which is never written; name a new {noun}"
    assert snapshot(ws) == before


def test_cwd_and_home_refused_even_with_overwrite(ws, tmp_path):
    before = snapshot(tmp_path)
    for spelling in (str(ws), "../work", f"{tmp_path}/home/../work"):
        with pytest.raises(OutputError) as e:
            check_output(spelling, kind="folder", overwrite=True)
        assert one_line(e) == (f"OUT {spelling} is the current folder, which is never replaced, even with "
                               "--overwrite; name a new folder")
    with pytest.raises(OutputError) as e:
        check_output(str(tmp_path / "home"), kind="folder", overwrite=True)
    assert one_line(e) == (f"OUT {tmp_path / 'home'} is your home folder, which is never replaced, even with "
                           "--overwrite; name a new folder")
    # A folder that holds the current folder or home would delete them too.
    with pytest.raises(OutputError) as e:
        check_output(str(tmp_path), kind="folder", overwrite=True)
    assert one_line(e).startswith(f"OUT {tmp_path} holds ")
    assert "which is never replaced, even with --overwrite" in str(e.value)
    # Through a symlinked parent.
    (tmp_path / "alias").symlink_to(tmp_path)
    with pytest.raises(OutputError, match="is the current folder"):
        check_output(str(tmp_path / "alias" / "work"), kind="folder", overwrite=True)
    # claim_folder refuses the same way and touches nothing.
    with pytest.raises(OutputError, match="is the current folder"):
        claim_folder(".." + "/work", overwrite=True)
    (tmp_path / "alias").unlink()
    assert snapshot(tmp_path) == before


def test_mount_point_refused():
    for mp in ("/proc", "/sys", "/dev"):
        if os.path.ismount(mp):
            with pytest.raises(OutputError) as e:
                check_output(mp, kind="folder", overwrite=True)
            assert one_line(e) == (f"OUT {mp} is a mount point (a filesystem root), which is never replaced; "
                                   "name a new folder inside it")
            return
    pytest.skip("no mounted /proc, /sys or /dev here")


# -- check_output: inputs --------------------------------------------------------------------

def test_out_is_input(ws):
    with pytest.raises(OutputError) as e:
        check_output("base", inputs=["base"], kind="folder", overwrite=True)
    assert one_line(e) == "OUT base is the input base; write to a new folder"
    with pytest.raises(OutputError) as e:
        check_output("g.safetensors", inputs=["g.safetensors", "base"], kind="file")
    assert one_line(e) == "output file g.safetensors is the input g.safetensors; write to a new file"
    # Spelled differently, or through a link.
    (ws / "link").symlink_to("base")
    with pytest.raises(OutputError, match=r"^OUT ./base/ is the input link; write to a new folder$"):
        check_output("./base/", inputs=["link"], kind="folder", overwrite=True)
    # A hard link to an input file is the input.
    os.link(ws / "g.safetensors", ws / "hard.safetensors")
    with pytest.raises(OutputError) as e:
        check_output("hard.safetensors", inputs=["g.safetensors"], kind="file")
    assert one_line(e) == ("output file hard.safetensors is the input g.safetensors (a hard link to it); "
                           "write to a new file")


def test_out_inside_input(ws):
    (ws / "base" / "sub").mkdir()
    cases = [("base/merged", "folder", "OUT base/merged lies inside the input base; write to a folder outside it"),
             ("base/sub/merged", "folder", "OUT base/sub/merged lies inside the input base; write to a folder "
                                           "outside it"),
             ("base/model.safetensors", "file", "output file base/model.safetensors lies inside the input base; "
                                               "write to a file outside it"),
             ("base/gains.safetensors", "file", "output file base/gains.safetensors lies inside the input base; "
                                               "write to a file outside it")]
    for out, kind, msg in cases:
        with pytest.raises(OutputError) as e:
            check_output(out, inputs=["g.safetensors", "base"], kind=kind, overwrite=True)
        assert one_line(e) == msg


def test_out_contains_input(ws):
    # export-peft --overwrite with the adapter folder = BASE's parent would delete BASE.
    (ws / "models").mkdir()
    shutil.move(ws / "base", ws / "models" / "base")
    with pytest.raises(OutputError) as e:
        check_output("models", inputs=["models/base"], kind="folder", overwrite=True)
    assert one_line(e) == "OUT models holds the input models/base; write to a folder outside it"
    (ws / "models" / "g.safetensors").write_bytes(b"g")
    with pytest.raises(OutputError) as e:
        check_output("models", inputs=["models/g.safetensors"], kind="folder", overwrite=True)
    assert one_line(e) == "OUT models holds the input models/g.safetensors; write to a folder outside it"


def test_snapshot_blobs_are_part_of_the_input(ws):
    repo = ws / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_text("{}")
    snap = repo / "snapshots" / "rev1"
    snap.mkdir(parents=True)
    (snap / "config.json").symlink_to("../../blobs/abc")
    for out in (repo / "blobs", repo / "blobs" / "x", repo):
        with pytest.raises(OutputError, match="the input"):
            check_output(out, inputs=[snap], kind="folder", overwrite=True)
    # Beside the repo is fine.
    assert check_output(ws / "hub" / "merged", inputs=[snap], kind="folder") == ws.resolve() / "hub" / "merged"


def test_file_folder_mismatch_links_and_parents(ws):
    (ws / "existing").mkdir()
    with pytest.raises(OutputError) as e:
        check_output("existing", kind="file")
    assert one_line(e) == ("output file existing is an existing folder, but a file is written here; "
                           "name a file (or a path inside the folder)")
    with pytest.raises(OutputError) as e:
        check_output("g.safetensors", kind="folder", overwrite=True)
    assert one_line(e) == ("OUT g.safetensors exists and is not a folder, but a folder is written here; "
                           "name a new folder")
    with pytest.raises(OutputError) as e:
        check_output("existing", kind="folder")
    assert one_line(e) == "OUT already exists: existing (pass --overwrite to replace it)"
    assert check_output("existing", kind="folder", overwrite=True) == ws.resolve() / "existing"
    os.mkfifo(ws / "pipe")
    with pytest.raises(OutputError) as e:
        check_output("pipe", kind="file")
    assert one_line(e) == "output file pipe exists and is not a regular file; name another file"
    (ws / "out-link").symlink_to("existing")
    with pytest.raises(OutputError) as e:
        check_output("out-link", kind="folder", overwrite=True)
    assert one_line(e) == "OUT out-link is a symbolic link (to existing); name the real path instead"
    with pytest.raises(OutputError) as e:
        check_output("nowhere/out", kind="folder")
    assert one_line(e) == f"the folder that should hold OUT does not exist: {ws.resolve() / 'nowhere'} (create it first)"
    # Ordinary -o: an existing regular file may be replaced; a new path is fine.
    assert check_output("g.safetensors", kind="file") == ws.resolve() / "g.safetensors"
    assert check_output("new.json", inputs=["base", "g.safetensors"], kind="file", what="--json",
                        error=GainFileError) == ws.resolve() / "new.json"


def test_newline_in_out_stays_one_line(ws):
    with pytest.raises(OutputError) as e:
        check_output("base/x\ny", inputs=["base"], kind="folder")
    assert one_line(e) == "OUT 'base/x\\ny' lies inside the input base; write to a folder outside it"


# -- single files -------------------------------------------------------------------------------

def test_write_file_atomic_permissions_and_replace(ws):
    old = os.umask(0o027)
    try:
        p = write_file("report.json", '{"ok": true}\n', inputs=["base", "g.safetensors"])
        assert p == ws.resolve() / "report.json"
        assert p.read_text() == '{"ok": true}\n'
        assert stat.S_IMODE(p.stat().st_mode) == 0o640
        os.umask(0o002)
        write_file("report.json", b"second")
        assert p.read_bytes() == b"second"
        assert stat.S_IMODE(p.stat().st_mode) == 0o664  # a new inode with today's umask, like open()
    finally:
        os.umask(old)
    assert sorted(os.listdir(ws)) == ["base", "g.safetensors", "report.json"]


def test_atomic_file_failure_leaves_target_untouched(ws):
    (ws / "out.bin").write_bytes(b"original")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_file("out.bin") as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert (ws / "out.bin").read_bytes() == b"original"
    assert sorted(os.listdir(ws)) == ["base", "g.safetensors", "out.bin"]


def test_atomic_file_refuses_inputs_and_folders(ws):
    for out in ("g.safetensors", "base/model.safetensors", "base"):
        with pytest.raises(OutputError):
            write_file(out, b"x", inputs=["base", "g.safetensors"])
    assert (ws / "g.safetensors").read_bytes() == b"gain"
    assert (ws / "base" / "model.safetensors").read_bytes() == b"weights"


def test_atomic_file_target_becomes_folder_meanwhile(ws):
    with pytest.raises(OutputError) as e:
        with atomic_file("x.json") as f:
            f.write(b"{}")
            (ws / "x.json").mkdir()
            (ws / "x.json" / "keep").write_text("theirs")
    assert one_line(e) == "output file x.json became a folder while it was written; it was left untouched"
    assert (ws / "x.json" / "keep").read_text() == "theirs"
    assert sorted(os.listdir(ws)) == ["base", "g.safetensors", "x.json"]


# -- renameat2 ------------------------------------------------------------------------------

def test_rename_noreplace_and_exchange(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "x").write_text("a")
    b.mkdir()
    (b / "y").write_text("b")
    with pytest.raises(FileExistsError):
        rename_noreplace(a, b)
    # Even an EMPTY existing folder is not replaced (plain rename would replace it).
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileExistsError):
        rename_noreplace(a, tmp_path / "empty")
    assert rename_exchange(a, b) is True
    assert (a / "y").read_text() == "b" and (b / "x").read_text() == "a"
    rename_noreplace(a, tmp_path / "c")
    assert (tmp_path / "c" / "y").read_text() == "b"


def test_rename_noreplace_fallback(tmp_path, monkeypatch):
    def refuse(src, dst, flags):
        raise OSError(errno.EINVAL, "not supported by this filesystem")

    monkeypatch.setattr(atomic, "renameat2", refuse)
    a = tmp_path / "a"
    a.mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(FileExistsError):
        rename_noreplace(a, tmp_path / "b")
    assert rename_exchange(a, tmp_path / "b") is False
    rename_noreplace(a, tmp_path / "c")
    assert (tmp_path / "c").is_dir() and not a.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux-only")
def test_renameat2_through_the_raw_syscall(tmp_path, monkeypatch):
    import platform
    if platform.machine().lower() not in atomic._SYS_RENAMEAT2:
        pytest.skip(f"no known renameat2 syscall number for {platform.machine()}")
    real = atomic._libc()

    class NoWrapper:  # a libc without the renameat2 wrapper (glibc < 2.28)
        syscall = real.syscall

    monkeypatch.setattr(atomic, "_libc", lambda: NoWrapper())
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    with pytest.raises(FileExistsError):
        rename_noreplace(a, b)
    assert rename_exchange(a, b) is True
    assert (b / "x").read_text() == "a"
    with pytest.raises(OSError) as e:
        atomic.renameat2(tmp_path / "missing", tmp_path / "c", atomic.RENAME_NOREPLACE)
    assert e.value.errno == errno.ENOENT


def test_no_renameat2_at_all_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_libc", lambda: None)  # not Linux, or no libc to load
    with pytest.raises(OSError) as e:
        atomic.renameat2(tmp_path, tmp_path / "x", atomic.RENAME_NOREPLACE)
    assert e.value.errno == errno.ENOSYS
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert rename_exchange(tmp_path / "a", tmp_path / "b") is False
    with pytest.raises(FileExistsError):
        rename_noreplace(tmp_path / "a", tmp_path / "b")
    rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert names(tmp_path) == ["b", "c"]


# -- folder claims, in one process ------------------------------------------------------------

def names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_claim_publish_and_nothing_left(ws):
    with claim_folder("merged", inputs=["base", "g.safetensors"]) as claim:
        assert claim.tmp.parent == ws.resolve()
        stem = f".merged.gainsurgery-{claim.token}"
        assert names(ws) == sorted(["base", "g.safetensors", stem + ".claim", stem + ".tmp",
                                    ".merged.gainsurgery.lock"])
        marker = json.loads((ws / (stem + ".claim")).read_text())
        assert (marker["format"], marker["out"], marker["token"]) == ("gainsurgery.claim/1", "merged", claim.token)
        assert len(claim.token) == 32
        (claim.tmp / "config.json").write_text("{}")
        assert claim.publish() == ws.resolve() / "merged"
    assert names(ws) == ["base", "g.safetensors", "merged"]
    assert names(ws / "merged") == ["config.json"]
    assert stat.S_IMODE((ws / "merged").stat().st_mode) == 0o777 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_claim_discarded_on_error(ws):
    with pytest.raises(RuntimeError):
        with claim_folder("merged") as claim:
            (claim.tmp / "half").write_text("x")
            raise RuntimeError("disk full")
    assert names(ws) == ["base", "g.safetensors"]


def test_out_created_by_someone_else_meanwhile_is_kept(ws, monkeypatch):
    for fallback in (False, True):
        if fallback:
            monkeypatch.setattr(atomic, "renameat2", _einval)
        with claim_folder("merged") as claim:
            (claim.tmp / "ours").write_text("ours")
            (ws / "merged").mkdir()
            (ws / "merged" / "theirs").write_text("theirs")
            with pytest.raises(OutputError) as e:
                claim.publish()
        assert one_line(e) == ("OUT merged appeared while this run was writing it (made by someone else); it was "
                               "left untouched and this run's result was discarded; choose another OUT or pass "
                               "--overwrite")
        assert snapshot(ws / "merged") == {"theirs": b"theirs"}
        assert names(ws) == ["base", "g.safetensors", "merged"]
        shutil.rmtree(ws / "merged")


def test_empty_folder_created_meanwhile_is_kept(ws):
    # A plain rename() would silently replace an empty folder; RENAME_NOREPLACE does not.
    with claim_folder("merged") as claim:
        (claim.tmp / "ours").write_text("ours")
        (ws / "merged").mkdir()
        with pytest.raises(OutputError, match="appeared while this run was writing it"):
            claim.publish()
    assert names(ws / "merged") == []


def _einval(src, dst, flags):
    raise OSError(errno.EINVAL, "Invalid argument")


@pytest.mark.parametrize("fallback", [False, True])
def test_overwrite_replaces_and_cleans(ws, monkeypatch, fallback):
    calls = []
    real = claims.rename_exchange
    monkeypatch.setattr(claims, "rename_exchange", lambda a, b: calls.append(1) or real(a, b))
    if fallback:
        monkeypatch.setattr(atomic, "renameat2", _einval)
    (ws / "merged").mkdir()
    (ws / "merged" / "old").write_text("old")
    with claim_folder("merged", overwrite=True) as claim:
        (claim.tmp / "new").write_text("new")
        claim.publish()
    assert calls == [1]
    assert snapshot(ws / "merged") == {"new": b"new"}
    assert names(ws) == ["base", "g.safetensors", "merged"]


def test_fallback_overwrite_that_cannot_put_the_old_out_back_says_where_it_is(ws, monkeypatch):
    """Without RENAME_EXCHANGE, OUT is moved aside first; if someone takes OUT before the new folder
    goes in, the old one cannot go back: the error says where it is, and the next run restores it."""
    real_renameat2, real = atomic.renameat2, claims.rename_noreplace
    monkeypatch.setattr(atomic, "renameat2", _einval)
    (ws / "merged").mkdir()
    (ws / "merged" / "id").write_text("old")

    def racing(src, dst):
        if str(src).endswith(".tmp"):  # the new folder going in: someone takes OUT just now
            (ws / "merged").mkdir()
        return real(src, dst)

    monkeypatch.setattr(claims, "rename_noreplace", racing)
    with pytest.raises(OutputError) as e:
        with claim_folder("merged", overwrite=True) as claim:
            (claim.tmp / "id").write_text("new")
            aside = ws.resolve() / (claim.tmp.name[: -len(".tmp")] + ".old")
            claim.publish()
    assert one_line(e) == (
        "OUT merged appeared while this run was writing it (made by someone else); it was left untouched and "
        "this run's result was discarded; choose another OUT or pass --overwrite; and the folder OUT merged held "
        f"was moved aside to {aside} and could not be put back (something else is at OUT now); it was left there "
        "with its claim marker")
    assert snapshot(aside) == {"id": b"old"} and names(ws / "merged") == []
    os.rmdir(ws / "merged")  # theirs goes; the next run puts the old OUT back before anything else
    monkeypatch.setattr(atomic, "renameat2", real_renameat2)
    monkeypatch.setattr(claims, "rename_noreplace", real)
    with pytest.raises(OutputError, match="already exists"):
        claim_folder("merged")
    assert snapshot(ws / "merged") == {"id": b"old"} and names(ws) == ["base", "g.safetensors", "merged"]


def test_overwrite_refuses_out_that_became_a_file(ws):
    (ws / "merged").mkdir()
    with claim_folder("merged", overwrite=True) as claim:
        (claim.tmp / "new").write_text("new")
        os.rmdir(ws / "merged")
        (ws / "merged").write_text("a file someone made")
        with pytest.raises(OutputError, match="became something other than a folder"):
            claim.publish()
    assert (ws / "merged").read_text() == "a file someone made"
    assert names(ws) == ["base", "g.safetensors", "merged"]


def test_lock_file_that_is_a_link_is_refused(ws, tmp_path):
    (ws / ".merged.gainsurgery.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputError, match=r"cannot create the lock file .*\.merged\.gainsurgery\.lock"):
        claim_folder("merged")
    assert not (tmp_path / "elsewhere").exists()


def test_long_out_name_uses_a_hashed_stem(ws):
    name = "m" * 250
    with claim_folder(name) as claim:
        assert len(claim.tmp.name) < 100 and claim.tmp.name.startswith(".h")
        (claim.tmp / "x").write_text("x")
        claim.publish()
    assert names(ws) == ["base", "g.safetensors", name]


def test_second_claim_in_process_sees_the_lock(ws):
    with claim_folder("merged") as first:
        with pytest.raises(OutputError) as e:
            claim_folder("merged")
        assert one_line(e) == ("OUT merged is being written by another gainsurgery run (it holds "
                               ".merged.gainsurgery.lock); wait for it to finish or choose another OUT")
        assert first.tmp.is_dir()
        (first.tmp / "x").write_text("x")
        first.publish()
    with pytest.raises(OutputError, match=r"^OUT already exists: merged \(pass --overwrite to replace it\)$"):
        claim_folder("merged")


def test_lock_output_excludes_a_second_holder_and_a_folder_claim(ws):
    """A file output held for a run (a trained gain file, a log) uses the folder claim's lock."""
    with locks.lock_output("g.safetensors", what="-o") as target:
        assert target == ws / "g.safetensors" and (ws / ".g.safetensors.gainsurgery.lock").is_file()
        with pytest.raises(OutputError) as e:
            with locks.lock_output("g.safetensors", what="-o"):
                pass
        assert one_line(e) == ("-o g.safetensors is being written by another gainsurgery run (it holds "
                               ".g.safetensors.gainsurgery.lock); wait for it to finish or choose another -o")
        assert (ws / "g.safetensors").read_bytes() == b"gain"  # nothing written by holding it
    with locks.lock_output("fresh"):
        with pytest.raises(OutputError, match="being written by another gainsurgery run"):
            claim_folder("fresh")
    assert not (ws / ".g.safetensors.gainsurgery.lock").exists()  # gone with its holder
    with locks.lock_output("g.safetensors"):
        pass


def test_check_apart_refuses_outputs_that_overlap(ws):
    checks.check_apart([("-o", "g.safetensors"), ("the log", "g.train.jsonl"), ("--checkpoint-dir", None)])
    cases = [
        ([("-o", "out"), ("--checkpoint-dir", "./out/")], "--checkpoint-dir ./out/ is also -o"),
        ([("-o", "out/g.safetensors"), ("--checkpoint-dir", "out")],
         "-o out/g.safetensors lies inside --checkpoint-dir out"),
        ([("-o", "a"), ("the log", "x/../a/b/log.jsonl")], "the log x/../a/b/log.jsonl lies inside -o a"),
    ]
    (ws / "x").mkdir()
    for pairs, message in cases:
        with pytest.raises(OutputError) as e:
            checks.check_apart(pairs)
        assert one_line(e) == message + "; give each output its own path"


# -- leftovers ---------------------------------------------------------------------------------

def plant_decoys(ws: Path) -> dict[str, dict]:
    """Hidden folders that look like ours but are not provably ours; return their snapshots."""
    hex_a, hex_b, hex_c = "a" * 32, "b" * 32, "c" * 32
    decoys = {
        f".merged.gainsurgery-{hex_a}.tmp": None,            # no claim file at all
        f".merged.gainsurgery-tmp-{os.getpid()}": None,      # an old PID-named temp
        f".merged.gainsurgery-{hex_b}.tmp": "bad-content",   # claim with the wrong token
        f".merged.gainsurgery-{hex_c}.tmp": "link",          # claim that is a symlink
        f".other.gainsurgery-{hex_a}.tmp": "other-out",      # another OUT's (valid) leftover
    }
    for name, how in decoys.items():
        (ws / name).mkdir()
        (ws / name / "keep.txt").write_text("precious")
        claim = ws / (name[: -len(".tmp")] + ".claim") if name.endswith(".tmp") else None
        if how == "bad-content":
            claim.write_text(json.dumps({"format": "gainsurgery.claim/1", "out": "merged", "token": "f" * 32}))
        elif how == "link":
            (ws / "fake-claim").write_text(json.dumps({"format": "gainsurgery.claim/1", "out": "merged",
                                                       "token": hex_c}))
            claim.symlink_to("fake-claim")
        elif how == "other-out":
            claim.write_text(json.dumps({"format": "gainsurgery.claim/1", "out": "other", "token": hex_a}))
    return {n: snapshot(ws / n) for n in decoys}


def test_clean_leftovers_only_touches_provable_ones(ws):
    decoys = plant_decoys(ws)
    before = set(os.listdir(ws))
    assert clean_leftovers("merged") == []
    assert set(os.listdir(ws)) == before
    for n, snap in decoys.items():
        assert snapshot(ws / n) == snap


# -- helpers for process tests ----------------------------------------------------------------

WORKER = r'''
import json, os, sys, time
from pathlib import Path
from gainsurgery.errors import GainSurgeryError
from gainsurgery.io import atomic, claims

a = json.loads(sys.argv[1])
status = Path(a["status"])

def say(msg):
    # One O_APPEND write per line: a reader sees whole lines, in order.
    fd = os.open(status, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(fd, (msg.replace("\n", " ") + "\n").encode())
    os.close(fd)

def wait_file(p):
    while not os.path.exists(p):
        time.sleep(0.005)

def hang(*_args, **_kw):
    while True:
        time.sleep(1)

mode = a["mode"]
os.chdir(a["cwd"])
if "start" in a:
    wait_file(a["start"])
try:
    if mode == "overwrite-many":
        for k in range(a["n"]):
            with claims.claim_folder(a["out"], overwrite=True) as c:
                (c.tmp / f"id-{k}").write_text(str(k))
                c.publish()
        say("done")
        sys.exit(0)
    claim = claims.claim_folder(a["out"], overwrite=a.get("overwrite", False))
    (claim.tmp / "id").write_text(a["id"])
    if mode == "try":
        say("claimed " + json.dumps(sorted(os.listdir(claim.out.parent))) + f" pid={os.getpid()}")
        claim.discard()
        sys.exit(0)
    if a.get("fallback"):  # a filesystem that refuses renameat2's flags
        atomic.renameat2 = lambda *x: (_ for _ in ()).throw(OSError(22, "Invalid argument"))
    say(f"claimed {claim.tmp.name} pid={os.getpid()}")
    if "go" in a:
        wait_file(a["go"])
    if mode == "hold":
        hang()
    claim.publish()
    say("published")
except GainSurgeryError as e:
    say("error: " + str(e))
    sys.exit(3)
'''


class Worker:
    """A real process running WORKER; it reports one line at a time in a status file.

    ``pause``: a step (gainsurgery.io.pausepoints) where it waits; see :meth:`wait_paused`.
    """

    def __init__(self, tmp: Path, name: str, prefix: list[str] | None = None, pause: str | None = None, **args):
        self.status = tmp / f"status-{name}"
        self.flag = tmp / f"paused-{name}"
        args = {"status": str(self.status), "id": name, **args}
        env = {**os.environ, ENV_STEP: pause, ENV_FILE: str(self.flag)} if pause else None
        self.proc = subprocess.Popen([*(prefix or []), sys.executable, "-c", WORKER, json.dumps(args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)

    def wait_paused(self) -> None:
        deadline = time.monotonic() + SAFETY_S
        while not self.flag.exists():
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}: {self.proc.stderr.read()}")
            assert time.monotonic() < deadline, "the worker never reached its pause step"
            time.sleep(0.005)

    def wait_status(self, prefix: str = "") -> str:
        deadline = time.monotonic() + SAFETY_S
        while time.monotonic() < deadline:
            for line in self.lines():
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None and not self.status.exists():
                raise AssertionError(f"worker exited {self.proc.returncode}: {self.proc.stderr.read()}")
            time.sleep(0.01)
        raise AssertionError(f"worker never reported {prefix!r}; status: {self.lines()}")

    def lines(self) -> list[str]:
        return self.status.read_text().splitlines() if self.status.exists() else []

    def last(self) -> str:
        return self.lines()[-1]

    def finish(self) -> int:
        try:
            return self.proc.wait(SAFETY_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def kill9(self) -> int:
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(SAFETY_S)


def held_msg(ws: Path) -> str:
    return ("error: OUT merged is being written by another gainsurgery run (it holds "
            ".merged.gainsurgery.lock); wait for it to finish or choose another OUT")


# -- two runs, real processes ---------------------------------------------------------------------

def test_parallel_processes_exactly_one_publishes(ws, tmp_path):
    start = tmp_path / "start"
    workers = [Worker(tmp_path, f"w{i}", mode="race", out="merged", cwd=str(ws), start=str(start))
               for i in range(4)]
    start.write_text("go")
    codes = [w.finish() for w in workers]
    statuses = [w.last() for w in workers]
    assert sorted(codes) == [0, 3, 3, 3], (codes, statuses)
    winner = codes.index(0)
    assert statuses[winner] == "published"
    exists = "error: OUT already exists: merged (pass --overwrite to replace it)"
    for i, s in enumerate(statuses):
        if i != winner:
            assert s in (held_msg(ws), exists), s
    assert snapshot(ws / "merged") == {"id": f"w{winner}".encode()}
    assert names(ws) == ["base", "g.safetensors", "merged"]


def test_held_claim_blocks_second_process_then_it_sees_out(ws, tmp_path):
    go = tmp_path / "go"
    a = Worker(tmp_path, "a", mode="race", out="merged", cwd=str(ws), go=str(go))
    claimed = a.wait_status("claimed")
    b = Worker(tmp_path, "b", mode="race", out="merged", cwd=str(ws))
    assert b.finish() == 3
    assert b.last() == held_msg(ws)
    assert (ws / claimed.split()[1]).is_dir()  # b deleted nothing of a's
    go.write_text("go")
    assert a.finish() == 0 and a.last() == "published"
    c = Worker(tmp_path, "c", mode="race", out="merged", cwd=str(ws))
    assert c.finish() == 3
    assert c.last() == "error: OUT already exists: merged (pass --overwrite to replace it)"
    assert snapshot(ws / "merged") == {"id": b"a"}


# -- SIGKILL ----------------------------------------------------------------------------------------

def test_sigkill_mid_run_next_run_cleans_only_marked_temp(ws, tmp_path):
    decoys = plant_decoys(ws)
    before = set(os.listdir(ws))
    w = Worker(tmp_path, "victim", mode="hold", out="merged", cwd=str(ws))
    tmp_name = w.wait_status("claimed").split()[1]
    assert w.kill9() == -signal.SIGKILL
    claim_name = tmp_name[: -len(".tmp")] + ".claim"
    assert {tmp_name, claim_name, ".merged.gainsurgery.lock"} <= set(os.listdir(ws))
    assert (ws / tmp_name / "id").read_text() == "victim"
    with claim_folder("merged") as claim:
        assert not (ws / tmp_name).exists() and not (ws / claim_name).exists()
        (claim.tmp / "id").write_text("next")
        claim.publish()
    assert snapshot(ws / "merged") == {"id": b"next"}
    for n, snap in decoys.items():
        assert snapshot(ws / n) == snap, n
    assert set(os.listdir(ws)) == before | {"merged"}


# -- overwrite: old or new at every instant -------------------------------------------------------

def test_overwrite_observed_old_or_new_at_every_instant(ws, tmp_path):
    (ws / "merged").mkdir()
    (ws / "merged" / "id-old").write_text("old")
    n = 25
    w = Worker(tmp_path, "ow", mode="overwrite-many", out="merged", cwd=str(ws), n=n)
    allowed = {"id-old", *(f"id-{k}" for k in range(n))}
    seen: set[str] = set()
    bad: list[str] = []
    observations = 0
    deadline = time.monotonic() + SAFETY_S
    while (w.proc.poll() is None or observations == 0) and time.monotonic() < deadline and len(bad) < 100:
        try:
            fd = os.open(ws / "merged", os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            bad.append("OUT missing")
            continue
        try:
            listing = os.listdir(fd)
            ino = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        observations += 1
        if len(listing) == 1 and listing[0] in allowed:
            seen.add(listing[0])
        elif os.stat(ws / "merged").st_ino == ino:
            # A partial listing is fine only from an old folder already swapped out (being deleted).
            bad.append(f"partial folder at OUT: {listing}")
    assert w.finish() == 0, w.proc.stderr.read()
    assert bad == []
    assert observations > 0
    assert names(ws / "merged") == [f"id-{n - 1}"]
    assert names(ws) == ["base", "g.safetensors", "merged"]


def test_kill_between_exchange_and_delete_next_run_cleans(ws, tmp_path):
    (ws / "merged").mkdir()
    (ws / "merged" / "id").write_text("old")
    w = Worker(tmp_path, "new", pause="claim.swapped", mode="race", out="merged", cwd=str(ws), overwrite=True)
    tmp_name = w.wait_status("claimed").split()[1]
    w.wait_paused()
    assert (ws / "merged" / "id").read_text() == "new"       # OUT is already the new folder
    assert (ws / tmp_name / "id").read_text() == "old"       # the old one waits at our marked name
    assert w.kill9() == -signal.SIGKILL
    assert (ws / "merged" / "id").read_text() == "new"
    # The next run (even one that then fails: no --overwrite) removes the proven leftover first.
    with pytest.raises(OutputError, match="already exists"):
        claim_folder("merged")
    assert names(ws) == ["base", "g.safetensors", "merged"]
    assert snapshot(ws / "merged") == {"id": b"new"}


def test_kill_inside_fallback_overwrite_next_run_restores_old(ws, tmp_path):
    (ws / "merged").mkdir()
    (ws / "merged" / "id").write_text("old")
    w = Worker(tmp_path, "new", pause="claim.aside", fallback=True, mode="race", out="merged", cwd=str(ws),
               overwrite=True)
    tmp_name = w.wait_status("claimed").split()[1]
    w.wait_paused()
    assert w.kill9() == -signal.SIGKILL
    old_name = tmp_name[: -len(".tmp")] + ".old"
    assert not (ws / "merged").exists()                      # the one window the fallback has...
    assert (ws / old_name / "id").read_text() == "old"
    with pytest.raises(OutputError, match="already exists"):
        claim_folder("merged")                               # ...which the next run repairs first
    assert snapshot(ws / "merged") == {"id": b"old"}
    assert names(ws) == ["base", "g.safetensors", "merged"]


@pytest.mark.parametrize("step", ["claim.publishing", "claim.aside", "claim.swapped", "claim.old-half-deleted",
                                  "claim.published", "claim.unmarked"])
def test_kill_9_at_each_step_of_the_fallback_overwrite(ws, tmp_path, step):
    """Where renameat2's flags are refused: after a kill at any step OUT is old or new, or (only between
    the fallback's two renames) missing until the next run, which puts the old one back; nothing stays."""
    (ws / "merged").mkdir()
    for k in range(3):
        (ws / "merged" / f"old-{k}").write_text("old")
    old = snapshot(ws / "merged")
    w = Worker(tmp_path, "new", pause=step, fallback=True, mode="race", out="merged", cwd=str(ws), overwrite=True)
    w.wait_paused()
    assert w.kill9() == -signal.SIGKILL
    if step == "claim.publishing":
        assert snapshot(ws / "merged") == old
    elif step == "claim.aside":
        assert not (ws / "merged").exists()
    else:
        assert snapshot(ws / "merged") == {"id": b"new"}
    with pytest.raises(OutputError, match="already exists"):
        claim_folder("merged")  # removes the proven leftovers first
    assert snapshot(ws / "merged") == (old if step in ("claim.publishing", "claim.aside") else {"id": b"new"})
    assert names(ws) == ["base", "g.safetensors", "merged"]


# -- a second PID namespace ----------------------------------------------------------------------

UNSHARE = ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child"]


def unshare_or_skip() -> list[str]:
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) is not installed here")
    r = subprocess.run([*UNSHARE, sys.executable, "-c", "import os; print(os.getpid())"],
                       capture_output=True, text=True, timeout=SAFETY_S)
    if r.returncode != 0:
        pytest.skip(f"unshare --user --map-root-user --pid --fork fails here: {r.stderr.strip()}")
    if r.stdout.strip() != "1":
        pytest.skip(f"unshare did not give a new PID namespace (pid {r.stdout.strip()})")
    return UNSHARE


def test_claim_from_another_pid_namespace(ws, tmp_path):
    prefix = unshare_or_skip()
    go = tmp_path / "go"
    a = Worker(tmp_path, "a", prefix=prefix, mode="race", out="merged", cwd=str(ws), go=str(go))
    a_status = a.wait_status("claimed")
    tmp_a = a_status.split()[1]
    assert a_status.endswith("pid=1")  # PID 1 in its namespace: a PID proves nothing
    # A run in a second namespace (also PID 1) sees the lock.
    b = Worker(tmp_path, "b", prefix=prefix, mode="try", out="merged", cwd=str(ws))
    assert b.finish() == 3
    assert b.last() == held_msg(ws)
    assert (ws / tmp_a / "id").read_text() == "a"
    # Even with the lock file removed from under it, the live run's own claim lock
    # protects its temp: the other namespace claims beside it and deletes nothing.
    os.unlink(ws / ".merged.gainsurgery.lock")
    c = Worker(tmp_path, "c", prefix=prefix, mode="try", out="merged", cwd=str(ws))
    assert c.finish() == 0, c.proc.stderr.read()
    c_status = c.last()
    assert c_status.startswith("claimed ") and c_status.endswith("pid=1")
    assert tmp_a in json.loads(c_status[len("claimed "): c_status.rindex(" pid=")])
    assert (ws / tmp_a / "id").read_text() == "a"
    go.write_text("go")
    assert a.finish() == 0 and a.last() == "published"
    assert snapshot(ws / "merged") == {"id": b"a"}
    assert names(ws) == ["base", "g.safetensors", "merged"]


# -- mount points inside an OUT that --overwrite would delete ------------------------------------

MOUNT_SCRIPT = r'''
import os, subprocess, sys, json
from pathlib import Path
from gainsurgery.errors import OutputError
from gainsurgery.io import claims, mounts
ws = Path(sys.argv[1])
os.chdir(ws)
(ws / "merged" / "cache").mkdir(parents=True)
subprocess.run(["mount", "-t", "tmpfs", "none", str(ws / "merged" / "cache")], check=True)
(ws / "merged" / "cache" / "precious").write_text("mounted data")
out = {}
try:
    claims.claim_folder("merged", overwrite=True)
    out["claim"] = "claimed"
except OutputError as e:
    out["claim"] = str(e)
try:
    mounts.remove_tree(ws / "merged")
    out["remove"] = "removed"
except OSError as e:
    out["remove"] = f"{e.strerror}: {e.filename}"
out["after"] = (ws / "merged" / "cache" / "precious").read_text()
out["names"] = sorted(os.listdir(ws))
subprocess.run(["umount", str(ws / "merged" / "cache")], check=True)
print(json.dumps(out))
'''


def test_overwrite_never_deletes_into_a_mount_point(ws):
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        pytest.skip("unshare(1) or mount(8) is not installed here")
    cmd = ["unshare", "--user", "--map-root-user", "--mount", sys.executable, "-c", MOUNT_SCRIPT, str(ws)]
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --user --map-root-user --mount fails here: {probe.stderr.strip()}")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=SAFETY_S)
    if r.returncode != 0 and "mount" in r.stderr and "permission denied" in r.stderr.lower():
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["claim"] == ("OUT merged holds a mount point (" + str(ws.resolve() / "merged" / "cache") + "); "
                            "--overwrite would delete what is mounted there; unmount it or choose another OUT")
    assert got["remove"] == f"holds a mount point; not deleted: {ws.resolve() / 'merged' / 'cache'}"
    assert got["after"] == "mounted data"
    assert got["names"] == ["base", "g.safetensors", "merged"]


def test_parent_that_is_a_file(ws):
    with pytest.raises(OutputError) as e:
        check_output("g.safetensors/out", kind="folder")
    assert one_line(e) == f"the path that should hold OUT is not a folder: {ws.resolve() / 'g.safetensors'}"


# -- remove_tree: the one deletion ---------------------------------------------------------------

def test_remove_tree_never_follows_a_link_and_takes_odd_entries_as_names(tmp_path):
    from gainsurgery.io.mounts import remove_tree

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    doomed = tmp_path / "doomed"
    deep = doomed
    for k in range(300):  # deeper than any recursion would like
        deep = deep / f"d{k}"
    deep.mkdir(parents=True)
    (deep / "leaf").write_text("x")
    (doomed / "link-to-outside").symlink_to(outside)
    (doomed / "d0" / "link-to-file").symlink_to(outside / "keep.txt")
    os.mkfifo(doomed / "fifo")  # never opened: a FIFO would block a reader
    (tmp_path / "link-to-doomed").symlink_to(doomed)
    with pytest.raises(OSError):
        remove_tree(tmp_path / "link-to-doomed")  # a link is not a folder we may delete
    assert doomed.is_dir()
    remove_tree(doomed)
    assert not doomed.exists() and (outside / "keep.txt").read_text() == "precious"
    assert names(tmp_path) == ["link-to-doomed", "outside"]
