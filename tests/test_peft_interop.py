"""`export-peft` / `import-peft`: gain files <-> PEFT (IA)^3 adapters, checked against PEFT itself.

Export: the adapter loaded with ``PeftModel.from_pretrained`` gives the logits of
the checkpoint merged by ``apply``, and ``merge_and_unload`` gives its weights.
Import: exported adapters give back the original vectors bit for bit; adapters
made natively by PEFT, applied with ``apply``, give PeftModel's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save_file

from conftest import random_gain
from gainsurgery.gainfile import GainFile, load
from models import load_model

INPUT_IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 64, 100, 7, 3]])

#: model_type -> (PEFT key of layer 0's FFN down projection, its Linear/Conv1D input width).
DOWN_KEY = {
    "llama": ("base_model.model.model.layers.0.mlp.down_proj.ia3_l", 64),
    "gpt2": ("base_model.model.transformer.h.0.mlp.c_proj.ia3_l", 96),
    "gemma3_text": ("base_model.model.model.layers.0.mlp.down_proj.ia3_l", 64),
}


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT_IDS).logits.float()


def peft_model(base: Path, model_type: str, adapter: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(base, model_type), str(adapter)).eval()


def adapter_tensors(adapter: Path) -> dict[str, np.ndarray]:
    with safe_open(adapter / "adapter_model.safetensors", "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def one_line_error(res) -> str:
    assert res.exit_code == 1, res.output
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def export_and_apply(cli, base: Path, gain: GainFile, tmp_path: Path) -> tuple[Path, Path]:
    gain.save(tmp_path / "g.safetensors")
    res = cli("apply", base, tmp_path / "g.safetensors", tmp_path / "merged")
    assert res.exit_code == 0, res.stderr
    res = cli("export-peft", tmp_path / "g.safetensors", tmp_path / "adapter", "--base", base)
    assert res.exit_code == 0, res.stderr
    return tmp_path / "merged", tmp_path / "adapter"


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gemma3_text"])
def test_export_matches_merged_and_imports_back(model_type, tiny_ckpt, cli, tmp_path):
    base = tiny_ckpt(model_type, "float32")
    gain = random_gain(base, "gain-ffn", seed=21)
    merged, adapter = export_and_apply(cli, base, gain, tmp_path)

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["task_type"] == "CAUSAL_LM"
    assert config["fan_in_fan_out"] is (model_type == "gpt2")
    assert config["base_model_name_or_path"] == str(base)
    # Input side throughout: every target is a feedforward module.
    assert config["feedforward_modules"] == config["target_modules"]
    assert config["target_modules"] == (["c_proj"] if model_type == "gpt2" else ["down_proj", "o_proj"])
    tensors = adapter_tensors(adapter)
    assert len(tensors) == len(gain.vectors) == 4
    key, width = DOWN_KEY[model_type]
    assert tensors[key].shape == (1, width) and tensors[key].dtype == np.float32
    assert all(k.startswith("base_model.model.") and k.endswith(".ia3_l") for k in tensors)

    peft = peft_model(base, model_type, adapter)
    expected = logits(load_model(merged, model_type))
    assert not torch.allclose(logits(load_model(base, model_type)), expected, atol=1e-3)
    torch.testing.assert_close(logits(peft), expected, rtol=1e-5, atol=1e-5)
    # PEFT's merge multiplies in float32 and rounds once, like apply: identical weights.
    unloaded = peft.merge_and_unload().state_dict()
    reference = load_model(merged, model_type).state_dict()
    assert unloaded.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(unloaded[name], value), name

    res = cli("import-peft", adapter, "-o", tmp_path / "back.safetensors", "--base", base)
    assert res.exit_code == 0, res.stderr
    back = load(tmp_path / "back.safetensors")
    assert back.dims == gain.dims
    for k, v in gain.vectors.items():
        assert np.array_equal(back.vectors[k], v), k
    assert back.metadata["method"] == "gain-ffn" and back.metadata["side"] == "in"


def test_export_output_side_scales_bias_like_peft(tiny_ckpt, cli, tmp_path):
    """GPT-2 c_proj has a bias: output-side gains export as non-feedforward modules (PEFT scales the bias)."""
    base = tiny_ckpt("gpt2", "float32")
    gain = random_gain(base, "gain", side="out", seed=22)
    assert len(gain.vectors) == 4  # 2 layers x (attn.c_proj weight + bias)
    merged, adapter = export_and_apply(cli, base, gain, tmp_path)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == ["attn.c_proj"] and config["feedforward_modules"] == []
    tensors = adapter_tensors(adapter)
    assert tensors["base_model.model.transformer.h.1.attn.c_proj.ia3_l"].shape == (32, 1)

    peft = peft_model(base, "gpt2", adapter)
    torch.testing.assert_close(logits(peft), logits(load_model(merged, "gpt2")), rtol=1e-5, atol=1e-5)
    unloaded, reference = peft.merge_and_unload().state_dict(), load_model(merged, "gpt2").state_dict()
    for name in ("transformer.h.0.attn.c_proj.weight", "transformer.h.0.attn.c_proj.bias"):
        assert torch.equal(unloaded[name], reference[name]), name

    assert cli("import-peft", adapter, "-o", tmp_path / "back.safetensors", "--base", base).exit_code == 0
    back = load(tmp_path / "back.safetensors")
    assert back.dims == gain.dims and back.metadata["method"] == "gain" and back.metadata["side"] == "out"
    for k, v in gain.vectors.items():
        assert np.array_equal(back.vectors[k], v), k


@pytest.mark.parametrize("model_type,targets,feedforward", [
    ("qwen2", ["k_proj", "v_proj", "down_proj"], ["down_proj"]),  # k/v have biases: output side scales them
    ("gpt2", None, None),  # PEFT's default for gpt2: c_attn (Conv1D, output side) + mlp.c_proj (input side)
])
def test_native_peft_adapter_round_trips_through_apply(model_type, targets, feedforward, tiny_ckpt, cli, tmp_path):
    from peft import IA3Config, get_peft_model

    base = tiny_ckpt(model_type, "float32")
    model = get_peft_model(load_model(base, model_type),
                           IA3Config(target_modules=targets, feedforward_modules=feedforward, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(23)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(torch.exp(torch.randn(p.shape, generator=gen) * 0.2))
    model.save_pretrained(tmp_path / "native")
    expected = logits(model.eval())

    res = cli("import-peft", tmp_path / "native", "-o", tmp_path / "g.safetensors", "--base", base)
    assert res.exit_code == 0, res.stderr
    gain = load(tmp_path / "g.safetensors")
    assert gain.metadata["method"] == "ia3" and gain.metadata["side"] == "mixed"
    if model_type == "qwen2":
        assert gain.dims["model.layers.0.mlp.down_proj.weight"] == 1
        assert gain.dims["model.layers.0.self_attn.k_proj.weight"] == 0
        assert np.array_equal(gain.vectors["model.layers.0.self_attn.k_proj.bias"],
                              gain.vectors["model.layers.0.self_attn.k_proj.weight"])
        assert len(gain.vectors) == 2 * (3 + 2)  # 3 weights + 2 biases per layer
    else:
        assert gain.dims["transformer.h.0.mlp.c_proj.weight"] == 0  # Conv1D input side
        assert gain.dims["transformer.h.0.attn.c_attn.weight"] == 1  # Conv1D output side
        assert gain.vectors["transformer.h.0.attn.c_attn.bias"].size == 96
        assert len(gain.vectors) == 2 * 3
    native = adapter_tensors(tmp_path / "native")
    key = "base_model.model." + ("model.layers.1.mlp.down_proj" if model_type == "qwen2"
                                 else "transformer.h.1.mlp.c_proj") + ".ia3_l"
    gkey = ("model.layers.1.mlp.down_proj.weight" if model_type == "qwen2" else "transformer.h.1.mlp.c_proj.weight")
    assert np.array_equal(gain.vectors[gkey], native[key].reshape(-1))

    assert cli("apply", base, tmp_path / "g.safetensors", tmp_path / "merged").exit_code == 0
    got = logits(load_model(tmp_path / "merged", model_type))
    assert not torch.allclose(logits(load_model(base, model_type)), got, atol=1e-3)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # And back out: the re-exported adapter equals PEFT's own, vector for vector.
    assert cli("export-peft", tmp_path / "g.safetensors", tmp_path / "again", "--base", base).exit_code == 0
    again = adapter_tensors(tmp_path / "again")
    assert again.keys() == native.keys()
    for k in native:
        assert np.array_equal(again[k], native[k]), k


def test_lora_adapter_refused(tiny_ckpt, cli, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = tiny_ckpt("llama", "float32")
    lora = get_peft_model(load_model(base, "llama"), LoraConfig(target_modules=["q_proj"], r=2))
    lora.save_pretrained(tmp_path / "lora")
    err = one_line_error(cli("import-peft", tmp_path / "lora", "-o", tmp_path / "g.safetensors", "--base", base))
    assert "LORA adapter cannot be imported" in err and "additive" in err
    assert not (tmp_path / "g.safetensors").exists()


def test_import_bad_inputs(tiny_ckpt, cli, tmp_path):
    base = tiny_ckpt("llama", "float32")
    out = tmp_path / "g.safetensors"
    (tmp_path / "empty").mkdir()
    assert "no adapter_config.json" in one_line_error(cli("import-peft", tmp_path / "empty", "-o", out, "--base", base))
    assert "not found" in one_line_error(cli("import-peft", tmp_path / "nope", "-o", out, "--base", base))

    random_gain(base, "gain-ffn", seed=24).save(tmp_path / "src.safetensors")
    assert cli("export-peft", tmp_path / "src.safetensors", tmp_path / "ad", "--base", base).exit_code == 0
    tensors = adapter_tensors(tmp_path / "ad")

    # A module the base does not have (layer 9 of a 2-layer model).
    bad = dict(tensors)
    bad["base_model.model.model.layers.9.mlp.down_proj.ia3_l"] = bad.pop(
        "base_model.model.model.layers.1.mlp.down_proj.ia3_l")
    save_file(bad, str(tmp_path / "ad" / "adapter_model.safetensors"), metadata={"format": "pt"})
    err = one_line_error(cli("import-peft", tmp_path / "ad", "-o", out, "--base", base))
    assert "'model.layers.9.mlp.down_proj' is not a module" in err

    # A tensor that is not an ia3_l vector (e.g. modules_to_save weights).
    bad = dict(tensors, **{"base_model.model.lm_head.weight": np.ones((4, 4), np.float32)})
    save_file(bad, str(tmp_path / "ad" / "adapter_model.safetensors"), metadata={"format": "pt"})
    assert "unexpected tensor 'base_model.model.lm_head.weight'" in one_line_error(
        cli("import-peft", tmp_path / "ad", "-o", out, "--base", base))

    # Wrong orientation for the config: a feedforward vector stored as [n, 1].
    bad = dict(tensors)
    bad["base_model.model.model.layers.0.mlp.down_proj.ia3_l"] = tensors[
        "base_model.model.model.layers.0.mlp.down_proj.ia3_l"].reshape(-1, 1)
    save_file(bad, str(tmp_path / "ad" / "adapter_model.safetensors"), metadata={"format": "pt"})
    assert "has shape (64, 1)" in one_line_error(cli("import-peft", tmp_path / "ad", "-o", out, "--base", base))

    # Negative and zero values.
    bad = dict(tensors)
    neg = tensors["base_model.model.model.layers.0.self_attn.o_proj.ia3_l"].copy()
    neg[0, 3] = -0.5
    bad["base_model.model.model.layers.0.self_attn.o_proj.ia3_l"] = neg
    save_file(bad, str(tmp_path / "ad" / "adapter_model.safetensors"), metadata={"format": "pt"})
    assert "negative" in one_line_error(cli("import-peft", tmp_path / "ad", "-o", out, "--base", base))
    res = cli("import-peft", tmp_path / "ad", "-o", out, "--base", base, "--allow-negative")
    assert res.exit_code == 0, res.stderr
    assert load(out, allow_negative=True).vectors["model.layers.0.self_attn.o_proj.weight"][3] == np.float32(-0.5)
    neg[0, 3] = 0.0
    save_file(bad, str(tmp_path / "ad" / "adapter_model.safetensors"), metadata={"format": "pt"})
    assert "zero gains" in one_line_error(cli("import-peft", tmp_path / "ad", "-o", out, "--base", base))

    # The adapter of another architecture.
    gpt2 = tiny_ckpt("gpt2", "float32")
    random_gain(gpt2, "gain", seed=25).save(tmp_path / "g2.safetensors")
    assert cli("export-peft", tmp_path / "g2.safetensors", tmp_path / "ad2", "--base", gpt2).exit_code == 0
    assert "is not a module" in one_line_error(cli("import-peft", tmp_path / "ad2", "-o", out, "--base", base))

    # Pickled weights are never loaded.
    (tmp_path / "ad2" / "adapter_model.safetensors").unlink()
    (tmp_path / "ad2" / "adapter_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    assert "never unpickles" in one_line_error(cli("import-peft", tmp_path / "ad2", "-o", out, "--base", gpt2))

    # Not JSON.
    (tmp_path / "ad2" / "adapter_config.json").write_text("{")
    assert "not valid JSON" in one_line_error(cli("import-peft", tmp_path / "ad2", "-o", out, "--base", gpt2))


def test_export_refusals(tiny_ckpt, cli, tmp_path):
    base = tiny_ckpt("gpt2", "float32")
    gain = random_gain(base, "gain-ffn", side="out", seed=26)
    # Output side without the bias: PEFT would scale the bias, so this gain has no IA3 form.
    no_bias = GainFile({k: v for k, v in gain.vectors.items() if k.endswith(".weight")},
                       {k: d for k, d in gain.dims.items() if k.endswith(".weight")})
    no_bias.save(tmp_path / "nb.safetensors")
    err = one_line_error(cli("export-peft", tmp_path / "nb.safetensors", tmp_path / "ad", "--base", base))
    assert "leaves its bias unscaled" in err and "transformer.h.0.attn.c_proj.bias" in err
    assert not (tmp_path / "ad").exists()

    # A different vector on the bias than on the weight.
    skew = GainFile(dict(gain.vectors), dict(gain.dims))
    skew.vectors["transformer.h.0.attn.c_proj.bias"] = skew.vectors["transformer.h.0.attn.c_proj.bias"] * 2
    skew.save(tmp_path / "skew.safetensors")
    assert "leaves its bias unscaled" in one_line_error(
        cli("export-peft", tmp_path / "skew.safetensors", tmp_path / "ad", "--base", base))

    # Existing folder: refused, then replaced with --overwrite.
    gain.save(tmp_path / "g.safetensors")
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "old.txt").write_text("old")
    assert "already exists" in one_line_error(cli("export-peft", tmp_path / "g.safetensors", tmp_path / "ad",
                                                  "--base", base))
    res = cli("export-peft", tmp_path / "g.safetensors", tmp_path / "ad", "--base", base, "--overwrite", "--json")
    assert res.exit_code == 0, res.stderr
    info = json.loads(res.output)
    assert info["parameters"] == 4 * 32 and info["fan_in_fan_out"] is True
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ad")], "temporary folder left behind"

    # A key that is not in the base.
    wrong = GainFile({"model.layers.0.self_attn.o_proj.weight": np.ones(32, np.float32)},
                     {"model.layers.0.self_attn.o_proj.weight": 1})
    wrong.save(tmp_path / "w.safetensors")
    assert "not a tensor of the base" in one_line_error(
        cli("export-peft", tmp_path / "w.safetensors", tmp_path / "ad3", "--base", base))


def test_export_refuses_fused_moe_experts(tiny_ckpt, cli, tmp_path):
    base = tiny_ckpt("mixtral", "float32")
    random_gain(base, "gain-ffn", seed=27).save(tmp_path / "g.safetensors")
    err = one_line_error(cli("export-peft", tmp_path / "g.safetensors", tmp_path / "ad", "--base", base))
    assert "cannot target 'model.layers.0.block_sparse_moe.experts.0.w2.weight'" in err and "fused" in err
    assert not (tmp_path / "ad").exists()
    # Attention alone is plain Linear modules and exports fine.
    random_gain(base, "gain", seed=27).save(tmp_path / "a.safetensors")
    assert cli("export-peft", tmp_path / "a.safetensors", tmp_path / "ad", "--base", base).exit_code == 0
