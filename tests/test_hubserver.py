"""Exercise tests/hubserver.py with the real huggingface_hub client."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


# huggingface_hub's own LFS PUT passes `data=<file>` to httpx2, which warns; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

REPO = "testuser/tiny"


def download(hub, repo_id, filename, **kw):
    """``hf_hub_download`` from the loopback Hub: endpoint, token and cache passed explicitly."""
    kw.setdefault("endpoint", hub.endpoint)
    kw.setdefault("token", hub.token)
    kw.setdefault("cache_dir", hub.cache_dir)
    return hf_hub_download(repo_id, filename, **kw)
BIG = 10 * 1024 * 1024 + 123  # > 10 MB: LFS by size as well as by suffix


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"hidden_size": 8}))
    (d / "model.safetensors").write_bytes(os.urandom(BIG))
    (d / "sub" / "notes.txt").write_text("hello\n")
    return d


def _local_files(d):
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in d.rglob("*") if p.is_file()}


def test_create_upload_list_download_roundtrip(hub, model_dir):
    api = hub.api
    url = api.create_repo(REPO, private=True, exist_ok=True, repo_type="model")
    assert url.repo_id == REPO and url.endpoint == hub.endpoint
    assert api.create_repo(REPO, exist_ok=True).repo_id == REPO  # 409 tolerated
    assert api.repo_exists(REPO) and not api.repo_exists("testuser/nope")

    info = api.upload_folder(folder_path=model_dir, repo_id=REPO, commit_message="add model")
    assert info.oid == hub.repos[REPO].head.sha and info.pr_url is None
    local = _local_files(model_dir)

    # server side: LFS used for the weights only, bytes stored intact
    assert hub.repos[REPO].lfs_paths == {"model.safetensors"}
    assert {p: b for p, b in hub.repos[REPO].files.items() if p != ".gitattributes"} == local
    assert any(r.method == "PUT" and r.path.startswith("/_lfs/upload/") for r in hub.requests)
    assert hub.commits[-1].message == "add model"

    # client side
    assert sorted(api.list_repo_files(REPO)) == sorted([".gitattributes", *local])
    assert {s.rfilename for s in api.model_info(REPO).siblings} == {".gitattributes", *local}
    for name, data in local.items():
        path = download(hub, REPO, name)
        assert Path(path).read_bytes() == data
        assert path.startswith(str(hub.cache_dir))

    # cache reuse: a second download is one HEAD, no GET
    n = len(hub.requests)
    download(hub, REPO, "model.safetensors")
    assert [r.method for r in hub.requests[n:]] == ["HEAD"]

    # re-uploading identical files makes no new commit
    n_commits = len(hub.commits)
    api.upload_folder(folder_path=model_dir, repo_id=REPO)
    assert len(hub.commits) == n_commits


def test_upload_file_to_branch_and_pr(hub):
    api = hub.api
    api.create_repo(REPO)
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id=REPO, revision="dev")
    api.create_branch(REPO, branch="dev")
    api.create_branch(REPO, branch="dev", exist_ok=True)
    api.upload_file(path_or_fileobj=b"on dev", path_in_repo="a.txt", repo_id=REPO, revision="dev")
    assert "a.txt" not in hub.repos[REPO].files
    assert hub.repos[REPO].files_at("dev")["a.txt"] == b"on dev"
    assert "a.txt" in api.list_repo_files(REPO, revision="dev")
    assert Path(download(hub, REPO, "a.txt", revision="dev")).read_bytes() == b"on dev"
    assert [b.name for b in api.list_repo_refs(REPO).branches] == ["main", "dev"]

    pr = api.upload_file(path_or_fileobj=b"\0binary", path_in_repo="w.bin", repo_id=REPO,
                         commit_message="propose", create_pr=True)
    assert pr.pr_num == 1 and pr.pr_revision == "refs/pr/1"
    assert pr.pr_url == f"{hub.endpoint}/{REPO}/discussions/1"
    assert "w.bin" not in hub.repos[REPO].files
    assert hub.repos[REPO].files_at("refs/pr/1")["w.bin"] == b"\0binary"
    path = download(hub, REPO, "w.bin", revision=pr.pr_revision)
    assert Path(path).read_bytes() == b"\0binary"


def test_bad_token_is_401(hub):
    hub.api.create_repo(REPO)
    bad = HfApi(endpoint=hub.endpoint, token="hf_wrong")
    with pytest.raises(HfHubHTTPError) as exc:
        bad.create_repo("testuser/other")
    assert exc.value.response.status_code == 401
    assert not isinstance(exc.value, RepositoryNotFoundError)
    with pytest.raises(HfHubHTTPError) as exc:
        download(hub, REPO, ".gitattributes", token="hf_wrong")
    assert exc.value.response.status_code == 401


def test_read_token_write_is_403_and_anonymous_private_is_not_found(hub):
    hub.api.create_repo(REPO, private=True)
    ro = HfApi(endpoint=hub.endpoint, token=hub.read_token)
    assert ro.model_info(REPO).private is True
    with pytest.raises(HfHubHTTPError) as exc:
        ro.upload_file(path_or_fileobj=b"x", path_in_repo="x", repo_id=REPO)
    assert exc.value.response.status_code == 403
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.endpoint, token=False).model_info(REPO)


def test_unknown_repo_revision_and_file(hub):
    api = hub.api
    with pytest.raises(RepositoryNotFoundError) as exc:
        api.model_info("testuser/missing")
    assert exc.value.response.status_code == 404
    with pytest.raises(RepositoryNotFoundError):
        download(hub, "testuser/missing", "config.json")
    hub.add_repo(REPO, {"config.json": b"{}"})
    with pytest.raises(RevisionNotFoundError):
        download(hub, REPO, "config.json", revision="nope")
    with pytest.raises(EntryNotFoundError):
        download(hub, REPO, "missing.json")
    assert not api.file_exists(REPO, "missing.json") and api.file_exists(REPO, "config.json")


def test_rate_limit_and_injected_errors(hub):
    hub.add_repo(REPO, {"config.json": b"{}"})
    hub.fail_next(status=429, path_contains="/api/models/")
    with pytest.raises(HfHubHTTPError) as exc:
        hub.api.model_info(REPO)
    assert exc.value.response.status_code == 429
    assert hub.api.model_info(REPO).id == REPO  # only the next one failed

    hub.fail_next(status=404, path_contains="/api/")
    with pytest.raises(RepositoryNotFoundError):
        hub.api.model_info(REPO)
    hub.fail_next(status=401, method="POST")
    with pytest.raises(HfHubHTTPError) as exc:
        hub.api.create_repo("testuser/x")
    assert exc.value.response.status_code == 401
    hub.fail_next(status=403, path_contains="/resolve/")
    with pytest.raises(LocalEntryNotFoundError):  # non-401 HEAD failure with nothing cached
        download(hub, REPO, "config.json")
    hub.fail_next(drop=True)
    with pytest.raises(httpx2.RemoteProtocolError):
        hub.api.model_info(REPO)


def test_network_down(hub):
    hub.add_repo(REPO, {"config.json": b'{"a": 1}'})
    assert hub.api.model_info(REPO).id == REPO
    with hub.offline():
        with pytest.raises(httpx2.ConnectError):
            hub.api.model_info(REPO)
    assert hub.api.model_info(REPO).id == REPO  # back online, same port


def test_download_resumes_after_truncated_body(hub):
    # The client writes what it received in DOWNLOAD_CHUNK_SIZE (10 MB) pieces and resumes
    # from what it has written, so cut the body well after the first piece.
    data = os.urandom(24 * 1024 * 1024)
    hub.add_repo(REPO, {"model.safetensors": data})
    hub.fail_next(path_contains="/_lfs/", method="GET", truncate_after=16 * 1024 * 1024)
    path = download(hub, REPO, "model.safetensors")
    assert Path(path).read_bytes() == data
    gets = [r for r in hub.requests if r.method == "GET" and r.path.startswith("/_lfs/")]
    assert len(gets) == 2 and gets[1].headers.get("range", "").startswith("bytes=")


def test_no_threads_left_behind(hub):
    HubServer = type(hub)  # a second, independent server; `hub` only provides the client env
    before = set(threading.enumerate())
    with HubServer() as server:
        server.add_repo(REPO, {"a.txt": b"a"})
        assert HfApi(endpoint=server.endpoint, token=server.token).list_repo_files(REPO) == [".gitattributes", "a.txt"]
    assert set(threading.enumerate()) <= before
