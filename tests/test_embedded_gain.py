"""GAIN on the real embedded Gemma 3 270M: training-time hooks == apply-merged logits.

Slow: converts the GGUF once into the test session's shared cache (about a minute,
fixture ``embedded_cache``) if no other test did, then trains for two steps.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gainsurgery.io.checkpoint import open_checkpoint
from gainsurgery.gainfile import load
from gainsurgery.training.hooks import attach
from gainsurgery.training.modeling import load_causal_lm, load_tokenizer
from gainsurgery.sources import resolve_base

pytestmark = pytest.mark.slow

TEXT = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software "
        "and associated documentation files, to deal in the Software without restriction.\n\n\n") * 30


def test_embedded_train_apply_equivalence(cli, tmp_path, embedded_cache):
    base = resolve_base("embedded:gemma-3-270m")
    ckpt = open_checkpoint(base)
    (tmp_path / "legal.txt").write_text(TEXT)
    res = cli("train", "embedded:gemma-3-270m", "--data", tmp_path / "legal.txt", "-o", tmp_path / "g.safetensors",
              "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--lr", "0.05", "--no-progress")
    assert res.exit_code == 0, res.stderr
    g = load(tmp_path / "g.safetensors")
    # Gemma 3 270M: 18 layers, o_proj input 4 heads x 256 = 1024, down_proj input 2048.
    assert g.num_parameters == 18 * (1024 + 2048) == 55_296
    assert set(g.vectors) <= set(ckpt.tensors)
    assert g.metadata["training"]["bos_first"] is True
    assert max(float(np.abs(v - 1).max()) for v in g.vectors.values()) > 0.01

    assert cli("apply", "embedded:gemma-3-270m", tmp_path / "g.safetensors", tmp_path / "m").exit_code == 0
    assert cli("verify", "embedded:gemma-3-270m", tmp_path / "g.safetensors", tmp_path / "m").exit_code == 0

    tok = load_tokenizer(base)
    ids = tok("The licensee may copy the Software.", return_tensors="pt")["input_ids"]
    assert ids[0, 0] == tok.bos_token_id
    hooked = load_causal_lm(base, "float32")
    with torch.no_grad():
        plain = hooked(input_ids=ids).logits
        attach(hooked, g)
        expected = hooked(input_ids=ids).logits
        got = load_causal_lm(tmp_path / "m", "float32")(input_ids=ids).logits
    # Merged weights are W·diag(s) rounded once to bf16; hooks scale activations in float32.
    diff = (got - expected).abs().max().item()
    effect = (expected - plain).abs().max().item()
    print(f"max |merged - hooks| = {diff:.4f}, max |gain effect| = {effect:.4f}")
    assert diff < 0.03 * effect, (diff, effect)
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.85
