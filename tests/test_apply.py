"""`gainsurgery apply` on tiny real checkpoints of every supported architecture.

For each: the merged folder loads with transformers and gives the logits of the
base with the same gains as forward hooks; target tensors equal the
float32-compute-round-once reference bit for bit; every other tensor is
byte-identical; the shard layout and index are unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import random_gain
from gainsurgery.architectures import family_of, supported_model_types
from gainsurgery.gainfile import GainFile
from gainsurgery.training.hooks import attach
from models import load_model

# Every model type of the registry (a new one without a tiny builder fails here). Mixture-of-experts
# families are tested apart: transformers fuses their experts in memory, so hooks cannot reach them.
MOE = [t for t in supported_model_types() if any("experts" in p for p in family_of(t).ffn_down)]
DENSE = [t for t in supported_model_types() if t not in MOE]
INPUT_IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 64, 100, 7, 3]])


def torch_reference(tensor: torch.Tensor, vector: np.ndarray, dim: int) -> torch.Tensor:
    """T' = round_to(T.dtype, float32(T) * s along dim), computed with torch."""
    shape = [1] * tensor.dim()
    shape[dim] = -1
    return (tensor.float() * torch.from_numpy(vector).reshape(shape)).to(tensor.dtype)


def assert_surgery_exact(base: Path, out: Path, gain: GainFile) -> None:
    """Targets equal the torch reference bit for bit; everything else is byte-identical."""
    assert sorted(p.name for p in base.glob("*.safetensors")) == sorted(p.name for p in out.glob("*.safetensors"))
    assert (base / "model.safetensors.index.json").read_bytes() == (out / "model.safetensors.index.json").read_bytes()
    seen = set()
    for shard in sorted(base.glob("*.safetensors")):
        raw_b, raw_o = shard.read_bytes(), (out / shard.name).read_bytes()
        assert len(raw_b) == len(raw_o)
        n = int.from_bytes(raw_b[:8], "little")
        assert raw_b[: 8 + n] == raw_o[: 8 + n], "header changed"
        header = json.loads(raw_b[8 : 8 + n])
        header.pop("__metadata__", None)
        with safe_open(shard, "pt") as fb, safe_open(out / shard.name, "pt") as fo:
            for name, entry in header.items():
                a, b = entry["data_offsets"]
                chunk_b, chunk_o = raw_b[8 + n + a : 8 + n + b], raw_o[8 + n + a : 8 + n + b]
                if name in gain.vectors:
                    seen.add(name)
                    ref = torch_reference(fb.get_tensor(name), gain.vectors[name], gain.dims[name])
                    got = fo.get_tensor(name)
                    assert got.dtype == ref.dtype
                    assert torch.equal(got.view(torch.int16 if got.element_size() == 2 else torch.int32),
                                       ref.view(torch.int16 if ref.element_size() == 2 else torch.int32)), name
                    assert chunk_b != chunk_o, f"{name} unchanged"
                else:
                    assert chunk_b == chunk_o, f"{name} changed but is not a target"
    assert seen == set(gain.vectors)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits.float()


@pytest.mark.parametrize("model_type", DENSE)
def test_apply_matches_hooks_and_reference(model_type, tiny_ckpt, cli, tmp_path):
    base = tiny_ckpt(model_type, "float32")
    gain = random_gain(base, "gain-ffn", seed=1)
    gain.save(tmp_path / "g.safetensors")
    out = tmp_path / "merged"
    res = cli("apply", base, tmp_path / "g.safetensors", out)
    assert res.exit_code == 0, res.output + res.stderr
    assert_surgery_exact(base, out, gain)

    merged = load_model(out, model_type)
    hooked = load_model(base, model_type)
    plain = logits(hooked)
    with attach(hooked, gain):
        expected = logits(hooked)
    assert torch.equal(logits(hooked), plain), "the hooks were not removed"
    got = logits(merged)
    assert not torch.allclose(plain, expected, atol=1e-4), "gain had no effect; test would be vacuous"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type,dtype", [("llama", "bfloat16"), ("gpt2", "bfloat16"), ("gemma3_text", "bfloat16"),
                                              ("qwen2", "float16"), ("gpt2", "float16")])
def test_apply_half_precision_exact_and_close(model_type, dtype, tiny_ckpt, cli, tmp_path):
    base = tiny_ckpt(model_type, dtype)
    gain = random_gain(base, "gain-ffn", seed=2)
    gain.save(tmp_path / "g.safetensors")
    res = cli("apply", base, tmp_path / "g.safetensors", tmp_path / "m")
    assert res.exit_code == 0, res.stderr
    assert_surgery_exact(base, tmp_path / "m", gain)
    merged = load_model(tmp_path / "m", model_type).float()
    hooked = load_model(base, model_type).float()
    attach(hooked, gain)
    # The merged weights are rounded once to half precision; hooks scale in float32.
    torch.testing.assert_close(logits(merged), logits(hooked), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("model_type", MOE)
def test_apply_moe_per_expert(model_type, tiny_ckpt, cli, tmp_path):
    base = tiny_ckpt(model_type, "float32")
    gain = random_gain(base, "gain-ffn", seed=3)
    experts = [k for k in gain.vectors if ".experts." in k]
    assert len(experts) == 2 * 3  # one FFN gain per expert down projection, 2 layers x 3 experts
    gain.save(tmp_path / "g.safetensors")
    res = cli("apply", base, tmp_path / "g.safetensors", tmp_path / "m")
    assert res.exit_code == 0, res.stderr
    assert_surgery_exact(base, tmp_path / "m", gain)
    # In memory transformers fuses experts, so hooks cannot reach them: the reference is
    # the base loaded and rescaled in memory with torch, compared on logits.
    ref_dir = tmp_path / "ref"
    from safetensors.torch import load_file, save_file

    ref_dir.mkdir()
    for f in base.iterdir():
        if f.suffix == ".safetensors":
            tensors = load_file(f)
            for k in tensors:
                if k in gain.vectors:
                    tensors[k] = torch_reference(tensors[k], gain.vectors[k], gain.dims[k])
            save_file(tensors, ref_dir / f.name, metadata={"format": "pt"})
        else:
            (ref_dir / f.name).write_bytes(f.read_bytes())
    torch.testing.assert_close(logits(load_model(tmp_path / "m", model_type)),
                               logits(load_model(ref_dir, model_type)), rtol=0, atol=0)
    assert not torch.allclose(logits(load_model(base, model_type)), logits(load_model(ref_dir, model_type)))


def test_output_side_scales_bias(tiny_ckpt, cli, tmp_path):
    base = tiny_ckpt("gpt2", "float32")
    gain = random_gain(base, "gain-ffn", side="out", seed=4)
    biases = [k for k in gain.vectors if k.endswith(".bias")]
    assert len(biases) == 4  # attn.c_proj and mlp.c_proj of 2 layers
    gain.save(tmp_path / "g.safetensors")
    assert cli("apply", base, tmp_path / "g.safetensors", tmp_path / "m").exit_code == 0
    assert_surgery_exact(base, tmp_path / "m", gain)
    hooked = load_model(base, "gpt2")
    attach(hooked, gain)
    torch.testing.assert_close(logits(load_model(tmp_path / "m", "gpt2")), logits(hooked), rtol=1e-4, atol=1e-4)


def test_gpt2_without_transformer_prefix(tmp_path, cli):
    """A GPT2Model checkpoint stores `h.N...` without the `transformer.` prefix."""
    from transformers import GPT2Model

    from models import tiny_config

    torch.manual_seed(0)
    GPT2Model(tiny_config("gpt2")).save_pretrained(tmp_path / "base", max_shard_size="20KB")
    gain = random_gain(tmp_path / "base", "gain-ffn", seed=5)
    assert all(k.startswith("h.") for k in gain.vectors)
    gain.save(tmp_path / "g.safetensors")
    assert cli("apply", tmp_path / "base", tmp_path / "g.safetensors", tmp_path / "m").exit_code == 0
    assert_surgery_exact(tmp_path / "base", tmp_path / "m", gain)


def test_single_file_checkpoint(tmp_path, cli):
    from models import build_model

    build_model("llama").save_pretrained(tmp_path / "base")  # one model.safetensors, no index
    assert not (tmp_path / "base" / "model.safetensors.index.json").exists()
    gain = random_gain(tmp_path / "base", "gain", seed=6)
    gain.save(tmp_path / "g.safetensors")
    assert cli("apply", tmp_path / "base", tmp_path / "g.safetensors", tmp_path / "m").exit_code == 0
    assert not (tmp_path / "m" / "model.safetensors.index.json").exists()
    raw_b, raw_o = (tmp_path / "base/model.safetensors").read_bytes(), (tmp_path / "m/model.safetensors").read_bytes()
    assert len(raw_b) == len(raw_o) and raw_b != raw_o
    assert cli("verify", tmp_path / "base", tmp_path / "g.safetensors", tmp_path / "m").exit_code == 0


def test_stack_applied_once_equals_float32_product(tiny_ckpt, cli, tmp_path):
    base = tiny_ckpt("llama", "bfloat16")
    a, b = random_gain(base, "gain-ffn", seed=10), random_gain(base, "gain", seed=11)
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    # Two gains on the command line and a stacked file give identical outputs.
    assert cli("apply", base, tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m1").exit_code == 0
    assert cli("stack", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-o", tmp_path / "ab.safetensors").exit_code == 0
    assert cli("apply", base, tmp_path / "ab.safetensors", tmp_path / "m2").exit_code == 0
    product = GainFile({k: (a.vectors[k] * b.vectors[k] if k in b.vectors else a.vectors[k]) for k in a.vectors},
                       dict(a.dims))
    assert_surgery_exact(base, tmp_path / "m1", product)
    for f in (tmp_path / "m1").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "m2" / f.name).read_bytes()
    # Rounding once differs from rounding twice (apply a, then b on the result) somewhere.
    assert cli("apply", base, tmp_path / "a.safetensors", tmp_path / "t").exit_code == 0
    assert cli("apply", tmp_path / "t", tmp_path / "b.safetensors", tmp_path / "m3").exit_code == 0
    assert any(f.read_bytes() != (tmp_path / "m3" / f.name).read_bytes() for f in (tmp_path / "m1").glob("*.safetensors"))


def test_invert_round_trip(tiny_ckpt, cli, tmp_path):
    base = tiny_ckpt("llama", "float32")
    g = random_gain(base, "gain-ffn", seed=12)
    g.save(tmp_path / "g.safetensors")
    assert cli("invert", tmp_path / "g.safetensors", "-o", tmp_path / "inv.safetensors").exit_code == 0
    from gainsurgery.gainfile import load

    inv = load(tmp_path / "inv.safetensors")
    for k in g.vectors:
        np.testing.assert_allclose(g.vectors[k] * inv.vectors[k], 1.0, rtol=2e-7)
    # g then g^-1 in one pass is the identity up to float32 rounding of s * (1/s).
    assert cli("apply", base, tmp_path / "g.safetensors", tmp_path / "inv.safetensors", tmp_path / "m").exit_code == 0
    from safetensors.torch import load_file

    for shard in base.glob("*.safetensors"):
        before, after = load_file(shard), load_file(tmp_path / "m" / shard.name)
        for k in before:
            torch.testing.assert_close(after[k], before[k], rtol=3e-7, atol=0)


def test_provenance_and_model_card(tiny_ckpt, cli, tmp_path):
    base = tiny_ckpt("qwen2", "bfloat16")
    g = random_gain(base, "gain", seed=13)
    g.metadata["base_model"] = "Qwen/Qwen2.5-0.5B"
    g.save(tmp_path / "g.safetensors")
    assert cli("apply", base, tmp_path / "g.safetensors", tmp_path / "m").exit_code == 0
    raw = (tmp_path / "m" / "gainsurgery.json").read_text()
    prov = json.loads(raw)
    from gainsurgery.io.hashing import sha256_file as file_sha256

    assert prov["gains"][0]["sha256"] == file_sha256(tmp_path / "g.safetensors")
    # Shared with the model: the base by folder name, files by name and sha256, no local paths.
    assert prov["base"] == {"local": "base"} and "path" not in prov["gains"][0]
    assert str(tmp_path) not in raw and str(base.parent) not in raw
    assert prov["tensors_scaled"] == 2
    for name, entry in prov["shards"].items():
        assert entry["sha256"] == file_sha256(tmp_path / "m" / name)
    card = (tmp_path / "m" / "README.md").read_text()
    # A local base is never claimed as base_model (the gain's metadata is no proof of it)...
    assert card.startswith("---\n") and "base_model:" not in card and 'library_name: "transformers"' in card
    # ... unless the user names the Hub repo.
    assert cli("apply", base, tmp_path / "g.safetensors", tmp_path / "m2", "--base-model",
               "Qwen/Qwen2.5-0.5B").exit_code == 0
    card = (tmp_path / "m2" / "README.md").read_text()
    assert 'base_model: "Qwen/Qwen2.5-0.5B"' in card
    assert 'base_model_relation: "merge"' in card and 'library_name: "transformers"' in card
    for extra in ("config.json", "generation_config.json"):
        assert (tmp_path / "m" / extra).read_bytes() == (base / extra).read_bytes()


def test_dry_run_writes_nothing(tiny_ckpt, cli, tmp_path):
    base = tiny_ckpt("llama", "bfloat16")
    random_gain(base, "gain-ffn").save(tmp_path / "g.safetensors")
    res = cli("apply", base, tmp_path / "g.safetensors", tmp_path / "m", "--dry-run", "--json")
    assert res.exit_code == 0
    plan = json.loads(res.output)
    assert plan["tensors_touched"] == 4
    assert plan["bytes_rewritten"] == sum(t["bytes"] for t in plan["touched"])
    assert plan["bytes_rewritten"] + plan["bytes_copied"] == sum(p.stat().st_size for p in base.glob("*.safetensors"))
    assert not (tmp_path / "m").exists()


def test_small_chunks_and_single_thread_give_same_bytes(tiny_ckpt, tmp_path):
    """Chunk boundaries and threading must not change a single byte."""
    from gainsurgery.api import apply

    from transformers import AutoModelForCausalLM, LlamaConfig

    base = tmp_path / "base"
    config = LlamaConfig(vocab_size=64, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(base, max_shard_size="3MB")
    # down_proj is 512 x 1536 bf16 = 1.5 MiB: several 1 MiB chunks and many 1 MiB compute blocks.
    gain = random_gain(base, "gain-ffn", seed=14)
    apply(base, [gain], tmp_path / "a", chunk_bytes=1 << 20, threads=1)
    apply(base, [gain], tmp_path / "b", chunk_bytes=64 << 20, threads=4)
    assert_surgery_exact(base, tmp_path / "a", gain)
    for f in base.glob("*.safetensors"):
        assert (tmp_path / "a" / f.name).read_bytes() == (tmp_path / "b" / f.name).read_bytes()
