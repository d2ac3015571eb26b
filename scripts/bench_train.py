#!/usr/bin/env python
"""Benchmark training throughput and peak memory: GAIN-FFN vs LoRA vs IA3, with and without
gradient checkpointing, through the real ``gainsurgery.training.train``.

Each (method, checkpointing) row runs ``--warmup + --steps`` optimizer steps of the same
data, batch and dtype; the step time is the mean of the steps after the warmup, read from
the training log (the loop's own clock: forward, backward, gradient averaging, optimizer):
the median step time, its minimum, and the median CPU seconds of the process per step (on
a CPU machine shared with other jobs, CPU time measures the work; wall time also waits).
Tokens/s counts every input token of a step (batch x seq_len). Peak memory is
``torch.cuda.max_memory_allocated`` on a GPU (rows run in one process, the counter reset
before each) and the process's peak RSS on a CPU (each row runs in a fresh process, so
rows do not see each other's peaks; RSS includes the weights and the interpreter).

With ``--repeats N`` the rows run N times in alternating order and each row keeps its
fastest run (a shared machine drifts). The last line is the ratio of GAIN-FFN's step time to LoRA's (goal: <= 1.0).

Example (this CPU machine: pause the background experiment while it runs):
    python scripts/bench_train.py --warmup 2 --steps 5 --repeats 2 --json /tmp/bench_train.json
    python scripts/bench_train.py --model embedded:gemma-3-270m --dtype bfloat16 \\
        --mixed-precision bf16 --batch-size 8 --seq-len 512 --steps 10      # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

DEFAULT_DATA = Path.home() / ".cache" / "gainsurgery" / "domains" / "legal" / "train.txt"
METHODS = ("gain-ffn", "lora", "ia3")


def fallback_text(folder: Path) -> Path:
    """Training text when no domain corpus is cached: this repository's own docs."""
    docs = sorted((Path(__file__).resolve().parent.parent / "docs").rglob("*.md"))
    path = folder / "docs-text.txt"
    path.write_text("\n\n\n".join(p.read_text(encoding="utf-8") for p in docs), encoding="utf-8")
    return path


def measure(model: str, data: str, method: str, checkpointing: bool, *, steps: int, warmup: int, batch_size: int,
            seq_len: int, dtype: str, mixed_precision: str, workdir: Path) -> dict[str, Any]:
    """Train one row in this process; its step time, tokens/s and peak memory."""
    import torch

    from gainsurgery.training import TrainConfig, train

    cuda = torch.cuda.is_available()
    if cuda:
        import gc

        gc.collect()  # the previous row's model
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    tag = f"{method}-{'gc' if checkpointing else 'nogc'}"
    out = workdir / (tag + (".safetensors" if method in ("gain", "gain-ffn") else ""))
    log = workdir / f"{tag}.jsonl"
    result = train(TrainConfig(base=model, data=[data], output=str(out), method=method, steps=warmup + steps,
                               batch_size=batch_size, seq_len=seq_len, dtype=dtype, mixed_precision=mixed_precision,
                               gradient_checkpointing=checkpointing, lora_rank=8, lora_alpha=16, seed=0,
                               warmup=0, schedule="constant", log=str(log), progress=False))
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    wall = [0.0] + [r["seconds"] for r in rows if "loss" in r]
    cpu = [0.0] + [r["cpu_seconds"] for r in rows if "loss" in r]
    step_times = [b - a for a, b in zip(wall, wall[1:])][warmup:]
    cpu_times = [b - a for a, b in zip(cpu, cpu[1:])][warmup:]
    step_s = statistics.median(step_times)  # the median resists other jobs' bursts on a shared machine
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"method": method, "gradient_checkpointing": checkpointing, "trainable": result.trainable_parameters,
            "step_s": round(step_s, 4), "step_s_min": round(min(step_times), 4),
            "cpu_s_per_step": round(statistics.median(cpu_times), 4),
            "tokens_per_s": round(batch_size * seq_len / step_s, 1),
            "peak_bytes": int(peak), "memory": "cuda_max_allocated" if cuda else "peak_rss",
            "final_loss": round(result.final_loss, 4), "device": "cuda" if cuda else "cpu",
            "steps_timed": len(step_times)}


def run_rows(args: argparse.Namespace, workdir: Path) -> list[dict[str, Any]]:
    """Every row: in this process on a GPU, one fresh process per row on a CPU."""
    import torch

    best: dict[tuple[str, bool], dict[str, Any]] = {}
    in_process = torch.cuda.is_available() and not args.isolate
    combos = [(m, gc) for m in args.methods for gc in (False, True)]
    for repeat in range(args.repeats):
        # Alternate the order, so slow drift of a shared machine does not favour one row.
        for method, checkpointing in (combos if repeat % 2 == 0 else combos[::-1]):
            kw = dict(steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, seq_len=args.seq_len,
                      dtype=args.dtype, mixed_precision=args.mixed_precision)
            if in_process:
                row = measure(args.model, args.data, method, checkpointing, workdir=workdir, **kw)
            else:
                spec = json.dumps({"model": args.model, "data": args.data, "method": method,
                                   "checkpointing": checkpointing, "workdir": str(workdir), **kw})
                proc = subprocess.run([sys.executable, __file__, "--worker", spec], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"row {method} (checkpointing {checkpointing}) failed:\n{proc.stderr[-3000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {row['method']:<9} gc={'on ' if checkpointing else 'off'} {row['step_s']:.3f} s/step "
                  f"{row['tokens_per_s']:>9.1f} tok/s  peak {row['peak_bytes'] / 2**30:.2f} GiB", flush=True)
            key = (method, checkpointing)
            if key not in best or row["step_s"] < best[key]["step_s"]:
                best[key] = {**row, "repeats": repeat + 1}
    return [best[k] for k in combos]


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the rows, with the GAIN-FFN/LoRA step-time ratios below it."""
    label = "peak GPU memory (GiB)" if rows and rows[0]["memory"] == "cuda_max_allocated" else "peak RSS (GiB)"
    lines = [f"| method | trainable | grad. checkpointing | s/step (median) | min | CPU s/step | tokens/s | "
             f"{label} | final loss |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable']:,} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                     f"{r['step_s']:.3f} | {r['step_s_min']:.3f} | {r['cpu_s_per_step']:.3f} | "
                     f"{r['tokens_per_s']:,.0f} | {r['peak_bytes'] / 2**30:.2f} | {r['final_loss']:.3f} |")
    for gc in (False, True):
        by = {r["method"]: r for r in rows if r["gradient_checkpointing"] == gc}
        if "gain-ffn" in by and "lora" in by:
            g, lo = by["gain-ffn"], by["lora"]
            lines.append(f"\nGAIN-FFN / LoRA step time, checkpointing {'on' if gc else 'off'}: "
                         f"{g['step_s'] / lo['step_s']:.3f} (wall, median), {g['step_s_min'] / lo['step_s_min']:.3f} "
                         f"(wall, min), {g['cpu_s_per_step'] / lo['cpu_s_per_step']:.3f} (CPU time)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded:gemma-3-270m", help="base: folder or embedded:NAME")
    ap.add_argument("--data", default=None, help=f"training text [default: {DEFAULT_DATA}, else the repo's docs]")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per row")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--mixed-precision", default="no")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run every row this many times, alternating the order; keep each row's fastest run")
    ap.add_argument("--isolate", action="store_true", help="one process per row on a GPU too")
    ap.add_argument("--json", default=None, help="write the rows and settings here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        row = measure(spec.pop("model"), spec.pop("data"), spec.pop("method"), spec.pop("checkpointing"),
                      workdir=Path(spec.pop("workdir")), **spec)
        print(json.dumps(row))
        return
    args.methods = [m for m in args.methods.split(",") if m]
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        workdir = Path(tmp)
        if args.data is None:
            args.data = str(DEFAULT_DATA if DEFAULT_DATA.is_file() else fallback_text(workdir))
        print(f"bench_train: {args.model}, {args.dtype} weights, mixed precision {args.mixed_precision}, "
              f"batch {args.batch_size} x {args.seq_len} tokens, {args.warmup}+{args.steps} steps per row, "
              f"{args.repeats} repeat(s)", flush=True)
        rows = run_rows(args, workdir)
    print(table(rows))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "worker")}
        Path(args.json).write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
