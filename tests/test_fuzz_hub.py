"""Fuzzing what the Hub sends: repo info, tree listings (sizes, LFS pointers), LFS batch answers, files.

The configured Hub is trusted to serve the files it lists, not to answer well-formed:
everything it sends is parsed as hostile. Each test makes a repo on the loopback Hub
(tests/hubserver.py), then has the server mutate the *real* answer of one route
(``HubServer.rewrite``) or serve a mutated file, and runs the real client code
against it: a result, or one line (see tests/fuzzing.py).

CI runs a bounded number of examples; ``GAINSURGERY_FUZZ_EXAMPLES=N`` runs N per test.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import (
    CONFIG,
    SHARDS,
    base_files,
    failed,
    fuzz_settings,
    index_doc,
    json_text,
    mutated,
    outcome,
    render,
    safetensors_file,
    shard_parts,
)
from gainsurgery import api
from gainsurgery.hub.client import HubClient, HubConfig
from gainsurgery.hub.refs import HubRef
from gainsurgery.hub.transfer import lfs_objects_present
from gainsurgery.sources.remote import open_remote_base
from hubserver import HubServer

#: The loopback Hub's threads and the HTTP client map memory of their own: a looser budget.
HUB_MEMORY = 1 << 30

_repo_numbers = itertools.count()


@pytest.fixture(scope="module")
def fuzz_hub(tmp_path_factory):
    """One loopback Hub for the module (hypothesis runs many examples per test call)."""
    server = HubServer().start()
    server.cache_dir = str(tmp_path_factory.mktemp("fuzz-hub-cache"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _loopback_without_proxy(monkeypatch):
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")


def client_of(server: HubServer) -> HubClient:
    """A client of the loopback Hub with its write token, built explicitly (tests get no token from the
    environment, and the environment is reset for every test)."""
    return HubClient(HubConfig(server.endpoint, token=server.token, cache_dir=server.cache_dir))


@pytest.fixture(scope="module")
def identity_gain(tmp_path_factory) -> Path:
    """A gain of ones over two tensors of the synthetic base (applies to any well-formed copy of it)."""
    from gainsurgery.gainfile import GainFile

    keys = {"model.layers.0.self_attn.o_proj.weight": 4, "model.layers.1.mlp.down_proj.weight": 6}
    path = tmp_path_factory.mktemp("fuzz-hub-gain") / "g.safetensors"
    GainFile({k: np.ones(n, np.float32) for k, n in keys.items()}, {k: 1 for k in keys}, {"method": "gain-ffn"}
             ).save(path)
    return path


def _get_json(server: HubServer, path: str) -> object:
    request = urllib.request.Request(server.endpoint + path, headers={"Authorization": f"Bearer {server.token}"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def _replace(text: str, pairs: dict[str, str]) -> str:
    for old, new in pairs.items():
        text = text.replace(old, new)
    return text


PARTS = ["none", "none", "info", "tree", "tree", "index", "config", "shard", "shard"]


@fuzz_settings(40)
@given(data=st.data())
def test_hub_base_opens_or_one_line_and_applies_when_it_opens(data, fuzz_hub, identity_gain):
    part = data.draw(st.sampled_from(PARTS), label="part")
    repo_id = f"fuzz/base-{next(_repo_numbers)}"
    replace: dict = {}
    if part == "index":
        replace["index"] = data.draw(json_text(index_doc(), keys=["weight_map", "metadata"]), label="index")
    elif part == "config":
        replace["config"] = data.draw(json_text(CONFIG, keys=list(CONFIG) + ["quantization_config"]), label="config")
    elif part == "shard":
        name = data.draw(st.sampled_from(list(SHARDS)), label="shard")
        header, body = shard_parts(SHARDS[name])
        replace["shard"] = (name, data.draw(safetensors_file(header, body, 2), label="bytes"))
    repo = fuzz_hub.add_repo(repo_id, base_files(**replace))
    if part == "info":
        # Drawn from a template with stand-ins for what differs between examples (the repo id, its
        # commit, the time), put in afterwards: hypothesis must draw the same way when it replays.
        real = _get_json(fuzz_hub, f"/api/models/{repo_id}")
        stand_ins = {repo_id: "@REPO@", real["sha"]: "@SHA@", real["lastModified"]: "@TIME@"}
        template = json.loads(_replace(json.dumps(real), stand_ins))
        body = data.draw(json_text(template, 2, keys=["sha", "siblings", "id"]), label="info")
        for real_value, stand_in in stand_ins.items():  # in bytes: the drawn text need not be UTF-8
            body = body.replace(stand_in.encode(), real_value.encode())
        fuzz_hub.rewrite(rf"/api/models/{repo_id}(/revision/.*)?", lambda _obj: body, method="GET")
    elif part == "tree":
        real = _get_json(fuzz_hub, f"/api/models/{repo_id}/tree/{repo.head.sha}")
        doc = data.draw(mutated(real, 2, keys=["type", "path", "size", "oid", "lfs", "pointerSize"]), label="tree")
        body = render(doc).encode("utf-8", "surrogatepass")
        fuzz_hub.rewrite(rf"/api/models/{repo_id}/tree/.*", lambda _obj: body, method="GET")
    work = Path(tempfile.mkdtemp(prefix="gainsurgery-fuzz-hub-"))
    try:
        client = client_of(fuzz_hub)
        remote = outcome(open_remote_base, HubRef(repo_id), client, memory_bytes=HUB_MEMORY)
        if failed(remote):
            return
        with remote:
            assert set(remote.checkpoint.shards) <= set(SHARDS)
            assert all(len(v) == 64 for v in remote.shard_sha256.values())
        # What opens, applies (the shards are downloaded, checked and streamed), or fails in one line.
        outcome(api.apply, repo_id, [identity_gain], work / "out", verify=True, hub=client, warn=lambda _m: None,
                memory_bytes=HUB_MEMORY)
    finally:
        fuzz_hub.clear_rewrites()
        shutil.rmtree(work, ignore_errors=True)


@st.composite
def lfs_objects(draw) -> dict[str, int]:
    count = draw(st.integers(1, 3))
    return {hashlib.sha256(bytes([i, draw(st.integers(0, 255))])).hexdigest(): draw(st.integers(0, 1 << 40))
            for i in range(count)}


@fuzz_settings(60)
@given(objects=lfs_objects(), data=st.data())
def test_lfs_batch_answer_gives_present_objects_or_one_line(objects, data, fuzz_hub):
    repo_id = "fuzz/batch"
    fuzz_hub.add_repo(repo_id)
    stored = data.draw(st.sets(st.sampled_from(sorted(objects))), label="stored")
    real = {"transfer": "basic", "hash_algo": "sha256", "objects": [
        {"oid": oid, "size": size, "authenticated": True,
         **({} if oid in stored else {"actions": {"upload": {"href": f"@HUB@/_lfs/upload/{oid}"},
                                                  "verify": {"href": "@HUB@/_lfs/verify"}}})}
        for oid, size in objects.items()]}
    drawn = data.draw(json_text(real, 2, keys=["objects", "oid", "size", "actions", "error", "transfer"]),
                      label="answer")
    body = drawn.replace(b"@HUB@", fuzz_hub.endpoint.encode())  # a stand-in: the port differs between runs
    fuzz_hub.rewrite(rf"/{repo_id}\.git/info/lfs/objects/batch", lambda _obj: body, method="POST")
    try:
        got = outcome(lfs_objects_present, client_of(fuzz_hub), repo_id, objects, memory_bytes=HUB_MEMORY)
    finally:
        fuzz_hub.clear_rewrites()
    if not failed(got):
        # Only objects we asked about can be present; an unmutated answer is believed exactly.
        assert got <= set(objects)
        if drawn in (json.dumps(real).encode(), render(real).encode()):
            assert got == stored


# --------------------------------------------------------------------------- regressions (bugs the fuzzer found)


@pytest.mark.parametrize("route,body,expected", [
    # The repo info was not JSON: json's JSONDecodeError came out of model_info as a traceback.
    ("info", b"", "sent a malformed answer while trying to read fuzz/"),
    # A listing entry without a size: huggingface_hub's KeyError.
    ("tree", b'[{"type": "file", "path": "config.json", "oid": "0"}]', "sent a malformed answer"),
    # A size that is not a number: compared with an int further on (TypeError).
    ("tree", b'[{"type": "file", "path": "model.safetensors.index.json", "oid": "0", "size": "12"}]',
     "not a path and a size"),
    # A commit that is not a commit id was used to build every later URL.
    ("info", b'{"id": "x", "sha": "../../other"}', "not a commit id"),
])
def test_a_malformed_hub_answer_about_a_base_is_one_line(fuzz_hub, route, body, expected):
    from gainsurgery.errors import HubError

    repo_id = f"fuzz/base-{next(_repo_numbers)}"
    fuzz_hub.add_repo(repo_id, base_files())
    pattern = rf"/api/models/{repo_id}(/revision/.*)?" if route == "info" else rf"/api/models/{repo_id}/tree/.*"
    fuzz_hub.rewrite(pattern, lambda _obj: body, method="GET")
    try:
        with pytest.raises(HubError) as e:
            open_remote_base(HubRef(repo_id), client_of(fuzz_hub))
    finally:
        fuzz_hub.clear_rewrites()
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("body", [b"", b"[" * 100_000, b'{"objects": [7]}', b'{"objects": [{"oid": 1}]}'])
def test_a_malformed_lfs_batch_answer_is_one_line(fuzz_hub, body):
    """Not JSON, nested past Python's recursion limit, objects that are not objects: one HubError line each."""
    from gainsurgery.errors import HubError

    fuzz_hub.add_repo("fuzz/batch")
    fuzz_hub.rewrite(r"/fuzz/batch\.git/info/lfs/objects/batch", lambda _obj: body, method="POST")
    try:
        oid = hashlib.sha256(b"x").hexdigest()
        try:
            got = lfs_objects_present(client_of(fuzz_hub), "fuzz/batch", {oid: 1})
        except HubError as e:
            assert "malformed answer" in str(e) and "\n" not in str(e)
        else:
            assert got == set()  # an entry without a usable oid is simply not present
    finally:
        fuzz_hub.clear_rewrites()


@pytest.mark.parametrize("listed", [False, True])
def test_a_long_shard_name_is_named_by_its_ends(fuzz_hub, listed):
    """Regression (fuzz): names the Hub or its index gives went whole into messages (a 5,000-character line;
    a listed one made a URL too long for the HTTP client, an httpx2.InvalidURL traceback)."""
    from gainsurgery.errors import CheckpointError, HubError

    repo_id = f"fuzz/base-{next(_repo_numbers)}"
    shard = "s" * (100_000 if listed else 5000) + ".safetensors"
    index = {"weight_map": {"model.norm.weight": shard}}
    fuzz_hub.add_repo(repo_id, base_files(index=json.dumps(index).encode()))
    extra = {"type": "file", "path": shard, "oid": "0" * 40, "size": 300}
    if listed:
        fuzz_hub.rewrite(rf"/api/models/{repo_id}/tree/.*", lambda obj: json.dumps([*obj, extra]).encode(),
                         method="GET")
    try:
        with pytest.raises((CheckpointError, HubError)) as e:
            open_remote_base(HubRef(repo_id), client_of(fuzz_hub))
    finally:
        fuzz_hub.clear_rewrites()
    message = str(e.value)
    assert len(message) < 1000 and message.isprintable()
    assert ("URL is not valid" if listed else "which the repo does not have") in message


def test_a_listed_file_whose_name_no_file_can_have_is_not_fetched(fuzz_hub, identity_gain, tmp_path):
    """Regression (fuzz): a listing naming a 100,000-character file made its URL too long for the HTTP client
    (httpx2.InvalidURL, a traceback). No file system holds such a name: it is not fetched, the base opens."""
    repo_id = f"fuzz/base-{next(_repo_numbers)}"
    fuzz_hub.add_repo(repo_id, base_files())
    extra = {"type": "file", "path": "n" * 100_000, "oid": "0" * 40, "size": 3}
    fuzz_hub.rewrite(rf"/api/models/{repo_id}/tree/.*", lambda obj: json.dumps([*obj, extra]).encode(), method="GET")
    try:
        with open_remote_base(HubRef(repo_id), client_of(fuzz_hub)) as remote:
            assert "n" * 100 not in " ".join(p.name for p in remote.staging.iterdir())
        api.apply(repo_id, [identity_gain], tmp_path / "out", hub=client_of(fuzz_hub), warn=lambda _m: None)
    finally:
        fuzz_hub.clear_rewrites()
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("size,expected", [(2**62, "file too large: writing the header stand-in"),
                                           (2**63, "not a path and a size"), (2**70, "not a path and a size")])
def test_a_shard_listed_larger_than_any_file_is_one_line(fuzz_hub, size, expected):
    """Regression (fuzz): a listing that gives a shard 2**62 bytes made its sparse stand-in fail with
    OSError EFBIG (a traceback from the Python API, "File too large" from the CLI); 2**63 bytes, past any
    file offset, with an OverflowError."""
    from gainsurgery.errors import CheckpointError, HubError

    repo_id = f"fuzz/base-{next(_repo_numbers)}"
    fuzz_hub.add_repo(repo_id, base_files())

    def huge(obj):
        return json.dumps([{**e, "size": size} if e["path"].endswith(".safetensors") else e for e in obj]).encode()

    fuzz_hub.rewrite(rf"/api/models/{repo_id}/tree/.*", huge, method="GET")
    try:
        with pytest.raises((CheckpointError, HubError), match=expected):
            open_remote_base(HubRef(repo_id), client_of(fuzz_hub))
    finally:
        fuzz_hub.clear_rewrites()
