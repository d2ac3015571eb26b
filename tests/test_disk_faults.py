"""A full disk (ENOSPC) and a file-size limit (EFBIG) in every command that writes (issue 18, item 4).

Each command runs as a real process, its outputs on a small tmpfs (``unshare -m``:
skipped with the reason where it cannot be mounted) or under ``RLIMIT_FSIZE``, at
sizes that make it fail at different points (the claim, the first shard, a later
shard, the small files, a checkpoint, the final save), and at one where it succeeds.
A failure is one ``error:`` line naming the problem, never a traceback; nothing is
published (no OUT, no commit on the Hub); no temp is left; an old OUT, BASE and the
gain files are untouched. What a failed run may leave is named per command: a
training log (how far it got, where ``--resume`` picks up), complete checkpoints, a
Hub-to-Hub journal (for the rerun), the HF cache's own partial download.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import random_gain
from fsfault import cli_env, run_limited, run_on_small_fs, small_fs_or_skip, tree
from gainsurgery.io.checkpoint import open_checkpoint
from gainsurgery.io.fingerprint import base_tensors_sha256
from test_hub import local_files, our_commits

# huggingface_hub's own LFS PUT passes `data=<file>` to httpx2, which warns; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

KiB = 1024
#: What a one-line error about room says (the Hub-to-Hub pipeline names its work folder).
NO_ROOM = ("disk full: ", "file too large: ", "no room left in the work folder")
TEXT = "\n\n".join(f"document {i}: the quick brown fox jumps over the lazy dog, then rests by the river."
                   for i in range(60))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A tiny llama with a tokenizer (BASE), a fingerprinted gain and a data file, on the ordinary disk."""
    from models import save_tiny_lm

    root = tmp_path_factory.mktemp("inputs")
    base = save_tiny_lm(root / "base", "llama")
    g = random_gain(base, "gain-ffn", seed=2)
    g.metadata["base_tensors_sha256"] = base_tensors_sha256(open_checkpoint(base), g.vectors)
    gain = g.save(root / "g.safetensors")
    (root / "data.txt").write_text(TEXT)
    return root, base, gain


@pytest.fixture
def untouched(inputs):
    """Asserts, after the test, that BASE, the gain and the data are byte for byte what they were."""
    root = inputs[0]
    before = tree(root)
    yield
    assert tree(root) == before


def faulted(fault: str, size: int, args: list, root: Path, *, seed=(), mkdir=(), env=None):
    """Run the CLI under ``fault`` (``"fsize"``: RLIMIT_FSIZE=size; ``"tmpfs"``: a tmpfs of size at ``root``)."""
    if fault == "tmpfs":
        return run_on_small_fs(args, size, root, seed=seed, mkdir=mkdir, env=env)
    for src, rel in seed:
        shutil.copytree(src, root / rel)
    for rel in mkdir:
        (root / rel).mkdir(parents=True, exist_ok=True)
    before = tree(root)
    outcome = run_limited(args, size, env=env)
    outcome.before, outcome.after = before, tree(root)
    return outcome


def new_entries(outcome) -> set[str]:
    """What the run added under the root (changed entries count as added)."""
    return {k for k, v in outcome.after.items() if outcome.before.get(k) != v}


def clean_failure(outcome, *, leaves: str = r"(?!)") -> None:
    """exit 1, exactly one ``error:`` line about room, no traceback; the run removed everything it made,
    except names matching ``leaves`` (a regex on the path under the root)."""
    assert outcome.rc == 1, (outcome.rc, outcome.stderr[-3000:])
    assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    assert len(outcome.lines) == 1 and outcome.lines[0].startswith("error: "), outcome.stderr[-3000:]
    assert any(s in outcome.lines[0] for s in NO_ROOM), outcome.lines[0]
    extra = sorted(k for k in new_entries(outcome) if not re.fullmatch(leaves, k))
    assert extra == [], extra
    gone = sorted(k for k in outcome.before if k not in outcome.after)
    assert gone == [], gone  # an old OUT, or anything else that was there, is still there


def ok_or_clean(outcome, fault, **kw) -> bool:
    """True for a run that succeeded, else asserts it failed cleanly; and that it did what ``fault`` expects."""
    expect = fault[2]
    if expect is not None:
        assert outcome.rc == (1 if expect == "fails" else 0), (fault, outcome.stderr[-3000:])
    if outcome.rc == 0:
        return True
    clean_failure(outcome, **kw)
    return False


def faults(*points: tuple) -> pytest.MarkDecorator:
    """Parametrize ``fault`` with (kind, bytes, "fails" | "works" | None: either, where the point is not exact)."""
    return pytest.mark.parametrize("fault", points, ids=lambda f: f"{f[0]}-{f[1]}")


@pytest.fixture
def root(tmp_path, request):
    fault = request.node.callspec.params["fault"][0]
    if fault == "tmpfs":
        small_fs_or_skip()
    r = tmp_path / "small"
    r.mkdir()
    return r


def base_shards(base: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in base.glob("model-*.safetensors")}


def published_like_base(outcome, out: str, base: Path) -> None:
    """OUT appeared whole: every shard of BASE at its size, the files apply adds, no temp beside it."""
    shards = {k[len(out) + 1:]: v[1] for k, v in outcome.after.items() if k.startswith(out + "/model-")}
    assert shards == base_shards(base)
    assert {f"{out}/gainsurgery.json", f"{out}/README.md", f"{out}/config.json"} <= set(outcome.after)
    assert not [k for k in outcome.after if k.startswith(f".{out}.")]


# --------------------------------------------------------------------------- apply


@faults(("fsize", 0, "fails"), ("fsize", 4 * KiB, "fails"), ("fsize", 16 * KiB, "fails"),
        ("fsize", 64 * KiB, "works"), ("tmpfs", 16 * KiB, "fails"), ("tmpfs", 64 * KiB, None),
        ("tmpfs", 128 * KiB, None), ("tmpfs", 8 << 20, "works"))
def test_apply(inputs, untouched, root, fault):
    _, base, gain = inputs
    outcome = faulted(*fault[:2], ["apply", base, gain, root / "out"], root)
    if ok_or_clean(outcome, fault):
        published_like_base(outcome, "out", base)
    elif fault[0] == "tmpfs":
        assert "disk full: no room to write OUT" in outcome.lines[0]


@faults(("fsize", 16 * KiB, "fails"), ("tmpfs", 64 * KiB, "fails"), ("tmpfs", 128 * KiB, "fails"))
def test_apply_overwrite_keeps_the_old_out(inputs, untouched, root, fault, tmp_path):
    _, base, gain = inputs
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("the old OUT")
    outcome = faulted(*fault[:2], ["apply", base, gain, root / "out", "--overwrite"], root, seed=[(old, "out")])
    clean_failure(outcome)  # the old OUT's files are checked unchanged by clean_failure
    assert outcome.after["out/keep.txt"] == outcome.before["out/keep.txt"]


@faults(("fsize", 16 * KiB, "fails"), ("tmpfs", 64 * KiB, "fails"), ("tmpfs", 8 << 20, "works"))
def test_apply_and_push_commits_nothing(inputs, untouched, root, fault, hub):
    _, base, gain = inputs
    outcome = faulted(*fault[:2], ["apply", base, gain, root / "out", "--push", "testuser/merged"], root)
    if ok_or_clean(outcome, fault):
        published_like_base(outcome, "out", base)
        assert len(our_commits(hub)) == 1
    else:
        assert our_commits(hub) == []  # (the repo is made first, so that a bad token fails before any work)


# --------------------------------------------------------------------------- a Hub base


HF_CACHE = r"hf(/hub(/.*)?)?"  # the HF cache's own files (blobs, refs, snapshots, locks, a partial download)


@faults(("fsize", 4 * KiB, "fails"), ("fsize", 16 * KiB, "fails"), ("tmpfs", 64 * KiB, "fails"),
        ("tmpfs", 256 * KiB, None), ("tmpfs", 8 << 20, "works"))
def test_apply_a_hub_base_into_a_local_out(inputs, untouched, root, fault, hub):
    """Downloads into the HF cache and the staging folder of headers ($TMPDIR) share the small disk."""
    _, base, gain = inputs
    hub.add_repo("testuser/tiny", local_files(base))
    env = cli_env(HF_HUB_CACHE=str(root / "hf" / "hub"), HF_HOME=str(root / "hf"), TMPDIR=str(root / "tmp"))
    outcome = faulted(*fault[:2], ["apply", "testuser/tiny", gain, root / "out"], root, mkdir=["tmp"], env=env)
    if ok_or_clean(outcome, fault, leaves=HF_CACHE):
        published_like_base(outcome, "out", base)
    assert not [k for k in outcome.after if k.startswith("tmp/")]  # the staging folder is always removed


@faults(("fsize", 16 * KiB, "fails"), ("tmpfs", 32 * KiB, "fails"), ("tmpfs", 64 * KiB, None),
        ("tmpfs", 8 << 20, "works"))
def test_hub_to_hub_staging(inputs, untouched, root, fault, hub):
    """apply ORG/BASE G --push ORG/NEW without OUT: the work folder (and $TMPDIR) on the small disk."""
    _, base, gain = inputs
    hub.add_repo("testuser/tiny", local_files(base))
    env = cli_env(TMPDIR=str(root / "tmp"))
    outcome = faulted(*fault[:2], ["apply", "testuser/tiny", gain, "--push", "testuser/new", "--work-dir",
                                   root / "work"], root, mkdir=["tmp", "work"], env=env)
    # A failed run keeps its journal (which shards are up) for the rerun; nothing else.
    if ok_or_clean(outcome, fault, leaves=r"work/gainsurgery-push-[0-9a-f]+(/\.lock|/state\.json)?"):
        assert set(local_files(base)) <= set(hub.repos["testuser/new"].files_at("main"))
        assert not [k for k in outcome.after if k.startswith(("work/", "tmp/"))]
    else:
        assert our_commits(hub) == []


# --------------------------------------------------------------------------- export-peft


@faults(("fsize", 0, "fails"), ("tmpfs", 4 * KiB, "fails"), ("tmpfs", 8 << 20, "works"))
def test_export_peft(inputs, untouched, root, fault):
    _, base, gain = inputs
    outcome = faulted(*fault[:2], ["export-peft", gain, root / "adapter", "--base", base], root)
    if ok_or_clean(outcome, fault):
        assert {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"} <= set(outcome.after)


# --------------------------------------------------------------------------- training


TRAIN = ["--steps", "6", "--batch-size", "2", "--seq-len", "32", "--no-progress"]
# A failed training run keeps its log (the steps it made; --resume continues from it) and the
# checkpoints it completed, each whole; never a half-written one, a temp, or -o.
TRAIN_LEAVES = r"g\.train\.jsonl|ckpt|ckpt/\.lock|ckpt/step-\d{8}(/state\.json|/state\.safetensors)?"


@faults(("fsize", 0, "fails"), ("fsize", 4 * KiB, "fails"), ("tmpfs", 16 * KiB, "fails"),
        ("tmpfs", 24 * KiB, "fails"), ("tmpfs", 8 << 20, "works"))
def test_train_with_checkpoints(inputs, untouched, root, fault):
    """Checkpoints at steps 2 and 4: the limit strikes the log, the first checkpoint or the second."""
    _, base, _ = inputs
    data = inputs[0] / "data.txt"
    outcome = faulted(*fault[:2], ["train", base, "--data", data, "-o", root / "g.safetensors", *TRAIN,
                                   "--save-every", "2", "--checkpoint-dir", root / "ckpt"], root)
    if ok_or_clean(outcome, fault, leaves=TRAIN_LEAVES):
        assert {"g.safetensors", "ckpt/step-00000004/state.safetensors"} <= set(outcome.after)
        return
    kept = {k.split("/")[1] for k in outcome.after if k.startswith("ckpt/step-")}
    for step in kept:  # only whole checkpoints: each was renamed into place complete
        assert {f"ckpt/{step}/state.json", f"ckpt/{step}/state.safetensors"} <= set(outcome.after)
        assert outcome.after[f"ckpt/{step}/state.safetensors"][1] > 0
    if fault[:2] == ("tmpfs", 24 * KiB):  # room for one checkpoint, not two
        assert kept == {"step-00000002"} and "checkpoint of step 4" in outcome.lines[0]
        assert "--resume continues from the last one" in outcome.lines[0]
    if not kept:
        assert "ckpt" not in new_entries(outcome)  # a folder this run made, left empty, goes too


@faults(("fsize", 30 * KiB, "fails"), ("tmpfs", 48 * KiB, "fails"), ("tmpfs", 8 << 20, "works"))
def test_train_an_adapter_folder(inputs, untouched, root, fault):
    _, base, _ = inputs
    data = inputs[0] / "data.txt"
    outcome = faulted(*fault[:2], ["train", base, "--data", data, "-o", root / "lora", "--method", "lora", *TRAIN],
                      root)
    if ok_or_clean(outcome, fault, leaves=r"lora\.train\.jsonl"):
        assert {"lora/adapter_model.safetensors", "lora/adapter_config.json"} <= set(outcome.after)


# --------------------------------------------------------------------------- the other files commands write


@pytest.mark.parametrize("limit", [0, 1 * KiB])
@pytest.mark.parametrize("command", ["stack", "invert", "targets --init", "inspect --plot"])
def test_single_file_outputs(inputs, untouched, tmp_path, command, limit):
    """Written whole or not at all (atomic_file): the temp goes even when closing it fails again."""
    _, base, gain = inputs
    out = tmp_path / "o" / "out.file"
    out.parent.mkdir()
    args = {"stack": ["stack", gain, gain, "-o", out], "invert": ["invert", gain, "-o", out],
            "targets --init": ["targets", base, "--init", "ones", "-o", out],
            "inspect --plot": ["inspect", gain, "--plot", out]}[command]
    if command == "inspect --plot":  # matplotlib's font cache (in this test's own MPLCONFIGDIR) is made first:
        subprocess.run([sys.executable, "-c", "import matplotlib.font_manager"], check=True, env=cli_env())
    outcome = run_limited(args, limit)  # else matplotlib says, before our error, that it could not save it
    assert outcome.rc == 1 and len(outcome.lines) == 1 and "Traceback" not in outcome.stderr, outcome.stderr
    assert outcome.lines[0].startswith("error: file too large: ")
    assert tree(out.parent) == {}
