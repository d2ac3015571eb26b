"""Architecture registry: target resolution, counts from the paper, layouts."""

from __future__ import annotations

import json

import pytest
import torch

from gainsurgery.architectures import FAMILIES, MODEL_TYPES, family_of, num_layers, resolve_targets, supported_model_types
from gainsurgery.errors import ArchitectureError


def meta_shapes(config) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a full-size model without allocating its weights."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {n: tuple(p.shape) for n, p in model.state_dict().items()}


def test_gpt2_large_counts_match_the_paper():
    """36 layers, d=1280, d_ff=5120: 46,080 (GAIN) and 230,400 (GAIN-FFN)."""
    from transformers import GPT2Config

    shapes = meta_shapes(GPT2Config(n_layer=36, n_embd=1280, n_head=20))
    gain = resolve_targets(shapes, "gpt2", "gain", expected_layers=36)
    ffn = resolve_targets(shapes, "gpt2", "gain-ffn", expected_layers=36)
    assert sum(t.length for t in gain) == 46_080
    assert sum(t.length for t in ffn) == 230_400
    assert {t.dim for t in ffn} == {0}  # Conv1D stores [in, out]: input side is dim 0


def test_qwen25_05b_counts():
    """Qwen2.5-0.5B: 24 layers, 14 heads x 64 = 896, d_ff = 4864."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                      num_key_value_heads=2, vocab_size=1000)
    shapes = meta_shapes(cfg)
    assert sum(t.length for t in resolve_targets(shapes, "qwen2", "gain", expected_layers=24)) == 24 * 896
    assert sum(t.length for t in resolve_targets(shapes, "qwen2", "gain-ffn")) == 24 * (896 + 4864)


def test_output_side_uses_out_dim_and_bias():
    shapes = {"transformer.h.0.attn.c_proj.weight": (32, 32), "transformer.h.0.attn.c_proj.bias": (32,),
              "transformer.h.0.mlp.c_proj.weight": (96, 32), "transformer.h.0.mlp.c_proj.bias": (32,)}
    tg = resolve_targets(shapes, "gpt2", "gain-ffn", "out")
    assert [(t.key.split(".", 2)[-1], t.dim, t.length) for t in tg] == [
        ("0.attn.c_proj.weight", 1, 32), ("0.attn.c_proj.bias", 0, 32),
        ("0.mlp.c_proj.weight", 1, 32), ("0.mlp.c_proj.bias", 0, 32)]
    tg_in = resolve_targets(shapes, "gpt2", "gain-ffn", "in")
    assert [(t.dim, t.length) for t in tg_in] == [(0, 32), (0, 96)]


def test_bigcode_c_proj_is_linear():
    shapes = {"transformer.h.0.attn.c_proj.weight": (32, 48), "transformer.h.0.mlp.c_proj.weight": (32, 96)}
    assert [(t.dim, t.length) for t in resolve_targets(shapes, "gpt_bigcode", "gain-ffn")] == [(1, 48), (1, 96)]


def test_gemma3_multimodal_skips_vision_tower():
    shapes = {
        "language_model.model.layers.0.self_attn.o_proj.weight": (32, 32),
        "language_model.model.layers.0.mlp.down_proj.weight": (32, 64),
        "vision_tower.vision_model.encoder.layers.0.self_attn.o_proj.weight": (16, 16),
        "vision_tower.vision_model.encoder.layers.0.mlp.down_proj.weight": (16, 32),
    }
    keys = [t.key for t in resolve_targets(shapes, "gemma3", "gain-ffn", expected_layers=1)]
    assert keys == ["language_model.model.layers.0.self_attn.o_proj.weight",
                    "language_model.model.layers.0.mlp.down_proj.weight"]


def test_unknown_model_type_lists_supported():
    with pytest.raises(ArchitectureError, match="supported: .*gpt2.*llama"):
        resolve_targets({}, "florp")
    assert supported_model_types() == sorted(MODEL_TYPES) and set(MODEL_TYPES.values()) == set(FAMILIES)


@pytest.mark.parametrize("model_type", supported_model_types())
def test_every_model_type_has_a_tiny_builder_and_resolves(model_type, tiny_ckpt):
    """Each registry entry is exercised on a saved tiny checkpoint of that type (tests/models.py)."""
    from gainsurgery.io.checkpoint import open_checkpoint
    from models import tiny_config

    assert tiny_config(model_type).model_type == model_type  # KeyError: add a builder to tests/models.py
    ckpt = open_checkpoint(tiny_ckpt(model_type, "float32"))
    found = resolve_targets({n: t.shape for n, t in ckpt.tensors.items()}, model_type, "gain-ffn",
                            expected_layers=num_layers(ckpt.config))
    assert {t.dim for t in found} == {family_of(model_type).input_dim}
    assert {t.kind for t in found} == {"attn_out", "ffn_down"}


def test_registry_mismatch_is_caught():
    shapes = {"model.layers.0.self_attn.o_proj.weight": (8, 8), "model.layers.0.mlp.down_proj.weight": (8, 16)}
    with pytest.raises(ArchitectureError, match="one attention output projection per layer"):
        resolve_targets(shapes, "llama", "gain", expected_layers=2)
    with pytest.raises(ArchitectureError, match="no attn out tensors"):
        resolve_targets({"x.weight": (2, 2)}, "llama", "gain")


def test_targets_cli_and_identity_file(tiny_ckpt, cli, tmp_path):
    base = tiny_ckpt("gpt2", "bfloat16")
    res = cli("targets", base, "--method", "gain-ffn", "--json")
    info = json.loads(res.output)
    assert info["model_type"] == "gpt2" and info["parameters"] == 2 * (32 + 96)
    res = cli("targets", base, "--method", "gain", "--init", "ones", "-o", tmp_path / "id.safetensors")
    assert res.exit_code == 0
    from gainsurgery.gainfile import load

    g = load(tmp_path / "id.safetensors")
    assert g.num_parameters == 64 and all((v == 1).all() for v in g.vectors.values())
    assert g.metadata["method"] == "gain" and g.metadata["base_fingerprint"].startswith("sha256:")
    # An identity gain leaves every byte of the base unchanged.
    assert cli("apply", base, tmp_path / "id.safetensors", tmp_path / "m").exit_code == 0
    for f in base.glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "m" / f.name).read_bytes()


def test_inspect_cli_numbers_and_plot(tiny_ckpt, cli, tmp_path):
    from conftest import random_gain

    base = tiny_ckpt("llama", "bfloat16")
    g = random_gain(base, "gain-ffn", seed=3)
    g.save(tmp_path / "g.safetensors")
    res = cli("inspect", tmp_path / "g.safetensors", "--json")
    st = json.loads(res.output)
    assert st["parameters"] == 2 * (32 + 64) and st["tensors"] == 4
    key = "model.layers.1.mlp.down_proj.weight"
    assert st["per_target"][key]["max"] == pytest.approx(float(g.vectors[key].max()))
    assert set(st["per_layer"]) == {"layer 0", "layer 1"}
    res = cli("inspect", tmp_path / "g.safetensors", "--plot", tmp_path / "g.png")
    assert res.exit_code == 0 and "192 gains" in res.output
    assert (tmp_path / "g.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verify_detects_a_flipped_bit(tiny_ckpt, cli, tmp_path):
    from conftest import random_gain

    base = tiny_ckpt("llama", "bfloat16")
    random_gain(base, "gain-ffn", seed=4).save(tmp_path / "g.safetensors")
    assert cli("apply", base, tmp_path / "g.safetensors", tmp_path / "m").exit_code == 0
    assert cli("verify", base, tmp_path / "g.safetensors", tmp_path / "m").exit_code == 0
    shard = sorted((tmp_path / "m").glob("*.safetensors"))[-1]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x01
    shard.write_bytes(bytes(raw))
    res = cli("verify", base, tmp_path / "g.safetensors", tmp_path / "m")
    assert res.exit_code == 1 and "verification failed: 1 problem" in res.stderr
