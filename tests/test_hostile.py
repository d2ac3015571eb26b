"""Hostile and careless input against every trust boundary, through the real CLI (issue 8).

Each test hashes BASE and every input folder before and after the attack: nothing
outside the command's output may change, and a refused command leaves no output
and no leftovers. Every refusal is one ``error:`` line on stderr, exit status 1,
no traceback. Concurrency runs real processes (``python -m gainsurgery.cli``),
stopped at named steps (tests/pausing.py) where an overlap must be certain, and a
second PID namespace (``unshare``) where one exists.

Sections follow the rules of the issue: reading, writing, ownership, numbers,
parsing, secrets and privacy, cards, the gain knows its base.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import fingerprinted, random_gain
from fsfault import tree
from pausing import PausedRun
from gainsurgery import gainfile as gf
from gainsurgery.io.checkpoint import open_checkpoint
from gainsurgery.io.fingerprint import base_tensors_sha256

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

KEY = "model.layers.0.self_attn.o_proj.weight"
CLI = [sys.executable, "-m", "gainsurgery.cli"]


# --------------------------------------------------------------------------- helpers


class Untouched:
    """Snapshots of folders taken now; :meth:`check` asserts none of them changed."""

    def __init__(self, *roots: Path) -> None:
        self.roots = roots
        self.before = [tree(r) for r in roots]

    def check(self) -> None:
        for root, before in zip(self.roots, self.before):
            after = tree(root)
            assert after == before, f"{root} changed: {sorted(set(after.items()) ^ set(before.items()))[:6]}"


def refused(res, *fragments: str) -> str:
    """The result of a refused command: exit 1, one ``error:`` line holding every fragment, no traceback."""
    stderr = res.stderr if isinstance(res.stderr, str) else res.stderr.decode()
    code = res.exit_code if hasattr(res, "exit_code") else res.returncode
    assert code == 1, (code, stderr, getattr(res, "output", ""))
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def run(*args, timeout: float = 120, cwd: Path | None = None, env: dict | None = None, prefix: list[str] = ()):
    """The real CLI in its own process (for FIFOs, signals, parallel runs and namespaces)."""
    return subprocess.run([*prefix, *CLI, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd, env=env)


def raw_header(shard: Path) -> tuple[dict, bytes]:
    raw = shard.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def write_shard(shard: Path, header_text: bytes, data: bytes) -> None:
    header_text += b" " * (-len(header_text) % 8)
    shard.write_bytes(struct.pack("<Q", len(header_text)) + header_text + data)


def first_shard(base: Path) -> Path:
    index = json.loads((base / "model.safetensors.index.json").read_text())
    return base / index["weight_map"][KEY]


def deep(n: int = 200_000) -> str:
    return "[" * n + "]" * n


@pytest.fixture
def world(tiny_ckpt, tmp_path, monkeypatch):
    """tmp/base (a tiny llama), tmp/gains/g.safetensors (fingerprinted), cwd = tmp/work."""
    base = tmp_path / "base"
    shutil.copytree(tiny_ckpt("llama", "bfloat16"), base)
    (tmp_path / "gains").mkdir()
    gain = fingerprinted(base).save(tmp_path / "gains" / "g.safetensors")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return base, gain, work


# =========================================================================== 1. reading


def test_symlink_to_proc_environ_is_refused_never_copied_nor_uploaded(world, cli, hub, tmp_path):
    base, gain, _ = world
    os.symlink("/proc/self/environ", base / "tokenizer_config.json")
    guard = Untouched(tmp_path)
    res = cli("apply", base, gain, tmp_path / "out", "--push", "testuser/leak")
    refused(res, "tokenizer_config.json", "/proc")
    guard.check()
    assert hub.requests == [] and "testuser/leak" not in hub.repos  # refused before the Hub is contacted


def test_symlink_out_of_base_is_refused_by_every_reader(world, cli, tmp_path):
    base, gain, _ = world
    (tmp_path / "secret.txt").write_text("do not copy")
    os.symlink("../secret.txt", base / "notes.txt")
    guard = Untouched(tmp_path)
    refused(cli("apply", base, gain, tmp_path / "out"), "notes.txt", "outside")
    refused(cli("apply", base, gain, tmp_path / "out", "--dry-run"), "notes.txt", "outside")
    guard.check()
    # verify reads OUT as an input folder too: a shard of OUT linking out is refused
    os.unlink(base / "notes.txt")
    assert cli("apply", base, gain, tmp_path / "out").exit_code == 0
    shard = first_shard(tmp_path / "out")
    shutil.move(shard, tmp_path / "moved.safetensors")
    os.symlink(tmp_path / "moved.safetensors", shard)
    refused(cli("verify", base, gain, tmp_path / "out"), shard.name, "outside")


@pytest.mark.parametrize("what", ["shard", "extra", "index", "config"])
def test_a_fifo_never_blocks(world, tmp_path, what):
    base, gain, _ = world
    target = {"shard": first_shard(base), "extra": base / "generation_config.json",
              "index": base / "model.safetensors.index.json", "config": base / "config.json"}[what]
    target.unlink()
    os.mkfifo(target)
    guard = Untouched(tmp_path)
    res = run("apply", base, gain, tmp_path / "out", timeout=60)  # a blocked open would time out here
    refused(res, target.name, "FIFO")
    guard.check()


def _hf_snapshot(hub, tmp_path, files: dict[str, bytes], repo_id: str) -> Path:
    """A real Hugging Face cache snapshot: the loopback Hub serves the files, huggingface_hub downloads them."""
    from huggingface_hub import snapshot_download

    hub.add_repo(repo_id, files)
    return Path(snapshot_download(repo_id, cache_dir=str(tmp_path / "hf-cache"), endpoint=hub.endpoint,
                                  token=hub.token))


@pytest.mark.parametrize("single", [False, True], ids=["sharded", "single-file"])
def test_hf_cache_snapshot_works_as_base(world, cli, hub, tmp_path, single):
    base, gain, _ = world
    if single:  # the same weights in one model.safetensors
        from safetensors.torch import load_file, save_file as save_torch

        tensors = {}
        for shard in sorted(base.glob("*.safetensors")):
            tensors.update(load_file(shard))
        single_base = tmp_path / "single"
        single_base.mkdir()
        save_torch(tensors, single_base / "model.safetensors", metadata={"format": "pt"})
        for name in ("config.json", "generation_config.json"):
            shutil.copy(base / name, single_base / name)
        base = single_base
    files = {p.name: p.read_bytes() for p in base.iterdir() if p.is_file()}
    snapshot = _hf_snapshot(hub, tmp_path, files, "testuser/tiny-llama")
    # The exact layout huggingface_hub makes: every file a relative link into ../../blobs/.
    shard_names = [n for n in files if n.endswith(".safetensors")]
    assert all(os.readlink(snapshot / n).startswith("../../blobs/") for n in files)
    assert len(shard_names) == (1 if single else 3)
    guard = Untouched(tmp_path / "hf-cache")
    res = cli("apply", snapshot, gain, tmp_path / "out", "--verify")
    assert res.exit_code == 0, res.stderr
    guard.check()
    assert cli("apply", base, gain, tmp_path / "plain").exit_code == 0
    for name in shard_names:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    prov = json.loads((tmp_path / "out" / "gainsurgery.json").read_text())
    assert prov["base"]["hub"] == "testuser/tiny-llama" and prov["base"]["commit"] == snapshot.name
    assert str(tmp_path) not in (tmp_path / "out" / "gainsurgery.json").read_text()
    assert 'base_model: "testuser/tiny-llama"' in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("spec", ["./typo", "../typo", "~/no-such-base-x", "checkpoints/final/", "a/b/c",
                                  "/no/such/base"])
def test_a_local_looking_base_never_reaches_the_hub(world, cli, hub, tmp_path, spec):
    _, gain, _ = world
    refused(cli("apply", spec, gain, tmp_path / "out"), "no such folder")
    refused(cli("targets", spec), "no such folder")
    assert hub.requests == []


def test_a_repo_id_whose_org_is_a_local_folder_is_read_as_local(world, cli, hub, tmp_path):
    _, gain, work = world
    (work / "org").mkdir()
    refused(cli("apply", "org/model", gain, tmp_path / "out"), "no such folder: org/model", "local folder org")
    refused(cli("apply", "org/name\n", gain, tmp_path / "out"), "no such folder")
    assert hub.requests == []


def test_push_refuses_a_folder_with_a_link_out_or_a_fifo(world, cli, hub, tmp_path):
    base, gain, _ = world
    out = tmp_path / "out"
    assert cli("apply", base, gain, out).exit_code == 0
    os.symlink("/proc/self/environ", out / "extra.txt")
    guard = Untouched(tmp_path)
    refused(cli("push", out, "testuser/m"), "extra.txt", "/proc")
    guard.check()
    os.unlink(out / "extra.txt")
    (out / "sub").mkdir()
    os.mkfifo(out / "sub" / "pipe")
    guard = Untouched(tmp_path)
    res = run("push", out, "testuser/m", timeout=60, env={**os.environ})
    refused(res, "pipe", "FIFO")
    guard.check()
    assert hub.requests == []


def test_adapter_folder_config_linking_out_is_refused(world, cli, tmp_path):
    base, gain, _ = world
    adapter = tmp_path / "adapter"
    assert cli("export-peft", gain, adapter, "--base", base).exit_code == 0
    (tmp_path / "elsewhere.json").write_bytes((adapter / "adapter_config.json").read_bytes())
    (adapter / "adapter_config.json").unlink()
    os.symlink(tmp_path / "elsewhere.json", adapter / "adapter_config.json")
    guard = Untouched(tmp_path)
    refused(cli("import-peft", adapter, "-o", tmp_path / "back.safetensors", "--base", base),
            "adapter_config.json", "outside")
    guard.check()


# =========================================================================== 2. writing


@pytest.mark.parametrize("out", ["", ".", "..", "./", "CWD", "/", "~", "HOME"])
def test_protected_outputs_are_never_replaced_even_with_overwrite(world, cli, tmp_path, monkeypatch, out):
    base, gain, work = world
    home = tmp_path / "home"
    home.mkdir()
    (home / "keep.txt").write_text("mine")
    (work / "keep.txt").write_text("mine")
    monkeypatch.setenv("HOME", str(home))
    out = {"CWD": str(work), "HOME": str(home)}.get(out, out)
    guard = Untouched(tmp_path)
    refused(cli("apply", base, gain, out, "--overwrite"), "empty" if out == "" else "never")
    guard.check()


def test_export_peft_overwrite_never_deletes_the_base(world, cli, tmp_path):
    base, gain, _ = world
    guard = Untouched(tmp_path)
    refused(cli("export-peft", gain, base, "--base", base, "--overwrite"), "is the input")
    refused(cli("export-peft", gain, tmp_path, "--base", base, "--overwrite"), "holds")  # cwd and the base
    guard.check()


def test_targets_init_never_writes_over_a_shard(world, cli, tmp_path):
    base, _, _ = world
    guard = Untouched(tmp_path)
    refused(cli("targets", base, "--init", "ones", "-o", first_shard(base)), "lies inside the input")
    guard.check()


def test_train_never_writes_into_its_base_or_data(world, cli, tmp_path):
    base, _, _ = world
    data = tmp_path / "d.txt"
    data.write_text("some text " * 50)
    guard = Untouched(tmp_path)
    refused(cli("train", base, "--method", "lora", "--data", data, "-o", base), "is the input")
    refused(cli("train", base, "--data", data, "-o", data), "is the input")
    refused(cli("train", base, "--data", data, "-o", tmp_path / "g.safetensors", "--log", data), "the input")
    guard.check()


def test_gain_file_commands_never_write_over_their_inputs(world, cli, tmp_path):
    base, gain, _ = world
    g2 = fingerprinted(base, seed=1).save(tmp_path / "gains" / "g2.safetensors")
    (tmp_path / "folder").mkdir()
    guard = Untouched(tmp_path)
    refused(cli("stack", gain, g2, "-o", gain), "is the input")
    refused(cli("invert", gain, "-o", gain), "is the input")
    refused(cli("inspect", gain, "--plot", gain), "is the input")
    refused(cli("stack", gain, g2, "-o", tmp_path / "folder"), "is an existing folder")
    os.link(gain, tmp_path / "hard.safetensors")
    refused(cli("invert", gain, "-o", tmp_path / "hard.safetensors"), "hard link")
    os.unlink(tmp_path / "hard.safetensors")
    guard.check()
    adapter = tmp_path / "adapter"
    assert cli("export-peft", gain, adapter, "--base", base).exit_code == 0
    guard = Untouched(tmp_path)
    refused(cli("import-peft", adapter, "-o", adapter / "adapter_model.safetensors", "--base", base),
            "lies inside the input")
    refused(cli("eval", base, "--data", f"d={gain}", "--json", base / "results.json"), "lies inside the input")
    guard.check()


def test_demo_and_experiment_outputs_are_checked(world, tmp_path):
    base, gain, work = world
    guard = Untouched(tmp_path)
    refused(run("demo", "--workdir", "", cwd=work), "--workdir")
    refused(run("demo", "--workdir", ".", cwd=work), "--workdir", "never")
    data = tmp_path / "a.txt"
    data.write_text("text " * 200)
    guard = Untouched(tmp_path)
    script = Path(__file__).resolve().parents[1] / "scripts" / "forgetting.py"
    res = subprocess.run([sys.executable, str(script), "run", "--out", str(base), "--base", str(base),
                          "--domain", f"a={data}", "--methods", "gain-ffn", "--steps", "1", "--seeds", "1",
                          "--yesno", "0"], capture_output=True, text=True, timeout=300, cwd=work)
    assert res.returncode != 0 and "--out" in res.stderr and "is the input" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    guard.check()


# =========================================================================== 3. ownership


@pytest.fixture(scope="module")
def small_base(tiny_ckpt, tmp_path_factory):
    """A sharded base and a fingerprinted gain for it. Runs are stopped at named steps
    (:mod:`gainsurgery.io.pausepoints`), never caught mid-way by being slow."""
    base = tiny_ckpt("llama")
    return base, fingerprinted(base).save(tmp_path_factory.mktemp("gain") / "g.safetensors")


@pytest.fixture
def flags(tmp_path_factory):
    """Where paused runs say they wait (outside the folders a test lists)."""
    return tmp_path_factory.mktemp("flags")


def _verify_ok(base: Path, gain: Path, out: Path) -> None:
    res = run("verify", base, gain, out)
    assert res.returncode == 0, res.stderr


def _wait_until_unlocked(claim: Path) -> None:
    """Until the run that holds ``claim`` is gone (its lock dies with it; a PID means nothing here)."""
    import fcntl

    deadline = time.monotonic() + 60
    with open(claim, "rb") as f:
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                assert time.monotonic() < deadline, f"{claim} stayed locked"
                time.sleep(0.01)


def test_two_runs_on_one_out_exactly_one_wins(small_base, tmp_path):
    base, gain = small_base
    out = tmp_path / "merged"
    procs = [subprocess.Popen([*CLI, "apply", str(base), str(gain), str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert loser.count("\n") == 1 and loser.startswith("error: ") and "Traceback" not in loser
    assert "being written by another gainsurgery run" in loser or "already exists" in loser
    _verify_ok(base, gain, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def _second_run_is_refused(small_base, tmp_path, flags, prefix: list[str] = ()) -> None:
    """A first run waits with a shard written; a second one (under ``prefix``) fails at once and deletes
    nothing of it; the first then finishes and verifies."""
    base, gain = small_base
    out = tmp_path / "merged"
    first = PausedRun(["apply", base, gain, out], "apply.shard-written", flags).wait_paused()
    [temp] = tmp_path.glob(".merged.gainsurgery-*.tmp")
    before = tree(temp)
    assert any(name.endswith(".safetensors") for name in before)
    res = run("apply", base, gain, out, prefix=prefix)
    refused(res, "being written by another gainsurgery run")
    assert tree(temp) == before
    code, err = first.resume()
    assert code == 0, err
    _verify_ok(base, gain, out)


def test_a_live_run_is_never_disturbed_by_a_second_one(small_base, tmp_path, flags):
    """The first run waits mid-write; the second fails at once and deletes nothing of it."""
    _second_run_is_refused(small_base, tmp_path, flags)


def _unshare() -> list[str]:
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child", "true"],
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no second PID namespace here (unshare: {probe.stderr.decode().strip()[:120]})")
    return ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--kill-child"]


def test_another_pid_namespace_never_deletes_a_live_temp(small_base, tmp_path, flags):
    """A container sharing the volume sees no such PID, but sees the claim's lock."""
    _second_run_is_refused(small_base, tmp_path, flags, prefix=_unshare())


def test_leftovers_of_a_run_killed_in_another_namespace_are_cleaned(small_base, tmp_path, flags):
    prefix = _unshare()
    base, gain = small_base
    out = tmp_path / "merged"
    killed = PausedRun(["apply", base, gain, out], "apply.shard-written", flags, prefix=prefix).wait_paused()
    killed.kill()  # unshare --kill-child takes the run with it
    [claim] = tmp_path.glob(".merged.gainsurgery-*.claim")
    _wait_until_unlocked(claim)
    similar = tmp_path / (".merged.gainsurgery-" + "0" * 32 + ".tmp")
    similar.mkdir()  # looks like ours but has no claim: never touched
    (similar / "x").write_text("not ours")
    res = run("apply", base, gain, out)
    assert res.returncode == 0, res.stderr
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "merged")
    assert leftovers == [similar.name] and (similar / "x").read_text() == "not ours"


def test_a_folder_made_at_out_meanwhile_is_kept_and_the_run_fails(small_base, tmp_path, flags):
    base, gain = small_base
    out = tmp_path / "merged"
    paused = PausedRun(["apply", base, gain, out], "claim.publishing", flags).wait_paused()
    out.mkdir()
    (out / "theirs.txt").write_text("someone else's")
    code, err = paused.resume()
    assert code == 1
    assert err.count("\n") == 1 and "appeared while this run was writing it" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


# kill -9 at every step of apply --overwrite: tests/test_kill_sweep.py.


def test_empty_claims_and_half_made_markers_do_not_live_forever(small_base, tmp_path, flags):
    """An empty file with a claim's name (a run of an older version killed while creating it, or a
    stray file) proves nothing and holds nothing: the next run removes it, and nothing else with it."""
    base, gain = small_base
    out = tmp_path / "merged"
    stem = ".merged.gainsurgery-"
    (tmp_path / f"{stem}{'1' * 32}.claim").touch()                     # empty: removed
    (tmp_path / f"{stem}{'2' * 32}.claim").touch()                     # empty, beside a folder:
    (tmp_path / f"{stem}{'2' * 32}.tmp").mkdir()                       # the claim goes, the folder stays
    (tmp_path / f"{stem}{'2' * 32}.tmp" / "x").write_text("not provably ours")
    (tmp_path / f"{stem}{'3' * 32}.claim").write_text("someone's notes")  # not empty, not ours: kept
    (tmp_path / f"{stem}{'4' * 32}.claim.part").touch()                # a marker never written: removed
    (tmp_path / f"{stem}{'5' * 32}.claim.part").write_text("junk")     # not ours: kept
    held = tmp_path / f"{stem}{'6' * 32}.claim"                        # empty but locked: a live run's
    held.touch()
    import fcntl

    with open(held, "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        res = run("apply", base, gain, out)
        assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["merged", f"{stem}{'2' * 32}.tmp", f"{stem}{'3' * 32}.claim", f"{stem}{'5' * 32}.claim.part", held.name])
    assert (tmp_path / f"{stem}{'2' * 32}.tmp" / "x").read_text() == "not provably ours"
    assert (tmp_path / f"{stem}{'3' * 32}.claim").read_text() == "someone's notes"


def test_a_claim_is_never_empty_at_its_own_name(small_base, tmp_path, flags):
    base, gain = small_base
    out = tmp_path / "merged"
    paused = PausedRun(["apply", base, gain, out], "claim.marker-created", flags).wait_paused()
    assert [p.name.split(".")[-2:] for p in tmp_path.glob(".merged.gainsurgery-*")] == [["claim", "part"]]
    assert paused.resume()[0] == 0
    paused = PausedRun(["apply", base, gain, out, "--overwrite"], "claim.marked", flags).wait_paused()
    [claim] = tmp_path.glob(".merged.gainsurgery-*.claim")
    marker = json.loads(claim.read_text())
    assert marker["format"] == "gainsurgery.claim/1" and marker["out"] == "merged"
    assert claim.name == f".merged.gainsurgery-{marker['token']}.claim"
    assert paused.resume()[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


# =========================================================================== 4. numbers


def _base_with(tmp_path: Path, dtype: str, values: np.ndarray) -> Path:
    """A one-file base whose target tensor holds ``values`` (16 x 8) in ``dtype``."""
    import torch
    from safetensors.torch import save_file as save_torch

    base = tmp_path / f"base-{dtype}"
    base.mkdir()
    t = torch.from_numpy(values.astype(np.float32)).to(getattr(torch, dtype))
    save_torch({KEY: t, "model.norm.weight": torch.ones(8, dtype=t.dtype)}, base / "model.safetensors",
               metadata={"format": "pt"})
    return base


@pytest.mark.parametrize("dtype,scale,inf,zero", [
    ("float16", 1e6, 16 * 8, 0),        # |w| >= 0.07 x 1e6 leaves float16's 65504
    ("bfloat16", 3e38, 16 * 8 // 2, 0),  # half of the weights are >= 2: 6e38 > bfloat16's 3.4e38
    ("bfloat16", 1e-45, 0, 16 * 8),      # every weight rounds to 0
])
def test_saturation_is_an_error_naming_the_tensor(tmp_path, cli, dtype, scale, inf, zero):
    values = np.where(np.arange(128).reshape(16, 8) % 2 == 0, 2.5, 0.07).astype(np.float32)
    base = _base_with(tmp_path, dtype, values)
    g = gf.GainFile({KEY: np.full(8, scale, np.float32)}, {KEY: 1})
    g.metadata["base_tensors_sha256"] = base_tensors_sha256(open_checkpoint(base), g.vectors)
    gain = g.save(tmp_path / "g.safetensors")
    guard = Untouched(tmp_path)
    expected_inf = 128 if dtype == "float16" else inf
    refused(cli("apply", base, gain, tmp_path / "out"), KEY, f"{expected_inf} finite weights became ±inf",
            f"{zero} non-zero weights became 0", "--allow-saturation")
    guard.check()
    res = cli("apply", base, gain, tmp_path / "out", "--allow-saturation")
    assert res.exit_code == 0, res.stderr
    prov = json.loads((tmp_path / "out" / "gainsurgery.json").read_text())
    assert prov["saturation_allowed"] == {KEY: {"became_inf": expected_inf, "became_zero": zero}}
    res = cli("verify", base, gain, tmp_path / "out")
    assert res.exit_code == 1 and "--allow-saturation" in res.stderr and KEY in res.stderr
    assert cli("verify", base, gain, tmp_path / "out", "--allow-saturation").exit_code == 0


# =========================================================================== 5. parsing


def test_deeply_nested_json_is_one_line_everywhere(world, cli, hub, tmp_path):
    base, gain, _ = world
    # shard header
    shard = first_shard(base)
    original = shard.read_bytes()
    write_shard(shard, b'{"a": ' + deep().encode() + b"}", b"")
    guard = Untouched(tmp_path)
    refused(cli("apply", base, gain, tmp_path / "out"), shard.name, "nested deeper")
    guard.check()
    shard.write_bytes(original)
    # index, config.json
    for name in ("model.safetensors.index.json", "config.json"):
        saved = (base / name).read_bytes()
        (base / name).write_text('{"weight_map": ' + deep() + "}")
        refused(cli("apply", base, gain, tmp_path / "out"), name, "nested deeper")
        (base / name).write_bytes(saved)
    # gain metadata
    for key in ("dims", "parents", "training"):
        meta = {"format": gf.FORMAT, "dims": json.dumps({KEY: 1}), key: deep()}
        save_file({KEY: np.ones(32, np.float32)}, tmp_path / "deep.safetensors", metadata=meta)
        refused(cli("apply", base, tmp_path / "deep.safetensors", tmp_path / "out"), key, "nested deeper")
    # adapter_config.json
    adapter = tmp_path / "adapter"
    assert cli("export-peft", gain, adapter, "--base", base).exit_code == 0
    (adapter / "adapter_config.json").write_text('{"peft_type": "IA3", "x": ' + deep() + "}")
    refused(cli("import-peft", adapter, "-o", tmp_path / "x.safetensors", "--base", base), "adapter_config.json",
            "nested deeper")
    # gainsurgery.json of a folder being pushed
    out = tmp_path / "out"
    assert cli("apply", base, gain, out).exit_code == 0
    (out / "gainsurgery.json").write_text(deep())
    refused(cli("push", out, "testuser/m"), "gainsurgery.json", "nested deeper")
    assert hub.requests == []


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.__setitem__("model_type", ["llama"]), "model_type: expected string, got array"),
    (lambda c: c.__setitem__("text_config", "llama"), "text_config: expected object, got string"),
    (lambda c: c.__setitem__("num_hidden_layers", "2"), "num_hidden_layers: expected integer, got string"),
    (lambda c: c.__setitem__("text_config", {"model_type": 3}), "text_config.model_type: expected string"),
])
def test_config_fields_of_the_wrong_type_are_one_line(world, cli, edit, match):
    base, gain, _ = world
    config = json.loads((base / "config.json").read_text())
    edit(config)
    (base / "config.json").write_text(json.dumps(config))
    guard = Untouched(base.parent)
    refused(cli("targets", base), "config.json", match)
    refused(cli("apply", base, gain, "out"), "config.json", match)
    guard.check()


def test_zero_d_bias_with_side_out_is_one_line(tmp_path, cli):
    import torch
    from safetensors.torch import save_file as save_torch

    base = tmp_path / "base"
    base.mkdir()
    tensors = {}
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.o_proj.weight"] = torch.ones(8, 8)
        tensors[f"model.layers.{i}.self_attn.o_proj.bias"] = torch.tensor(1.0)  # 0-d
        tensors[f"model.layers.{i}.mlp.down_proj.weight"] = torch.ones(8, 16)
    save_torch(tensors, base / "model.safetensors")
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    guard = Untouched(tmp_path)
    refused(cli("targets", base, "--side", "out"), "model.layers.0.self_attn.o_proj.bias", "1-D")
    refused(cli("targets", base, "--side", "out", "--init", "ones", "-o", tmp_path / "g.safetensors"), "1-D")
    guard.check()


def test_unclosed_regex_in_feedforward_modules_is_one_line(world, cli, tmp_path):
    base, gain, _ = world
    adapter = tmp_path / "adapter"
    assert cli("export-peft", gain, adapter, "--base", base).exit_code == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["feedforward_modules"] = "(o_proj|down_proj"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    guard = Untouched(tmp_path)
    refused(cli("import-peft", adapter, "-o", tmp_path / "x.safetensors", "--base", base),
            "feedforward_modules is not a valid regular expression")
    guard.check()
    config["feedforward_modules"] = [3]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    guard = Untouched(tmp_path)
    refused(cli("import-peft", adapter, "-o", tmp_path / "x.safetensors", "--base", base),
            "feedforward_modules[0]: expected string, got integer")
    guard.check()


def test_pushing_a_gain_file_named_readme_is_one_line(world, cli, hub, tmp_path):
    _, gain, _ = world
    shutil.copy(gain, tmp_path / "README.md")
    guard = Untouched(tmp_path)
    refused(cli("push", tmp_path / "README.md", "testuser/g"), "README.md", "must end in .safetensors")
    refused(cli("push", gain, "org/name\n"), "is not a Hub repo id")
    guard.check()
    assert hub.requests == []


def _edit_header(shard: Path, edit) -> None:
    header, data = raw_header(shard)
    text, data = edit(header, data)
    write_shard(shard, text, data)


def _dup(header, data):
    text = json.dumps(header)
    entry = json.dumps({KEY: header[KEY]})[1:-1]
    return (text[:-1] + ", " + entry + "}").encode(), data


def _hole(header, data):
    for entry in header.values():
        if isinstance(entry, dict) and "data_offsets" in entry:
            entry["data_offsets"] = [o + 8 for o in entry["data_offsets"]]
    return json.dumps(header).encode(), b"\0" * 8 + data


@pytest.mark.parametrize("edit,match", [
    (_dup, "duplicate key"),
    (_hole, "8 bytes before the first tensor"),
    (lambda h, d: (json.dumps({**h, "__metadata__": []}).encode(), d), "__metadata__: expected object of strings"),
    (lambda h, d: (json.dumps({**h, "__metadata__": False}).encode(), d), "__metadata__: expected object of strings"),
    (lambda h, d: (json.dumps({**h, "__metadata__": {"n": 1}}).encode(), d), "__metadata__.n: expected string"),
    (lambda h, d: (json.dumps({**h, KEY: {**h[KEY], "dtype": "Q4_K"}}).encode(), d), "unknown dtype 'Q4_K'"),
    (lambda h, d: (json.dumps(h).encode(), d + b"\0" * 4), "4 trailing bytes"),
])
def test_safetensors_headers_are_held_to_safetensors_rules(world, cli, tmp_path, edit, match):
    base, gain, _ = world
    _edit_header(first_shard(base), edit)
    guard = Untouched(tmp_path)
    refused(cli("apply", base, gain, tmp_path / "out"), first_shard(base).name, match)
    guard.check()


def test_a_hole_between_tensors_and_duplicate_keys_in_a_gain_file(world, cli, tmp_path):
    base, gain, _ = world
    shard = first_shard(base)
    header, data = raw_header(shard)
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    second = names[1]
    shift = 16
    for k in names[1:]:
        header[k]["data_offsets"] = [o + shift for o in header[k]["data_offsets"]]
    cut = header[names[1]]["data_offsets"][0] - shift
    write_shard(shard, json.dumps(header).encode(), data[:cut] + b"\0" * shift + data[cut:])
    refused(cli("apply", base, gain, tmp_path / "out"), f"16 bytes between {names[0]} and {second}", "hole")
    # a gain file with one key twice: one vector would be silently ignored
    header, data = raw_header(gain)
    name = next(k for k in header if k != "__metadata__")
    text = json.dumps(header)
    write_shard(tmp_path / "dup.safetensors",
                (text[:-1] + ", " + json.dumps({name: header[name]})[1:-1] + "}").encode(), data)
    refused(cli("inspect", tmp_path / "dup.safetensors"), "duplicate key")


# =========================================================================== 6. secrets and privacy


def test_credentials_in_hf_endpoint_are_never_printed(world, cli, tmp_path, monkeypatch):
    _, gain, _ = world
    monkeypatch.setenv("HF_ENDPOINT", "http://alice:s3cr3t-pw@127.0.0.1:9")
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    guard = Untouched(tmp_path)
    line = refused(cli("apply", "testuser/tiny-llama", gain, tmp_path / "out"), "could not reach the Hub")
    guard.check()
    assert "s3cr3t-pw" not in line and "alice" not in line and "x" * 34 not in line
    assert "http://127.0.0.1:9" in line


def test_what_libraries_log_and_a_bugs_traceback_lose_credentials(tmp_path):
    from gainsurgery.hub.internals import RETRY_LOGGER

    code = ("import logging, warnings, sys\n"
            "from gainsurgery.io.secrets import install_redaction\n"
            "install_redaction()\n"
            f"logging.getLogger({RETRY_LOGGER!r}).warning('retrying GET %s', 'http://alice:pw1@h/api')\n"
            "warnings.warn('see http://alice:pw2@h/x')\n"
            "raise RuntimeError('failed: http://alice:pw3@h/y token ' + 'hf_' + 'z' * 34)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "HF_TOKEN": "hf_" + "z" * 34})
    assert res.returncode == 1
    assert "retrying GET http://h/api" in res.stderr and "http://h/x" in res.stderr and "http://h/y" in res.stderr
    assert "RuntimeError" in res.stderr  # a bug still shows its traceback
    assert not any(s in res.stderr for s in ("pw1", "pw2", "pw3", "alice", "z" * 34))


def test_push_refuses_any_file_holding_the_token(world, cli, hub, tmp_path):
    import base64

    base, gain, _ = world
    out = tmp_path / "out"
    assert cli("apply", base, gain, out).exit_code == 0
    for content in (f"token={hub.token}\n".encode(), base64.b64encode(b"x" + hub.token.encode() + b"yz"),
                    hub.token.encode("utf-16-le")):
        (out / "notes.txt").write_bytes(content)
        guard = Untouched(tmp_path)
        line = refused(cli("push", out, "testuser/m"), "notes.txt", "contains the value of your Hub token")
        guard.check()
        assert hub.token not in line
    (out / "notes.txt").unlink()
    # a safetensors header's metadata is text too
    shard = first_shard(out)
    header, data = raw_header(shard)
    header["__metadata__"] = {"format": "pt", "note": hub.token}
    write_shard(shard, json.dumps(header).encode(), data)
    prov = json.loads((out / "gainsurgery.json").read_text())
    prov["shards"][shard.name]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (out / "gainsurgery.json").write_text(json.dumps(prov))
    refused(cli("push", out, "testuser/m"), shard.name, "token")
    assert hub.requests == [] and "testuser/m" not in hub.repos


def test_nothing_shared_carries_a_local_path(world, cli, tmp_path):
    base, gain, _ = world
    out = tmp_path / "out"
    assert cli("apply", base, gain, out).exit_code == 0
    for name in ("gainsurgery.json", "README.md"):
        text = (out / name).read_text()
        assert str(tmp_path) not in text and "/tmp/" not in text and os.path.expanduser("~") + "/" not in text
    assert cli("targets", base, "--init", "ones", "-o", tmp_path / "id.safetensors").exit_code == 0
    meta = json.dumps(gf.load(tmp_path / "id.safetensors").metadata)
    assert str(tmp_path) not in meta and "base_model" not in meta


def test_train_records_names_and_hashes_not_paths(tmp_path, cli):
    from models import TEXT_A, save_tiny_lm, write_domain

    base = save_tiny_lm(tmp_path / "base")
    data = write_domain(tmp_path, "legal", TEXT_A)
    res = cli("train", base, "--data", data, "--steps", "2", "--batch-size", "2", "--seq-len", "16",
              "--no-progress", "-o", tmp_path / "g.safetensors")
    assert res.exit_code == 0, res.stderr
    g = gf.load(tmp_path / "g.safetensors")
    text = json.dumps(g.metadata)
    assert str(tmp_path) not in text and "base_model" not in g.metadata  # a local base: no name claimed
    assert g.metadata["training"]["data"] == [{"name": "legal.txt",
                                               "sha256": hashlib.sha256(data.read_bytes()).hexdigest()}]
    assert g.metadata["base_tensors_sha256"] == base_tensors_sha256(open_checkpoint(base), g.vectors)


# =========================================================================== 7. cards


def test_a_relative_local_base_is_never_a_card_base_model(world, cli, tmp_path):
    base, gain, work = world
    shutil.copytree(base, work / "checkpoints" / "final")
    res = cli("apply", "checkpoints/final", gain, tmp_path / "out")
    assert res.exit_code == 0, res.stderr
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model" not in card and "checkpoints/final" not in card
    refused(cli("apply", base, gain, tmp_path / "o2", "--base-model", "org/name\n"), "not a Hub repo id")
    refused(cli("apply", base, gain, tmp_path / "o2", "--base-model", "checkpoints/final/x"), "not a Hub repo id")


def test_metadata_text_is_escaped_in_cards(world, cli, hub, tmp_path):
    base, _, _ = world
    hostile = "<script>alert(1)</script>\n---\nbase_model: evil/model\n| x | y |\n[click](javascript:x)"
    g = fingerprinted(base, description=hostile)
    g.metadata["method"] = "gain\n---\ntags: evil"
    gain = g.save(tmp_path / "gains" / "hostile.safetensors")
    res = cli("push", gain, "testuser/g", "--dry-run", "--json")
    assert res.exit_code == 0, res.stderr
    from gainsurgery import api

    card = next(i.data for i in api.push(gain, "testuser/g", dry_run=True).items if i.path_in_repo == "README.md")
    text = card.decode()
    assert text.count("\n---\n") == 1 and text.startswith("---\n")  # the front matter is closed once
    front = text.split("---\n")[1]
    assert "evil" not in front and "<script>" not in text and "&lt;script&gt;" in text
    assert "[click](javascript:" not in text and "\\[click\\](javascript:x)" in text
    described = [ln for ln in text.splitlines() if "alert(1)" in ln]
    assert len(described) == 1 and "\\| x \\| y \\|" in described[0]  # one line: no table, no block


# =========================================================================== 8. the gain knows its base


def test_targets_init_records_the_base_fingerprint_and_inspect_shows_it(world, cli, tmp_path):
    base, _, _ = world
    assert cli("targets", base, "--init", "ones", "-o", tmp_path / "id.safetensors").exit_code == 0
    g = gf.load(tmp_path / "id.safetensors")
    want = base_tensors_sha256(open_checkpoint(base), g.vectors)
    assert g.metadata["base_tensors_sha256"] == want
    res = cli("inspect", tmp_path / "id.safetensors")
    assert f"base_tensors_sha256: {want}" in res.output


def test_a_gain_for_a_sibling_is_refused_unless_allowed(world, cli, tiny_ckpt, tmp_path):
    base, gain, _ = world
    sibling = tmp_path / "sibling"  # same names and shapes, other weights (an instruct sibling)
    shutil.copytree(tiny_ckpt("llama", "bfloat16", seed=1), sibling)
    guard = Untouched(tmp_path)
    refused(cli("apply", sibling, gain, tmp_path / "out"), "g.safetensors was trained on other weights",
            "--allow-base-mismatch")
    guard.check()
    res = cli("apply", sibling, gain, tmp_path / "out", "--allow-base-mismatch")
    assert res.exit_code == 0
    warnings = res.stderr.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("warning: g.safetensors was trained on other weights")
    prov = json.loads((tmp_path / "out" / "gainsurgery.json").read_text())
    assert prov["base_mismatch_allowed"] == ["g.safetensors"]


def test_an_old_gain_without_a_fingerprint_applies_with_one_warning(world, cli, tmp_path):
    base, _, _ = world
    old = random_gain(base, "gain", seed=4).save(tmp_path / "old.safetensors")
    res = cli("apply", base, old, tmp_path / "out")
    assert res.exit_code == 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: old.safetensors records no base_tensors_sha256")
    assert json.loads((tmp_path / "out" / "gainsurgery.json").read_text())["base_not_checked"] == ["old.safetensors"]


def test_stack_keeps_parents_fingerprints_and_refuses_mixed_bases(world, cli, tiny_ckpt, tmp_path):
    base, gain, _ = world
    sibling = tiny_ckpt("llama", "bfloat16", seed=1)
    other = fingerprinted(sibling, seed=2).save(tmp_path / "gains" / "other.safetensors")
    same = fingerprinted(base, seed=3).save(tmp_path / "gains" / "same.safetensors")
    refused(cli("stack", gain, other, "-o", tmp_path / "mixed.safetensors"), "trained on different bases",
            "--allow-base-mismatch")
    assert cli("stack", gain, same, "-o", tmp_path / "both.safetensors").exit_code == 0
    both = gf.load(tmp_path / "both.safetensors")
    assert both.metadata["base_tensors_sha256"] == gf.load(gain).metadata["base_tensors_sha256"]
    assert cli("apply", base, tmp_path / "both.safetensors", tmp_path / "out").exit_code == 0
    assert cli("stack", gain, other, "-o", tmp_path / "mixed.safetensors", "--allow-base-mismatch").exit_code == 0
    mixed = gf.load(tmp_path / "mixed.safetensors")
    assert "base_tensors_sha256" not in mixed.metadata
    assert [p["base_tensors_sha256"] for p in mixed.metadata["parents"]] == [
        gf.load(gain).metadata["base_tensors_sha256"], gf.load(other).metadata["base_tensors_sha256"]]
    refused(cli("apply", base, tmp_path / "mixed.safetensors", tmp_path / "o2"),
            "other.safetensors (parent of mixed.safetensors) was trained on other weights")
