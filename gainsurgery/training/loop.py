"""Training GAIN gains (and LoRA / IA3 baselines, full fine-tuning) on domain text.

The loop is data -> model -> loss -> step, nothing more:

- the base is frozen; GAIN adds one trainable vector per adapted weight
  (initialised to 1), applied by forward hooks, so W·diag(s) is never
  materialised during training;
- the gain vectors are keyed by the *checkpoint's own tensor names* (resolved
  from its safetensors headers), so the saved file applies to that checkpoint;
- LoRA and IA3 go through PEFT and the same loop, for side-by-side numbers.

Scale, each one option (docs/training.md):

- processes: launched by ``torchrun`` or ``accelerate launch``; accelerate gives the
  process group and the device. ``--batch-size`` is the *global* batch, split
  across processes, and the trainable gradients are averaged once per step, so any
  process count optimises the same objective (:mod:`~gainsurgery.training.distributed`);
- ``--fsdp``: the frozen base sharded with FSDP2, the trainable numbers whole;
- ``--gradient-checkpointing``: layers recompute their activations in backward;
- ``--dtype`` (weights) and ``--mixed-precision`` (autocast):
  :mod:`~gainsurgery.training.precision`; gains and their optimizer state stay float32;
- ``--streaming``: data read in blocks, each process its own share
  (:mod:`~gainsurgery.training.streaming`);
- ``--save-every`` / ``--resume CHECKPOINT``: exact resume
  (:mod:`~gainsurgery.training.state`).

Without any of them, one process in float32 computes exactly what it always did
(tests/test_training_pinned.py).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gainsurgery.architectures import Target, model_type_of, num_layers, resolve_targets
from gainsurgery.architectures.registry import METHODS as GAIN_METHODS
from gainsurgery.errors import TrainingError
from gainsurgery.extras import require_extra
from gainsurgery.io.atomic import write_json, write_text
from gainsurgery.io.checkpoint import fingerprint, open_checkpoint
from gainsurgery.sources import resolve_base
from gainsurgery.training.config import TrainConfig, TrainResult
from gainsurgery.training.data import fingerprint_files, pack, read_documents
from gainsurgery.training.hooks import GainHooks


def resolve_gain_targets(folder: Path, method: str, side: str) -> tuple[list[Target], Any]:
    """GAIN targets of a checkpoint folder, from its headers and config."""
    ckpt = open_checkpoint(folder)
    targets = resolve_targets({n: t.shape for n, t in ckpt.tensors.items()}, model_type_of(ckpt.config),
                              method, side, expected_layers=num_layers(ckpt.config))
    return targets, ckpt


def train(cfg: TrainConfig) -> TrainResult:
    """Train gains (or a PEFT baseline) and save them to ``cfg.output``.

    GAIN methods save a v1 gain file (with the run's settings, data fingerprint
    and final loss in its ``training`` metadata); ``lora``/``ia3`` save a PEFT
    adapter folder. Runs on one CPU/GPU, or under ``torchrun`` / ``accelerate launch``.

    Args:
        cfg: what to train (see :class:`~gainsurgery.training.config.TrainConfig`).

    Returns:
        A :class:`~gainsurgery.training.config.TrainResult`.

    Raises:
        TrainingError: bad options (checked before the model loads), a checkpoint made
            with other settings, or a loss that diverges.
        MissingExtraError: torch, transformers, accelerate or peft are not installed.

    Example:
        >>> train(TrainConfig(base="embedded:gemma-3-270m", data=["legal.txt"],
        ...                   output="legal.safetensors", steps=30))  # doctest: +SKIP
    """
    require_extra("train", "train()")
    cfg.validate()
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, gather_object, set_seed

    from gainsurgery.training import distributed, precision, state
    from gainsurgery.training.data import MemoryBatches
    from gainsurgery.training.evaluation import perplexity
    from gainsurgery.training.modeling import load_causal_lm, load_tokenizer
    from gainsurgery.training.streaming import StreamedBatches, fingerprint_streamed, iter_documents

    mode = precision.resolve_mixed_precision(cfg.mixed_precision)
    # cpu=True where torch sees no accelerator: accelerate then runs torchrun's processes as
    # MULTI_CPU over gloo (without it, each CPU process would think it is alone).
    # Autocast is ours (precision.autocast), not accelerate's: accelerate fixes its mixed
    # precision once per process, and a library's train() may run many times in one.
    accelerator = Accelerator(cpu=not _has_accelerator())
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    fsdp = cfg.fsdp or accelerator.distributed_type == DistributedType.FSDP
    checkpointing = cfg.gradient_checkpointing or bool(getattr(plugin, "activation_checkpointing", False))
    if fsdp and cfg.method == "full":
        raise TrainingError("--fsdp shards the frozen base; full fine-tuning trains every weight "
                            "(use several processes without --fsdp)")
    if fsdp and world == 1:
        raise TrainingError("--fsdp shards the base across processes; launch several with torchrun or "
                            "accelerate launch (see docs/training.md)")
    if cfg.batch_size % world:
        raise TrainingError(f"--batch-size {cfg.batch_size} must be divisible by the "
                            f"{world} processes (it is the global batch)")
    resume_record, resume_tensors, resume_folder = None, None, None
    if cfg.resumes_checkpoint:
        resume_folder = state.find_checkpoint(cfg.resume)
        resume_record, resume_tensors = state.load(resume_folder)
    set_seed(cfg.seed)
    folder = resolve_base(cfg.base)
    if cfg.save_every:  # a new output: the trust rules of every output hold for it too
        from gainsurgery.io.outputs import check_output

        check_output(cfg.checkpoint_folder(), inputs=[folder, *cfg.data], kind="folder", overwrite=True,
                     what="--checkpoint-dir", error=TrainingError)
    tokenizer = load_tokenizer(folder)
    share = cfg.batch_size // world
    if cfg.streaming:
        batches: Any = StreamedBatches(tokenizer, cfg.data, cfg.seq_len, share, seed=cfg.seed, rank=rank, world=world,
                                       text_field=cfg.text_field, block_bytes=cfg.stream_block_bytes)
        n_windows, bos_first = None, batches.bos is not None
        data_fingerprint = fingerprint_streamed(cfg.data)
        read_eval: Any = iter_documents
    else:
        docs = [d for path in cfg.data for d in read_documents(path, cfg.text_field)]
        windows = pack(tokenizer, docs, cfg.seq_len)
        batches = MemoryBatches(windows, cfg.batch_size, seed=cfg.seed, rank=rank, world=world)
        n_windows, bos_first = len(windows.ids), windows.bos is not None
        data_fingerprint = fingerprint_files(cfg.data)
        read_eval = read_documents
    settings = {**asdict(cfg), "lr": cfg.learning_rate, "mixed_precision": mode, "processes": world,
                "data_fingerprint": data_fingerprint}
    if resume_record is not None:  # before the model loads: a mismatch is the user's to fix, fast
        state.check_compatible(resume_record, settings, resume_folder)
    names = [_eval_name(p) for p in cfg.eval_data]
    if len(set(names)) < len(names):
        names = [str(p) for p in cfg.eval_data]
    eval_sets = {name: pack(tokenizer, read_eval(p, cfg.text_field), cfg.seq_len, cfg.eval_windows)
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
        init = None
        if cfg.resume and not cfg.resumes_checkpoint:
            from gainsurgery.gainfile import load

            init = load(cfg.resume, allow_negative=True)
        adapter = GainHooks.trainable(model, targets, init)
    else:
        model = _peft_model(model, cfg)
    if checkpointing:
        # Non-reentrant: recomputation follows autograd, so it needs no input that requires
        # grad (the embeddings are frozen) and runs the gain hooks again in backward.
        _enable_activation_checkpointing(model)
    named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    trainable = [p for _, p in named_trainable]
    n_trainable = int(sum(p.numel() for p in trainable))
    if fsdp:
        reshard = getattr(plugin, "reshard_after_forward", True)
        distributed.shard_frozen_base(model, device, trainable,
                                      reshard_after_forward=reshard if isinstance(reshard, bool) else True)
    else:
        model.to(device)
    param_bytes = distributed.parameter_bytes(model)

    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=0.0)
    scheduler = _scheduler(optimizer, cfg)
    scaler = precision.grad_scaler(device, mode)
    step, evals, elapsed = 0, [], 0.0
    last_loss = float("nan")
    if resume_record is not None:
        try:
            state.restore(resume_record, resume_tensors, named_trainable, optimizer, resume_folder)
            scheduler.load_state_dict(resume_record["scheduler"])
            if scaler is not None and resume_record.get("scaler"):
                scaler.load_state_dict(resume_record["scaler"])
            data_pos = resume_record["data"]
            batches.restore(data_pos["processes"][rank] if cfg.streaming else data_pos)
            step, evals = int(resume_record["step"]), list(resume_record.get("evals", []))
            last_loss = float(resume_record.get("last_loss", last_loss))
            elapsed = float(resume_record.get("seconds", 0))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise TrainingError(f"--resume {resume_folder}: the checkpoint is damaged ({type(exc).__name__}: "
                                f"{str(exc)[:120]})") from None
    start_step = step
    sizes = gather_object([param_bytes]) if world > 1 else [param_bytes]

    lock = state.CheckpointLock(cfg.checkpoint_folder()) if cfg.save_every and accelerator.is_main_process else None
    log_path = Path(cfg.log) if cfg.log else _default_log(cfg.output)
    if start_step and accelerator.is_main_process:
        _trim_log(log_path, start_step)
    log = open(log_path, "a" if start_step else "w", encoding="utf-8") if accelerator.is_main_process else None
    if log:
        log.write(json.dumps({"processes": world, "fsdp": fsdp, "mixed_precision": mode, "dtype": cfg.dtype,
                              "gradient_checkpointing": checkpointing, "streaming": cfg.streaming,
                              "trainable_parameters": n_trainable, "parameter_bytes": sizes,
                              "resumed_from": start_step}) + "\n")

    def run_eval(at: int) -> None:
        if not eval_sets:
            return
        model.eval()
        with precision.autocast(device, mode):
            row = {"step": at, **{f"eval_ppl/{name}": perplexity(model, w, device=device)["ppl"]
                                  for name, w in eval_sets.items()}}
        model.train()
        evals.append(row)
        if log:
            log.write(json.dumps(row) + "\n")
            log.flush()

    def save_checkpoint(at: int) -> None:
        data_pos = ({"processes": gather_object([batches.position()]) if world > 1 else [batches.position()]}
                    if cfg.streaming else batches.position())
        if accelerator.is_main_process:
            record = {"settings": state._jsonable(settings), "scheduler": scheduler.state_dict(),
                      "scaler": scaler.state_dict() if scaler is not None else None, "data": data_pos,
                      "last_loss": last_loss, "seconds": round(elapsed + time.perf_counter() - t0, 3),
                      "evals": evals}
            state.save(cfg.checkpoint_folder(), at, named_trainable, optimizer, record)
        accelerator.wait_for_everyone()

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.method}",
               disable=not (cfg.progress and accelerator.is_main_process), leave=False)
    if start_step == 0:
        run_eval(0)
    model.train()
    t0, c0 = time.perf_counter(), time.process_time()  # CPU time: this process's work, on a shared machine too
    while step < cfg.steps:
        loss_sum = 0.0
        for _ in range(cfg.grad_accum):
            batch = batches.next().to(device)
            with precision.autocast(device, mode):
                loss = model(input_ids=batch, labels=batch).loss
            scaled = loss / cfg.grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_sum += accelerator.gather(loss.detach()).mean().item()
        distributed.average_gradients(trainable)
        if scaler is not None:
            before = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            stepped = scaler.get_scale() >= before  # a lowered scale means inf/nan: the step was skipped
        else:
            optimizer.step()
            stepped = True
        if stepped:
            scheduler.step()
        optimizer.zero_grad()
        step += 1
        last_loss = loss_sum / cfg.grad_accum
        if not math.isfinite(last_loss):
            raise TrainingError(f"loss became {last_loss} at step {step}; lower --lr")
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}")
        if log:
            log.write(json.dumps({"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                                  "tokens": step * cfg.batch_size * cfg.grad_accum * (cfg.seq_len - 1),
                                  "seconds": round(elapsed + time.perf_counter() - t0, 3),
                                  "cpu_seconds": round(time.process_time() - c0, 3)}) + "\n")
            log.flush()  # a killed run's log ends at its last step, where --resume picks it up
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            run_eval(step)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            save_checkpoint(step)
    seconds = time.perf_counter() - t0
    bar.close()
    run_eval(step)
    if log:
        log.close()

    accelerator.wait_for_everyone()
    done = step - start_step
    result = TrainResult(cfg.output, cfg.method, n_trainable, step, last_loss, seconds, seconds / max(done, 1),
                         step * cfg.batch_size * cfg.grad_accum * (cfg.seq_len - 1), evals, param_bytes, start_step)
    if accelerator.is_main_process:
        training_meta = {k: v for k, v in asdict(cfg).items()
                         if k not in ("progress", "output", "log", "checkpoint_dir", "save_every")}
        training_meta.update(lr=cfg.learning_rate, data_fingerprint=data_fingerprint, mixed_precision=mode,
                             final_loss=last_loss, seconds=round(elapsed + seconds, 1), tokens=result.tokens,
                             processes=world, windows=n_windows, bos_first=bos_first)
        if adapter is not None:
            gain = adapter.gain_file({"method": cfg.method, "side": cfg.side, "base_model": cfg.base,
                                      "base_fingerprint": fingerprint(ckpt), "training": training_meta,
                                      "description": f"GAIN ({cfg.method}) trained on {', '.join(Path(d).name for d in cfg.data)}"})
            gain.save(cfg.output)
        elif cfg.method == "full":
            _save_full(model, folder, Path(cfg.output))
            write_json(Path(cfg.output) / "gainsurgery_training.json", training_meta)
        else:
            model.save_pretrained(cfg.output)
            write_json(Path(cfg.output) / "gainsurgery_training.json", training_meta)
    accelerator.wait_for_everyone()
    if lock is not None:  # on an error, the lock goes with the frame (CheckpointLock.__del__)
        lock.release()
    return result


def _trim_log(path: Path, step: int) -> None:
    """Drop the log lines of steps after ``step`` (a killed run went past its last checkpoint).

    The resumed run writes those steps again; without this they would appear twice.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or row["step"] <= step:
            kept.append(line)
    write_text(path, "".join(line + "\n" for line in kept))


def _enable_activation_checkpointing(model: Any) -> None:
    """Checkpoint every decoder layer, non-reentrant (transformers' new name where it has it)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:  # transformers before the rename
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _has_accelerator() -> bool:
    import torch

    probe = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS...
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()


def _save_full(model: Any, base_folder: Path, out: Path) -> None:
    """A fully fine-tuned model as a checkpoint folder in the base's dtype, with the base's non-weight files."""
    import shutil

    from gainsurgery.merge.provenance import OUTPUT_FILES
    from gainsurgery.training.modeling import checkpoint_dtype, torch_dtype

    model.to(torch_dtype(checkpoint_dtype(base_folder))).save_pretrained(out)
    for extra in open_checkpoint(base_folder).extra_files(skip=OUTPUT_FILES):
        if not (out / extra.name).exists():  # tokenizer, generation config, license...
            shutil.copyfile(extra, out / extra.name)


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


def _default_log(output: str) -> Path:
    out = Path(output)
    return out.with_name(out.stem + ".train.jsonl") if out.suffix else out.parent / (out.name + ".train.jsonl")
