"""`gainsurgery apply BASE G --push REPO` without OUT: the Hub-to-Hub pipeline, end to end.

The real huggingface_hub client (classic LFS: conftest sets HF_HUB_DISABLE_XET, and the
loopback Hub speaks no Xet) talks to the loopback Hub of tests/hubserver.py; nothing of
ours is mocked. The result must be what `apply OUT` + `push` publish, nothing may be
committed after a failure, a killed run must resume without uploading a shard twice,
and the work folder must stay within its budget.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import random_gain
from test_hub import assert_clean_failure, local_files, our_commits, remote_files

# huggingface_hub's own LFS PUT passes `data=<file>` to httpx2, which warns; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

GENERATED = ("gainsurgery.json", "README.md")  # hold times and paths: compared apart


def without_generated(files: dict[str, bytes]) -> dict[str, bytes]:
    return {k: v for k, v in files.items() if k not in GENERATED}


def shard_names(files) -> list[str]:
    return sorted(p for p in files if p.endswith(".safetensors"))


def folder_bytes(folder: Path) -> int:
    total = 0
    for here, _, files in os.walk(folder):
        for f in files:
            try:
                total += os.lstat(os.path.join(here, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


class DiskSampler:
    """Samples the bytes allocated under a folder every few milliseconds, in a thread."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.peak, self.samples = folder, 0, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, folder_bytes(self.folder))
            self.samples += 1
            self.stop.wait(0.002)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


@pytest.fixture
def base(tiny_ckpt):
    return tiny_ckpt("llama", "bfloat16")


@pytest.fixture
def gain_file(base, tmp_path):
    g = random_gain(base, "gain-ffn", seed=3)
    g.metadata["base_model"] = "testuser/tiny-llama"
    return g.save(tmp_path / "legal.safetensors")


@pytest.fixture
def hub_base(hub, base):
    hub.add_repo("testuser/tiny-llama", local_files(base))
    return "testuser/tiny-llama"


@pytest.fixture
def work(tmp_path):
    w = tmp_path / "work"
    w.mkdir()
    return w


@pytest.fixture(scope="module")
def big_base(tmp_path_factory):
    """Six shards of about 1 MB: big enough for a budget, a disk sampler and Range tests to mean something."""
    from models import synthetic_llama

    return synthetic_llama(tmp_path_factory.mktemp("big") / "base", layers=4, hidden=256, inter=512,
                           shard_bytes=1_300_000)


@pytest.fixture
def big_gain(big_base, tmp_path):
    return random_gain(big_base, "gain-ffn", seed=5).save(tmp_path / "big-gain.safetensors")


def reference(hub, base_id, gain, tmp_path, cli) -> dict[str, bytes]:
    """What `apply OUT` + `push` publish, for comparison."""
    out = tmp_path / "reference"
    res = cli("apply", base_id, gain, out, "--push", "testuser/reference")
    assert res.exit_code == 0, res.stderr
    return remote_files(hub, "testuser/reference")


def lfs_puts(hub) -> list[str]:
    return [r.path.rsplit("/", 1)[-1] for r in hub.requests if r.method == "PUT" and r.path.startswith("/_lfs/upload/")]


# --------------------------------------------------------------------------- the result


def test_streamed_repo_equals_apply_then_push(hub, hub_base, gain_file, cli, tmp_path, work):
    res = cli("apply", hub_base, gain_file, "--push", "testuser/streamed", "--work-dir", work, "--json")
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.stdout)
    assert list(work.iterdir()) == []  # the work folder is gone
    assert not list(hub.cache_dir.rglob("model-*.safetensors"))  # no shard went through the HF cache
    ref = reference(hub, hub_base, gain_file, tmp_path, cli)
    streamed = remote_files(hub, "testuser/streamed")
    assert set(streamed) == set(ref)  # same file list
    assert without_generated(streamed) == without_generated(ref)  # same bytes, same index, same config
    assert streamed["model.safetensors.index.json"] == ref["model.safetensors.index.json"]
    prov = json.loads(streamed["gainsurgery.json"])
    assert prov["base"]["hub"] == hub_base and prov["base"]["commit"] == hub.repos[hub_base].head.sha
    assert {n: e["sha256"] for n, e in prov["shards"].items()} == {n: hub.repos["testuser/streamed"].oids[n]
                                                                    for n in shard_names(streamed)}
    assert json.loads(ref["gainsurgery.json"])["shards"] == prov["shards"]
    card = streamed["README.md"].decode()
    assert 'base_model: "testuser/tiny-llama"' in card and 'base_model_relation: "merge"' in card
    assert info["out"] is None and info["verified"] is True and info["resumed"] == []
    assert info["pushed"]["repo_id"] == "testuser/streamed"
    assert [c.message for c in our_commits(hub) if c.repo_id == "testuser/streamed"] == [
        "Upload testuser/tiny-llama (gainsurgery apply)"]
    assert {p for p in hub.repos["testuser/streamed"].lfs_paths} == set(shard_names(streamed))


def test_every_shard_uploaded_once_with_the_hash_computed_while_writing(hub, hub_base, gain_file, cli, work):
    res = cli("apply", hub_base, gain_file, "--push", "testuser/streamed", "--work-dir", work, "--json")
    assert res.exit_code == 0, res.stderr
    oids = hub.repos["testuser/streamed"].oids
    shards = shard_names(oids)
    assert sorted(lfs_puts(hub)) == sorted(oids[s] for s in shards)
    assert json.loads(res.stdout)["shards"] == {s: oids[s] for s in shards}
    # one batch request per shard (the upload), each naming the oid we computed while writing
    batches = [r for r in hub.requests if r.path.endswith("/info/lfs/objects/batch")]
    assert len(batches) == len(shards)


def test_local_base_streams_without_download(hub, base, gain_file, cli, tmp_path, work):
    res = cli("apply", base, gain_file, "--push", "testuser/from-local", "--work-dir", work, "--json")
    assert res.exit_code == 0, res.stderr
    out = tmp_path / "merged"
    assert cli("apply", base, gain_file, out).exit_code == 0
    streamed = remote_files(hub, "testuser/from-local")
    assert without_generated(streamed) == without_generated(local_files(out))
    assert not [r for r in hub.requests if r.method == "GET" and "/_lfs/" in r.path]
    assert json.loads(res.stdout)["peak_disk_bytes"] <= 2 * max(p.stat().st_size for p in base.glob("*.safetensors"))


def test_revision_pr_private_and_message(hub, hub_base, gain_file, cli, work):
    res = cli("apply", hub_base, gain_file, "--push", "testuser/s", "--work-dir", work, "--private",
              "--revision", "dev", "--commit-message", "merged on dev")
    assert res.exit_code == 0, res.stderr
    repo = hub.repos["testuser/s"]
    assert repo.private and "config.json" not in repo.files
    assert "model.safetensors.index.json" in remote_files(hub, "testuser/s", "dev")
    assert our_commits(hub)[-1].message == "merged on dev" and our_commits(hub)[-1].ref == "dev"
    res = cli("apply", hub_base, gain_file, "--push", "testuser/s", "--work-dir", work, "--create-pr", "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["pushed"]["pr_url"] == f"{hub.endpoint}/testuser/s/discussions/1"
    assert "config.json" in remote_files(hub, "testuser/s", "refs/pr/1")
    assert "config.json" not in repo.files


def test_dry_run_reads_headers_only_and_prints_bytes_and_disk(hub, hub_base, gain_file, base, cli, work):
    res = cli("apply", hub_base, gain_file, "--push", "testuser/x", "--work-dir", work, "--dry-run", "--json")
    assert res.exit_code == 0, res.stderr
    plan = json.loads(res.stdout)
    sizes = [p.stat().st_size for p in sorted(base.glob("*.safetensors"))]
    t = plan["transfer"]
    assert t["shards"] == len(sizes) and t["download_bytes"] == sum(sizes) == t["upload_bytes"]
    assert t["peak_disk_bytes"] == 3 * max(sizes) and t["upload_path"] == "lfs"
    assert t["small_files_bytes"] == sum((base / n).stat().st_size for n in
                                         ("config.json", "generation_config.json", "model.safetensors.index.json"))
    assert "testuser/x" not in hub.repos and list(work.iterdir()) == []
    shard_gets = [r for r in hub.requests if r.method == "GET" and r.path.startswith("/_lfs/")]
    assert shard_gets and all(r.headers.get("range", "").startswith("bytes=0-") for r in shard_gets)
    text = cli("apply", hub_base, gain_file, "--push", "testuser/x", "--work-dir", work, "--dry-run").output
    assert "peak disk:" in text and "download:" in text and "through LFS" in text and "nothing written" in text


def test_without_out_needs_push(hub, gain_file, base, cli):
    res = cli("apply", base, gain_file)
    assert res.exit_code == 2 and "OUT" in res.output


# --------------------------------------------------------------------------- failures


def test_failed_upload_commits_nothing(hub, hub_base, gain_file, cli, work):
    hub.fail_next(status=403, path_contains="/_lfs/upload/", times=None)
    res = cli("apply", hub_base, gain_file, "--push", "testuser/out", "--work-dir", work)
    assert_clean_failure(res, None, "403")
    assert our_commits(hub) == [] and remote_files(hub, "testuser/out") == {}
    leftovers = [p.name for d in work.iterdir() for p in d.iterdir()]
    assert set(leftovers) <= {".lock", "state.json"}  # no shard left behind


def test_failed_download_commits_nothing(hub, hub_base, gain_file, cli, work):
    oid = hub.repos[hub_base].oids["model-00002-of-00003.safetensors"]
    hub.fail_next(status=404, path_contains=f"/_lfs/{oid}", method="GET", times=None)
    res = cli("apply", hub_base, gain_file, "--push", "testuser/out", "--work-dir", work)
    assert_clean_failure(res, None, "404")
    assert our_commits(hub) == [] and remote_files(hub, "testuser/out") == {}
    assert set(p.name for d in work.iterdir() for p in d.iterdir()) <= {".lock", "state.json"}


def test_corrupt_download_is_refused(hub, hub_base, gain_file, cli, work):
    """The Hub lists a sha256 for each LFS shard: a download that does not match it stops the run."""
    name = "model-00002-of-00003.safetensors"
    stored = hub.lfs_objects[hub.repos[hub_base].oids[name]]
    data = bytearray(stored.data)
    data[-1] ^= 1  # the bytes served change; the listed sha256 does not
    stored.data_ = bytes(data)
    res = cli("apply", hub_base, gain_file, "--push", "testuser/out", "--work-dir", work)
    assert_clean_failure(res, None, "sha256")
    assert name in res.stderr and our_commits(hub) == []


def test_upload_cut_half_way_is_retried(hub, hub_base, gain_file, cli, work):
    hub.fail_next(path_contains="/_lfs/upload/", method="PUT", cut_body_after=4096, times=1)
    res = cli("apply", hub_base, gain_file, "--push", "testuser/out", "--work-dir", work)
    assert res.exit_code == 0, res.stderr
    oids = hub.repos["testuser/out"].oids
    assert all(hub.lfs_uploads[oids[s]] == 1 for s in shard_names(oids))
    assert len(lfs_puts(hub)) == len(shard_names(oids)) + 1  # the cut one, then the retry


def test_download_cut_half_way_resumes(hub, big_base, big_gain, cli, work):
    hub.add_repo("testuser/big", local_files(big_base))
    hub.fail_next(path_contains="/_lfs/", method="GET", truncate_after=200_000, times=1, ranged=False)
    n = len(hub.requests)
    res = cli("apply", "testuser/big", big_gain, "--push", "testuser/out", "--work-dir", work)
    assert res.exit_code == 0, res.stderr
    ranges = [r.headers.get("range") for r in hub.requests[n:] if r.method == "GET" and "/_lfs/" in r.path]
    assert "bytes=200000-" in ranges, str(ranges)  # resumed where the cut left it


def test_second_run_of_the_same_push_waits_its_turn(hub, hub_base, gain_file, work):
    from gainsurgery import api
    from gainsurgery.applying import hub_sink as hp
    from gainsurgery.io.workdir import WorkFolder
    from gainsurgery.hub.client import HubClient
    from gainsurgery.hub.publish import HubPublisher
    from gainsurgery.errors import OutputError

    client = HubClient.from_env()
    name = hp.work_folder_name(HubPublisher(client, "testuser/out"), client.endpoint, hub_base, [str(gain_file)])
    held = WorkFolder.claim(work, name)
    try:
        with pytest.raises(OutputError, match="another gainsurgery run is doing the same push to testuser/out"):
            api.apply(hub_base, [gain_file], push_to="testuser/out", work_dir=work, hub=client)
    finally:
        held.release()
    assert "testuser/out" not in hub.repos


def test_work_folder_that_is_a_link_is_refused(hub, hub_base, gain_file, cli, work, tmp_path):
    from gainsurgery.hub.client import HubClient
    from gainsurgery.hub.publish import HubPublisher
    from gainsurgery.applying import hub_sink as hp

    client = HubClient.from_env()
    name = hp.work_folder_name(HubPublisher(client, "testuser/out"), client.endpoint, hub_base, [str(gain_file)])
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    (work / name).symlink_to(victim)
    res = cli("apply", hub_base, gain_file, "--push", "testuser/out", "--work-dir", work)
    assert_clean_failure(res, None, "is a symbolic link")  # checked like OUT before anything else
    assert (victim / "precious.txt").read_text() == "keep me" and "testuser/out" not in hub.repos


# --------------------------------------------------------------------------- resume


def run_cli_process(args: list[str]) -> subprocess.Popen:
    code = "import sys; from gainsurgery.cli import main; sys.argv[0] = 'gainsurgery'; main()"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("kill_at", ["first", "middle", "last"])
def test_killed_run_resumes_without_uploading_a_shard_twice(hub, big_base, big_gain, cli, work, tmp_path, kill_at):
    """SIGKILL right as the k-th shard reaches the Hub; the rerun skips what the Hub stores.

    (A shard no gain touches is identical to the base's: the Hub has it already, so it
    is never sent at all.)
    """
    hub.add_repo("testuser/big", local_files(big_base))
    base_oids = hub.repos["testuser/big"].oids
    changed = sum(1 for s in shard_names(base_oids) if any(
        op for op in json.loads((big_base / "model.safetensors.index.json").read_text())["weight_map"].items()
        if op[1] == s and (".o_proj." in op[0] or ".down_proj." in op[0])))
    kill_after = {"first": 1, "middle": changed // 2 + 1, "last": changed}[kill_at]
    args = ["apply", "testuser/big", big_gain, "--push", "testuser/out", "--work-dir", work]
    proc = run_cli_process(args)
    stored = []

    def kill(oid):
        stored.append(oid)
        if len(stored) == kill_after:
            os.kill(proc.pid, signal.SIGKILL)

    hub.on_lfs_stored = kill
    proc.communicate(timeout=120)
    hub.on_lfs_stored = None
    assert proc.returncode == -signal.SIGKILL
    assert our_commits(hub) == [] and len(stored) == kill_after
    leftovers = {p.name for d in work.iterdir() for p in d.iterdir()}
    assert ".lock" in leftovers  # the dead run's folder is there, with whatever it was doing

    n = len(hub.requests)
    res = cli(*args, "--json")
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.stdout)
    oids = hub.repos["testuser/out"].oids
    shards = shard_names(oids)
    assert len(shards) == 6
    assert all(hub.lfs_uploads[oids[s]] <= 1 for s in shards)  # no shard uploaded twice
    assert sum(hub.lfs_uploads[oids[s]] for s in shards) == changed  # every changed shard once
    assert not set(lfs_puts_since(hub, n)) & set(stored)  # nothing the Hub had was sent again
    # the journal let the rerun skip the shards the killed run had finished: nothing downloaded for them
    assert len(info["resumed"]) >= kill_after - 1
    resumed_oids = {base_oids[s] for s in info["resumed"]}
    assert not [r for r in hub.requests[n:] if r.method == "GET" and r.path.rsplit("/", 1)[-1] in resumed_oids
                and "range" not in r.headers]
    assert list(work.iterdir()) == []  # leftovers and journal gone
    ref = reference(hub, "testuser/big", big_gain, tmp_path, cli)
    assert without_generated(remote_files(hub, "testuser/out")) == without_generated(ref)


def lfs_puts_since(hub, n: int) -> list[str]:
    return [r.path.rsplit("/", 1)[-1] for r in hub.requests[n:] if r.method == "PUT"
            and r.path.startswith("/_lfs/upload/")]


def test_rerun_on_a_fresh_machine_sends_nothing_the_hub_has(hub, hub_base, gain_file, cli, tmp_path):
    """No journal (another runner): every shard is made again, but the LFS batch answer stops the uploads."""
    first, second = tmp_path / "w1", tmp_path / "w2"
    first.mkdir(), second.mkdir()
    hub.fail_next(status=403, path_contains="/commit/", method="POST", times=1)
    res = cli("apply", hub_base, gain_file, "--push", "testuser/out", "--work-dir", first)
    assert_clean_failure(res, None, "403")  # every shard uploaded, the commit refused
    uploaded = set(lfs_puts(hub))
    n = len(hub.requests)
    res = cli("apply", hub_base, gain_file, "--push", "testuser/out", "--work-dir", second, "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["resumed"] == [] and lfs_puts_since(hub, n) == []
    assert set(shard_names(hub.repos["testuser/out"].oids)) and uploaded == {
        hub.repos["testuser/out"].oids[s] for s in shard_names(hub.repos["testuser/out"].oids)}


# --------------------------------------------------------------------------- bounds


def test_peak_disk_stays_within_three_shards(hub, big_base, big_gain, cli, work):
    hub.add_repo("testuser/big", local_files(big_base))
    hub.down.rate = hub.up.rate = 20e6  # 20 MB/s each way: stages overlap for real
    largest = max(p.stat().st_size for p in big_base.glob("*.safetensors"))
    with DiskSampler(work) as sampler:
        res = cli("apply", "testuser/big", big_gain, "--push", "testuser/out", "--work-dir", work, "--json")
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.stdout)
    assert sampler.samples > 50
    assert 2 * largest <= info["peak_disk_bytes"] <= 3 * largest  # the budget's own count
    assert sampler.peak <= 3 * largest + 64 * 1024  # what the disk held (plus the journal, the lock)
    assert sampler.peak >= largest  # the sampler did see shards


def test_headers_behind_a_proxy_that_ignores_range(hub, big_base, big_gain, cli, work):
    """A server that answers Range with the whole file: we read the header and hang up."""
    hub.add_repo("testuser/big", local_files(big_base))
    hub.ignore_range = True
    hub.down.rate = 20e6  # slow enough that hanging up shows in the bytes sent,
    hub.piece_bytes = 64 * 1024  # in pieces small enough that socket buffers do not swallow a shard
    sizes = {hub.repos["testuser/big"].oids[p.name]: p.stat().st_size for p in big_base.glob("*.safetensors")}
    res = cli("apply", "testuser/big", big_gain, "--work-dir", work, "--push", "testuser/x", "--dry-run")
    assert res.exit_code == 0, res.stderr
    gets = [r for r in hub.requests if r.method == "GET" and r.path.rsplit("/", 1)[-1] in sizes]
    assert len(gets) == len(sizes)
    for r in gets:  # the server meant to send the whole shard; the client stopped it early
        assert r.sent < sizes[r.path.rsplit("/", 1)[-1]]
    # and the full pipeline works there too
    res = cli("apply", "testuser/big", big_gain, "--push", "testuser/out", "--work-dir", work)
    assert res.exit_code == 0, res.stderr


def test_resume_after_a_cut_when_range_is_ignored(hub, big_base, big_gain, cli, work, tmp_path):
    hub.add_repo("testuser/big", local_files(big_base))
    hub.ignore_range = True
    hub.fail_next(path_contains="/_lfs/", method="GET", truncate_after=200_000, times=1, ranged=False)
    res = cli("apply", "testuser/big", big_gain, "--push", "testuser/out", "--work-dir", work)
    assert res.exit_code == 0, res.stderr
    hub.ignore_range = False
    ref = reference(hub, "testuser/big", big_gain, tmp_path, cli)
    assert without_generated(remote_files(hub, "testuser/out")) == without_generated(ref)


# --------------------------------------------------------------------------- what huggingface_hub lets us pass


def test_lfs_path_uses_our_sha256_without_hashing_again(hub, tmp_path):
    """The batch request names the sha256 we give, not one huggingface_hub computed: with a wrong
    one, the object is announced under it and the upload is refused by the Hub's own check."""
    from gainsurgery.errors import HubError
    from gainsurgery.hub.client import HubClient
    from gainsurgery.hub.internals import is_uploaded
    from gainsurgery.hub.transfer import preupload_file

    client = HubClient.from_env()
    client.api.create_repo("testuser/x")
    f = tmp_path / "model.safetensors"
    f.write_bytes(os.urandom(300_000))
    wrong = "ab" * 32
    with pytest.raises(HubError, match="400"):
        preupload_file(client, "testuser/x", f, "model.safetensors", wrong)
    batch = [r for r in hub.requests if r.path.endswith("/info/lfs/objects/batch")]
    assert len(batch) == 1 and lfs_puts(hub)[0] == wrong
    import hashlib

    right = hashlib.sha256(f.read_bytes()).hexdigest()
    op = preupload_file(client, "testuser/x", f, "model.safetensors", right)
    assert op.upload_info.sha256.hex() == right and is_uploaded(op) and hub.lfs_uploads[right] == 1


def test_xet_path_hands_hf_xet_our_sha256(hub, tmp_path):
    """Xet cannot be served here (no CAS server); this runs huggingface_hub's real Xet upload code with
    a recording stand-in for the hf_xet session, to show what reaches hf_xet: the path and our sha256
    (not hf_xet.COMPUTE_SHA256), so hf_xet does not hash the file a second time."""
    import types

    from gainsurgery.hub.client import HubClient
    from gainsurgery.hub.internals import upload_transport, xet_uploads
    from gainsurgery.hub.transfer import preupload_file

    calls = []

    class Commit:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def start_upload_file(self, path, sha256):
            calls.append((path, sha256))
            return types.SimpleNamespace(result=lambda: types.SimpleNamespace(
                xet_info=types.SimpleNamespace(sha256=sha256)))

    class Session:
        def new_upload_commit(self, **kwargs):
            return Commit()

    client = HubClient.from_env()
    client.api.create_repo("testuser/x")
    f = tmp_path / "model.safetensors"
    f.write_bytes(os.urandom(300_000))
    ours = "cd" * 32  # not the file's hash: hf_xet gets it as given, nobody recomputes it
    seen = []
    assert not xet_uploads()  # the suite uploads through LFS (HF_HUB_DISABLE_XET)
    with upload_transport("xet", xet_session=Session):
        assert xet_uploads()
        op = preupload_file(client, "testuser/x", f, "model.safetensors", ours, progress=seen.append)
    assert not xet_uploads()  # the switch is undone
    assert calls == [(str(f), ours)]
    assert op.upload_info.sha256.hex() == ours and seen == [300_000]
    assert not [r for r in hub.requests if r.path.endswith("/info/lfs/objects/batch")]  # Xet skips the LFS batch


def test_xet_state_goes_into_the_work_folder(tmp_path, monkeypatch):
    from gainsurgery.applying.hub_sink import xet_state_in

    monkeypatch.delenv("HF_XET_CACHE", raising=False)
    monkeypatch.delenv("HF_XET_CHUNK_CACHE_SIZE_BYTES", raising=False)
    with xet_state_in(tmp_path):
        assert os.environ["HF_XET_CACHE"] == str(tmp_path / "xet")
        assert os.environ["HF_XET_CHUNK_CACHE_SIZE_BYTES"] == "0"
    assert "HF_XET_CACHE" not in os.environ
    monkeypatch.setenv("HF_XET_CACHE", "/somewhere/else")  # the user's choice wins
    with xet_state_in(tmp_path):
        assert os.environ["HF_XET_CACHE"] == "/somewhere/else"


# --------------------------------------------------------------------------- careless and hostile use


@pytest.mark.parametrize("work_dir, match", [("", "--work-dir is empty"), ("missing", "does not exist"),
                                              ("afile", "is not a folder")])
def test_bad_work_dir(hub, hub_base, gain_file, cli, tmp_path, work_dir, match):
    (tmp_path / "afile").write_text("x")
    arg = str(tmp_path / work_dir) if work_dir else ""
    res = cli("apply", hub_base, gain_file, "--push", "testuser/out", "--work-dir", arg)
    assert_clean_failure(res, None, match)
    assert "testuser/out" not in hub.repos


def test_work_dir_inside_a_local_base_is_refused(hub, base, gain_file, cli, tmp_path):
    import shutil

    mine = tmp_path / "base"
    shutil.copytree(base, mine)
    res = cli("apply", mine, gain_file, "--push", "testuser/out", "--work-dir", mine)
    assert_clean_failure(res, None, "lies inside the input")
    assert sorted(p.name for p in mine.iterdir()) == sorted(p.name for p in base.iterdir())


def test_a_work_dir_that_is_a_link(hub, base, gain_file, cli, tmp_path, work):
    """--work-dir is the user's path: a link to a scratch folder is followed (the work folder goes
    there and is removed); a link into the base (or a gain's folder) is refused like OUT would be."""
    import shutil

    mine = tmp_path / "base"
    shutil.copytree(base, mine)
    (tmp_path / "scratch").symlink_to(work, target_is_directory=True)
    res = cli("apply", mine, gain_file, "--push", "testuser/out", "--work-dir", tmp_path / "scratch")
    assert res.exit_code == 0, res.stderr
    assert list(work.iterdir()) == [] and len(our_commits(hub)) == 1
    (tmp_path / "into-base").symlink_to(mine, target_is_directory=True)
    res = cli("apply", mine, gain_file, "--push", "testuser/out2", "--work-dir", tmp_path / "into-base")
    assert_clean_failure(res, None, f"lies inside the input {mine}")
    assert sorted(p.name for p in mine.iterdir()) == sorted(p.name for p in base.iterdir())
    res = cli("apply", mine, gain_file, "--push", "testuser/out3", "--work-dir", "/proc/self")
    assert_clean_failure(res, None, "cannot write into /proc/")
    assert "testuser/out2" not in hub.repos and "testuser/out3" not in hub.repos


def test_a_small_file_holding_the_token_is_not_published(hub, base, gain_file, cli, tmp_path, work):
    import shutil

    mine = tmp_path / "base"
    shutil.copytree(base, mine)
    (mine / "notes.txt").write_text(f"token: {hub.token}\n")
    res = cli("apply", mine, gain_file, "--push", "testuser/out", "--work-dir", work)
    assert_clean_failure(res, None, "notes.txt contains the value of your Hub token")
    assert hub.token not in res.stderr and our_commits(hub) == []
    assert "testuser/out" not in hub.repos and not list(work.iterdir())  # refused before any work


def test_revision_without_push_is_refused(base, gain_file, cli, tmp_path):
    res = cli("apply", base, gain_file, tmp_path / "out", "--revision", "dev")
    assert_clean_failure(res, tmp_path / "out", "go with --push")


def test_work_dir_with_out_is_refused(hub, base, gain_file, cli, tmp_path, work):
    """A careless --work-dir beside OUT would do nothing: said, not ignored."""
    res = cli("apply", base, gain_file, tmp_path / "out", "--push", "testuser/out", "--work-dir", work)
    assert_clean_failure(res, tmp_path / "out", "--work-dir goes with --push and no OUT")
    assert "testuser/out" not in hub.repos and list(work.iterdir()) == []


def test_pushing_over_the_base_is_refused(hub, hub_base, gain_file, cli, work):
    res = cli("apply", hub_base, gain_file, "--push", hub_base, "--work-dir", work)
    assert_clean_failure(res, None, "over its own base")
    assert our_commits(hub) == []
    res = cli("apply", hub_base, gain_file, "--push", hub_base, "--work-dir", work, "--revision", "merged")
    assert res.exit_code == 0, res.stderr  # another branch of the same repo is fine
    assert "config.json" in remote_files(hub, hub_base, "merged")


def test_single_file_base(hub, tmp_path, work, cli):
    from models import synthetic_llama

    folder = synthetic_llama(tmp_path / "one", layers=2, hidden=128, inter=256, shard_bytes=1 << 30)
    (folder / "model-00001-of-00001.safetensors").rename(folder / "model.safetensors")
    (folder / "model.safetensors.index.json").unlink()
    gain = random_gain(folder, "gain", seed=1).save(tmp_path / "g.safetensors")
    hub.add_repo("testuser/one", local_files(folder))
    res = cli("apply", "testuser/one", gain, "--push", "testuser/out", "--work-dir", work)
    assert res.exit_code == 0, res.stderr
    ref = reference(hub, "testuser/one", gain, tmp_path, cli)
    assert set(remote_files(hub, "testuser/out")) == set(ref) == {"model.safetensors", "config.json",
                                                                  "gainsurgery.json", "README.md"}
    assert without_generated(remote_files(hub, "testuser/out")) == without_generated(ref)


def test_sigterm_mid_run_leaves_nothing(hub, big_base, big_gain, work):
    hub.add_repo("testuser/big", local_files(big_base))
    proc = run_cli_process(["apply", "testuser/big", big_gain, "--push", "testuser/out", "--work-dir", work])
    hub.on_lfs_stored = lambda oid: proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    hub.on_lfs_stored = None
    assert proc.returncode == 143, err
    assert "Traceback" not in err and our_commits(hub) == []
    assert {p.name for d in work.iterdir() for p in d.iterdir()} <= {".lock", "state.json"}


def test_no_room_in_the_work_folder(hub, big_base, big_gain, work):
    """A file size limit stands in for a full disk (on a local base: the Hub base's sparse header
    stand-ins would hit the limit first): one line, nothing committed, nothing left."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, 500_000))

    code = "import sys; from gainsurgery.cli import main; sys.argv[0] = 'gainsurgery'; main()"
    proc = subprocess.run([sys.executable, "-c", code, "apply", str(big_base), str(big_gain), "--push",
                           "testuser/out", "--work-dir", str(work)], capture_output=True, text=True,
                          preexec_fn=limit, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no room left in the work folder"), proc.stderr
    assert "choose another --work-dir; nothing was committed" in lines[0]
    assert our_commits(hub) == []
    assert {p.name for d in work.iterdir() for p in d.iterdir()} <= {".lock", "state.json"}


@pytest.mark.parametrize("journal", [
    b"[" * 100_000 + b"]" * 100_000,  # deeply nested
    b'{"format": "gainsurgery.push-journal/1", "fingerprint": "x", "shards": 1}',
    None,  # filled in below: the right fingerprint, hostile entries
    b"\xff\xfe not json",
    b"{" + b" " * (2 << 20) + b"}",  # bigger than a journal may be
])
def test_a_hostile_journal_is_ignored(hub, hub_base, gain_file, cli, work, journal):
    """A killed run's journal is read as hostile JSON: anything odd is ignored and the run starts over."""
    from gainsurgery.hub.client import HubClient
    from gainsurgery.hub.publish import HubPublisher
    from gainsurgery.applying import hub_sink as hp

    client = HubClient.from_env()
    name = hp.work_folder_name(HubPublisher(client, "testuser/out"), client.endpoint, hub_base, [str(gain_file)])
    folder = work / name
    folder.mkdir(mode=0o700)
    if journal is None:
        journal = json.dumps({"format": "gainsurgery.push-journal/1", "fingerprint": "whatever", "shards": {
            "model-00001-of-00003.safetensors": {"sha256": "zz" * 32, "bytes": 10 ** 30},
            "model-00002-of-00003.safetensors": {"sha256": ["x"], "bytes": -1},
            "../../etc/passwd": {"sha256": "ab" * 32, "bytes": 1}}}).encode()
    (folder / "state.json").write_bytes(journal)
    res = cli("apply", hub_base, gain_file, "--push", "testuser/out", "--work-dir", work, "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["resumed"] == []
    assert list(work.iterdir()) == []


def test_journal_with_the_right_fingerprint_but_odd_entries(hub, hub_base, gain_file, cli, work):
    """Entries are checked one by one: a bad hash, a wrong size, an unknown shard are not resumed."""
    res = cli("apply", hub_base, gain_file, "--push", "testuser/first", "--work-dir", work, "--json")
    assert res.exit_code == 0, res.stderr
    good = json.loads(res.stdout)["shards"]
    from gainsurgery.hub.client import HubClient
    from gainsurgery.hub.publish import HubPublisher
    from gainsurgery.applying import hub_sink as hp
    from gainsurgery.applying import hub_stream
    from gainsurgery.sources import opened_base
    from gainsurgery.applying.gains import load_gains
    from gainsurgery.merge.plan import make_plan

    client = HubClient.from_env()
    name = hp.work_folder_name(HubPublisher(client, "testuser/out"), client.endpoint, hub_base, [str(gain_file)])
    with opened_base(hub_base, client) as opened:
        loaded = load_gains([gain_file])
        plan = make_plan(opened.checkpoint, loaded.gain, loaded.sources)
        fingerprint = hub_stream.output_fingerprint(opened, plan)
    names = sorted(good)
    folder = work / name
    folder.mkdir(mode=0o700)
    (folder / "state.json").write_text(json.dumps({"format": "gainsurgery.push-journal/1", "fingerprint": fingerprint,
                                                   "shards": {names[0]: {"sha256": good[names[0]], "bytes": 1},
                                                              names[1]: {"sha256": "0" * 64, "bytes": 1},
                                                              names[2]: {"sha256": good[names[2]],
                                                                         "bytes": len(b"")}}}))
    res = cli("apply", hub_base, gain_file, "--push", "testuser/out", "--work-dir", work, "--json")
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["resumed"] == []
    assert json.loads(res.stdout)["shards"] == good


# --------------------------------------------------------------------------- the trust rules hold here too


def fingerprinted_gain(base, tmp_path, name="fp.safetensors", fingerprint=None, scale=None):
    """A gain that records the base fingerprint of its targets (or ``fingerprint``), values times ``scale``."""
    from gainsurgery.gainfile import BASE_TENSORS_KEY
    from gainsurgery.io.checkpoint import open_checkpoint
    from gainsurgery.io.fingerprint import base_tensors_sha256

    g = random_gain(base, "gain-ffn", seed=7)
    g.metadata[BASE_TENSORS_KEY] = fingerprint or base_tensors_sha256(open_checkpoint(base), g.vectors)
    if scale is not None:
        for k in g.vectors:
            g.vectors[k] = (g.vectors[k] * scale).astype("float32")
    return g.save(tmp_path / name)


def test_base_fingerprint_and_saturation_are_checked_before_the_commit(hub, hub_base, base, cli, tmp_path, work):
    """What a local apply refuses, the pipeline refuses too: nothing committed; allowed, it is recorded."""
    good = fingerprinted_gain(base, tmp_path)
    res = cli("apply", hub_base, good, "--push", "testuser/good", "--work-dir", work, "--json")
    assert res.exit_code == 0, res.stderr
    provenance = json.loads(remote_files(hub, "testuser/good")["gainsurgery.json"])
    assert "base_not_checked" not in provenance and "base_mismatch_allowed" not in provenance
    card = remote_files(hub, "testuser/good")["README.md"].decode()
    assert 'base_model: "testuser/tiny-llama"' in card  # a Hub base is named
    assert json.loads(res.stdout)["shards"] == {k: v["sha256"] for k, v in provenance["shards"].items()}

    other = fingerprinted_gain(base, tmp_path, "other.safetensors", fingerprint="sha256:" + "0" * 64)
    n = len(our_commits(hub))
    res = cli("apply", hub_base, other, "--push", "testuser/other", "--work-dir", work)
    assert_clean_failure(res, None, "other.safetensors was trained on other weights")
    assert "nothing was committed; pass --allow-base-mismatch" in res.stderr
    assert len(our_commits(hub)) == n and remote_files(hub, "testuser/other") == {}
    assert set(p.name for d in work.iterdir() for p in d.iterdir()) <= {".lock", "state.json"}
    res = cli("apply", hub_base, other, "--push", "testuser/other", "--work-dir", work, "--allow-base-mismatch")
    assert res.exit_code == 0, res.stderr
    assert json.loads(remote_files(hub, "testuser/other")["gainsurgery.json"])["base_mismatch_allowed"] == [
        "other.safetensors"]

    tiny = fingerprinted_gain(base, tmp_path, "tiny.safetensors", scale=1e-38)  # bf16 weights x 1e-38 -> 0
    res = cli("apply", hub_base, tiny, "--push", "testuser/tiny", "--work-dir", work)
    assert_clean_failure(res, None, "became 0")
    assert "--allow-saturation" in res.stderr and remote_files(hub, "testuser/tiny") == {}
    res = cli("apply", hub_base, tiny, "--push", "testuser/tiny", "--work-dir", work, "--allow-saturation")
    assert res.exit_code == 0, res.stderr
    saturated = json.loads(remote_files(hub, "testuser/tiny")["gainsurgery.json"])["saturation_allowed"]
    assert saturated and all(v["became_zero"] > 0 for v in saturated.values())


def test_a_resumed_run_checks_the_fingerprint_from_its_journal(hub, hub_base, base, cli, tmp_path, work):
    """The commit fails once: every shard is uploaded and journaled with its base digests; the rerun
    uploads nothing, yet checks the gain's base fingerprint on every shard (from the journal)."""
    good = fingerprinted_gain(base, tmp_path)
    hub.fail_next(status=500, path_contains="/commit/", method="POST", times=None)
    res = cli("apply", hub_base, good, "--push", "testuser/out", "--work-dir", work)
    assert res.exit_code == 1 and our_commits(hub) == []
    hub.clear_failures()
    (journal,) = work.glob("*/state.json")
    shards = json.loads(journal.read_text())["shards"]
    assert len(shards) == 3 and all(set(e) == {"sha256", "bytes", "tensors", "saturation"} for e in shards.values())
    from gainsurgery.gainfile import load as load_gain

    assert sum(len(e["tensors"]) for e in shards.values()) == len(load_gain(good).vectors)
    res = cli("apply", hub_base, good, "--push", "testuser/out", "--work-dir", work, "--json")
    assert res.exit_code == 0, res.stderr
    assert sorted(json.loads(res.stdout)["resumed"]) == sorted(shards)
    # the same journal with one digest changed: the fingerprint no longer matches, nothing is committed
    hub.fail_next(status=500, path_contains="/commit/", method="POST", times=None)
    res = cli("apply", hub_base, good, "--push", "testuser/again", "--work-dir", work)
    hub.clear_failures()
    (journal,) = work.glob("*/state.json")
    record = json.loads(journal.read_text())
    entry = next(e for e in record["shards"].values() if e["tensors"])
    entry["tensors"][next(iter(entry["tensors"]))]["sha256"] = "1" * 64
    journal.write_text(json.dumps(record))
    n = len(our_commits(hub))
    res = cli("apply", hub_base, good, "--push", "testuser/again", "--work-dir", work)
    assert_clean_failure(res, None, "was trained on other weights")
    assert len(our_commits(hub)) == n


def test_a_local_base_is_never_named_in_the_card(hub, base, gain_file, cli, work):
    res = cli("apply", base, gain_file, "--push", "testuser/local", "--work-dir", work)
    assert res.exit_code == 0, res.stderr
    files = remote_files(hub, "testuser/local")
    assert "base_model:" not in files["README.md"].decode()
    assert str(base) not in files["README.md"].decode() and str(base.parent) not in files["gainsurgery.json"].decode()
    assert hub.commits[-1].message == f"Upload {base.name} (gainsurgery apply)"  # a folder name, never its path


def test_hub_progress_bars_stay_off_until_the_last_thread_is_done():
    """The pipeline talks to the Hub from several threads: one ending its request must not turn
    huggingface_hub's bars back on under another (a stray bar breaks the one-line error)."""
    from huggingface_hub.utils import are_progress_bars_disabled

    from gainsurgery.hub.errors import hub_errors

    if are_progress_bars_disabled():
        pytest.skip("huggingface_hub's bars are off in this environment already")
    download, upload = hub_errors("org/base", "download"), hub_errors("org/new", "upload to")
    download.__enter__()
    upload.__enter__()
    assert are_progress_bars_disabled()
    download.__exit__(None, None, None)
    assert are_progress_bars_disabled()  # the upload is still running
    upload.__exit__(None, None, None)
    assert not are_progress_bars_disabled()


def test_private_files_of_the_work_folder_never_follow_a_link_nor_wait_on_a_fifo(tmp_path):
    from gainsurgery.io.workdir import WorkFolder, open_private

    with WorkFolder.claim(tmp_path, "gainsurgery-push-x") as work:
        assert os.stat(work.path).st_mode & 0o777 == 0o700
        fd = open_private(work.path / "out.safetensors", create=True)
        os.close(fd)
        assert os.stat(work.path / "out.safetensors").st_mode & 0o777 == 0o600
        with pytest.raises(FileExistsError):
            open_private(work.path / "out.safetensors", create=True)
        (tmp_path / "secret").write_text("not yours")
        (work.path / "link").symlink_to(tmp_path / "secret")
        with pytest.raises(OSError):
            open_private(work.path / "link")
        os.mkfifo(work.path / "state.json")
        assert work.read_state() is None  # a FIFO is no state of ours, and is never waited on
        work.write_state({"format": "x"})  # replaces it (atomically) with a plain file
        assert work.read_state() == {"format": "x"}
        assert (tmp_path / "secret").read_text() == "not yours"


def test_no_test_or_product_module_imports_a_private_huggingface_hub_name():
    """huggingface_hub's private names are used in gainsurgery/hub/internals.py only (issue 20, item 4)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    private = re.compile(r"huggingface_hub(\.\w+)*\._\w+|\._is_uploaded\b")
    seam = root / "gainsurgery" / "hub" / "internals.py"
    offenders = []
    for path in [*root.joinpath("gainsurgery").rglob("*.py"), *root.joinpath("gainsurgery_lab").rglob("*.py"),
                 *root.joinpath("tests").glob("*.py"), *root.joinpath("scripts").glob("*.py")]:
        if path == seam or path == Path(__file__).resolve():
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if private.search(line):
                offenders.append(f"{path.relative_to(root)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
    assert private.search(seam.read_text(encoding="utf-8"))  # the seam is where they are
