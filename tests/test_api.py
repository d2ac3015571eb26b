"""The public Python API (gainsurgery.api, re-exported lazily from gainsurgery), on tiny real models."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import gainsurgery
from conftest import random_gain
from gainsurgery import api
from gainsurgery.errors import ArchitectureError, GainFileError
from gainsurgery.gainfile import GainFile
from models import TEXT_A, load_model, save_tiny_lm, write_domain

INPUT_IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 64, 100, 7, 3]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits.float()


def test_lazy_reexports_are_the_api():
    assert gainsurgery.apply is api.apply and gainsurgery.load_gain is api.load_gain
    assert gainsurgery.train is api.train and gainsurgery.attach is api.attach
    from gainsurgery.training.config import TrainConfig

    assert gainsurgery.TrainConfig is TrainConfig
    assert {"apply", "attach", "train", "load_gain", "TrainConfig"} <= set(dir(gainsurgery))
    with pytest.raises(AttributeError):
        gainsurgery.no_such_name  # noqa: B018


def test_import_gainsurgery_is_cheap():
    code = "import sys, gainsurgery; print(sorted(m for m in ('numpy', 'torch', 'huggingface_hub') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_load_save_stack_invert(tiny_ckpt, tmp_path):
    base = tiny_ckpt("llama", "bfloat16")
    a, b = random_gain(base, "gain-ffn", seed=1), random_gain(base, "gain", seed=2)
    pa = api.save_gain(a, tmp_path / "a.safetensors")
    api.save_gain(b, tmp_path / "b.safetensors")
    loaded = api.load_gain(pa)
    assert loaded.dims == a.dims and all(np.array_equal(loaded.vectors[k], a.vectors[k]) for k in a.vectors)

    both = api.stack_gains([pa, tmp_path / "b.safetensors"], description="a then b")
    key = next(iter(b.vectors))
    np.testing.assert_array_equal(both.vectors[key], np.multiply(a.vectors[key], b.vectors[key], dtype=np.float32))
    assert [p["name"] for p in both.metadata["parents"]] == ["a.safetensors", "b.safetensors"]
    assert all(len(p["sha256"]) == 64 for p in both.metadata["parents"])
    assert both.metadata["description"] == "a then b"
    in_memory = api.stack_gains([a, b])  # objects work too (no sha256 to record)
    np.testing.assert_array_equal(in_memory.vectors[key], both.vectors[key])

    inv = api.invert_gain(pa)
    for k in a.vectors:
        np.testing.assert_allclose(inv.vectors[k] * a.vectors[k], 1.0, rtol=2e-7)
    assert inv.metadata["parents"][0]["op"] == "invert"
    with pytest.raises(GainFileError):
        api.load_gain(tmp_path / "missing.safetensors")


def test_apply_returns_a_result_and_matches_the_cli(tiny_ckpt, tmp_path, cli):
    base = tiny_ckpt("llama", "bfloat16")
    g = random_gain(base, "gain-ffn", seed=3)
    path = g.save(tmp_path / "g.safetensors")
    result = api.apply(base, [path], tmp_path / "m", verify=True)
    assert result.out == (tmp_path / "m").resolve() and result.verified and not result.dry_run
    assert result.plan.tensors_touched == 4 and set(result.shard_sha256) == {p.name for p in base.glob("*.safetensors")}
    assert json.loads((tmp_path / "m" / "gainsurgery.json").read_text())["shards"] == {
        n: {"sha256": s, "bytes": (base / n).stat().st_size} for n, s in result.shard_sha256.items()}
    assert cli("apply", base, path, tmp_path / "m-cli").exit_code == 0
    for f in base.glob("*.safetensors"):
        assert (tmp_path / "m" / f.name).read_bytes() == (tmp_path / "m-cli" / f.name).read_bytes()
    assert api.verify(base, [path], tmp_path / "m").ok

    # an in-memory GainFile applies the same bytes
    api.apply(base, [g], tmp_path / "m-obj")
    for f in base.glob("*.safetensors"):
        assert (tmp_path / "m" / f.name).read_bytes() == (tmp_path / "m-obj" / f.name).read_bytes()

    plan = api.apply(base, [path], tmp_path / "dry", dry_run=True)
    assert plan.dry_run and plan.out is None and not (tmp_path / "dry").exists()


def test_targets_and_identity(tiny_ckpt):
    base = tiny_ckpt("gpt2", "bfloat16")
    found = api.targets(base, "gain-ffn")
    assert found.model_type == "gpt2" and found.parameters == 2 * (32 + 96)
    assert {t.dim for t in found.targets} == {0}  # Conv1D: input side is dim 0
    ident = found.identity()
    assert ident.num_parameters == found.parameters and ident.metadata["base_fingerprint"] == found.fingerprint


def test_attach_is_removable_and_a_context_manager(tiny_ckpt, tmp_path):
    base = tiny_ckpt("llama", "float32")
    g = random_gain(base, "gain-ffn", seed=4)
    path = g.save(tmp_path / "g.safetensors")
    api.apply(base, [path], tmp_path / "m")
    model = load_model(base, "llama")
    plain = logits(model)
    merged = logits(load_model(tmp_path / "m", "llama"))

    handle = api.attach(model, path)
    torch.testing.assert_close(logits(model), merged, rtol=1e-4, atol=1e-4)
    handle.remove()
    assert torch.equal(logits(model), plain)

    with api.attach(model, [g]) as hooks:
        assert len(hooks.handles) == 4
        torch.testing.assert_close(logits(model), merged, rtol=1e-4, atol=1e-4)
    assert torch.equal(logits(model), plain)

    # two gains are stacked: g and its inverse leave the model as it was (up to float32 rounding)
    with api.attach(model, [g, api.invert_gain(g)]):
        torch.testing.assert_close(logits(model), plain, rtol=1e-5, atol=1e-5)


def test_attach_refuses_a_gain_for_another_model(tiny_ckpt):
    llama, gpt2 = tiny_ckpt("llama", "float32"), tiny_ckpt("gpt2", "float32")
    model = load_model(gpt2, "gpt2")
    with pytest.raises(ArchitectureError, match="no unique module"):
        api.attach(model, random_gain(llama, "gain"))
    assert not model._forward_pre_hooks and all(not m._forward_pre_hooks for m in model.modules())


def test_train_with_a_config(tmp_path):
    base = save_tiny_lm(tmp_path / "base", "llama")
    data = write_domain(tmp_path, "legal", TEXT_A)
    cfg = gainsurgery.TrainConfig(base=str(base), data=[str(data)], output=str(tmp_path / "g.safetensors"),
                                  method="gain", steps=3, batch_size=2, seq_len=32, lr=0.05, progress=False)
    result = api.train(cfg)
    assert result.steps == 3 and result.trainable_parameters == 2 * 32 and np.isfinite(result.final_loss)
    g = api.load_gain(tmp_path / "g.safetensors")
    assert g.metadata["method"] == "gain" and g.metadata["training"]["steps"] == 3
    assert any(not np.allclose(v, 1.0) for v in g.vectors.values())


def test_gainfile_objects_are_validated(tiny_ckpt, tmp_path):
    base = tiny_ckpt("llama", "bfloat16")
    g = random_gain(base, "gain", seed=5)
    key = next(iter(g.vectors))
    bad = GainFile({**g.vectors, key: -g.vectors[key]}, dict(g.dims))
    with pytest.raises(GainFileError, match="negative"):
        api.apply(base, [bad], tmp_path / "m")
    assert not (tmp_path / "m").exists()
