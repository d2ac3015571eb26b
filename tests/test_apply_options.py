"""ApplyOptions (declared once, checked when made), the BASE grammar, and BASE classified once per apply."""

from __future__ import annotations

import json

import pytest

from conftest import random_gain
from gainsurgery import api
from gainsurgery.applying import pipeline
from gainsurgery.applying.options import MAX_CHUNK_BYTES, ApplyOptions
from gainsurgery.errors import CheckpointError, GainSurgeryError, HubError, PlanError
from gainsurgery.hub import refs
from gainsurgery.hub.refs import parse_file_ref
from gainsurgery.sources import spec as grammar
from gainsurgery.sources.spec import BaseSpec, classify_base
from test_hub import local_files


@pytest.mark.parametrize("kwargs, message", [
    ({"verify": "yes"}, "verify must be True or False, not str"),
    ({"overwrite": 1}, "overwrite must be True or False, not int"),
    ({"chunk_bytes": 0}, "chunk size must be 1 byte to 4096 MiB, not 0"),
    ({"chunk_bytes": MAX_CHUNK_BYTES + 1}, f"chunk size must be 1 byte to 4096 MiB, not {MAX_CHUNK_BYTES + 1}"),
    ({"chunk_bytes": True}, "chunk size must be 1 byte to 4096 MiB, not True"),
    ({"threads": 0}, "threads must be 1 to 64, not 0"),
    ({"threads": 65}, "threads must be 1 to 64, not 65"),
    ({"threads": 2.0}, "threads must be 1 to 64, not 2.0"),
    ({"requant_tolerance": float("nan")}, "--requant-tolerance must be a finite fraction >= 0, not nan"),
    ({"requant_tolerance": -0.5}, "--requant-tolerance must be a finite fraction >= 0, not -0.5"),
    ({"revision": "dev"}, "--revision, --create-pr and --commit-message go with --push"),
    ({"create_pr": True}, "--revision, --create-pr and --commit-message go with --push"),
    ({"commit_message": "x"}, "--revision, --create-pr and --commit-message go with --push"),
])
def test_options_refuse_what_no_apply_accepts(kwargs, message):
    with pytest.raises(GainSurgeryError) as e:
        ApplyOptions(**kwargs)
    assert str(e.value) == message


@pytest.mark.parametrize("field", ["push_to", "base_model"])
@pytest.mark.parametrize("repo", ["org/name\n", "./x/y", "org/na--me", "", "org"])
def test_options_check_repo_ids_in_full(field, repo):
    if field == "push_to" and repo == "":
        assert ApplyOptions(push_to="").push_to == ""  # no push, as before: "" is falsy
        return
    with pytest.raises(HubError, match="is not a Hub repo id"):
        ApplyOptions(**{field: repo})


def test_options_are_frozen_and_round_trip():
    o = ApplyOptions(verify=True, chunk_bytes=1 << 20, threads=2, push_to="me/out", revision="dev")
    with pytest.raises(AttributeError):
        o.verify = False  # type: ignore[misc]
    assert ApplyOptions(**o.as_dict()) == o
    assert o.as_dict()["chunk_bytes"] == 1 << 20


@pytest.mark.parametrize("base, out, kwargs, error, message", [
    ("base", None, {}, PlanError, "give OUT (a folder to write), or a repo to push to"),
    ("base", None, {"push_to": "me/x", "overwrite": True}, GainSurgeryError, "--overwrite goes with OUT"),
    ("base", "out", {"work_dir": "/tmp"}, GainSurgeryError, "--work-dir goes with --push and no OUT"),
    ("base", "out", {"keep_types": True}, GainSurgeryError, "--keep-types and --requant-tolerance are for a GGUF"),
    ("base", "out.GGUF", {}, GainSurgeryError, "OUT ends in .gguf, but BASE is a safetensors checkpoint"),
    ("m.gguf", None, {}, PlanError, "give OUT, the .gguf file to write"),
    ("m.gguf", None, {"push_to": "me/x"}, GainSurgeryError, "give OUT, the .gguf file to write; --push uploads it"),
    ("m.gguf", "out", {}, PlanError, "OUT out must be a .gguf file when BASE is one"),
    ("m.gguf", "o.gguf", {"work_dir": "/tmp"}, GainSurgeryError, "--work-dir is for a safetensors BASE"),
])
def test_options_are_checked_against_base_and_out(base, out, kwargs, error, message):
    with pytest.raises(error) as e:
        ApplyOptions(**kwargs).check_for(base, out)
    assert str(e.value).startswith(message), str(e.value)


def test_pushing_over_the_base_branch_is_refused_but_a_pr_or_branch_is_not():
    hub_base = BaseSpec(kind="hub", spec="org/base", repo_id="org/base")
    with pytest.raises(GainSurgeryError, match="would commit the merged model over its own base"):
        ApplyOptions(push_to="ORG/Base").check_push_target(hub_base)
    ApplyOptions(push_to="org/base", create_pr=True).check_push_target(hub_base)
    ApplyOptions(push_to="org/base", revision="merged").check_push_target(hub_base)
    gguf = BaseSpec(kind="hub", spec="org/base:m.gguf", repo_id="org/base", file="m.gguf", format="gguf")
    with pytest.raises(GainSurgeryError, match="into its own base's repo and branch"):
        ApplyOptions(push_to="org/base").check_push_target(gguf)


def test_api_takes_options_or_flags_not_both(tiny_ckpt, tmp_path):
    base = tiny_ckpt("llama", "bfloat16")
    path = random_gain(base, "gain-ffn", seed=5).save(tmp_path / "g.safetensors")
    a = api.apply(base, [path], tmp_path / "a", options=ApplyOptions(verify=True, threads=1), warn=lambda m: None)
    b = api.apply(base, [path], tmp_path / "b", verify=True, threads=1, warn=lambda m: None)
    assert a.verified and b.verified and a.shard_sha256 == b.shard_sha256
    with pytest.raises(TypeError, match="not both"):
        api.apply(base, [path], tmp_path / "c", verify=True, options=ApplyOptions())
    assert not (tmp_path / "c").exists()


def test_the_cli_checks_options_before_reading_anything(cli, tmp_path):
    # Neither BASE nor the gain exists: the option error comes first, in one line.
    res = cli("apply", tmp_path / "nothing", tmp_path / "g.safetensors", tmp_path / "out", "--revision", "dev")
    assert res.exit_code == 1
    assert res.stderr.strip() == "error: --revision, --create-pr and --commit-message go with --push"


def test_the_grammar_has_one_repo_id_pattern():
    assert refs._REPO_ID.pattern == grammar.REPO_ID_PATTERN
    assert grammar.HUB_BASE_RE.pattern.startswith(f"(?P<repo>{grammar.REPO_ID_PATTERN})")
    assert grammar.FILE_REF_RE.pattern.startswith(f"(?P<repo>{grammar.REPO_ID_PATTERN})")
    assert parse_file_ref("org/name@v1:dir/g.safetensors") == refs.HubRef("org/name", "v1", "dir/g.safetensors")
    assert parse_file_ref("org/name:g.safetensors\n") is None


def test_gguf_bases_are_classified_by_kind(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert classify_base("embedded:gemma-3-270m.gguf") == BaseSpec(
        kind="embedded", spec="embedded:gemma-3-270m.gguf", name="gemma-3-270m", format="gguf")
    assert classify_base("org/repo@v2:models/m-Q4_K_M.gguf") == BaseSpec(
        kind="hub", spec="org/repo@v2:models/m-Q4_K_M.gguf", repo_id="org/repo", revision="v2",
        file="models/m-Q4_K_M.gguf", format="gguf")
    (tmp_path / "m.gguf").write_bytes(b"")
    local = classify_base("m.gguf")
    assert (local.kind, str(local.path), local.is_gguf) == ("local", "m.gguf", True)
    with pytest.raises(CheckpointError, match="no such file: missing.gguf"):
        classify_base("missing.gguf")
    # a local file that looks like a Hub reference stays local, and a spec is passed through as it is
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "r:m.gguf").write_bytes(b"")
    assert classify_base("org/r:m.gguf").kind == "local"
    assert classify_base(local) is local


def test_a_hub_to_hub_push_classifies_base_once(hub, tiny_ckpt, tmp_path, cli, monkeypatch):
    """`apply ORG/BASE G --push REPO`: BASE is classified once; every later step takes the spec."""
    base = tiny_ckpt("llama", "bfloat16")
    hub.add_repo("testuser/tiny-llama", local_files(base))
    gain = random_gain(base, "gain-ffn", seed=3).save(tmp_path / "legal.safetensors")
    calls = []
    real = grammar.classify_base_spec

    def counting(spec, **kwargs):
        calls.append(spec)
        return real(spec, **kwargs)

    # every module that can classify a BASE: the grammar, and the one that opens bases
    monkeypatch.setattr(grammar, "classify_base_spec", counting)
    monkeypatch.setattr("gainsurgery.sources.local.classify_base_spec", counting)
    work = tmp_path / "work"
    work.mkdir()
    res = cli("apply", "testuser/tiny-llama", gain, "--push", "testuser/out", "--work-dir", work, "--json")
    assert res.exit_code == 0, res.stderr
    assert calls == ["testuser/tiny-llama"]
    assert json.loads(res.stdout)["pushed"]["repo_id"] == "testuser/out"


def test_the_pipeline_checks_its_options_against_base_and_out(tiny_ckpt, tmp_path):
    """No entry skips the checks: the pipeline itself runs them (options check themselves when made)."""
    base = tiny_ckpt("llama", "bfloat16")
    path = random_gain(base, "gain-ffn", seed=5).save(tmp_path / "g.safetensors")
    with pytest.raises(GainSurgeryError, match="--overwrite goes with OUT"):
        pipeline.apply(base, [path], None, ApplyOptions(overwrite=True, push_to="me/x"))
