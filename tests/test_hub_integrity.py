"""Every byte taken from the Hub is checked against the hash the Hub lists (issue 18, item 3f).

The loopback Hub serves a tampered byte (``fail_next(..., corrupt_at=N)``: a bad
mirror or proxy; the tree listing still names the right sha256), or the HF cache
holds a corrupt copy. On every path that reads Hub bytes (a Hub base applied into a
local OUT, ``verify`` of a Hub base, the Hub-to-Hub pipeline, the index and small
files, a Hub gain file) the run stops with one line and nothing is written, or, for
a corrupt cached copy, the copy is replaced by a fresh, checked download.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import pytest

from conftest import fingerprinted
from test_hub import assert_clean_failure, local_files, our_commits, weights_and_config

# huggingface_hub's own LFS PUT passes `data=<file>` to httpx2, which warns; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

REPO = "testuser/tiny-llama"
SHARD = "model-00002-of-00003.safetensors"


@pytest.fixture
def base(tiny_ckpt):
    return tiny_ckpt("llama", "bfloat16")


@pytest.fixture
def gain_file(base, tmp_path):
    return fingerprinted(base, "gain-ffn", seed=3, base_model=REPO).save(tmp_path / "legal.safetensors")


@pytest.fixture
def hub_base(hub, base):
    hub.add_repo(REPO, local_files(base))
    return REPO


def tamper(hub, name: str, times: int | None = None, repo: str = REPO) -> str:
    """Serve ``name`` of ``repo`` with its last byte flipped (whole-file GETs; header probes stay clean)."""
    head = hub.repos[repo].head
    stored = head.snapshot[name]
    # LFS files are served by the "CDN" a resolve redirects to; other files by the resolve route itself.
    where = f"/_lfs/{stored.sha256}" if stored.lfs else f"/{repo}/resolve/{head.sha}/{name}"
    hub.fail_next(None, path_contains=where, method="GET", times=times, ranged=False, corrupt_at=stored.size - 1)
    return stored.sha256


def cached_blob(hub, oid: str, repo: str = REPO) -> Path:
    return hub.cache_dir / f"models--{repo.replace('/', '--')}" / "blobs" / oid


def nothing_beside(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")] == []


def test_the_loopback_hub_can_serve_a_tampered_byte(hub, hub_base):
    stored = hub.repos[REPO].head.snapshot[SHARD]
    url = f"{hub.endpoint}/_lfs/{stored.sha256}"
    hub.fail_next(None, path_contains=stored.sha256, method="GET", times=2, corrupt_at=stored.size - 1)
    body = urllib.request.urlopen(url).read()
    assert len(body) == stored.size and body[:-1] == stored.data[:-1] and body[-1] == stored.data[-1] ^ 1
    ranged = urllib.request.urlopen(urllib.request.Request(url, headers={"Range": f"bytes={stored.size - 4}-"}))
    assert ranged.read() == stored.data[-4:-1] + bytes([stored.data[-1] ^ 1])
    assert urllib.request.urlopen(url).read() == stored.data  # the injection was used up


# --------------------------------------------------------------------------- a Hub base into a local OUT


def test_a_tampered_shard_is_refused_when_applied_into_a_local_out(hub, hub_base, gain_file, cli, tmp_path):
    oid = tamper(hub, SHARD)
    out = tmp_path / "out"
    res = cli("apply", hub_base, gain_file, out)
    assert_clean_failure(res, out, SHARD)
    assert "its sha256 is" in res.stderr and f"the Hub lists {oid}" in res.stderr
    assert "the bad copy was removed from the HF cache" in res.stderr
    nothing_beside(out)
    assert not cached_blob(hub, oid).exists()  # never left in the cache under the name of what it is not


def test_one_bad_download_is_replaced_by_a_fresh_checked_one(hub, hub_base, gain_file, cli, tmp_path, base):
    oid = tamper(hub, SHARD, times=1)
    res = cli("apply", hub_base, gain_file, tmp_path / "out")
    assert res.exit_code == 0, res.stderr
    gets = [r for r in hub.requests if r.method == "GET" and r.path == f"/_lfs/{oid}" and "range" not in r.headers]
    assert len(gets) == 2  # the tampered one, then a fresh one
    assert cached_blob(hub, oid).read_bytes() == (base / SHARD).read_bytes()
    assert cli("verify", base, gain_file, tmp_path / "out").exit_code == 0


def test_a_corrupt_cached_shard_is_caught_when_first_used(hub, hub_base, gain_file, cli, tmp_path, base):
    assert cli("apply", hub_base, gain_file, tmp_path / "first").exit_code == 0
    oid = hub.repos[REPO].head.snapshot[SHARD].sha256
    blob = cached_blob(hub, oid)
    raw = bytearray(blob.read_bytes())
    raw[-1] ^= 1  # the disk (or someone) changed the cached copy
    blob.write_bytes(bytes(raw))
    res = cli("apply", hub_base, gain_file, tmp_path / "second")
    assert res.exit_code == 0, res.stderr
    assert weights_and_config(tmp_path / "second") == weights_and_config(tmp_path / "first")
    assert blob.read_bytes() == (base / SHARD).read_bytes()  # repaired by a checked download
    # Corrupt in the cache and on the Hub: refused, and the bad copy is not kept.
    blob.write_bytes(bytes(raw))
    tamper(hub, SHARD)
    out = tmp_path / "third"
    assert_clean_failure(cli("apply", hub_base, gain_file, out), out, "its sha256 is")
    nothing_beside(out)
    assert not blob.exists()


def test_verify_refuses_a_tampered_hub_base(hub, hub_base, gain_file, cli, tmp_path):
    assert cli("apply", hub_base, gain_file, tmp_path / "merged").exit_code == 0
    for p in (hub.cache_dir).rglob("*"):  # a fresh cache: verify downloads again
        if p.is_symlink() or p.is_file():
            p.unlink()
    tamper(hub, SHARD)
    res = cli("verify", hub_base, gain_file, tmp_path / "merged")
    assert res.exit_code == 1 and "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "its sha256 is" in lines[0]


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_a_tampered_small_file_is_refused_on_both_paths(hub, hub_base, gain_file, cli, tmp_path, name):
    """Files not in LFS are checked against their git blob id, before they are parsed or copied."""
    assert not hub.repos[REPO].head.snapshot[name].lfs
    tamper(hub, name)
    out = tmp_path / "out"
    res = cli("apply", hub_base, gain_file, out)
    assert_clean_failure(res, out, "its git blob sha1 is")
    assert f":{name}:" in res.stderr
    nothing_beside(out)
    work = tmp_path / "work"
    work.mkdir()
    res = cli("apply", hub_base, gain_file, "--push", "testuser/out", "--work-dir", work)
    assert_clean_failure(res, None, "its git blob sha1 is")
    assert our_commits(hub) == [] and "testuser/out" not in hub.repos
    assert list(work.iterdir()) == []


def test_a_tampered_hub_gain_file_is_refused(hub, base, gain_file, cli, tmp_path):
    hub.add_repo("testuser/legal-gain", {"gains/legal.safetensors": gain_file.read_bytes()})
    oid = tamper(hub, "gains/legal.safetensors", repo="testuser/legal-gain")
    out = tmp_path / "out"
    res = cli("apply", base, "testuser/legal-gain:gains/legal.safetensors", out)
    assert_clean_failure(res, out, "gains/legal.safetensors")
    assert f"the Hub lists {oid}" in res.stderr
    nothing_beside(out)
    hub.clear_failures()
    res = cli("apply", base, "testuser/legal-gain:gains/legal.safetensors", out)
    assert res.exit_code == 0, res.stderr


def test_a_hub_to_hub_push_refuses_a_tampered_shard(hub, hub_base, gain_file, cli, tmp_path):
    tamper(hub, SHARD)
    work = tmp_path / "work"
    work.mkdir()
    res = cli("apply", hub_base, gain_file, "--push", "testuser/out", "--work-dir", work)
    assert_clean_failure(res, None, "sha256")
    assert SHARD in res.stderr and our_commits(hub) == []


def test_a_listing_without_a_hash_is_never_trusted():
    from huggingface_hub.hf_api import RepoFile

    from gainsurgery.hub.integrity import HubFileHash

    plain = RepoFile(path="config.json", size=3, oid="a" * 40)
    lfs = RepoFile(path="m.safetensors", size=9, oid="b" * 40, lfs={"size": 9, "oid": "c" * 64, "pointerSize": 1})
    assert HubFileHash.from_entry(plain) == HubFileHash("config.json", 3, git_sha1="a" * 40)
    assert HubFileHash.from_entry(lfs) == HubFileHash("m.safetensors", 9, sha256="c" * 64)
    assert HubFileHash.from_entry(RepoFile(path="x", size=3, oid="not-hex")) is None
    assert HubFileHash.from_entry(RepoFile(path="x", size=9, oid="b" * 40,
                                           lfs={"size": 9, "oid": "zz", "pointerSize": 1})) is None


# --------------------------------------------------------------------------- a local cache snapshot as BASE


@pytest.fixture
def snapshot(hub, hub_base):
    """The base downloaded into the (test's) HF cache: a snapshot folder of links into blobs/."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(REPO, endpoint=hub.endpoint, token=hub.token, cache_dir=hub.cache_dir))


def corrupt_blob(snapshot: Path, name: str) -> Path:
    blob = Path(os.path.realpath(snapshot / name))
    raw = bytearray(blob.read_bytes())
    raw[-1] ^= 1
    blob.write_bytes(bytes(raw))
    return blob


def test_a_cache_snapshot_base_is_checked_against_its_blob_names(snapshot, gain_file, cli, tmp_path, hub):
    assert cli("apply", snapshot, gain_file, tmp_path / "ok").exit_code == 0
    corrupt_blob(snapshot, SHARD)
    before = {p.name: p.read_bytes() for p in (snapshot.parent.parent / "blobs").iterdir()}
    out = tmp_path / "out"
    res = cli("apply", snapshot, gain_file, out)
    assert_clean_failure(res, out, f"{SHARD} (in the Hugging Face cache): its sha256 is")
    assert "delete it from the cache and download it again" in res.stderr
    nothing_beside(out)
    assert {p.name: p.read_bytes() for p in (snapshot.parent.parent / "blobs").iterdir()} == before  # an input
    res = cli("verify", snapshot, gain_file, tmp_path / "ok")
    assert res.exit_code == 1 and "its sha256 is" in res.stderr
    work = tmp_path / "work"
    work.mkdir()
    res = cli("apply", snapshot, gain_file, "--push", "testuser/new", "--work-dir", work)
    assert_clean_failure(res, None, "its sha256 is")
    assert our_commits(hub) == []


def test_a_cache_snapshot_small_file_is_checked_against_its_git_blob_id(snapshot, gain_file, cli, tmp_path):
    corrupt_blob(snapshot, "tokenizer_config.json" if (snapshot / "tokenizer_config.json").exists()
                 else "generation_config.json")
    out = tmp_path / "out"
    assert_clean_failure(cli("apply", snapshot, gain_file, out), out, "its git blob sha1 is")
    nothing_beside(out)
