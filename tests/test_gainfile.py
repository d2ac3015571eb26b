"""Gain file format v1: round trip, spec conformance, refusals, stack, invert, stats."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from gainsurgery import gainfile as gf
from gainsurgery.errors import GainFileError

KEY_A = "model.layers.0.self_attn.o_proj.weight"
KEY_B = "model.layers.0.mlp.down_proj.weight"


def make(values_a=(1.0, 2.0, 0.5), values_b=(1.5, 1.5, 1.5, 1.5), meta=None) -> gf.GainFile:
    return gf.GainFile({KEY_A: np.array(values_a, np.float32), KEY_B: np.array(values_b, np.float32)},
                       {KEY_A: 1, KEY_B: 1}, dict(meta or {}))


def test_round_trip_and_raw_layout(tmp_path):
    g = make(meta={"method": "gain-ffn", "side": "in", "training": {"steps": 10, "lr": 0.01}})
    path = g.save(tmp_path / "g.safetensors")
    # The file is plain safetensors with the normative metadata, readable by anyone.
    n = struct.unpack("<Q", path.read_bytes()[:8])[0]
    header = json.loads(path.read_bytes()[8 : 8 + n])
    assert header["__metadata__"]["format"] == "gainsurgery.gain/1"
    assert json.loads(header["__metadata__"]["dims"]) == {KEY_A: 1, KEY_B: 1}
    assert json.loads(header["__metadata__"]["training"]) == {"steps": 10, "lr": 0.01}
    assert header[KEY_A] == {"dtype": "F32", "shape": [3], "data_offsets": header[KEY_A]["data_offsets"]}
    back = gf.load(path)
    assert back.num_parameters == 7
    assert back.metadata == {"method": "gain-ffn", "side": "in", "training": {"steps": 10, "lr": 0.01}}
    np.testing.assert_array_equal(back.vectors[KEY_A], [1.0, 2.0, 0.5])


def test_file_written_from_the_spec_alone_loads(tmp_path):
    """Another tool following DESIGN.md with safetensors only must interoperate."""
    save_file({"h.0.attn.c_proj.weight": np.full(4, 1.25, np.float32)}, tmp_path / "x.safetensors",
              metadata={"format": "gainsurgery.gain/1", "dims": '{"h.0.attn.c_proj.weight": 0}'})
    g = gf.load(tmp_path / "x.safetensors")
    assert g.dims == {"h.0.attn.c_proj.weight": 0} and g.num_parameters == 4


@pytest.mark.parametrize("meta,match", [
    ({}, "not a gain file"),
    ({"format": "gainsurgery.gain/2", "dims": "{}"}, "not a gain file"),
    ({"format": "gainsurgery.gain/1"}, "'dims' is missing"),
    ({"format": "gainsurgery.gain/1", "dims": "[1]"}, "dims.: expected object, got array"),
    ({"format": "gainsurgery.gain/1", "dims": '{"other": 1}'}, "disagree"),
])
def test_bad_metadata(tmp_path, meta, match):
    save_file({KEY_A: np.ones(3, np.float32)}, tmp_path / "g.safetensors", metadata=meta or None)
    with pytest.raises(GainFileError, match=match):
        gf.load(tmp_path / "g.safetensors")


@pytest.mark.parametrize("values,match", [
    ([1.0, float("nan"), 1.0], "NaN or infinite"),
    ([1.0, float("inf"), 1.0], "NaN or infinite"),
    ([1.0, 0.0, 1.0], "zero gains"),
    ([1.0, -2.0, 1.0], "negative gains"),
])
def test_bad_values_refused(tmp_path, values, match):
    save_file({KEY_A: np.array(values, np.float32)}, tmp_path / "g.safetensors",
              metadata={"format": gf.FORMAT, "dims": json.dumps({KEY_A: 1})})
    with pytest.raises(GainFileError, match=match):
        gf.load(tmp_path / "g.safetensors")


def test_negative_allowed_only_with_flag(tmp_path):
    make(values_a=(1.0, -1.0, 2.0)).save(tmp_path / "g.safetensors")
    with pytest.raises(GainFileError, match="--allow-negative"):
        gf.load(tmp_path / "g.safetensors")
    assert gf.load(tmp_path / "g.safetensors", allow_negative=True).vectors[KEY_A][1] == -1.0


@pytest.mark.parametrize("tensor,dims,match", [
    (np.ones((2, 3), np.float32), 1, "1-D"),
    (np.ones(3, np.float16), 1, "float32"),
    (np.ones(3, np.float32), -1, "non-negative integer"),
])
def test_bad_vectors(tmp_path, tensor, dims, match):
    save_file({KEY_A: tensor}, tmp_path / "g.safetensors", metadata={"format": gf.FORMAT, "dims": json.dumps({KEY_A: dims})})
    with pytest.raises(GainFileError, match=match):
        gf.load(tmp_path / "g.safetensors")


def test_not_safetensors(tmp_path):
    (tmp_path / "g.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(GainFileError, match="truncated"):
        gf.load(tmp_path / "g.safetensors")
    with pytest.raises(GainFileError, match="not found"):
        gf.load(tmp_path / "missing.safetensors")


def test_stack_product_union_and_provenance():
    a = make(values_a=(2.0, 2.0, 2.0))
    b = gf.GainFile({KEY_A: np.array([0.5, 3.0, 1.0], np.float32),
                     "model.layers.1.self_attn.o_proj.weight": np.array([1.1, 1.2], np.float32)},
                    {KEY_A: 1, "model.layers.1.self_attn.o_proj.weight": 1}, {"method": "gain"})
    s = gf.stack([a, b], ["a.safetensors", "b.safetensors"])
    np.testing.assert_array_equal(s.vectors[KEY_A], np.array([1.0, 6.0, 2.0], np.float32))
    np.testing.assert_array_equal(s.vectors[KEY_B], a.vectors[KEY_B])
    assert set(s.vectors) == {KEY_A, KEY_B, "model.layers.1.self_attn.o_proj.weight"}
    assert [p["name"] for p in s.metadata["parents"]] == ["a.safetensors", "b.safetensors"]
    assert s.metadata["parents"][1]["parameters"] == 5


def test_stack_float32_product_is_exact_order():
    rng = np.random.default_rng(0)
    vs = [rng.uniform(0.5, 2, 1000).astype(np.float32) for _ in range(3)]
    gains = [gf.GainFile({KEY_A: v}, {KEY_A: 1}) for v in vs]
    expected = np.multiply(np.multiply(vs[0], vs[1], dtype=np.float32), vs[2], dtype=np.float32)
    np.testing.assert_array_equal(gf.stack(gains).vectors[KEY_A], expected)


def test_stack_refuses_conflicting_dims():
    a = gf.GainFile({KEY_A: np.ones(3, np.float32)}, {KEY_A: 1})
    b = gf.GainFile({KEY_A: np.ones(3, np.float32)}, {KEY_A: 0})
    with pytest.raises(GainFileError, match="along dim 0"):
        gf.stack([a, b])


def test_invert():
    g = make(values_a=(2.0, 4.0, 0.25))
    inv = gf.invert(g)
    np.testing.assert_array_equal(inv.vectors[KEY_A], np.array([0.5, 0.25, 4.0], np.float32))
    with pytest.raises(GainFileError, match="overflows"):
        gf.invert(gf.GainFile({KEY_A: np.array([1e-39], np.float32)}, {KEY_A: 1}))


def test_stats_numbers():
    st = gf.stats(make(values_a=(1.0, 2.0, 0.5), values_b=(1.5, 1.5, 1.5, 1.5)))
    assert st["parameters"] == 7
    assert st["per_target"][KEY_A]["min"] == 0.5 and st["per_target"][KEY_A]["max"] == 2.0
    assert st["per_target"][KEY_A]["frac_gt_1"] == pytest.approx(1 / 3)
    assert st["per_layer"]["layer 0"]["mean"] == pytest.approx((1 + 2 + 0.5 + 6) / 7)
    assert st["overall"]["frac_gt_1"] == pytest.approx(5 / 7)


def test_save_is_atomic_on_failure(tmp_path):
    path = tmp_path / "g.safetensors"
    make().save(path)
    before = path.read_bytes()
    bad = gf.GainFile({KEY_A: np.array([0.0], np.float32)}, {KEY_A: 1})
    bad.vectors[KEY_A] = np.array([np.nan], np.float32)
    with pytest.raises(GainFileError):
        bad.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"]


def test_saved_file_has_normal_permissions(tmp_path):
    import os
    import stat

    path = make().save(tmp_path / "g.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
