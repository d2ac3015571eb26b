#!/usr/bin/env python
"""Measure a gain applied straight onto a quantized GGUF against the float route.

For a GGUF BASE and a gain file, builds the adapted GGUF with ``gainsurgery apply``
(default options and, for comparison, ``--keep-types``), then compares, on held-out
text of each domain (the demo's: legal and code):

- **base**: the GGUF dequantized by transformers' GGUF loader (float32);
- **float route**: the same dequantized model with the gain applied to its weights
  in float32 (W * s) — what applying the gain to a float copy would give;
- **OUT**: the adapted GGUF, dequantized by the same loader.

Reported per domain: the RMS (over positions and vocabulary) of the gain's own
effect on the logits (float route - base), of OUT's deviation from the float route
(OUT - float route) and their ratio (the acceptance: <= 0.10), and the perplexity
of each model. With llama-cpp-python installed, llama.cpp itself also loads base and
OUT and their perplexity is computed from its logits.

Example:
    python scripts/gguf_quality.py --base gemma-3-270m-q4_k_m.gguf --gain legal-gain-ffn.safetensors \\
        --workdir /tmp/gguf-quality --json docs/results/gguf-quality.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load(path: Path):
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                quantization_config=GgufConfig(dequantize=True)).eval()


def compare(models: dict, windows, batch: int = 2) -> dict:
    """Batch by batch (logits of a 262k vocabulary do not all fit in memory): the sums of squares of
    (float route - base) and (OUT - float route) over positions and vocabulary, and each model's NLL."""
    import torch

    sums: dict[str, float] = {}
    nll = {n: 0.0 for n in models}
    count = tokens = 0
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            ids = torch.tensor(windows[i:i + batch])
            lg = {n: m(input_ids=ids).logits.float() for n, m in models.items()}
            for n, x in lg.items():
                nll[n] += torch.nn.functional.cross_entropy(x[:, :-1].reshape(-1, x.shape[-1]), ids[:, 1:].reshape(-1),
                                                            reduction="sum").item()
                if n.startswith("OUT"):
                    sums[n] = sums.get(n, 0.0) + (x.double() - lg["float route"].double()).pow(2).sum().item()
            sums["effect"] = sums.get("effect", 0.0) + (lg["float route"].double() - lg["base"].double()).pow(2).sum().item()
            count += lg["base"].numel()
            tokens += ids[:, 1:].numel()
            del lg
    out = {"gain_effect_rms": math.sqrt(sums["effect"] / count), "ppl": {n: math.exp(v / tokens) for n, v in nll.items()}}
    for n in models:
        if n.startswith("OUT"):
            out[f"deviation_rms[{n[4:]}]"] = math.sqrt(sums[n] / count)
            out[f"ratio[{n[4:]}]"] = out[f"deviation_rms[{n[4:]}]"] / out["gain_effect_rms"]
    return out


def llama_cpp_ppl(path: Path, windows) -> float | None:
    """Perplexity from llama.cpp's own logits (one window per evaluation), or None without llama_cpp."""
    try:
        import llama_cpp
    except ImportError:
        return None
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(windows[0]) + 8, logits_all=True, verbose=False,
                          n_threads=2)
    nll, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        lg = np.asarray(llm.scores[: len(w)], dtype=np.float64)
        lg -= lg.max(axis=1, keepdims=True)
        logp = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
        nll -= sum(logp[i, w[i + 1]] for i in range(len(w) - 1))
        count += len(w) - 1
    return math.exp(nll / count)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, type=Path, help="the GGUF base")
    ap.add_argument("--gain", required=True, type=Path, help="a gain file trained on (a dequantization of) it")
    ap.add_argument("--tokenizer", default="embedded:gemma-3-270m", help="a checkpoint folder or embedded:NAME")
    ap.add_argument("--domains", default="legal,code", help="demo domains (gainsurgery_lab corpora)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from gainsurgery import api
    from gainsurgery.gainfile import load as load_gain
    from gainsurgery.sources import resolve_base
    from gainsurgery.training.data import pack, read_documents
    from gainsurgery.training.modeling import load_tokenizer
    from gainsurgery_lab import corpora

    torch.manual_seed(0)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"base": args.base.name, "gain": args.gain.name, "variants": {}, "domains": {}}
    outs = {}
    for name, kw in (("default", {}), ("keep-types", {"keep_types": True})):
        out = args.workdir / f"{args.base.stem}-{name}.gguf"
        t0 = time.perf_counter()
        r = api.apply(str(args.base), [str(args.gain)], str(out), overwrite=True, warn=print, **kw)
        s = r.summary()
        promoted = {t["type"] + ">" + t["type_out"] for t in s["tensors"] if t["type"] != t["type_out"]}
        results["variants"][name] = {"seconds": round(time.perf_counter() - t0, 2), "bytes": s["bytes_out"],
                                     "size_ratio": s["size_ratio"], "promoted": sorted(promoted),
                                     "tensors": s["tensors"], "routes": s["routes"]}
        outs[name] = out
        print(f"{name}: {out.name} {s['bytes_out']:,} bytes ({s['size_ratio']:.4f}x), promoted {sorted(promoted)}")
    results["bytes_base"] = args.base.stat().st_size

    tokenizer = load_tokenizer(resolve_base(args.tokenizer))
    gain = load_gain(args.gain)
    base = load(args.base)
    float_route = load(args.base)
    with torch.no_grad():
        params = dict(float_route.named_parameters())
        for key, vector in gain.vectors.items():
            v = torch.from_numpy(vector)
            params[key].mul_(v[None, :] if gain.dims[key] == 1 else v[:, None])
    models = {"base": base, "float route": float_route, **{f"OUT {n}": load(p) for n, p in outs.items()}}
    for domain in args.domains.split(","):
        corpora.fetch([domain], log=lambda m: None)
        docs = read_documents(corpora.split_path(domain, "validation"))
        windows = pack(tokenizer, docs, args.seq_len, args.windows).ids
        row: dict = {"windows": len(windows), "tokens": len(windows) * args.seq_len, **compare(models, windows)}
        for n, p in (("base", args.base), *((f"OUT {k}", v) for k, v in outs.items())):
            value = llama_cpp_ppl(p, windows)
            if value is not None:
                row.setdefault("llama_cpp_ppl", {})[n] = value
        results["domains"][domain] = row
        print(json.dumps({domain: row}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
