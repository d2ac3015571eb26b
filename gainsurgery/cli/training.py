"""Commands on models (the ``train`` extra): ``train``, ``eval``, ``export-peft``, ``import-peft``; and ``demo``."""

from __future__ import annotations

import os
from pathlib import Path

import click

from gainsurgery import api
from gainsurgery.architectures.registry import METHODS as GAIN_METHODS
from gainsurgery.architectures.registry import SIDES
from gainsurgery.cli.group import emit_json, main, opt_allow_negative, opt_json, shown
from gainsurgery.extras import require_extra
from gainsurgery.io.atomic import write_json
from gainsurgery.io.checks import check_output
from gainsurgery.sources.local import local_folder_of
from gainsurgery.training import TrainConfig
from gainsurgery.training.config import METHODS as TRAIN_METHODS


@main.command()
@click.argument("base")
@click.option("--data", "data", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training text: .txt (documents split by two blank lines), .jsonl or .parquet. Repeatable.")
@click.option("--method", type=click.Choice(TRAIN_METHODS), default="gain-ffn", show_default=True)
@click.option("--side", type=click.Choice(SIDES), default="in", show_default=True,
              help="GAIN only: in = W·diag(s) (paper); out = diag(s)·W (experiment).")
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Gain file (.safetensors) for gain methods; adapter folder for lora/ia3; checkpoint folder for full.")
@click.option("--steps", default=100, show_default=True, type=click.IntRange(1))
@click.option("--lr", type=float, default=None, help="Peak learning rate [default: 5e-3 gains/ia3, 5e-4 lora].")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1), help="Global batch (windows).")
@click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(1))
@click.option("--seq-len", default=256, show_default=True, type=click.IntRange(8), help="Tokens per window.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="dtype of the frozen base weights (gains and adapters stay float32).")
@click.option("--mixed-precision", type=click.Choice(["no", "bf16", "fp16"]), default=None,
              help="Autocast the forward pass [default: accelerate launch's setting, else no]. fp16 uses loss scaling.")
@click.option("--gradient-checkpointing", is_flag=True,
              help="Recompute layer activations in backward: less memory, ~30% more compute.")
@click.option("--fsdp", is_flag=True, help="Shard the frozen base across processes (FSDP2); launch with torchrun "
              "or accelerate launch.")
@click.option("--streaming", is_flag=True, help="Stream --data in blocks (files larger than memory); each process "
              "reads its own blocks.")
@click.option("--stream-block-bytes", default=8 << 20, show_default=True, type=click.IntRange(1),
              help="Block size of streamed .txt/.jsonl files, in bytes.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--warmup", default=0.1, show_default=True, type=float, help="Fraction of steps (<1) or steps (>=1).")
@click.option("--schedule", type=click.Choice(["cosine", "linear", "constant"]), default="cosine", show_default=True)
@click.option("--eval-data", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Validation text; perplexity is logged before, during and after training.")
@click.option("--eval-every", default=0, type=click.IntRange(0), help="Steps between evaluations (0: start and end).")
@click.option("--eval-windows", default=32, show_default=True, type=click.IntRange(1))
@click.option("--text-field", default="text", show_default=True, help="Field/column holding text in .jsonl/.parquet.")
@click.option("--resume", type=click.Path(exists=True), default=None,
              help="A gain file to start from (gains only; optimizer fresh), or a checkpoint folder from "
                   "--save-every to continue exactly (optimizer, schedule, data position).")
@click.option("--save-every", default=0, show_default=True, type=click.IntRange(0),
              help="Write a training checkpoint every N steps (0: never).")
@click.option("--checkpoint-dir", type=click.Path(), default=None,
              help="Where --save-every writes [default: OUTPUT.checkpoints beside -o].")
@click.option("--log", type=click.Path(dir_okay=False), default=None, help="JSONL training log [default: beside -o].")
@click.option("--lora-rank", default=8, show_default=True, type=click.IntRange(1))
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--overwrite", is_flag=True, help="lora/ia3/full: replace the -o folder if it exists (on success).")
@opt_json
def train(base, data, method, side, output, steps, lr, batch_size, grad_accum, seq_len, dtype, mixed_precision,
          gradient_checkpointing, fsdp, streaming, stream_block_bytes, seed, warmup, schedule, eval_data, eval_every,
          eval_windows, text_field, resume, save_every, checkpoint_dir, log, lora_rank, no_progress, overwrite, as_json):
    """Train GAIN gains (or a LoRA / IA3 baseline) on domain text.

    The base stays frozen; only one gain per adapted weight is learned (init 1).
    Runs on one CPU/GPU, or across processes with `torchrun` or `accelerate launch`
    (add --fsdp to shard the base; configs/ has ready accelerate configs).

    \b
    Example:
      gainsurgery train embedded:gemma-3-270m --data legal/train.txt \\
          --eval-data legal/validation.txt --steps 200 -o legal.safetensors
    """
    require_extra("train", "gainsurgery train")

    cfg = TrainConfig(base=base, data=list(data), output=output, method=method, side=side, steps=steps, lr=lr,
                      batch_size=batch_size, grad_accum=grad_accum, seq_len=seq_len, dtype=dtype,
                      mixed_precision=mixed_precision, gradient_checkpointing=gradient_checkpointing, fsdp=fsdp,
                      streaming=streaming, stream_block_bytes=stream_block_bytes, seed=seed,
                      warmup=warmup, schedule=schedule, eval_data=list(eval_data), eval_every=eval_every,
                      eval_windows=eval_windows, text_field=text_field, resume=resume, save_every=save_every,
                      checkpoint_dir=checkpoint_dir, log=log, lora_rank=lora_rank, overwrite=overwrite,
                      progress=not no_progress)
    result = api.train(cfg)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate launch, one process reports
        return
    if as_json:
        emit_json(result.__dict__)
        return
    click.echo(f"trained {method}: {result.trainable_parameters:,} parameters, {result.steps} steps, "
               f"final loss {result.final_loss:.4f}, {result.seconds_per_step:.2f} s/step")
    for row in result.eval:
        click.echo("  eval step {}: ".format(row["step"]) + ", ".join(
            f"{k.split('/', 1)[1]} ppl {v:.3f}" for k, v in row.items() if k != "step"))
    click.echo(f"wrote {shown(output)}")


@main.command()
@click.option("--workdir", type=click.Path(), default="gainsurgery-demo", show_default=True,
              help="Where the gain file, merged model and logs go.")
@click.option("--model", default="embedded:gemma-3-270m", show_default=True, help="Base model.")
@click.option("--domain", default="legal", show_default=True, help="Domain to adapt to (see scripts/fetch_domains.py).")
@click.option("--other", default="code", show_default=True, help="A different domain, to watch for forgetting.")
@click.option("--method", type=click.Choice(GAIN_METHODS), default="gain-ffn", show_default=True)
@click.option("--steps", default=30, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1))
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(8))
@click.option("--eval-windows", default=16, show_default=True, type=click.IntRange(1))
def demo(workdir, model, domain, other, method, steps, batch_size, seq_len, eval_windows):
    """The whole workflow on the embedded Gemma 3 270M, in minutes on a CPU.

    Fetches real domain text, trains GAIN-FFN briefly, saves the gain file,
    applies it by streaming, verifies the merged checkpoint and compares
    perplexity before and after on the trained and on a different domain.
    """
    require_extra("demo", "gainsurgery demo")
    from gainsurgery.demo import DemoConfig, run_demo  # the demo extra's corpora and models: only when it runs

    run_demo(DemoConfig(workdir=Path(workdir), model=model, domain=domain, other=other, method=method,
                        steps=steps, batch_size=batch_size, seq_len=seq_len, eval_windows=eval_windows),
             say=click.echo)


@main.command(name="eval")
@click.argument("model")
@click.option("--gain", "gains", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Gain file(s) applied as forward hooks (no merge). Repeatable; stacked.")
@click.option("--base", default=None, help="Base model for a PEFT adapter MODEL (default: from its config).")
@click.option("--data", "data", multiple=True, metavar="NAME=FILE", help="Held-out text per domain. Repeatable.")
@click.option("--yesno", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSONL with passage/question/answer(yes|no) for zero-shot accuracy.")
@click.option("--yesno-limit", type=click.IntRange(1), default=None, help="Score only the first N yes/no items.")
@click.option("--seq-len", default=256, show_default=True, type=click.IntRange(8))
@click.option("--max-windows", default=32, show_default=True, type=click.IntRange(1), help="Windows per domain.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--text-field", default="text", show_default=True)
@click.option("--json", "json_out", type=click.Path(), default=None, help="Also write results here.")
def evaluate(model, gains, base, data, yesno, yesno_limit, seq_len, max_windows, batch_size, dtype, text_field,
             json_out):
    """Perplexity per domain (and yes/no accuracy) of MODEL, optionally with gains.

    MODEL is a checkpoint folder (base or merged), embedded:gemma-3-270m, or a
    PEFT adapter folder.

    \b
    Example:
      gainsurgery eval embedded:gemma-3-270m --gain legal.safetensors \\
          --data legal=legal/validation.txt --data code=code/validation.txt
    """
    if not data and not yesno:
        raise click.UsageError("give --data NAME=FILE and/or --yesno FILE")
    domains = {}
    for item in data:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.UsageError(f"--data takes NAME=FILE, got {item!r}")
        domains[name] = path
    require_extra("train", "gainsurgery eval")

    inputs = [local_folder_of(model), local_folder_of(base), *gains, *domains.values(), yesno]
    if json_out:  # checked before the models are loaded, and again when written
        check_output(json_out, inputs=inputs, kind="file", what="--json file")

    results = api.evaluate(model, gains=list(gains), base=base, data=domains, yesno=yesno, yesno_limit=yesno_limit,
                           seq_len=seq_len, max_windows=max_windows, batch_size=batch_size, dtype=dtype,
                           text_field=text_field)
    click.echo(f"{'domain':<16} {'ppl':>10} {'nll':>8} {'tokens':>8}")
    for name, r in results["domains"].items():
        click.echo(f"{name:<16} {r['ppl']:>10.3f} {r['nll']:>8.4f} {r['tokens']:>8}")
    if yesno:
        y = results["yesno"]
        click.echo(f"yes/no accuracy: {y['accuracy']:.3f} on {y['items']} items (said yes {y['predicted_yes']:.0%})")
    if json_out:
        write_json(json_out, results, inputs=inputs, what="--json file")


@main.command("export-peft")
@click.argument("gain")
@click.argument("adapter_dir")
@click.option("--base", required=True, help="The base the gain was made for (folder or embedded:NAME).")
@click.option("--base-name", default=None,
              help="base_model_name_or_path to record (default: the gain's base_model, else BASE).")
@click.option("--overwrite", is_flag=True, help="Replace ADAPTER_DIR if it exists (atomically, on success).")
@opt_allow_negative
@opt_json
def export_peft(gain, adapter_dir, base, base_name, overwrite, allow_negative, as_json):
    """Write GAIN as a PEFT (IA)^3 adapter folder for BASE.

    Input-side gains become feedforward modules (input scaled), output-side
    gains non-feedforward modules (output and bias scaled). Module names are
    those of the model transformers builds from BASE.

    \b
    Example:
      gainsurgery export-peft gain.safetensors adapter/ --base base/
    """
    require_extra("train", "gainsurgery export-peft")

    result = api.export_peft(gain, adapter_dir, base=base, base_name=base_name, overwrite=overwrite,
                             allow_negative=allow_negative)
    cfg = result.config
    if as_json:
        emit_json({"adapter_dir": str(result.adapter_dir), "parameters": result.num_parameters,
                   "modules": len(result.modules), "target_modules": cfg["target_modules"],
                   "feedforward_modules": cfg["feedforward_modules"], "fan_in_fan_out": cfg["fan_in_fan_out"]})
    else:
        click.echo(f"wrote {shown(result.adapter_dir)}: IA3 adapter, {len(result.modules)} modules, "
                   f"{result.num_parameters:,} values (targets {', '.join(cfg['target_modules'])}; "
                   f"feedforward {', '.join(cfg['feedforward_modules']) or 'none'})")


@main.command("import-peft")
@click.argument("adapter_dir")
@click.option("-o", "--output", required=True, type=click.Path(), help="Output gain file.")
@click.option("--base", required=True, help="The base the adapter was trained on (folder or embedded:NAME).")
@click.option("--description", default=None, help="Free text stored in the metadata.")
@opt_allow_negative
@opt_json
def import_peft(adapter_dir, output, base, description, allow_negative, as_json):
    """Turn a PEFT (IA)^3 adapter into a gain file keyed by BASE's tensor names.

    LoRA and other additive adapters are refused: W + B·A is not a diagonal gain.

    \b
    Example:
      gainsurgery import-peft adapter/ -o gain.safetensors --base base/
    """
    require_extra("train", "gainsurgery import-peft")

    g = api.import_peft(adapter_dir, base=base, description=description, allow_negative=allow_negative)
    g.save(output, inputs=[adapter_dir, base])
    if as_json:
        emit_json({"output": output, "parameters": g.num_parameters, "tensors": len(g.vectors),
                   "method": g.metadata.get("method"), "side": g.metadata.get("side")})
    else:
        click.echo(f"wrote {shown(output)}: {len(g.vectors)} tensors, {g.num_parameters:,} gains "
                   f"(method {g.metadata.get('method')}, side {g.metadata.get('side')})")
