"""Bad input: one-line error, non-zero exit, no OUT left behind, BASE untouched."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from conftest import random_gain
from gainsurgery import gainfile as gf

KEY = "model.layers.0.self_attn.o_proj.weight"


def copy_base(tiny_ckpt, tmp_path, model_type="llama") -> Path:
    dst = tmp_path / "base"
    shutil.copytree(tiny_ckpt(model_type, "bfloat16"), dst)
    return dst


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_clean_failure(res, out: Path, match: str) -> None:
    assert res.exit_code == 1, res.output + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert match in lines[0], lines[0]
    assert "Traceback" not in res.stderr
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.gainsurgery*"))


def write_raw_shard(path: Path, header: dict, data: bytes, header_len: int | None = None) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", header_len if header_len is not None else len(raw)) + raw + data)


def first_shard(base: Path) -> Path:
    index = json.loads((base / "model.safetensors.index.json").read_text())
    return base / index["weight_map"][KEY]


@pytest.fixture
def setup(tiny_ckpt, tmp_path):
    base = copy_base(tiny_ckpt, tmp_path)
    random_gain(base, "gain", seed=0).save(tmp_path / "g.safetensors")
    return base, tmp_path / "g.safetensors", tmp_path / "out"


def test_missing_shard(setup, cli):
    base, g, out = setup
    first_shard(base).unlink()
    assert_clean_failure(cli("apply", base, g, out), out, "shard missing")


def test_truncated_shard(setup, cli):
    base, g, out = setup
    shard = first_shard(base)
    shard.write_bytes(shard.read_bytes()[:-10])
    assert_clean_failure(cli("apply", base, g, out), out, "truncated")


def test_absurd_header_length(setup, cli):
    base, g, out = setup
    shard = first_shard(base)
    shard.write_bytes(struct.pack("<Q", 1 << 60) + shard.read_bytes()[8:])
    assert_clean_failure(cli("apply", base, g, out), out, "absurd")


def test_header_not_json(setup, cli):
    base, g, out = setup
    shard = first_shard(base)
    raw = bytearray(shard.read_bytes())
    raw[8:12] = b"\xff\xfe{["
    shard.write_bytes(bytes(raw))
    assert_clean_failure(cli("apply", base, g, out), out, "header: not valid UTF-8")


def _rewrite_header(shard: Path, edit) -> None:
    raw = shard.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    edit(header)
    write_raw_shard(shard, header, data)


def test_offsets_outside_file(setup, cli):
    base, g, out = setup
    _rewrite_header(first_shard(base), lambda h: h[KEY].__setitem__("data_offsets", [0, 10**9]))
    assert_clean_failure(cli("apply", base, g, out), out, "spans 1000000000 bytes but shape [32, 32] x BF16 needs 2048")


def test_overlapping_tensors(setup, cli):
    base, g, out = setup

    def overlap(h):
        names = [k for k in h if k != "__metadata__"]
        a, b = sorted(names, key=lambda k: h[k]["data_offsets"][0])[:2]
        size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
        start = h[a]["data_offsets"][0]
        h[b]["data_offsets"] = [start, start + size]

    _rewrite_header(first_shard(base), overlap)
    assert_clean_failure(cli("apply", base, g, out), out, "overlap")


def test_unknown_dtype(setup, cli):
    base, g, out = setup
    _rewrite_header(first_shard(base), lambda h: h[KEY].__setitem__("dtype", "Q3_K"))
    assert_clean_failure(cli("apply", base, g, out), out, "unknown dtype 'Q3_K'")


@pytest.mark.parametrize("shard_name,match", [
    ("../evil.safetensors", "not a plain file name"),
    ("sub/evil.safetensors", "not a plain file name"),
    ("..", "not a plain file name"),
    ("/etc/passwd", "not a plain file name"),
])
def test_index_shard_names(setup, cli, shard_name, match):
    base, g, out = setup
    index = json.loads((base / "model.safetensors.index.json").read_text())
    index["weight_map"][KEY] = shard_name
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_clean_failure(cli("apply", base, g, out), out, match)


def test_index_symlink_outside_base(setup, cli, tmp_path):
    base, g, out = setup
    shard = first_shard(base)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    assert_clean_failure(cli("apply", base, g, out), out, f"resolves to {outside}, outside {base}; refusing to read it")


def test_bin_only_checkpoint(tmp_path, cli):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "llama"}')
    (base / "pytorch_model.bin").write_bytes(b"PK\x03\x04 pickle inside")
    gf.GainFile({KEY: np.ones(4, np.float32)}, {KEY: 1}).save(tmp_path / "g.safetensors")
    assert_clean_failure(cli("apply", base, tmp_path / "g.safetensors", tmp_path / "out"), tmp_path / "out",
                         "reads safetensors only")


def test_gain_without_v1_metadata(setup, cli, tmp_path):
    base, _, out = setup
    save_file({KEY: np.ones(32, np.float32)}, tmp_path / "plain.safetensors")
    assert_clean_failure(cli("apply", base, tmp_path / "plain.safetensors", out), out, "not a gain file")


def test_gain_key_not_in_base(setup, cli, tmp_path):
    base, _, out = setup
    gf.GainFile({"model.layers.7.self_attn.o_proj.weight": np.ones(32, np.float32)},
                {"model.layers.7.self_attn.o_proj.weight": 1}).save(tmp_path / "x.safetensors")
    assert_clean_failure(cli("apply", base, tmp_path / "x.safetensors", out), out, "not a tensor of the base")


def test_vector_length_mismatch(setup, cli, tmp_path):
    base, _, out = setup
    gf.GainFile({KEY: np.ones(31, np.float32)}, {KEY: 1}).save(tmp_path / "x.safetensors")
    assert_clean_failure(cli("apply", base, tmp_path / "x.safetensors", out), out, "has length 31")


def test_dim_out_of_range(setup, cli, tmp_path):
    base, _, out = setup
    gf.GainFile({KEY: np.ones(32, np.float32)}, {KEY: 2}).save(tmp_path / "x.safetensors")
    assert_clean_failure(cli("apply", base, tmp_path / "x.safetensors", out), out, "only 2 dims")


@pytest.mark.parametrize("value,match", [(float("nan"), "NaN"), (float("inf"), "infinite"), (0.0, "zero"),
                                         (-1.0, "negative")])
def test_bad_gain_values(setup, cli, tmp_path, value, match):
    base, _, out = setup
    vec = np.ones(32, np.float32)
    vec[3] = value
    save_file({KEY: vec}, tmp_path / "x.safetensors", metadata={"format": gf.FORMAT, "dims": json.dumps({KEY: 1})})
    assert_clean_failure(cli("apply", base, tmp_path / "x.safetensors", out), out, match)


def test_negative_gain_with_flag(setup, cli, tmp_path):
    base, _, out = setup
    vec = np.ones(32, np.float32)
    vec[3] = -1.0
    gf.GainFile({KEY: vec}, {KEY: 1}).save(tmp_path / "x.safetensors")
    assert cli("apply", base, tmp_path / "x.safetensors", out, "--allow-negative").exit_code == 0


def test_quantized_target_refused(tmp_path, cli):
    base = tmp_path / "base"
    base.mkdir()
    save_file({KEY: np.zeros((32, 32), np.int8), "model.embed_tokens.weight": np.zeros((4, 32), np.float32)},
              base / "model.safetensors")
    gf.GainFile({KEY: np.ones(32, np.float32)}, {KEY: 1}).save(tmp_path / "g.safetensors")
    assert_clean_failure(cli("apply", base, tmp_path / "g.safetensors", tmp_path / "out"), tmp_path / "out",
                         "quantized (I8)")


def test_out_equal_to_or_inside_base(setup, cli):
    base, g, _ = setup
    before = snapshot(base)
    for out, why in ((base, "is the input"), (base / "merged", "lies inside the input")):
        res = cli("apply", base, g, out)
        assert res.exit_code == 1 and why in res.stderr
    assert snapshot(base) == before


def test_out_exists_and_overwrite(setup, cli):
    base, g, out = setup
    out.mkdir()
    (out / "keep.txt").write_text("x")
    res = cli("apply", base, g, out)
    assert res.exit_code == 1 and "already exists" in res.stderr and "--overwrite" in res.stderr
    assert (out / "keep.txt").exists()
    assert cli("apply", base, g, out, "--overwrite").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "gainsurgery.json").exists()


def test_overwrite_refuses_out_containing_base_or_gain(setup, cli, tmp_path):
    base, g, out = setup
    res = cli("apply", base, g, tmp_path, "--overwrite")
    assert res.exit_code == 1 and f"holds the input {base}" in res.stderr
    out.mkdir()
    shutil.copy(g, out / "g.safetensors")
    res = cli("apply", base, out / "g.safetensors", out, "--overwrite")
    assert res.exit_code == 1 and f"holds the input {out / 'g.safetensors'}" in res.stderr
    assert (out / "g.safetensors").exists()


def test_unknown_model_type_for_targets(setup, cli):
    base, _, _ = setup
    config = json.loads((base / "config.json").read_text())
    config["model_type"] = "florp"
    (base / "config.json").write_text(json.dumps(config))
    res = cli("targets", base)
    assert res.exit_code == 1 and "unsupported model_type 'florp'" in res.stderr and "llama" in res.stderr


def test_disk_full_leaves_nothing(tiny_ckpt, cli, tmp_path):
    """A real full disk: a 1 MiB tmpfs that cannot hold the output."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=512,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2)).to(torch.bfloat16).save_pretrained(
        base, max_shard_size="1MB")
    random_gain(base, "gain").save(tmp_path / "g.safetensors")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = mnt / "merged"
        assert_clean_failure(cli("apply", base, tmp_path / "g.safetensors", out), out, "disk full")
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)])


def _signal_mid_apply(tiny_ckpt, tmp_path, tmp_path_factory, sig) -> tuple[int, list[str], Path]:
    """Start a real `gainsurgery apply`, wait until its first output shard is whole in the temporary
    folder (a named pause point, gainsurgery.io.pausepoints), and send ``sig``; return its exit status."""
    from pausing import CLI, PausedRun

    base = tiny_ckpt("llama")
    random_gain(base, "gain-ffn").save(tmp_path / "g.safetensors")
    out = tmp_path / "merged"
    args = ["apply", str(base), str(tmp_path / "g.safetensors"), str(out)]
    paused = PausedRun(args, "apply.shard-written", tmp_path_factory.mktemp("flags")).wait_paused()
    return paused.kill(sig), [*CLI, *args], out


def test_sigkill_mid_apply_leaves_no_out(tiny_ckpt, tmp_path, tmp_path_factory):
    """Kill -9 while shards are being written: OUT never appears; the next run cleans up."""
    code, cmd, out = _signal_mid_apply(tiny_ckpt, tmp_path, tmp_path_factory, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not out.exists()
    assert list(tmp_path.glob(".merged.gainsurgery-*.tmp")), "expected the dead run's temporary folder"
    assert list(tmp_path.glob(".merged.gainsurgery-*.claim")), "expected the dead run's claim marker"
    # A later run proves the leftovers are a dead run's (its claim's lock is free), removes them, succeeds.
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert out.is_dir() and not list(tmp_path.glob(".merged.gainsurgery*"))


def test_sigterm_mid_apply_cleans_up(tiny_ckpt, tmp_path, tmp_path_factory):
    code, _, out = _signal_mid_apply(tiny_ckpt, tmp_path, tmp_path_factory, signal.SIGTERM)
    assert code == 143
    assert not out.exists() and not list(tmp_path.glob(".merged.gainsurgery*"))


def test_unwritable_output_folder_is_one_line(setup, cli, tmp_path):
    base, g, _ = setup
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: use a path under a file instead
            out = tmp_path / "g.safetensors" / "out"
            res = cli("apply", base, g, out)
            assert res.exit_code == 1 and res.stderr.startswith("error: ") and len(res.stderr.splitlines()) == 1
        else:
            out = locked / "out"
            assert_clean_failure(cli("apply", base, g, out), out, "ermission")
    finally:
        locked.chmod(0o700)
