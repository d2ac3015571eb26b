#!/usr/bin/env python
"""Benchmark `gainsurgery apply` against `cp -r` and a PEFT IA3 merge.

Builds a synthetic llama-shaped sharded bf16 checkpoint of about --size-gb GB
(random weights, real config, loadable by transformers), a GAIN-FFN gain file
for it, then measures wall time and peak RSS of each contender in its own
process:

- ``cp -r``            the physical floor for producing a full copy
- ``cp -r && sync``    the same, with the data on disk (apply fsyncs every shard)
- ``gainsurgery apply``
- PEFT IA3 ``merge_and_unload`` + ``save_pretrained`` (only when the model fits in RAM)

Each contender runs --repeats times, alternating, and its output is deleted
between runs; the median is reported. Results go to stdout as a markdown table
and, with --json, to a file.

Example:
    python scripts/bench_apply.py --size-gb 4 --workdir /tmp/bench
    python scripts/bench_apply.py --size-gb 30 --skip-peft --repeats 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 2048, 5632, 16, 4, 32000
SHARD_BYTES = 2 * 1000**3  # transformers' default "2GB" shards (decimal, like max_shard_size)


def layer_tensors(i: int) -> list[tuple[str, tuple[int, int]]]:
    head_dim = HIDDEN // HEADS
    p = f"model.layers.{i}."
    return [
        (p + "input_layernorm.weight", (HIDDEN,)),
        (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
        (p + "self_attn.k_proj.weight", (KV_HEADS * head_dim, HIDDEN)),
        (p + "self_attn.v_proj.weight", (KV_HEADS * head_dim, HIDDEN)),
        (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
        (p + "post_attention_layernorm.weight", (HIDDEN,)),
        (p + "mlp.gate_proj.weight", (INTER, HIDDEN)),
        (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
        (p + "mlp.down_proj.weight", (HIDDEN, INTER)),
    ]


def build_checkpoint(folder: Path, size_gb: float, shard_bytes: int = SHARD_BYTES) -> int:
    """Write a llama-shaped bf16 checkpoint of about ``size_gb`` GB in shards of at most ``shard_bytes``
    bytes of tensor data; returns the layer count."""
    per_layer = sum(math.prod(s) for _, s in layer_tensors(0)) * 2
    fixed = (2 * VOCAB * HIDDEN + HIDDEN) * 2
    layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    tensors = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        tensors += layer_tensors(i)
    tensors += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    # Real-looking bf16 weights (normal, std 0.02), cycled from one 64 MiB block.
    block = (rng.standard_normal(32 << 20, dtype=np.float32) * 0.02).view(np.uint32) >> 16
    block = block.astype("<u2").tobytes()
    weight_map = {}
    total = 0
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
            left = offset
            while left:
                n = min(left, len(block))
                f.write(block[:n])
                left -= n
        total += offset
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return layers


def write_gain(base: Path, path: Path, seed: int = 1) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from gainsurgery.architectures import resolve_targets
    from gainsurgery.io.checkpoint import open_checkpoint
    from gainsurgery.gainfile import GainFile

    ckpt = open_checkpoint(base)
    targets = resolve_targets({n: t.shape for n, t in ckpt.tensors.items()}, "llama", "gain-ffn")
    rng = np.random.default_rng(seed)
    g = GainFile({t.key: np.exp(rng.normal(0, 0.05, t.length)).astype(np.float32) for t in targets},
                 {t.key: t.dim for t in targets}, {"method": "gain-ffn", "side": "in"})
    g.save(path)
    return g.num_parameters


PEFT_MERGE = r"""
import sys, torch, numpy as np
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM
from peft import IA3Config, get_peft_model
base, gain, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
cfg = IA3Config(target_modules=["o_proj", "down_proj"], feedforward_modules=["o_proj", "down_proj"])
model = get_peft_model(model, cfg)
vectors = load_file(gain)
with torch.no_grad():
    for name, module in model.named_modules():
        if hasattr(module, "ia3_l"):
            key = name.replace("base_model.model.", "", 1) + ".weight"
            module.ia3_l["default"].copy_(torch.from_numpy(vectors[key]).reshape(module.ia3_l["default"].shape))
merged = model.merge_and_unload()
merged.save_pretrained(out)
"""


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of ``cmd`` run alone under /usr/bin/time."""
    t0 = time.perf_counter()
    res = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    rss_kib = int(res.stderr.strip().splitlines()[-1])
    return wall, rss_kib / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=4.0, help="checkpoint size in GB (1e9 bytes)")
    ap.add_argument("--workdir", type=Path, default=Path("bench-tmp"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-peft", action="store_true", help="skip the PEFT in-RAM merge")
    ap.add_argument("--chunk-size", type=int, default=64, help="apply --chunk-size in MiB")
    ap.add_argument("--json", type=Path, default=None, help="also write results here")
    args = ap.parse_args()

    work = args.workdir.resolve()
    base = work / f"base-{args.size_gb:g}gb"
    if not (base / "config.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        t0 = time.perf_counter()
        layers = build_checkpoint(base, args.size_gb)
        print(f"built {base} ({layers} layers) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    gain = work / "gain.safetensors"
    params = write_gain(base, gain)
    total = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    out = work / "out"
    exe = shutil.which("gainsurgery") or "gainsurgery"
    contenders = {
        "cp -r": ["cp", "-r", str(base), str(out)],
        "cp -r && sync": ["sh", "-c", f"cp -r '{base}' '{out}' && sync"],
        "gainsurgery apply": [exe, "apply", str(base), str(gain), str(out), "--chunk-size", str(args.chunk_size)],
    }
    fits = total * 2.5 < _mem_total_bytes()
    if not args.skip_peft and fits:
        contenders["PEFT IA3 merge_and_unload + save_pretrained"] = [sys.executable, "-c", PEFT_MERGE, str(base),
                                                                     str(gain), str(out)]
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in contenders}
    subprocess.run(["sync"])
    for r in range(args.repeats):
        for name, cmd in contenders.items():
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"])
            results[name].append(measure(cmd))
            print(f"run {r + 1}: {name}: {results[name][-1][0]:.1f} s, {results[name][-1][1]:.0f} MiB",
                  file=sys.stderr)
    shutil.rmtree(out, ignore_errors=True)

    floor = statistics.median(w for w, _ in results["cp -r"])
    print(f"\ncheckpoint: {total / 1e9:.2f} GB bf16, {len(list(base.glob('*.safetensors')))} shards; "
          f"gain-ffn: {params:,} gains; {os.cpu_count()} CPUs; repeats: {args.repeats} (median)\n")
    print("| contender | wall (s) | vs cp -r | peak RSS (MiB) | throughput (GB/s) |")
    print("|---|---:|---:|---:|---:|")
    rows = {}
    for name, runs in results.items():
        wall = statistics.median(w for w, _ in runs)
        rss = max(m for _, m in runs)
        rows[name] = {"wall_s": wall, "peak_rss_mib": rss, "ratio_vs_cp": wall / floor, "runs": runs}
        print(f"| {name} | {wall:.1f} | {wall / floor:.2f}x | {rss:.0f} | {total / 1e9 / wall:.2f} |")
    if not fits and not args.skip_peft:
        print("\nPEFT merge skipped: the model does not fit in RAM twice over.")
    if args.json:
        args.json.write_text(json.dumps({"bytes": total, "gain_parameters": params, "results": rows}, indent=2))


def _mem_total_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


if __name__ == "__main__":
    main()
