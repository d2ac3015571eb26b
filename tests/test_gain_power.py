"""The post-hoc strength knob: ``gainsurgery scale G --power α`` (s -> s^α) and ``apply BASE G@α OUT``."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import random_gain
from gainsurgery.errors import GainFileError
from gainsurgery.gainfile import GainFile, invert, load, power, split_power


def _g(values, dim=0) -> GainFile:
    return GainFile({"w": np.asarray(values, np.float32)}, {"w": dim}, {"description": "d"})


def test_power_is_s_to_the_alpha_and_meets_identity_and_inverse():
    g = _g([4.0, 0.25, 1.5, 0.9])
    np.testing.assert_allclose(power(g, 0.5).vectors["w"], [2.0, 0.5, 1.5 ** 0.5, 0.9 ** 0.5], rtol=1e-7)
    np.testing.assert_array_equal(power(g, 0).vectors["w"], np.ones(4, np.float32))
    np.testing.assert_array_equal(power(g, 1).vectors["w"], g.vectors["w"])
    np.testing.assert_allclose(power(g, -1).vectors["w"], invert(g).vectors["w"], rtol=1e-7)
    # powers compose: (s^a)^b = s^(ab), up to float32 rounding of the intermediate
    np.testing.assert_allclose(power(power(g, 0.5), 4).vectors["w"], power(g, 2).vectors["w"], rtol=1e-6)
    assert power(g, 0.5).metadata["description"] == "s^0.5 of d" and g.metadata["description"] == "d"
    assert power(g, 0.5).vectors["w"].dtype == np.float32


def test_power_refuses_what_has_no_real_or_finite_answer():
    neg = _g([-2.0, 0.5])
    np.testing.assert_array_equal(power(neg, 2).vectors["w"], [4.0, 0.25])
    np.testing.assert_array_equal(power(neg, 3).vectors["w"], [-8.0, 0.125])
    with pytest.raises(GainFileError, match="no real power 0.5"):
        power(neg, 0.5)
    with pytest.raises(GainFileError, match="overflows float32"):
        power(_g([100.0]), 100)
    with pytest.raises(GainFileError, match="reaches zero"):
        power(_g([0.01]), 200)
    for bad in (float("nan"), float("inf"), 1e9, True):
        with pytest.raises(GainFileError, match="finite number"):
            power(_g([1.1]), bad)


@pytest.mark.parametrize("spec, expect", [
    ("legal.safetensors@0.5", ("legal.safetensors", 0.5)),
    ("dir/legal.safetensors@-1", ("dir/legal.safetensors", -1.0)),
    ("legal.safetensors@1e-1", ("legal.safetensors", 0.1)),
    ("legal.safetensors@.25", ("legal.safetensors", 0.25)),
    ("legal.safetensors", ("legal.safetensors", None)),
    ("legal.safetensors@abc", ("legal.safetensors@abc", None)),
    ("legal.safetensors@0.5@0.5", ("legal.safetensors@0.5@0.5", None)),
    ("org/gains@v1.5:legal.safetensors", ("org/gains@v1.5:legal.safetensors", None)),
    ("org/gains@2:legal.safetensors", ("org/gains@2:legal.safetensors", None)),
    ("org/gains@v1.5:legal.safetensors@0.5", ("org/gains@v1.5:legal.safetensors", 0.5)),
    ("org/gains:legal.safetensors@2", ("org/gains:legal.safetensors", 2.0)),
    ("legal.bin@0.5", ("legal.bin@0.5", None)),
])
def test_the_power_suffix_is_never_a_hub_revision(spec, expect):
    assert split_power(spec) == expect


def test_a_file_named_with_the_suffix_is_that_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "odd.safetensors@0.5").write_bytes(b"x")
    assert split_power("odd.safetensors@0.5") == ("odd.safetensors@0.5", None)


def test_scale_cli_then_apply_with_the_suffix_is_the_same_model(tiny_ckpt, cli, tmp_path):
    base = tiny_ckpt("llama", "bfloat16")
    g = random_gain(base, "gain-ffn", seed=21)
    g.save(tmp_path / "g.safetensors")
    res = cli("scale", tmp_path / "g.safetensors", "--power", "0.5", "-o", tmp_path / "half.safetensors", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["power"] == 0.5
    half = load(tmp_path / "half.safetensors")
    for k, v in g.vectors.items():
        np.testing.assert_allclose(half.vectors[k], np.sqrt(v.astype(np.float64)), rtol=1e-7)
    assert half.metadata["parents"][0]["op"] == "power" and half.metadata["parents"][0]["power"] == 0.5
    # apply G@0.5 writes exactly what apply of the scaled file writes, and verify reads the suffix too
    assert cli("apply", base, f"{tmp_path / 'g.safetensors'}@0.5", tmp_path / "m1").exit_code == 0
    assert cli("apply", base, tmp_path / "half.safetensors", tmp_path / "m2").exit_code == 0
    for f in (tmp_path / "m1").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "m2" / f.name).read_bytes()
    res = cli("verify", base, f"{tmp_path / 'g.safetensors'}@0.5", tmp_path / "m1")
    assert res.exit_code == 0, res.output
    prov = json.loads((tmp_path / "m1" / "gainsurgery.json").read_text())
    assert any(src.get("power") == 0.5 for src in prov["gains"])
    # α = 0 is the base, byte for byte
    assert cli("apply", base, f"{tmp_path / 'g.safetensors'}@0", tmp_path / "m0").exit_code == 0
    for f in base.glob("*.safetensors"):
        from safetensors.torch import load_file

        before, after = load_file(f), load_file(tmp_path / "m0" / f.name)
        assert all((before[k] == after[k]).all() for k in before)


def test_scale_errors_are_one_line(tiny_ckpt, cli, tmp_path):
    base = tiny_ckpt("llama", "float32")
    random_gain(base, seed=3).save(tmp_path / "g.safetensors")
    res = cli("scale", tmp_path / "g.safetensors", "--power", "nan", "-o", tmp_path / "x.safetensors")
    assert res.exit_code == 1 and "finite number" in res.output and not (tmp_path / "x.safetensors").exists()
    res = cli("scale", tmp_path / "g.safetensors", "--power", "0.5", "-o", tmp_path / "g.safetensors")
    assert res.exit_code == 1
