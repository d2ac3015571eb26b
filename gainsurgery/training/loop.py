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

import contextlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gainsurgery.architectures import Target, model_type_of, num_layers, resolve_targets
from gainsurgery.architectures.registry import METHODS as GAIN_METHODS
from gainsurgery.errors import CheckpointError, TrainingError
from gainsurgery.extras import require_extra
from gainsurgery.gainfile import BASE_TENSORS_KEY
from gainsurgery.io.atomic import open_log_file, write_file, write_json
from gainsurgery.io.checkpoint import copy_extra_files, fingerprint, open_checkpoint
from gainsurgery.io.claims import claim_folder
from gainsurgery.io.fingerprint import base_tensors_sha256
from gainsurgery.io.hashing import file_records
from gainsurgery.io.inputs import check_input_folder, show_path
from gainsurgery.io.locks import lock_output
from gainsurgery.io.write_errors import no_room
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
    # The log, written as training goes, is where a full disk strikes first; the sites that write
    # checkpoints and -o say more precisely what they were writing.
    with no_room(f"the outputs of the run (-o {show_path(cfg.output)}, the log {show_path(cfg.log_path())})", None,
                 error=TrainingError,
                 left="no -o was written; a checkpoint folder keeps only complete checkpoints"), \
            contextlib.ExitStack() as outputs:  # a claimed output folder is released (or removed) on the way out
        return _train(cfg, outputs)


def _train(cfg: TrainConfig, outputs: contextlib.ExitStack) -> TrainResult:
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
    resume_record, resume_tensors, resume_folder, resumed = None, None, None, None
    if cfg.resumes_checkpoint:  # an input folder, read whole now (before anything is written)
        resume_folder = state.find_checkpoint(cfg.resume)
        resume_record, resume_tensors, state_sha = state.load(resume_folder)
        resumed = state.describe(resume_folder, resume_record["step"], state_sha)
    start_step = resume_record["step"] if resume_record is not None else 0
    set_seed(cfg.seed)
    folder = resolve_base(cfg.base)
    if cfg.save_every:  # checked in validate(); again now that the base's own folder is known
        cfg.check_checkpoint_folder(extra_inputs=[folder])
    # transformers opens the folder's files by name: every one is checked first (no link out,
    # no FIFO), and the index, headers and config.json are validated.
    check_input_folder(folder, error=CheckpointError)
    base_ckpt = open_checkpoint(folder)
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

    def open_outputs() -> tuple[Any, Any]:
        # Every output is held for the whole run, so a second run into the same -o, log or
        # checkpoint folder fails at once instead of interleaving with this one. A folder output
        # (adapter, checkpoint) is claimed (lock + marked temp folder) and published at the end;
        # a failed run leaves nothing. A resumed run's log loses the steps it will write again.
        claim = None
        if cfg.writes_folder:
            claim = outputs.enter_context(claim_folder(cfg.output, inputs=cfg.inputs(), overwrite=cfg.overwrite,
                                                       what="-o"))
        else:
            outputs.enter_context(lock_output(cfg.output, what="-o"))
        outputs.enter_context(lock_output(cfg.log_path(), what="the training log"))
        if cfg.save_every:
            outputs.callback(state.CheckpointLock(cfg.checkpoint_folder()).release)
        log_inputs = [*cfg.inputs(), cfg.output]
        if start_step:
            _trim_log(cfg.log_path(), start_step, log_inputs)
        log = outputs.enter_context(open_log_file(cfg.log_path(), inputs=log_inputs, what="the training log",
                                                  append=bool(start_step)))
        return claim, log

    # Outputs are the main process's; if claiming them fails, every process stops with its message.
    claim, log = distributed.on_main_process(accelerator.is_main_process, device, open_outputs) or (None, None)
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
        # The gain knows its base: the target tensors' bytes, hashed now that the base is read.
        base_sha = base_tensors_sha256(ckpt, [t.key for t in targets]) if accelerator.is_main_process else None
        init = None
        if cfg.resume and not cfg.resumes_checkpoint:
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
        step, evals, last_loss, elapsed = state.resume(
            resume_record, resume_tensors, named_trainable, optimizer, scheduler, scaler, batches, rank=rank,
            streaming=cfg.streaming, steps=cfg.steps, max_windows=cfg.steps * cfg.grad_accum * cfg.batch_size,
            folder=resume_folder)
    sizes = gather_object([param_bytes]) if world > 1 else [param_bytes]
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
        record = {"settings": state._jsonable(settings), "scheduler": scheduler.state_dict(),
                  "scaler": scaler.state_dict() if scaler is not None else None, "data": data_pos,
                  "last_loss": last_loss, "seconds": round(elapsed + time.perf_counter() - t0, 3), "evals": evals}
        def write() -> None:
            # state.save removes its half-written temp folder; the checkpoints before it stay.
            with no_room(f"the training checkpoint of step {at}", cfg.checkpoint_folder(), error=TrainingError,
                         left="the checkpoints written before it are kept; --resume continues from the last one"):
                state.save(cfg.checkpoint_folder(), at, named_trainable, optimizer, record)

        distributed.on_main_process(accelerator.is_main_process, device, write)

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

    def save_outputs() -> None:
        # A gain file is written atomically, a folder output in its claimed temp folder: either way
        # a full disk leaves no -o behind (the claim's temp goes when the run unwinds).
        with no_room(f"-o {show_path(cfg.output)}", error=TrainingError,
                     left=f"no -o was written; the log {show_path(cfg.log_path())} says how far training went"):
            _save_outputs()

    def _save_outputs() -> None:
        training_meta = _shared_settings(cfg, resumed)
        training_meta.update(lr=cfg.learning_rate, data_fingerprint=data_fingerprint, mixed_precision=mode,
                             final_loss=last_loss, seconds=round(elapsed + seconds, 1), tokens=result.tokens,
                             processes=world, windows=n_windows, bos_first=bos_first)
        if adapter is not None:
            meta = {"method": cfg.method, "side": cfg.side, "base_model": base_model_name(cfg.base),
                    "base_fingerprint": fingerprint(ckpt), BASE_TENSORS_KEY: base_sha, "training": training_meta,
                    "description": f"GAIN ({cfg.method}) trained on {', '.join(Path(d).name for d in cfg.data)}"}
            gain = adapter.gain_file({k: v for k, v in meta.items() if v is not None})
            gain.save(cfg.output, inputs=cfg.inputs())
        else:
            if cfg.method == "full":
                _save_full(model, base_ckpt, claim.tmp)
            else:
                model.save_pretrained(claim.tmp)
            write_json(claim.tmp / "gainsurgery_training.json", training_meta)
            claim.publish()

    distributed.on_main_process(accelerator.is_main_process, device, save_outputs)
    return result


def _trim_log(path: Path, step: int, inputs: list[str]) -> None:
    """Drop the log lines of steps after ``step`` (a killed run went past its last checkpoint).

    The resumed run writes those steps again; without this they would appear twice. The
    old log is read like any file someone else may have swapped (no FIFO, nothing under
    ``/proc``) and rewritten through the output helper (checked against ``inputs``,
    atomic, never through a link). A link at the log's name is left for
    :func:`~gainsurgery.io.atomic.open_log_file` to refuse.
    """
    from gainsurgery.io import jsonsafe
    from gainsurgery.io.inputs import open_regular

    if not os.path.lexists(path) or os.path.islink(path):
        return
    with open_regular(path, error=TrainingError) as f:
        text = f.read().decode("utf-8", errors="replace")
    kept = []
    for line in text.splitlines():
        try:
            row = jsonsafe.loads(line, where="the training log", error=TrainingError)
        except TrainingError:  # a line cut by the kill
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int) or row["step"] <= step:
            kept.append(line)
    write_file(path, "".join(line + "\n" for line in kept), inputs=inputs, what="the training log",
               error=TrainingError)


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


def _shared_settings(cfg: TrainConfig, resumed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's settings as the output records them: files by name and sha256, never by local path.

    ``resumed``: the checkpoint a run continued from (:func:`~gainsurgery.training.state.describe`:
    its ``step-*`` name, step and state hash); a gain file given to ``--resume`` is a file record.
    Where checkpoints were written is the user's business, not the output's.
    """
    meta = {k: v for k, v in asdict(cfg).items()
            if k not in ("progress", "output", "log", "base", "data", "eval_data", "resume", "init_adapter",
                         "overwrite", "checkpoint_dir")}
    meta["base"] = base_model_name(cfg.base)
    meta["data"] = file_records(cfg.data)
    meta["eval_data"] = file_records(cfg.eval_data)
    if resumed is not None:
        meta["resume"] = resumed
    elif cfg.resume:
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


