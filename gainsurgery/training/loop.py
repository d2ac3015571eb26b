"""Training GAIN gains (and LoRA / IA3 baselines, full fine-tuning) on domain text.

One run, read top-down in this file, as nanoGPT reads:

- :func:`train` checks the options once (:meth:`~gainsurgery.training.config.TrainConfig.plan`:
  plain values from there on), takes the outputs
  (:class:`~gainsurgery.training.outputs.RunOutputs`: claims, locks, the log, checkpoints),
  and runs the loop: micro-batch -> forward -> loss -> backward -> gradients averaged
  across processes -> optimizer step; log, evaluate, checkpoint;
- :func:`prepare_run` builds the model, the data and the optimizer (or restores them
  from a checkpoint);
- :func:`finish` evaluates once more and saves the trained numbers: a gain file, or
  an adapter / checkpoint folder.

What is trained:

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

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from gainsurgery.architectures import model_type_of, num_layers, resolve_targets
from gainsurgery.architectures.registry import METHODS as GAIN_METHODS
from gainsurgery.errors import CheckpointError, TrainingError
from gainsurgery.extras import require_extra
from gainsurgery.gainfile import BASE_TENSORS_KEY
from gainsurgery.gainfile import load as load_gain
from gainsurgery.io.checkpoint import Checkpoint, copy_extra_files, fingerprint, open_checkpoint
from gainsurgery.io.fingerprint import base_tensors_sha256
from gainsurgery.io.hashing import file_records
from gainsurgery.io.inputs import check_input_folder
from gainsurgery.sources import base_model_name, resolve_base
from gainsurgery.training import distributed, precision, state
from gainsurgery.training.config import FSDP_FULL, DataPlan, ModelPlan, RunPlan, TrainConfig, TrainResult
from gainsurgery.training.data import MemoryBatches, Windows, fingerprint_files, pack, read_documents
from gainsurgery.training.evaluation import perplexity
from gainsurgery.training.hooks import GainHooks
from gainsurgery.training.modeling import checkpoint_dtype, load_causal_lm, load_tokenizer, torch_dtype
from gainsurgery.training.outputs import RunOutputs
from gainsurgery.training.streaming import StreamedBatches, fingerprint_streamed, iter_documents


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
    cfg.validate()  # every option and every output path, checked once: before anything is loaded or written
    # From here on the run reads plain values, settled once; each part of it receives its own.
    plan = RunPlan(model=cfg.model_plan(), data=cfg.data_plan(), outputs=cfg.output_plan(), steps=cfg.steps,
                   grad_accum=cfg.grad_accum, lr=cfg.learning_rate, schedule=cfg.schedule,
                   warmup_steps=cfg.warmup_steps(), mixed_precision=cfg.mixed_precision, eval_every=cfg.eval_every,
                   save_every=cfg.save_every, resume_checkpoint=cfg.resume if cfg.resumes_checkpoint else None,
                   progress=cfg.progress, options=asdict(cfg))
    with RunOutputs(plan.outputs) as outputs:
        run = prepare_run(plan, outputs)
        model, batches, optimizer, scheduler, scaler = run.model, run.batches, run.optimizer, run.scheduler, run.scaler
        step, last_loss, accum = run.start_step, run.last_loss, plan.grad_accum
        bar = tqdm(total=plan.steps, initial=step, desc=f"train {plan.model.method}",
                   disable=not (plan.progress and run.is_main), leave=False)
        if step == 0:
            evaluate(run, outputs, 0)
        model.train()
        t0, c0 = time.perf_counter(), time.process_time()  # CPU time: this process's work, on a shared machine too
        while step < plan.steps:
            loss_sum = 0.0
            for _ in range(accum):
                batch = batches.next().to(run.device)
                with precision.autocast(run.device, run.mixed_precision):
                    loss = model(input_ids=batch, labels=batch).loss
                scaled = loss / accum
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                loss_sum += run.accelerator.gather(loss.detach()).mean().item()
            distributed.average_gradients(run.trainable)
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
            last_loss = loss_sum / accum
            if not math.isfinite(last_loss):
                raise TrainingError(f"loss became {last_loss} at step {step}; lower --lr")
            bar.update(1)
            bar.set_postfix(loss=f"{last_loss:.4f}")
            seconds = run.elapsed + time.perf_counter() - t0
            outputs.log({"step": step, "loss": last_loss, "lr": scheduler.get_last_lr()[0],
                         "tokens": step * plan.data.batch_size * accum * (plan.data.seq_len - 1),
                         "seconds": round(seconds, 3), "cpu_seconds": round(time.process_time() - c0, 3)})
            if plan.eval_every and step % plan.eval_every == 0 and step < plan.steps:
                evaluate(run, outputs, step)
            if plan.save_every and step % plan.save_every == 0 and step < plan.steps:
                save_checkpoint(run, outputs, step, last_loss, run.elapsed + time.perf_counter() - t0)
        bar.close()
        return finish(plan, run, outputs, step, last_loss, time.perf_counter() - t0)


@dataclass
class Run:
    """A prepared run: what :func:`prepare_run` builds for the loop and :func:`finish`."""

    accelerator: Any
    device: Any
    world: int  # processes
    is_main: bool
    mixed_precision: str  # autocast of forward passes: no, bf16, fp16
    model: Any
    gains: GainHooks | None  # GAIN's trainable vectors; None for a PEFT adapter or full fine-tuning
    named_trainable: list[tuple[str, Any]]  # what the optimizer trains, by its name in the model
    trainable_parameters: int  # numbers trained
    batches: Any  # this process's micro-batches: MemoryBatches or StreamedBatches
    streaming: bool  # batches are StreamedBatches: each process has its own data position
    eval_sets: dict[str, Windows]
    optimizer: Any
    scheduler: Any
    scaler: Any  # fp16's loss scaler, else None
    start_step: int  # 0, or the step a checkpoint resumed at
    last_loss: float
    elapsed: float  # seconds trained before a resume
    evals: list[dict[str, Any]]  # one row per evaluation, from the first step on
    settings: dict[str, Any]  # every option, settled, with the process count and data fingerprint: in checkpoints
    data_record: dict[str, Any]  # what the output records of the data: fingerprint, windows, bos_first
    base: Checkpoint
    base_sha: str | None  # the fingerprint of the target tensors (GAIN, main process)
    resumed: dict[str, Any] | None  # the checkpoint continued from, as outputs record it
    parameter_bytes: int

    @property
    def trainable(self) -> list[Any]:
        return [p for _, p in self.named_trainable]


def prepare_run(plan: RunPlan, outputs: RunOutputs) -> Run:
    """The model, data and optimizer of ``plan``, ready for its first step (or the step a checkpoint resumed at).

    What the user can get wrong is found before anything is written: the launch, the
    checkpoint to resume (read whole now), the base (every file checked before
    transformers opens it), the data, the checkpoint's settings against this run's.
    Then the outputs are taken, then the model loads.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, gather_object, set_seed

    mode = precision.resolve_mixed_precision(plan.mixed_precision)
    # cpu=True where torch sees no accelerator: accelerate then runs torchrun's processes as
    # MULTI_CPU over gloo (without it, each CPU process would think it is alone).
    # Autocast is ours (precision.autocast), not accelerate's: accelerate fixes its mixed
    # precision once per process, and a library's train() may run many times in one.
    accelerator = Accelerator(cpu=not _has_accelerator())
    device, world, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    fsdp = plan.model.fsdp or accelerator.distributed_type == DistributedType.FSDP
    checkpointing = plan.model.gradient_checkpointing or bool(getattr(plugin, "activation_checkpointing", False))
    if fsdp and plan.model.method == "full":
        raise TrainingError(FSDP_FULL)
    if fsdp and world == 1:
        raise TrainingError("--fsdp shards the base across processes; launch several with torchrun or "
                            "accelerate launch (see docs/training.md)")
    if plan.data.batch_size % world:
        raise TrainingError(f"--batch-size {plan.data.batch_size} must be divisible by the "
                            f"{world} processes (it is the global batch)")
    record, tensors, resumed, resume_folder = None, None, None, None
    if plan.resume_checkpoint:  # an input folder, read whole now (before anything is written)
        resume_folder = state.find_checkpoint(plan.resume_checkpoint)
        record, tensors, state_sha = state.load(resume_folder)
        resumed = state.describe(resume_folder, record["step"], state_sha)
    set_seed(plan.data.seed)
    folder = resolve_base(plan.model.base)
    outputs.keep_apart_from(folder)
    # transformers opens the folder's files by name: every one is checked first (no link out,
    # no FIFO), and the index, headers and config.json are validated.
    check_input_folder(folder, error=CheckpointError)
    base = open_checkpoint(folder)
    tokenizer = load_tokenizer(folder)
    batches, data_record = _batches(plan.data, tokenizer, rank=rank, world=world)
    settings = {**plan.options, "lr": plan.lr, "mixed_precision": mode, "processes": world,
                "data_fingerprint": data_record["data_fingerprint"]}
    if record is not None:  # before the model loads: a mismatch is the user's to fix, fast
        state.check_compatible(record, settings, resume_folder)
    outputs.open(resumed_at=record["step"] if record is not None else 0, is_main=accelerator.is_main_process,
                 device=device)
    eval_sets = _eval_sets(plan.data, tokenizer)

    model, gains, base_sha = _model(plan.model, folder, base, hash_base=accelerator.is_main_process)
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
    optimizer = torch.optim.AdamW(trainable, lr=plan.lr, weight_decay=0.0)
    scheduler = _scheduler(optimizer, plan.schedule, plan.warmup_steps, plan.steps)
    scaler = precision.grad_scaler(device, mode)
    step, evals, last_loss, elapsed = 0, [], float("nan"), 0.0
    if record is not None:
        step, evals, last_loss, elapsed = state.resume(
            record, tensors, named_trainable, optimizer, scheduler, scaler, batches, rank=rank,
            streaming=plan.data.streaming, steps=plan.steps,
            max_windows=plan.steps * plan.grad_accum * plan.data.batch_size, folder=resume_folder)
    sizes = gather_object([param_bytes]) if world > 1 else [param_bytes]
    outputs.log({"processes": world, "fsdp": fsdp, "mixed_precision": mode, "dtype": plan.model.dtype,
                 "gradient_checkpointing": checkpointing, "streaming": plan.data.streaming,
                 "trainable_parameters": n_trainable, "parameter_bytes": sizes, "resumed_from": step})
    return Run(accelerator=accelerator, device=device, world=world, is_main=accelerator.is_main_process,
               mixed_precision=mode, model=model, gains=gains, named_trainable=named_trainable,
               trainable_parameters=n_trainable, batches=batches, streaming=plan.data.streaming,
               eval_sets=eval_sets, optimizer=optimizer, scheduler=scheduler, scaler=scaler, start_step=step,
               last_loss=last_loss, elapsed=elapsed, evals=evals, settings=settings, data_record=data_record,
               base=base, base_sha=base_sha, resumed=resumed, parameter_bytes=param_bytes)


def evaluate(run: Run, outputs: RunOutputs, at: int) -> None:
    """Perplexity of every validation set after ``at`` steps: kept for the result and logged."""
    if not run.eval_sets:
        return
    run.model.eval()
    with precision.autocast(run.device, run.mixed_precision):
        row = {"step": at, **{f"eval_ppl/{name}": perplexity(run.model, w, device=run.device)["ppl"]
                              for name, w in run.eval_sets.items()}}
    run.model.train()
    run.evals.append(row)
    outputs.log(row)


def save_checkpoint(run: Run, outputs: RunOutputs, step: int, last_loss: float, seconds: float) -> None:
    """Checkpoint the run after ``step`` steps: every process's data position, the main process writes."""
    from accelerate.utils import gather_object

    position = run.batches.position()
    data = ({"processes": gather_object([position]) if run.world > 1 else [position]}
            if run.streaming else position)
    record = {"settings": state._jsonable(run.settings), "scheduler": run.scheduler.state_dict(),
              "scaler": run.scaler.state_dict() if run.scaler is not None else None, "data": data,
              "last_loss": last_loss, "seconds": round(seconds, 3), "evals": run.evals}
    outputs.save_checkpoint(step, run.named_trainable, run.optimizer, record)


def finish(plan: RunPlan, run: Run, outputs: RunOutputs, step: int, last_loss: float,
           seconds: float) -> TrainResult:
    """Evaluate once more, close the log, save the trained numbers; what the run measured."""
    evaluate(run, outputs, step)
    outputs.close_log()
    run.accelerator.wait_for_everyone()
    tokens_per_step = plan.data.batch_size * plan.grad_accum * (plan.data.seq_len - 1)
    result = TrainResult(plan.outputs.output, plan.model.method, run.trainable_parameters, step, last_loss, seconds,
                         seconds / max(step - run.start_step, 1), step * tokens_per_step, run.evals,
                         run.parameter_bytes, run.start_step)

    def save() -> None:  # on the main process
        training = _training_record(plan, run, result)
        if run.gains is not None:  # GAIN: a v1 gain file, keyed by the base checkpoint's own tensor names
            outputs.write_gain(run.gains.gain_file(_gain_metadata(plan.model, plan.data, run, training)))
        elif plan.model.method == "full":  # every weight, back in the base's dtype, with its other files
            outputs.write_folder(lambda folder: _save_full(run.model, run.base, folder), training)
        else:
            outputs.write_folder(run.model.save_pretrained, training)

    outputs.save(save)
    return result


def _batches(plan: DataPlan, tokenizer: Any, *, rank: int, world: int) -> tuple[Any, dict[str, Any]]:
    """This process's micro-batches, and what the output records of the data."""
    if plan.streaming:
        batches: Any = StreamedBatches(tokenizer, list(plan.files), plan.seq_len, plan.batch_size // world,
                                       seed=plan.seed, rank=rank, world=world, text_field=plan.text_field,
                                       block_bytes=plan.block_bytes)
        return batches, {"data_fingerprint": fingerprint_streamed(plan.files), "windows": None,
                         "bos_first": batches.bos is not None}
    docs = [d for path in plan.files for d in read_documents(path, plan.text_field)]
    windows = pack(tokenizer, docs, plan.seq_len)
    batches = MemoryBatches(windows, plan.batch_size, seed=plan.seed, rank=rank, world=world)
    return batches, {"data_fingerprint": fingerprint_files(plan.files), "windows": len(windows.ids),
                     "bos_first": windows.bos is not None}


def _eval_sets(plan: DataPlan, tokenizer: Any) -> dict[str, Windows]:
    """Validation windows by name (the domain's, or the path where two names would clash)."""
    names = [_eval_name(p) for p in plan.eval_files]
    if len(set(names)) < len(names):
        names = [str(p) for p in plan.eval_files]
    read = iter_documents if plan.streaming else read_documents
    return {name: pack(tokenizer, read(p, plan.text_field), plan.seq_len, plan.eval_windows)
            for name, p in zip(names, plan.eval_files)}


def _model(plan: ModelPlan, folder: Path, base: Checkpoint, *, hash_base: bool) -> tuple[Any, GainHooks | None,
                                                                                         str | None]:
    """The model to train (every base weight frozen but for ``full``), its gains, the targets' fingerprint."""
    model = load_causal_lm(folder, plan.dtype)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(plan.method == "full")  # full fine-tuning: every weight, kept in plan.dtype
    if plan.method == "full":
        return model, None, None
    if plan.method not in GAIN_METHODS:
        return _peft_model(model, plan), None, None
    targets = resolve_targets({n: t.shape for n, t in base.tensors.items()}, model_type_of(base.config),
                              plan.method, plan.side, expected_layers=num_layers(base.config))
    # The gain knows its base: the target tensors' bytes, hashed now that the base is read.
    base_sha = base_tensors_sha256(base, [t.key for t in targets]) if hash_base else None
    init = None
    if plan.init_gains:
        init = load_gain(plan.init_gains, allow_negative=True)
        recorded = init.metadata.get(BASE_TENSORS_KEY)
        if recorded and base_sha and recorded != base_sha:
            raise TrainingError(f"--resume {Path(plan.init_gains).name} was trained on other base weights than "
                                f"{Path(str(folder)).name} (base_tensors_sha256 differs); continue it on "
                                "the base it was trained on")
    return model, GainHooks.trainable(model, targets, init), base_sha


def _training_record(plan: RunPlan, run: Run, result: TrainResult) -> dict[str, Any]:
    """The run's settings as the output records them: files by name and sha256, never by local path.

    A resumed checkpoint is recorded as :func:`~gainsurgery.training.state.describe` says
    (its ``step-*`` name, step and state hash); a gain file given to ``--resume`` as a
    file record. Where checkpoints were written is the user's business, not the output's.
    """
    meta = {k: v for k, v in plan.options.items() if k not in _NOT_RECORDED}
    meta["base"] = base_model_name(plan.model.base)
    meta["data"] = file_records(plan.data.files)
    meta["eval_data"] = file_records(plan.data.eval_files)
    if run.resumed is not None:
        meta["resume"] = run.resumed
    elif plan.model.init_gains:
        meta["resume"] = file_records([plan.model.init_gains])[0]
    if plan.model.init_adapter:
        meta["init_adapter"] = Path(plan.model.init_adapter).name
    data = run.data_record
    meta.update(lr=plan.lr, data_fingerprint=data["data_fingerprint"], mixed_precision=run.mixed_precision,
                final_loss=result.final_loss, seconds=round(run.elapsed + result.seconds, 1), tokens=result.tokens,
                processes=run.world, windows=data["windows"], bos_first=data["bos_first"])
    return meta


#: Options a trained output never records as they are: local paths (they say who and where the
#: user is; files are recorded by name and sha256) and what does not change the numbers.
_NOT_RECORDED = ("progress", "output", "log", "base", "data", "eval_data", "resume", "init_adapter", "overwrite",
                 "checkpoint_dir")


def _gain_metadata(model: ModelPlan, data: DataPlan, run: Run, training: dict[str, Any]) -> dict[str, Any]:
    """A trained gain file's metadata: method, side, base (by name and fingerprints), training."""
    meta = {"method": model.method, "side": model.side, "base_model": base_model_name(model.base),
            "base_fingerprint": fingerprint(run.base), BASE_TENSORS_KEY: run.base_sha, "training": training,
            "description": f"GAIN ({model.method}) trained on {', '.join(Path(d).name for d in data.files)}"}
    return {k: v for k, v in meta.items() if v is not None}


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


def _save_full(model: Any, base: Checkpoint, out: Path) -> None:
    """A fully fine-tuned model as a checkpoint folder in the base's dtype, with the base's non-weight files."""
    # Here, not at the top: merge brings the Hub modules with it, and training never needs them
    # (scripts/gpu_check.py reports any that a run imported).
    from gainsurgery.merge.provenance import OUTPUT_FILES

    model.to(torch_dtype(checkpoint_dtype(base.folder))).save_pretrained(out)
    # tokenizer, generation config, license... (those save_pretrained wrote are kept), read safely
    copy_extra_files(base, out, skip=OUTPUT_FILES, keep_existing=True)


def _peft_model(model: Any, plan: ModelPlan):
    from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

    if plan.init_adapter:
        try:
            return PeftModel.from_pretrained(model, plan.init_adapter, is_trainable=True)
        except (ValueError, OSError) as exc:
            raise TrainingError(f"cannot continue adapter {plan.init_adapter}: {str(exc).splitlines()[0]}") from None
    if plan.method == "lora":
        pcfg = LoraConfig(r=plan.lora_rank, lora_alpha=plan.lora_alpha, lora_dropout=0.0,
                          target_modules=list(plan.lora_targets) if plan.lora_targets else "all-linear",
                          task_type="CAUSAL_LM")
    else:  # PEFT's per-architecture default targets (for Gemma 3: q_proj, v_proj and the FFN down_proj)
        pcfg = IA3Config(task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, pcfg)
    except ValueError as exc:
        raise TrainingError(f"PEFT cannot build a {plan.method} adapter here: {str(exc).splitlines()[0]}") from None


def _scheduler(optimizer: Any, schedule: str, warmup_steps: int, steps: int):
    import transformers

    make = {"cosine": transformers.get_cosine_schedule_with_warmup,
            "linear": transformers.get_linear_schedule_with_warmup}.get(schedule)
    if make is None:
        return transformers.get_constant_schedule_with_warmup(optimizer, warmup_steps)
    return make(optimizer, warmup_steps, steps)


def _eval_name(path: str) -> str:
    """A short label for an eval file: ``legal.txt`` -> legal, ``legal/validation.txt`` -> legal."""
    p = Path(path)
    generic = ("validation", "valid", "val", "test", "eval", "train", "dev")
    return p.parent.name if p.stem in generic and p.parent.name else p.stem
