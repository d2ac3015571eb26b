"""A gain's base fingerprint must cover every tensor it scales (issue 18, items 3c and 3d).

Through the real CLI: a stacked file carries the weakest provenance of its parents (a
parent without ``base_tensors_sha256`` leaves its tensors unchecked, and ``apply``
warns exactly as it does when the parents are applied directly), and a fingerprint
over fewer tensors than the file scales, down to the sha256 of nothing, counts as
absent for the tensors it leaves out (while what it does cover is still checked).
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest

from conftest import random_gain
from gainsurgery import gainfile as gf
from gainsurgery.io.checkpoint import open_checkpoint
from gainsurgery.io.fingerprint import base_tensors_sha256
from conftest import fingerprinted
from test_hostile import Untouched, refused

EMPTY_SHA = "sha256:" + hashlib.sha256(b"").hexdigest()


@pytest.fixture
def bases(tiny_ckpt, tmp_path, monkeypatch):
    """(base, sibling): the same names and shapes, other weights; cwd is a scratch folder."""
    base, sibling = tmp_path / "base", tmp_path / "sibling"
    shutil.copytree(tiny_ckpt("llama", "bfloat16"), base)
    shutil.copytree(tiny_ckpt("llama", "bfloat16", seed=1), sibling)
    (tmp_path / "gains").mkdir()
    monkeypatch.chdir(tmp_path / "gains")
    return base, sibling


def warnings_of(res) -> list[str]:
    assert res.exit_code == 0, res.stderr
    lines = res.stderr.strip().splitlines()
    assert all(line.startswith("warning: ") for line in lines), res.stderr
    return lines


def provenance(out) -> dict:
    return json.loads((out / "gainsurgery.json").read_text())


def ffn_only(base, seed: int) -> gf.GainFile:
    """A gain on the FFN down projections only (what gain-ffn adds to gain)."""
    full = random_gain(base, "gain-ffn", seed=seed)
    attn = set(random_gain(base, "gain").vectors)
    keys = [k for k in full.vectors if k not in attn]
    return gf.GainFile({k: full.vectors[k] for k in keys}, {k: full.dims[k] for k in keys}, {"method": "gain-ffn"})


# ---------------------------------------------------------------------- 3c: stacking keeps the weakest provenance


def test_stacking_an_unfingerprinted_file_on_the_same_tensors_warns_like_applying_both(bases, cli, tmp_path):
    base, _ = bases
    a = fingerprinted(base, "gain", seed=1).save(tmp_path / "gains" / "a.safetensors")
    b = random_gain(base, "gain", seed=2).save(tmp_path / "gains" / "b.safetensors")  # no fingerprint
    direct = warnings_of(cli("apply", base, a, b, tmp_path / "direct"))
    assert len(direct) == 1 and direct[0].startswith("warning: b.safetensors records no base_tensors_sha256")

    res = cli("stack", a, b, "-o", tmp_path / "gains" / "ab.safetensors")
    assert res.exit_code == 0, res.stderr
    n = len(gf.load(a).vectors)
    assert f"ab.safetensors records no base_tensors_sha256 for {n} of its {n} tensors" in res.stderr
    stacked = gf.load(tmp_path / "gains" / "ab.safetensors")
    assert gf.BASE_TENSORS_KEY not in stacked.metadata  # a and b do not agree: nothing covers the union

    lines = warnings_of(cli("apply", base, tmp_path / "gains" / "ab.safetensors", tmp_path / "stacked"))
    assert len(lines) == 1 and f"ab.safetensors records no base_tensors_sha256 for {n} of its {n}" in lines[0]
    assert provenance(tmp_path / "stacked")["base_not_checked"] == ["ab.safetensors"]
    # The fingerprinted parent is still checked: on its sibling the stack is refused, as a alone is.
    guard = Untouched(tmp_path / "sibling")
    refused(cli("apply", bases[1], tmp_path / "gains" / "ab.safetensors", tmp_path / "o2"),
            "a.safetensors (parent of ab.safetensors) was trained on other weights")
    guard.check()


def test_a_stack_of_disjoint_parents_warns_for_exactly_the_unfingerprinted_tensors(bases, cli, tmp_path):
    base, sibling = bases
    a = fingerprinted(base, "gain", seed=1).save(tmp_path / "gains" / "attn.safetensors")
    ffn = ffn_only(base, seed=2).save(tmp_path / "gains" / "ffn.safetensors")  # no fingerprint
    assert cli("stack", a, ffn, "-o", tmp_path / "gains" / "both.safetensors").exit_code == 0
    n_ffn, n_all = len(gf.load(ffn).vectors), len(gf.load(tmp_path / "gains" / "both.safetensors").vectors)
    lines = warnings_of(cli("apply", base, tmp_path / "gains" / "both.safetensors", tmp_path / "out"))
    assert len(lines) == 1
    assert f"both.safetensors records no base_tensors_sha256 for {n_ffn} of its {n_all} tensors" in lines[0]
    refused(cli("apply", sibling, tmp_path / "gains" / "both.safetensors", tmp_path / "o2"),
            "attn.safetensors (parent of both.safetensors) was trained on other weights")


def test_a_nested_stack_keeps_the_inner_parents_checks_and_their_gaps(bases, cli, tmp_path):
    base, sibling = bases
    g = tmp_path / "gains"
    a = fingerprinted(base, "gain", seed=1).save(g / "a.safetensors")
    b = random_gain(base, "gain", seed=2).save(g / "b.safetensors")
    c = fingerprinted(base, "gain-ffn", seed=3).save(g / "c.safetensors")
    assert cli("stack", a, b, "-o", g / "ab.safetensors").exit_code == 0
    assert cli("stack", g / "ab.safetensors", c, "-o", g / "abc.safetensors").exit_code == 0
    n_all, n_attn = len(gf.load(c).vectors), len(gf.load(a).vectors)
    lines = warnings_of(cli("apply", base, g / "abc.safetensors", tmp_path / "out"))
    assert len(lines) == 1 and f"for {n_attn} of its {n_all} tensors" in lines[0]
    # The inner fingerprinted parent is checked through two levels of stacking.
    refused(cli("apply", sibling, g / "abc.safetensors", tmp_path / "o2"),
            "a.safetensors (parent of ab.safetensors (parent of abc.safetensors)) was trained on other weights")


def test_a_fully_fingerprinted_stack_applies_without_a_warning(bases, cli, tmp_path):
    base, _ = bases
    g = tmp_path / "gains"
    a = fingerprinted(base, "gain", seed=1).save(g / "a.safetensors")
    c = fingerprinted(base, "gain-ffn", seed=3).save(g / "c.safetensors")
    res = cli("stack", a, c, "-o", g / "ac.safetensors")
    assert res.exit_code == 0 and res.stderr == ""
    assert warnings_of(cli("apply", base, g / "ac.safetensors", tmp_path / "out")) == []
    assert "base_not_checked" not in provenance(tmp_path / "out")


def test_inspect_says_how_much_of_a_stack_is_unchecked(bases, cli, tmp_path):
    base, _ = bases
    g = tmp_path / "gains"
    a = fingerprinted(base, "gain", seed=1).save(g / "attn.safetensors")
    ffn = ffn_only(base, seed=2).save(g / "ffn.safetensors")
    assert cli("stack", a, ffn, "-o", g / "both.safetensors").exit_code == 0
    res = cli("inspect", g / "both.safetensors")
    n_ffn, n_all = len(gf.load(ffn).vectors), len(gf.load(g / "both.safetensors").vectors)
    assert f"none recorded for {n_ffn} of its {n_all} tensors" in res.output
    assert json.loads(cli("inspect", g / "both.safetensors", "--json").output)["base_coverage"] == {
        "tensors": n_all, "uncovered": n_ffn}


# ---------------------------------------------------------------------- 3d: a fingerprint must cover what it vouches for


def crafted(base, parents: list, name: str, tmp_path, method: str = "gain"):
    """A stacked-looking gain file whose ``parents`` say what the test wants (no own fingerprint)."""
    g = random_gain(base, method, seed=7)
    g.metadata["parents"] = parents
    return g.save(tmp_path / "gains" / name)


def test_a_fingerprint_over_zero_tensors_matches_no_base(bases, cli, tmp_path):
    """``tensors: []`` with the sha256 of nothing used to match every base, silently."""
    base, sibling = bases
    gain = crafted(base, [{"name": "x", gf.BASE_TENSORS_KEY: EMPTY_SHA, "tensors": []}], "zero.safetensors",
                   tmp_path)
    for target, out in ((base, "o1"), (sibling, "o2")):
        lines = warnings_of(cli("apply", target, gain, tmp_path / out))
        assert len(lines) == 1 and lines[0].startswith("warning: zero.safetensors records no base_tensors_sha256 "
                                                       "(made before"), lines
        assert provenance(tmp_path / out)["base_not_checked"] == ["zero.safetensors"]
    assert "none recorded (apply cannot check" in cli("inspect", gain).output


def test_a_fingerprint_over_some_tensors_is_checked_and_the_rest_warned(bases, cli, tmp_path):
    base, sibling = bases
    g = random_gain(base, "gain", seed=7)
    keys = sorted(g.vectors)[:1]
    fp = base_tensors_sha256(open_checkpoint(base), keys)
    gain = crafted(base, [{"name": "part", gf.BASE_TENSORS_KEY: fp, "tensors": keys}], "part.safetensors", tmp_path)
    lines = warnings_of(cli("apply", base, gain, tmp_path / "o1"))
    assert len(lines) == 1 and f"for {len(g.vectors) - 1} of its {len(g.vectors)} tensors" in lines[0]
    refused(cli("apply", sibling, gain, tmp_path / "o2"), "part (parent of part.safetensors) was trained on other")
    assert not (tmp_path / "o2").exists()


@pytest.mark.parametrize("parents", [
    [{"name": "nested", "parents": [{"name": "inner", gf.BASE_TENSORS_KEY: EMPTY_SHA, "tensors": []}]}],
    [{"name": "bad", gf.BASE_TENSORS_KEY: "sha256:" + "0" * 63}],  # not spelled like a fingerprint
    [{"name": "no-fingerprint"}],
    [],
])
def test_anything_short_of_a_full_fingerprint_warns(bases, cli, tmp_path, parents):
    base, sibling = bases
    gain = crafted(base, parents, "odd.safetensors", tmp_path)
    lines = warnings_of(cli("apply", sibling, gain, tmp_path / "out"))
    assert len(lines) == 1 and lines[0].startswith("warning: odd.safetensors records no base_tensors_sha256")


@pytest.mark.parametrize("tensors, message", [
    ("model.layers.0.self_attn.o_proj.weight", "'tensors' must be a list of tensor names"),
    ([1, 2], "'tensors' must be a list of tensor names"),
    (["not.a.key.of.the.file"], "records tensors the file does not scale"),
])
def test_a_malformed_parent_tensor_list_is_one_line(bases, cli, tmp_path, tensors, message):
    base, _ = bases
    gain = crafted(base, [{"name": "p", gf.BASE_TENSORS_KEY: EMPTY_SHA, "tensors": tensors}], "bad.safetensors",
                   tmp_path)
    refused(cli("apply", base, gain, tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()


def test_no_code_path_takes_a_fingerprint_over_nothing():
    from gainsurgery.io.fingerprint import combine

    with pytest.raises(ValueError):
        combine({}, [])
