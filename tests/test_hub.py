"""`gainsurgery push` and Hub bases/gains for `apply`, end to end.

The real huggingface_hub client talks to the loopback Hub of tests/hubserver.py
(fixture ``hub``); nothing of ours is mocked. Failures must give exit status 1,
one ``error:`` line on stderr, no OUT and no commit on the server.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import fingerprinted, random_gain
from gainsurgery.io.hashing import sha256_file as file_sha256


# huggingface_hub's own LFS PUT passes `data=<file>` to httpx2, which warns; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

SEEDED = ("initial commit", "seed files")


def local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def remote_files(hub, repo_id: str, revision: str = "main") -> dict[str, bytes]:
    if repo_id not in hub.repos:
        return {}
    files = hub.repos[repo_id].files_at(revision)
    return {p: b for p, b in files.items() if p != ".gitattributes"}


def our_commits(hub) -> list:
    return [c for c in hub.commits if c.message not in SEEDED]


def weights_and_config(folder: Path) -> dict[str, bytes]:
    """Everything apply derives from the base (not provenance/README, which hold paths and times)."""
    return {k: v for k, v in local_files(folder).items() if k not in ("gainsurgery.json", "README.md")}


def assert_clean_failure(res, out: Path | None, match: str) -> None:
    assert res.exit_code == 1, (res.output, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert match in lines[0], lines[0]
    if out is not None:
        assert not out.exists()
        assert not list(out.parent.glob(f".{out.name}.gainsurgery-tmp-*"))


@pytest.fixture
def base(tiny_ckpt):
    return tiny_ckpt("llama", "bfloat16")


@pytest.fixture
def gain_file(base, tmp_path):
    """A gain trained on testuser/tiny-llama, as train would record it (base_model + base fingerprint)."""
    return fingerprinted(base, "gain-ffn", seed=3, base_model="testuser/tiny-llama").save(tmp_path / "legal.safetensors")


@pytest.fixture
def merged(base, gain_file, tmp_path, cli):
    out = tmp_path / "merged"
    assert cli("apply", base, gain_file, out).exit_code == 0
    return out


@pytest.fixture
def hub_base(hub, base):
    """The tiny base, seeded on the loopback Hub as testuser/tiny-llama."""
    hub.add_repo("testuser/tiny-llama", local_files(base))
    return "testuser/tiny-llama"


# --------------------------------------------------------------------------- push


def test_push_merged_folder(hub, merged, cli):
    res = cli("push", merged, "testuser/merged", "--json", "--private")
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["kind"] == "merged checkpoint" and info["revision"] == "main"
    assert remote_files(hub, "testuser/merged") == local_files(merged)
    assert hub.repos["testuser/merged"].private
    assert {f["path"] for f in info["files"]} == set(local_files(merged))
    assert [c.message for c in our_commits(hub)] == ["Upload merged checkpoint with gainsurgery"]
    readme = remote_files(hub, "testuser/merged")["README.md"].decode()
    # The base was a local folder: the card claims no Hub base_model (whatever the gain records)...
    assert readme.startswith("---\n") and "base_model" not in readme
    # ... unless the user names it: the card is then written again from gainsurgery.json.
    res = cli("push", merged, "testuser/merged2", "--base-model", "testuser/tiny-llama")
    assert res.exit_code == 0, res.stderr
    readme = remote_files(hub, "testuser/merged2")["README.md"].decode()
    assert 'base_model: "testuser/tiny-llama"' in readme and 'base_model_relation: "merge"' in readme
    # shards are LFS files, as on the real Hub
    assert {p for p in hub.repos["testuser/merged"].lfs_paths if p.endswith(".safetensors")} == {
        p for p in local_files(merged) if p.endswith(".safetensors")}


def _drop_shard(folder: Path) -> str:
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.unlink()
    return shard.name


def _flip_byte(folder: Path) -> str:
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01  # tensor data, not the header: the checkpoint still opens
    shard.write_bytes(bytes(data))
    return "sha256"


def _drop_config(folder: Path) -> str:
    (folder / "config.json").unlink()
    return "config.json missing"


def _drop_index(folder: Path) -> str:
    (folder / "model.safetensors.index.json").unlink()
    return "model.safetensors.index.json"


@pytest.mark.parametrize("damage", [_drop_shard, _flip_byte, _drop_config, _drop_index])
def test_push_refuses_incomplete_folder(hub, merged, cli, damage):
    match = damage(merged)
    res = cli("push", merged, "testuser/merged")
    assert_clean_failure(res, None, match)
    assert hub.requests == [] and "testuser/merged" not in hub.repos


def test_push_gain_file_with_card(hub, gain_file, cli):
    res = cli("push", gain_file, "testuser/legal-gain", "--json")
    assert res.exit_code == 0, res.stderr
    files = remote_files(hub, "testuser/legal-gain")
    assert set(files) == {"legal.safetensors", "README.md"}
    assert files["legal.safetensors"] == gain_file.read_bytes()
    card = files["README.md"].decode()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert 'base_model: "testuser/tiny-llama"' in front
    assert 'base_model_relation: "adapter"' in front and 'library_name: "gainsurgery"' in front
    assert 'tags:\n- "gainsurgery"\n- "gain"\n- "gain-ffn"' in front
    assert "gainsurgery apply testuser/tiny-llama testuser/legal-gain:legal.safetensors merged/" in body
    from gainsurgery.gainfile import load

    n = load(gain_file).num_parameters
    assert f"parameters: {n:,}" in body and "| layer 1 |" in body


def test_dry_run_contacts_nothing(hub, merged, gain_file, cli):
    res = cli("push", merged, "testuser/merged", "--dry-run", "--json")
    assert res.exit_code == 0, res.stderr
    listed = {f["path"]: f["bytes"] for f in json.loads(res.stdout)["files"]}
    assert listed == {k: len(v) for k, v in local_files(merged).items()}
    res = cli("push", gain_file, "testuser/g", "--dry-run")
    assert res.exit_code == 0 and "legal.safetensors" in res.output and "README.md" in res.output
    assert "nothing uploaded" in res.output
    with hub.offline():  # works without a network too
        assert cli("push", gain_file, "testuser/g", "--dry-run").exit_code == 0
    assert hub.requests == [] and hub.repos == {}


def test_revision_and_create_pr(hub, gain_file, cli):
    res = cli("push", gain_file, "testuser/g", "--revision", "dev", "--commit-message", "on dev")
    assert res.exit_code == 0, res.stderr
    repo = hub.repos["testuser/g"]
    assert "legal.safetensors" not in repo.files
    assert remote_files(hub, "testuser/g", "dev")["legal.safetensors"] == gain_file.read_bytes()
    assert our_commits(hub)[-1].message == "on dev" and our_commits(hub)[-1].ref == "dev"

    res = cli("push", gain_file, "testuser/g", "--create-pr", "--json")
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["pr_url"] == f"{hub.endpoint}/testuser/g/discussions/1"
    assert "legal.safetensors" not in repo.files
    assert remote_files(hub, "testuser/g", "refs/pr/1")["legal.safetensors"] == gain_file.read_bytes()


# --------------------------------------------------------------------------- apply from the Hub


def test_apply_from_hub_base_is_byte_identical(hub, hub_base, base, gain_file, merged, cli, tmp_path):
    out = tmp_path / "from-hub"
    res = cli("apply", f"{hub_base}@main", gain_file, out, "--json")
    assert res.exit_code == 0, res.stderr
    assert weights_and_config(out) == weights_and_config(merged)
    assert set(local_files(out)) == set(local_files(merged))
    prov = json.loads((out / "gainsurgery.json").read_text())
    assert prov["base"]["hub"] == hub_base and prov["base"]["commit"] == hub.repos[hub_base].head.sha
    for name, entry in prov["shards"].items():
        assert entry["sha256"] == file_sha256(out / name)
    assert 'base_model: "testuser/tiny-llama"' in (out / "README.md").read_text()
    # every shard came through the HF cache
    shards = {p.name for p in base.glob("*.safetensors")}
    cached = {p.name for p in hub.cache_dir.rglob("*.safetensors")}
    assert shards <= cached


def test_verify_and_targets_take_a_hub_base(hub, hub_base, gain_file, merged, cli, tmp_path):
    assert cli("verify", hub_base, gain_file, merged).exit_code == 0
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(merged, broken)
    shard = sorted(broken.glob("*.safetensors"))[-1]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0x01
    shard.write_bytes(bytes(raw))
    res = cli("verify", hub_base, gain_file, broken)
    assert res.exit_code == 1 and "verification failed: 1 problem" in res.stderr
    info = json.loads(cli("targets", hub_base, "--method", "gain", "--json").output)
    assert info["model_type"] == "llama" and info["parameters"] == 2 * 32


def test_hub_base_plan_reads_headers_only(hub, hub_base, base, tmp_path, cli):
    """A gain that does not fit is refused before any shard is downloaded."""
    other = random_gain(base, "gain", seed=1)
    key = next(iter(other.vectors))
    other.vectors["model.layers.7.self_attn.o_proj.weight"] = other.vectors.pop(key)
    other.dims["model.layers.7.self_attn.o_proj.weight"] = other.dims.pop(key)
    other.save(tmp_path / "bad.safetensors")
    out = tmp_path / "out"
    res = cli("apply", hub_base, tmp_path / "bad.safetensors", out)
    assert_clean_failure(res, out, "is not a tensor of the base checkpoint")
    shard_gets = [r for r in hub.requests if r.method == "GET" and r.path.startswith("/_lfs/")]
    assert shard_gets and all(r.headers.get("range", "").startswith("bytes=0-") for r in shard_gets)
    assert not list(hub.cache_dir.rglob("model-*.safetensors"))

    # --dry-run on a Hub base: the plan, from headers alone
    res = cli("apply", hub_base, tmp_path / "bad.safetensors", out, "--dry-run")
    assert res.exit_code == 1


def test_hub_base_dry_run(hub, hub_base, gain_file, cli, tmp_path):
    res = cli("apply", hub_base, gain_file, tmp_path / "out", "--dry-run", "--json", "--push", "testuser/x")
    assert res.exit_code == 0, res.stderr
    plan = json.loads(res.stdout)
    assert plan["base"] == hub_base and plan["push"] == "testuser/x" and plan["tensors_touched"] == 4
    assert not (tmp_path / "out").exists() and "testuser/x" not in hub.repos
    assert not list(hub.cache_dir.rglob("model-*.safetensors"))  # headers only


def test_apply_with_hub_gain_reference(hub, base, gain_file, merged, cli, tmp_path):
    hub.add_repo("testuser/legal-gain", {"legal.safetensors": gain_file.read_bytes()})
    out = tmp_path / "m2"
    res = cli("apply", base, "testuser/legal-gain@main:legal.safetensors", out)
    assert res.exit_code == 0, res.stderr
    assert weights_and_config(out) == weights_and_config(merged)
    prov = json.loads((out / "gainsurgery.json").read_text())
    assert prov["gains"][0]["hub"] == "testuser/legal-gain@main:legal.safetensors"
    assert prov["gains"][0]["sha256"] == file_sha256(gain_file)


def test_apply_push_publishes_verified_output(hub, hub_base, gain_file, merged, cli, tmp_path):
    out = tmp_path / "pushed"
    res = cli("apply", hub_base, gain_file, out, "--push", "testuser/tiny-llama-legal", "--private", "--json")
    assert res.exit_code == 0, res.stderr
    assert hub.repos["testuser/tiny-llama-legal"].private is True
    info = json.loads(res.stdout)
    assert info["verified"] is True and info["pushed"]["repo_id"] == "testuser/tiny-llama-legal"
    assert remote_files(hub, "testuser/tiny-llama-legal") == local_files(out)
    assert weights_and_config(out) == weights_and_config(merged)
    assert len(our_commits(hub)) == 1


# --------------------------------------------------------------------------- failures



def test_push_bad_token_is_401(hub, gain_file, cli, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    res = cli("push", gain_file, "testuser/g")
    assert_clean_failure(res, None, "401")
    assert "hf auth login" in res.stderr and "HF_TOKEN" in res.stderr and "hf_wrong" not in res.stderr
    assert hub.repos == {} and our_commits(hub) == []


def test_push_read_token_is_403(hub, gain_file, cli, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.read_token)
    res = cli("push", gain_file, "testuser/g")
    assert_clean_failure(res, None, "403")
    assert "testuser/g" in res.stderr and hub.read_token not in res.stderr
    assert our_commits(hub) == []


def test_push_rate_limited_commits_nothing(hub, merged, cli):
    hub.fail_next(status=429, path_contains="/preupload/", times=None)
    res = cli("push", merged, "testuser/merged")
    assert_clean_failure(res, None, "429")
    assert our_commits(hub) == [] and remote_files(hub, "testuser/merged") == {}
    assert len([r for r in hub.requests if "/preupload/" in r.path]) > 1  # the client retried first


def test_push_lfs_upload_failure_commits_nothing(hub, merged, cli):
    hub.fail_next(status=503, path_contains="/_lfs/upload/", times=None)
    res = cli("push", merged, "testuser/merged")
    assert_clean_failure(res, None, "503")
    assert our_commits(hub) == [] and remote_files(hub, "testuser/merged") == {}


def test_push_offline(hub, gain_file, cli):
    with hub.offline():
        res = cli("push", gain_file, "testuser/g")
    assert_clean_failure(res, None, "could not reach the Hub")
    assert hub.repos == {}


def test_apply_unknown_hub_repo_is_404(hub, gain_file, cli, tmp_path):
    out = tmp_path / "out"
    res = cli("apply", "testuser/nope", gain_file, out)
    assert_clean_failure(res, out, "404: repo not found")
    assert "testuser/nope" in res.stderr


def test_apply_unknown_hub_gain_file_is_404(hub, base, cli, tmp_path):
    hub.add_repo("testuser/g", {"x.txt": b"x"})
    out = tmp_path / "out"
    res = cli("apply", base, "testuser/g:missing.safetensors", out)
    assert_clean_failure(res, out, "404")
    assert "missing.safetensors" in res.stderr


@pytest.mark.parametrize("status", [401, 403, 429])
def test_apply_hub_base_download_failure(hub, hub_base, gain_file, cli, tmp_path, status):
    """The second shard's download fails mid-apply: nothing is left, nothing published."""
    hub.fail_next(status=status, path_contains="model-00002-of-00003.safetensors", method="HEAD", times=None)
    out = tmp_path / "out"
    res = cli("apply", hub_base, gain_file, out, "--push", "testuser/out")
    assert_clean_failure(res, out, str(status))
    assert "model-00002-of-00003.safetensors" in res.stderr
    assert "testuser/out" in hub.repos  # prepared before the apply started...
    assert our_commits(hub) == [] and remote_files(hub, "testuser/out") == {}  # ...but nothing published
    cached = {p.name for p in hub.cache_dir.rglob("model-*.safetensors")}
    assert cached and "model-00002-of-00003.safetensors" not in cached  # failed mid-apply, after a shard


def test_apply_hub_base_offline(hub, hub_base, gain_file, cli, tmp_path):
    out = tmp_path / "out"
    with hub.offline():
        res = cli("apply", hub_base, gain_file, out)
    assert_clean_failure(res, out, "could not reach the Hub")


@pytest.mark.parametrize("token", ["hf_wrong", "read"])
def test_apply_push_auth_failure_before_any_work(hub, base, gain_file, cli, tmp_path, monkeypatch, token):
    monkeypatch.setenv("HF_TOKEN", hub.read_token if token == "read" else token)
    out = tmp_path / "out"
    res = cli("apply", base, gain_file, out, "--push", "testuser/out")
    assert_clean_failure(res, out, "403" if token == "read" else "401")
    assert our_commits(hub) == []


def test_apply_push_upload_failure_leaves_no_out(hub, base, gain_file, cli, tmp_path):
    hub.fail_next(status=429, path_contains="/preupload/", times=None)
    out = tmp_path / "out"
    res = cli("apply", base, gain_file, out, "--push", "testuser/out")
    assert_clean_failure(res, out, "429")
    assert our_commits(hub) == [] and remote_files(hub, "testuser/out") == {}


def test_not_a_repo_id(gain_file, cli):
    res = cli("push", gain_file, "no-slash")
    assert_clean_failure(res, None, "not a Hub repo id")


def test_local_paths_still_win(hub, base, gain_file, cli, tmp_path, monkeypatch):
    """A local folder named like a Hub id is a folder: the (loopback) Hub sees no request."""
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(base, tmp_path / "org" / "model")
    res = cli("apply", "org/model", gain_file, "out")
    assert res.exit_code == 0, res.stderr
    assert hub.requests == []


# --------------------------------------------------------------------------- the explicit client


def test_config_is_read_from_the_environment_when_built(monkeypatch, tmp_path):
    from gainsurgery.hub.client import DEFAULT_ENDPOINT, HubConfig

    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HOME", raising=False)
    assert HubConfig.from_env() == HubConfig(DEFAULT_ENDPOINT, None, None)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:1234/")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert HubConfig.from_env() == HubConfig("http://127.0.0.1:1234", None, str(tmp_path / "home" / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert HubConfig.from_env().cache_dir == str(tmp_path / "cache")
    assert "hf_secret" not in repr(HubConfig(token="hf_secret"))


def test_an_explicit_client_needs_no_environment(hub, gain_file, monkeypatch):
    """A client built from its own config reaches that Hub whatever the environment says."""
    from gainsurgery import api
    from gainsurgery.hub.client import HubClient, HubConfig

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    client = HubClient(HubConfig(endpoint=hub.endpoint, token=hub.token, cache_dir=str(hub.cache_dir)))
    result = api.push(gain_file, "testuser/explicit", hub=client).result
    assert result.repo_id == "testuser/explicit"
    assert remote_files(hub, "testuser/explicit")["legal.safetensors"] == gain_file.read_bytes()
