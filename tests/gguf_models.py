"""Small GGUF files written in tests from tiny random transformers models, with the gguf library's writer.

``write_gguf`` converts a model's state dict the way llama.cpp's converter does for
the architectures used here (names through the gguf library's map, llama's q/k rows
permuted, Gemma's norms stored as 1 + w), quantizes each weight to the type the test
asks for (K-quants with gainsurgery's own quantizer, the rest with the library's),
and writes the metadata transformers' GGUF loader needs to rebuild the model.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

#: Sizes whose rows fit every block type (K-quants need rows of 256 weights).
QSIZES = dict(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64, head_dim=64)

#: A typical mixed-precision file, like llama.cpp's Q4_K_M: (regex on the GGUF name, type).
MIXED = (("attn_output", "Q4_K"), ("ffn_down", "Q6_K"), ("ffn_up", "Q5_0"), ("ffn_gate", "Q5_0"),
         ("attn_v", "Q8_0"), ("attn_[qk]\\.", "Q5_0"), ("token_embd", "Q8_0"), ("output\\.", "Q6_K"))


def tiny_model(model_type: str = "llama", kv_heads: int = 2, seed: int = 0, **overrides):
    """A float32 tiny model whose matrices fit every GGUF block type."""
    import torch
    import transformers as tf

    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "gemma3_text": tf.Gemma3TextConfig}[model_type]
    kw = dict(QSIZES, num_key_value_heads=kv_heads, **overrides)
    if model_type == "gemma3_text":
        kw.update(query_pre_attn_scalar=64, sliding_window=16)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(cls(**kw)).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's LlamaModel.permute (rotary halves interleaved); transformers reverses it on load.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path: Path, types=MIXED, default: str = "F32", arch: str | None = None,
               extra_kv: dict | None = None, alignment: int | None = None) -> Path:
    """Write ``model`` as a GGUF file at ``path``; 2-D weights take the first type in ``types`` that matches."""
    import gguf

    from gainsurgery.formats.gguf.quants import encode

    cfg = model.config
    model_type = cfg.model_type
    arch = arch or {"llama": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3"}[model_type]
    model_arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    layers = cfg.num_hidden_layers
    tmap = gguf.get_tensor_name_map(model_arch, layers)
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"tiny {model_type}")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or 10000.0))
    w.add_file_type(15)
    w.add_tokenizer_model("llama")
    tokens = [f"<t{i}>".encode() for i in range(cfg.vocab_size)]
    w.add_token_list(tokens)
    w.add_token_scores([float(-i) for i in range(cfg.vocab_size)])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if model_type == "gemma3_text":
        w.add_sliding_window(cfg.sliding_window)
    for key, value in (extra_kv or {}).items():
        w.add_key_value(key, *value) if isinstance(value, tuple) else w.add_string(key, value)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    for hf, tensor in state.items():
        name = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        assert name is not None, hf
        data = np.ascontiguousarray(tensor, dtype=np.float32)
        if arch == "llama" and re.search(r"attn_[qk]\.", name):
            heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
            data = np.ascontiguousarray(_permute(data, heads))
        if arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1.0
        qtype = default if data.ndim == 2 else "F32"
        if data.ndim == 2:
            qtype = next((t for pattern, t in types if re.search(pattern, name)), default)
        raw, _ = encode(data.reshape(-1, data.shape[-1]), qtype)
        # uint8 rows of blocks: the writer infers the weight shape from the byte shape and the type.
        w.add_tensor(name, raw.reshape(*data.shape[:-1], -1), raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def load_gguf_model(path: Path):
    """The model transformers' own GGUF loader builds from ``path`` (dequantized, float32)."""
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig
    from transformers.utils import logging

    logging.disable_progress_bar()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                quantization_config=GgufConfig(dequantize=True)).eval()
