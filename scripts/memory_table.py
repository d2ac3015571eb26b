#!/usr/bin/env python
"""Parameter memory per process for 1B / 8B / 70B models: one process or DDP vs FSDP, and the
trainable numbers of GAIN-FFN and LoRA r8 (the table in docs/training.md).

Counted from the published Llama 3.x architectures (no download): frozen weights in bf16
(2 bytes); trainable numbers in float32 with their gradient and Adam's two moments
(16 bytes each), whole on every process. Under FSDP a process holds 1/N of the base plus,
transiently, the unit that is running and the one being prefetched (the two largest
units: a decoder layer, or an untied LM head). Activations are not counted: they depend
on batch x sequence length, and gradient checkpointing cuts them to one layer's worth
plus a [batch, seq, hidden] tensor per layer.

Example:
    python scripts/memory_table.py --processes 8
"""

from __future__ import annotations

import argparse

#: name: (hidden, FFN intermediate, layers, KV heads x head dim, vocabulary, tied embeddings)
MODELS = {
    "Llama 3.2 1B": (2048, 8192, 16, 8 * 64, 128256, True),
    "Llama 3.1 8B": (4096, 14336, 32, 8 * 128, 128256, False),
    "Llama 3.1 70B": (8192, 28672, 80, 8 * 128, 128256, False),
}
GB = 1e9


def counts(hidden: int, inter: int, layers: int, kv: int, vocab: int, tied: bool) -> dict[str, float]:
    """Parameter counts: total, one decoder layer, the embedding, GAIN-FFN gains, LoRA r8 (all linear)."""
    attn = hidden * hidden * 2 + hidden * kv * 2
    layer = attn + 3 * hidden * inter + 2 * hidden
    embed = vocab * hidden
    total = layers * layer + embed * (1 if tied else 2) + hidden
    r = 8
    lora = layers * r * ((hidden + hidden) * 2 + (hidden + kv) * 2 + (hidden + inter) * 3)
    return {"total": total, "layer": layer, "embed": embed, "gain_ffn": layers * (hidden + inter), "lora": lora,
            "largest_unit": max(layer, 0 if tied else embed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=8)
    n = ap.parse_args().processes
    print(f"| model | parameters | 1 process or DDP: base per process | FSDP x{n}: base per process "
          f"(shard + 2 gathered units) | GAIN-FFN gains + grad + Adam | LoRA r8 + grad + Adam |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, arch in MODELS.items():
        c = counts(*arch)
        whole = 2 * c["total"]
        fsdp = whole / n + 2 * 2 * c["largest_unit"]
        print(f"| {name} | {c['total'] / 1e9:.2f}B | {whole / GB:.1f} GB | {fsdp / GB:.1f} GB "
              f"({whole / n / GB:.1f} + {2 * 2 * c['largest_unit'] / GB:.1f}) | "
              f"{16 * c['gain_ffn'] / 1e6:.1f} MB ({c['gain_ffn'] / 1e6:.2f}M) | "
              f"{16 * c['lora'] / GB:.2f} GB ({c['lora'] / 1e6:.1f}M) |")


if __name__ == "__main__":
    main()
