"""Tiny random checkpoints of real architectures, built with transformers.

Each builder returns a config small enough to build and save in well under a
second; ``save_tiny`` writes it sharded so the index path is always exercised.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 128
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_config(model_type: str):
    """A tiny transformers config for ``model_type``."""
    import transformers as tf

    if model_type in ("llama", "mistral", "qwen2", "qwen3", "phi3", "starcoder2"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "qwen3": tf.Qwen3Config, "phi3": tf.Phi3Config, "starcoder2": tf.Starcoder2Config}[model_type]
        kw = dict(SMALL)
        if model_type == "phi3":
            kw.update(pad_token_id=0)
        return cls(**kw)
    if model_type in ("gemma", "gemma2", "gemma3_text"):
        cls = {"gemma": tf.GemmaConfig, "gemma2": tf.Gemma2Config, "gemma3_text": tf.Gemma3TextConfig}[model_type]
        return cls(**SMALL, head_dim=8)
    if model_type == "gemma3":
        text = dict(SMALL, head_dim=8)
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      image_size=16, patch_size=8)
        return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                               image_token_index=VOCAB - 1, boi_token_index=VOCAB - 2, eoi_token_index=VOCAB - 3)
    if model_type == "phi":
        return tf.PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64)
    if model_type in ("gpt2", "gpt_bigcode"):
        cls = tf.GPT2Config if model_type == "gpt2" else tf.GPTBigCodeConfig
        return cls(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=96)
    if model_type == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, max_position_embeddings=64)
    if model_type == "opt":
        return tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)
    if model_type == "falcon":
        return tf.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               new_decoder_architecture=False, multi_query=True)
    if model_type == "bloom":
        return tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
    if model_type == "mixtral":
        return tf.MixtralConfig(**SMALL, num_local_experts=3, num_experts_per_tok=2)
    if model_type == "qwen2_moe":
        return tf.Qwen2MoeConfig(**SMALL, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                                 num_experts=3, num_experts_per_tok=2)
    raise KeyError(model_type)


def build_model(model_type: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A randomly initialised model in eval mode (weights jittered so no gain is a no-op)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = tiny_config(model_type)
    if model_type == "gemma3":
        from transformers import Gemma3ForConditionalGeneration

        model = Gemma3ForConditionalGeneration(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.to(dtype).eval()


def save_tiny(model, folder: Path, max_shard_size: str = "20KB") -> Path:
    """Save sharded safetensors (several shards + index) and return the folder."""
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return Path(folder)


def load_model(folder: Path, model_type: str):
    """Load a saved tiny checkpoint with the right auto class."""
    if model_type == "gemma3":
        from transformers import Gemma3ForConditionalGeneration

        return Gemma3ForConditionalGeneration.from_pretrained(folder).eval()
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


TEXT_A = ("the court held that the licence grants each party a right to copy and modify the work. "
          "a licensee shall retain the notice in all copies of the software. ") * 40
TEXT_B = ("def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n") * 40


def tiny_tokenizer(add_bos: bool = True):
    """A BPE tokenizer with exactly VOCAB entries, trained on TEXT_A + TEXT_B."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<bos>", "<eos>"],
                                  initial_alphabet=sorted(set(TEXT_A + TEXT_B + " yesno?QA:")),
                                  show_progress=False)
    tok.train_from_iterator([TEXT_A, TEXT_B, "yes no Question: Answer:"], trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                           special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    assert tok.get_vocab_size() <= VOCAB
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


def save_tiny_lm(folder: Path, model_type: str = "llama", dtype: torch.dtype = torch.float32, seed: int = 0,
                 add_bos: bool = True) -> Path:
    """A tiny model plus tokenizer: a complete base for train/eval tests."""
    model = build_model(model_type, dtype, seed)
    save_tiny(model, folder)
    tiny_tokenizer(add_bos).save_pretrained(folder)
    return Path(folder)


def write_domain(folder: Path, name: str, text: str, docs: int = 12) -> Path:
    """A .txt domain file of ``docs`` documents separated by two blank lines."""
    path = Path(folder) / f"{name}.txt"
    parts = [text[i * 97 % len(text):][:600] for i in range(docs)]
    path.write_text("\n\n\n".join(parts), encoding="utf-8")
    return path


def synthetic_llama(folder: Path, *, layers: int = 4, hidden: int = 256, inter: int = 512, vocab: int = 512,
                    shard_bytes: int = 1 << 20, seed: int = 0) -> Path:
    """A llama-shaped bf16 checkpoint written directly (no torch model): sizes of our choosing.

    Shards are cut at ``shard_bytes`` (tensor data), like ``save_pretrained``'s
    ``max_shard_size``; weights are N(0, 0.02). Returns the folder.
    """
    import json
    import math
    import struct

    import numpy as np

    def layer(i):
        p = f"model.layers.{i}."
        return [(p + "input_layernorm.weight", (hidden,)), (p + "self_attn.q_proj.weight", (hidden, hidden)),
                (p + "self_attn.k_proj.weight", (hidden, hidden)), (p + "self_attn.v_proj.weight", (hidden, hidden)),
                (p + "self_attn.o_proj.weight", (hidden, hidden)), (p + "post_attention_layernorm.weight", (hidden,)),
                (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                (p + "mlp.down_proj.weight", (hidden, inter))]

    tensors = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        tensors += layer(i)
    tensors += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    shards: list[list] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {}, 0
        for name, shape in shard:
            nbytes = math.prod(shape) * 2
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in shard:
                w = (rng.standard_normal(math.prod(shape), dtype=np.float32) * 0.02).view(np.uint32) >> 16
                f.write(w.astype("<u2").tobytes())
        total += offset
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 4,
              "num_key_value_heads": 4, "vocab_size": vocab, "max_position_embeddings": 256,
              "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder
