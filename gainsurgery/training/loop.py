"""Training GAIN gains (and LoRA / IA3 baselines) on domain text, with accelerate.

The loop is data -> model -> loss -> step, nothing more:

- the base is frozen; GAIN adds one trainable vector per adapted weight
  (initialised to 1), applied by forward hooks, so W·diag(s) is never
  materialised during training;
- the gain vectors are keyed by the *checkpoint's own tensor names* (resolved
  from its safetensors headers), so the saved file applies to that checkpoint;
- LoRA and IA3 go through PEFT and the same loop, for side-by-side numbers;
- accelerate runs it on one CPU, or across processes/devices with
  ``accelerate launch`` (DDP). ``--batch-size`` is the *global* batch: it is
  split across processes, so any process count gives the same optimisation.

Options and defaults: :mod:`gainsurgery.training.config`; the hooks:
:mod:`gainsurgery.training.hooks`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gainsurgery.architectures import Target, model_type_of, num_layers, resolve_targets
from gainsurgery.architectures.registry import METHODS as GAIN_METHODS
from gainsurgery.errors import CheckpointError, TrainingError
from gainsurgery.extras import require_extra
from gainsurgery.gainfile import BASE_TENSORS_KEY
from gainsurgery.io.checkpoint import copy_extra_files, fingerprint, open_checkpoint
from gainsurgery.io.fingerprint import base_tensors_sha256
from gainsurgery.io.hashing import file_records
from gainsurgery.io.inputs import check_input_folder
from gainsurgery.io.outputs import claim_folder, open_log_file, write_json
from gainsurgery.sources import base_model_name, resolve_base
from gainsurgery.training.config import TrainConfig, TrainResult
from gainsurgery.training.data import fingerprint_files, pack, read_documents
from gainsurgery.training.hooks import GainHooks

def resolve_gain_targets(folder: Path, method: str, side: str) -> tuple[list[Target], Any]:
    """GAIN targets of a checkpoint folder, from its headers and config."""
    ckpt = open_checkpoint(folder)
    targets = resolve_targets({n: t.shape for n, t in ckpt.tensors.items()}, model_type_of(ckpt.config),
                              method, side, expected_layers=num_layers(ckpt.config))
    return targets, ckpt


def _order(n_windows: int, needed: int, seed: int) -> list[int]:
    """Window indices for the whole run: a fresh seeded permutation per epoch."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < needed:
        order.extend(torch.randperm(n_windows, generator=gen).tolist())
    return order[:needed]


def train(cfg: TrainConfig) -> TrainResult:
    """Train gains (or a PEFT baseline) and save them to ``cfg.output``.

    GAIN methods save a v1 gain file (with the run's settings, data fingerprint
    and final loss in its ``training`` metadata); ``lora``/``ia3`` save a PEFT
    adapter folder. Runs on one CPU/GPU, or under ``accelerate launch``.

    Args:
        cfg: what to train (see :class:`~gainsurgery.training.config.TrainConfig`).

    Returns:
        A :class:`~gainsurgery.training.config.TrainResult`.

    Raises:
        TrainingError: bad options (checked before the model loads) or a loss that diverges.
        MissingExtraError: torch, transformers, accelerate or peft are not installed.

    Example:
        >>> train(TrainConfig(base="embedded:gemma-3-270m", data=["legal.txt"],
        ...                   output="legal.safetensors", steps=30))  # doctest: +SKIP
    """
    require_extra("train", "train()")
    cfg.validate()
    with contextlib.ExitStack() as outputs:  # a claimed output folder is released (or removed) on the way out
        return _train(cfg, outputs)


def _train(cfg: TrainConfig, outputs: contextlib.ExitStack) -> TrainResult:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from torch.utils.data import DataLoader

    from gainsurgery.training.evaluation import perplexity
    from gainsurgery.training.modeling import load_causal_lm, load_tokenizer

    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    if cfg.batch_size % accelerator.num_processes:
        raise TrainingError(f"--batch-size {cfg.batch_size} must be divisible by the "
                            f"{accelerator.num_processes} processes (it is the global batch)")
    # A folder output (adapter, checkpoint) is claimed when the run starts (lock + marked temp
    # folder, by the main process) and published at the end; a failed run leaves nothing.
    claim = None
    if cfg.writes_folder and accelerator.is_main_process:
        claim = outputs.enter_context(claim_folder(cfg.output, inputs=cfg.inputs(), overwrite=cfg.overwrite,
                                                   what="-o"))
    set_seed(cfg.seed)
    folder = resolve_base(cfg.base)
    # transformers opens the folder's files by name: every one is checked first (no link out,
    # no FIFO), and the index, headers and config.json are validated.
    check_input_folder(folder, error=CheckpointError)
    base_ckpt = open_checkpoint(folder)
    tokenizer = load_tokenizer(folder)
    docs = [d for path in cfg.data for d in read_documents(path, cfg.text_field)]
    windows = pack(tokenizer, docs, cfg.seq_len)
    names = [_eval_name(p) for p in cfg.eval_data]
    if len(set(names)) < len(names):
        names = [str(p) for p in cfg.eval_data]
    eval_sets = {name: pack(tokenizer, read_documents(p, cfg.text_field), cfg.seq_len, cfg.eval_windows)
                 for name, p in zip(names, cfg.eval_data)}

    model = load_causal_lm(folder, cfg.dtype)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(cfg.method == "full")  # full fine-tuning: every weight, kept in cfg.dtype
    adapter = None
    if cfg.method == "full":
        pass
    elif cfg.method in GAIN_METHODS:
        targets, ckpt = resolve_gain_targets(folder, cfg.method, cfg.side)
        # The gain knows its base: the target tensors' bytes, hashed now that the base is read.
        base_sha = base_tensors_sha256(ckpt, [t.key for t in targets]) if accelerator.is_main_process else None
        init = None
        if cfg.resume:
            from gainsurgery.gainfile import load

            init = load(cfg.resume, allow_negative=True)
            recorded = init.metadata.get(BASE_TENSORS_KEY)
            if recorded and base_sha and recorded != base_sha:
                raise TrainingError(f"--resume {Path(cfg.resume).name} was trained on other base weights than "
                                    f"{Path(str(folder)).name} (base_tensors_sha256 differs); continue it on "
                                    "the base it was trained on")
        adapter = GainHooks.trainable(model, targets, init)
    else:
        model = _peft_model(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = int(sum(p.numel() for p in trainable))

    needed = cfg.steps * cfg.grad_accum * cfg.batch_size
    data = torch.tensor(windows.ids, dtype=torch.long)[_order(len(windows.ids), needed, cfg.seed)]
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=False, drop_last=True)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=0.0)
    scheduler = _scheduler(optimizer, cfg)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    log = open_log_file(cfg.log_path(), inputs=[*cfg.inputs(), cfg.output], what="the training log") \
        if accelerator.is_main_process else None
    evals: list[dict] = []

    def run_eval(step: int) -> None:
        if not eval_sets:
            return
        model.eval()
        row = {"step": step, **{f"eval_ppl/{name}": perplexity(model, w)["ppl"] for name, w in eval_sets.items()}}
        model.train()
        evals.append(row)
        if log:
            log.write(json.dumps(row) + "\n")
            log.flush()

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, desc=f"train {cfg.method}", disable=not (cfg.progress and accelerator.is_main_process),
               leave=False)
    run_eval(0)
    model.train()
    t0 = time.perf_counter()
    step, micro, loss_sum, last_loss = 0, 0, 0.0, float("nan")
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(input_ids=batch, labels=batch).loss
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        loss_sum += accelerator.gather(loss.detach()).mean().item()
        micro += 1
        if micro % cfg.grad_accum:
            continue
        step += 1
        last_loss = loss_sum / cfg.grad_accum
        loss_sum = 0.0
        if not math.isfinite(last_loss):
            raise TrainingError(f"loss became {last_loss} at step {step}; lower --lr")
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}")
        if log:
            log.write(json.dumps({"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                                  "tokens": step * cfg.batch_size * cfg.grad_accum * (cfg.seq_len - 1),
                                  "seconds": round(time.perf_counter() - t0, 3)}) + "\n")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            run_eval(step)
        if step >= cfg.steps:
            break
    seconds = time.perf_counter() - t0
    bar.close()
    run_eval(step)
    if log:
        log.close()

    accelerator.wait_for_everyone()
    result = TrainResult(cfg.output, cfg.method, n_trainable, step, last_loss, seconds, seconds / max(step, 1),
                         step * cfg.batch_size * cfg.grad_accum * (cfg.seq_len - 1), evals)
    if accelerator.is_main_process:
        training_meta = _shared_settings(cfg)
        training_meta.update(lr=cfg.learning_rate, data_fingerprint=fingerprint_files(cfg.data),
                             final_loss=last_loss, seconds=round(seconds, 1), tokens=result.tokens,
                             processes=accelerator.num_processes, windows=len(windows.ids),
                             bos_first=windows.bos is not None)
        if adapter is not None:
            meta = {"method": cfg.method, "side": cfg.side, "base_model": base_model_name(cfg.base),
                    "base_fingerprint": fingerprint(ckpt), BASE_TENSORS_KEY: base_sha, "training": training_meta,
                    "description": f"GAIN ({cfg.method}) trained on {', '.join(Path(d).name for d in cfg.data)}"}
            gain = adapter.gain_file({k: v for k, v in meta.items() if v is not None})
            gain.save(cfg.output, inputs=cfg.inputs())
        else:
            if cfg.method == "full":
                _save_full(accelerator.unwrap_model(model), base_ckpt, claim.tmp)
            else:
                accelerator.unwrap_model(model).save_pretrained(claim.tmp)
            write_json(claim.tmp / "gainsurgery_training.json", training_meta)
            claim.publish()
    accelerator.wait_for_everyone()
    return result


def _shared_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The run's settings as the output records them: files by name and sha256, never by local path."""
    meta = {k: v for k, v in asdict(cfg).items()
            if k not in ("progress", "output", "log", "base", "data", "eval_data", "resume", "init_adapter",
                         "overwrite")}
    meta["base"] = base_model_name(cfg.base)
    meta["data"] = file_records(cfg.data)
    meta["eval_data"] = file_records(cfg.eval_data)
    if cfg.resume:
        meta["resume"] = file_records([cfg.resume])[0]
    if cfg.init_adapter:
        meta["init_adapter"] = Path(cfg.init_adapter).name
    return meta


def _save_full(model: Any, base: Any, out: Path) -> None:
    """A fully fine-tuned model as a checkpoint folder in the base's dtype, with the base's non-weight files."""
    from gainsurgery.merge.provenance import OUTPUT_FILES
    from gainsurgery.training.modeling import checkpoint_dtype, torch_dtype

    model.to(torch_dtype(checkpoint_dtype(base.folder))).save_pretrained(out)
    # tokenizer, generation config, license... (those save_pretrained wrote are kept), read safely
    copy_extra_files(base, out, skip=OUTPUT_FILES, keep_existing=True)


def _peft_model(model: Any, cfg: TrainConfig):
    from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

    if cfg.init_adapter:
        try:
            return PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)
        except (ValueError, OSError) as exc:
            raise TrainingError(f"cannot continue adapter {cfg.init_adapter}: {str(exc).splitlines()[0]}") from None
    if cfg.method == "lora":
        pcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                          target_modules=list(cfg.lora_targets) if cfg.lora_targets else "all-linear",
                          task_type="CAUSAL_LM")
    else:  # PEFT's per-architecture default targets (for Gemma 3: q_proj, v_proj and the FFN down_proj)
        pcfg = IA3Config(task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, pcfg)
    except ValueError as exc:
        raise TrainingError(f"PEFT cannot build a {cfg.method} adapter here: {str(exc).splitlines()[0]}") from None


def _scheduler(optimizer: Any, cfg: TrainConfig):
    import transformers

    warmup = cfg.warmup_steps()
    make = {"cosine": transformers.get_cosine_schedule_with_warmup,
            "linear": transformers.get_linear_schedule_with_warmup}.get(cfg.schedule)
    if make is None:
        return transformers.get_constant_schedule_with_warmup(optimizer, warmup)
    return make(optimizer, warmup, cfg.steps)


def _eval_name(path: str) -> str:
    """A short label for an eval file: ``legal.txt`` -> legal, ``legal/validation.txt`` -> legal."""
    p = Path(path)
    generic = ("validation", "valid", "val", "test", "eval", "train", "dev")
    return p.parent.name if p.stem in generic and p.parent.name else p.stem


