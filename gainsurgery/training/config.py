"""What a training run is asked to do (:class:`TrainConfig`), the same checked and settled into plain
values (:class:`RunPlan`), and what it measured (:class:`TrainResult`).

Methods: the GAIN methods of the registry (``gain``, ``gain-ffn``), two PEFT
baselines trained on the same loop and data (``lora``, ``ia3``), and full
fine-tuning (``full``: every weight trained, kept in ``dtype`` — fp32 master
weights by default — and saved as a checkpoint in the base's dtype).

Default learning rates (documented in docs/training.md): gains are O(1)
multipliers trained with Adam, whose step is about ``lr`` in parameter units,
so lr=5e-3 moves a gain by at most ~0.5% per step — enough to adapt in a few
hundred steps without overshooting 1.0 into sign flips. LoRA's B starts at 0
and its effective step scales with alpha/r, so it takes the customary smaller
lr (5e-4 for short runs); IA3 vectors are gains too (5e-3).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from gainsurgery.architectures.registry import METHODS as GAIN_METHODS
from gainsurgery.errors import TrainingError
from gainsurgery.io.checks import check_apart, check_output, output_path
from gainsurgery.sources import local_folder_of
from gainsurgery.training.precision import MIXED_PRECISION
from gainsurgery.training.state import is_step_name

#: PEFT baselines: trained on the same loop, saved as adapter folders.
PEFT_METHODS = ("lora", "ia3")
#: Everything ``gainsurgery train`` can train: GAIN methods, the PEFT baselines, full fine-tuning.
METHODS = (*GAIN_METHODS, *PEFT_METHODS, "full")
#: Default peak learning rate per method (see the module docstring for why).
DEFAULT_LR = {"gain": 5e-3, "gain-ffn": 5e-3, "ia3": 5e-3, "lora": 5e-4, "full": 1e-5}
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    """Everything a training run needs. Field names mirror the ``gainsurgery train`` options.

    Attributes:
        base: the base model (checkpoint folder or ``embedded:NAME``).
        data: training text files (.txt, .jsonl, .parquet).
        output: the gain file (GAIN methods), adapter folder (``lora``/``ia3``) or
            checkpoint folder (``full``) to write.
        method: one of :data:`METHODS`.
        side: ``in`` (W·diag(s)) or ``out`` (diag(s)·W); GAIN only.
        steps: optimizer steps.
        lr: peak learning rate; None for :data:`DEFAULT_LR` of the method.
        batch_size: the *global* batch, in windows (split across processes).
        grad_accum: micro-batches per step.
        seq_len: tokens per window.
        dtype: the frozen base weights' dtype (``float32``, ``bfloat16``, ``float16``); trainable
            gains and adapters stay float32 whatever it is.
        mixed_precision: autocast for the forward pass: ``no``, ``bf16`` or ``fp16`` (with loss
            scaling); None: what ``accelerate launch`` was configured with, else ``no``.
        gradient_checkpointing: recompute each layer's activations in backward instead of
            keeping them (non-reentrant, so frozen weights and the gain hooks work).
        fsdp: shard the frozen base across processes with FSDP2 (the trainable numbers stay
            whole in every process); also on when ``accelerate launch`` is configured for FSDP.
        streaming: stream the training data in blocks instead of reading it all into memory
            (see :mod:`gainsurgery.training.streaming`).
        stream_block_bytes: block size of streamed .txt/.jsonl files, in bytes.
        seed: seeds the data order and initialisation.
        warmup: a fraction of the steps (< 1) or a number of steps (>= 1).
        schedule: ``cosine``, ``linear`` or ``constant``.
        eval_data: validation files; perplexity is logged before, during and after training.
        eval_every: steps between evaluations (0: at start and end only).
        eval_windows: windows per validation file.
        text_field: the text field of .jsonl / column of .parquet.
        resume: a gain file to start from (GAIN only; the optimizer starts fresh), or a training
            checkpoint folder (any method) to continue exactly where it stopped.
        save_every: write a training checkpoint every N optimizer steps (0: never).
        checkpoint_dir: where checkpoints go (default: ``<output>.checkpoints`` beside the output).
        log: JSON-lines log path (default: beside ``output``).
        lora_rank: LoRA rank; lora_alpha: LoRA alpha.
        lora_targets: LoRA target modules (PEFT names, e.g. ``["o_proj", "down_proj"]``);
            None: every linear layer but the head.
        init_adapter: a PEFT adapter folder to continue training (``lora``/``ia3``) instead
            of a fresh adapter.
        overwrite: replace an existing output folder (``lora``/``ia3``/``full``); a gain
            file (a plain ``-o`` file) is always replaced.
        progress: show a progress bar.

    Example:
        >>> TrainConfig(base="embedded:gemma-3-270m", data=["legal.txt"], output="legal.safetensors").learning_rate
        0.005
    """

    base: str
    data: list[str]
    output: str
    method: str = "gain-ffn"
    side: str = "in"
    steps: int = 100
    lr: float | None = None
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    dtype: str = "float32"
    mixed_precision: str | None = None
    gradient_checkpointing: bool = False
    fsdp: bool = False
    streaming: bool = False
    stream_block_bytes: int = 8 << 20
    seed: int = 0
    warmup: float = 0.1
    schedule: str = "cosine"
    eval_data: list[str] = field(default_factory=list)
    eval_every: int = 0
    eval_windows: int = 32
    text_field: str = "text"
    resume: str | None = None
    save_every: int = 0
    checkpoint_dir: str | None = None
    log: str | None = None
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_targets: list[str] | None = None
    init_adapter: str | None = None
    overwrite: bool = False
    progress: bool = True

    @property
    def learning_rate(self) -> float:
        """The peak learning rate: ``lr``, or the method's default."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def validate(self) -> None:
        """Refuse options that cannot work, and outputs that may not be written, before any model is loaded.

        The output, the log and the checkpoint folder are checked with
        :func:`gainsurgery.io.checks.check_output`: never ``""``, ``.``, the current or
        home folder, never an input (the base, data files...) nor inside or around one,
        never one another; a gain file's ``-o`` is never a folder.

        Raises:
            TrainingError: unknown method or schedule, bad counts, no data, an unusable
                checkpoint folder.
            OutputError: an unusable output or log path.
        """
        if self.method not in METHODS:
            raise TrainingError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise TrainingError("--steps, --batch-size and --grad-accum must be at least 1")
        if self.schedule not in SCHEDULES:
            raise TrainingError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup < 1 and not (self.warmup >= 1 and float(self.warmup).is_integer()):
            raise TrainingError("--warmup is a fraction of the steps in [0, 1) or a whole number of steps")
        if self.resume and not self.resumes_checkpoint and self.method not in GAIN_METHODS:
            raise TrainingError("--resume with a gain file continues GAIN gains; it needs --method gain or gain-ffn "
                                "(or give a training checkpoint folder)")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise TrainingError(f"unknown mixed precision {self.mixed_precision!r}; choose one of no, bf16, fp16")
        if self.save_every < 0 or self.stream_block_bytes < 1:
            raise TrainingError("--save-every must be at least 0 and --stream-block-bytes at least 1")
        if self.fsdp and self.method == "full":
            raise TrainingError(FSDP_FULL)
        if self.init_adapter and self.method not in PEFT_METHODS:
            raise TrainingError("init_adapter continues a PEFT adapter; it needs method lora or ia3")
        if not self.data:
            raise TrainingError("give training text with --data FILE")
        inputs = self.inputs()
        check_output(self.output, inputs=inputs, kind="folder" if self.writes_folder else "file",
                     overwrite=self.overwrite, what="-o")
        # Each output is written on its own terms: none is, holds or lies inside another.
        check_apart([("-o", self.output), ("the training log", self.log_path()),
                     ("--checkpoint-dir", self.checkpoint_folder() if self.save_every else None)])
        check_output(self.log_path(), inputs=[*inputs, self.output], kind="file", what="the training log")
        if self.save_every:
            check_checkpoint_folder(self.checkpoint_folder(), self._checkpoint_inputs())

    def model_plan(self) -> ModelPlan:
        """What is trained, on which base, settled: the model's part of a :class:`RunPlan`."""
        return ModelPlan(base=self.base, method=self.method, side=self.side, dtype=self.dtype,
                         gradient_checkpointing=self.gradient_checkpointing, fsdp=self.fsdp,
                         init_gains=self.resume if not self.resumes_checkpoint else None,
                         init_adapter=self.init_adapter, lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
                         lora_targets=tuple(self.lora_targets) if self.lora_targets else None)

    def data_plan(self) -> DataPlan:
        """What the run reads, in which shape: the data's part of a :class:`RunPlan`."""
        return DataPlan(files=tuple(self.data), eval_files=tuple(self.eval_data), text_field=self.text_field,
                        seq_len=self.seq_len, batch_size=self.batch_size, seed=self.seed, streaming=self.streaming,
                        block_bytes=self.stream_block_bytes, eval_windows=self.eval_windows)

    def output_plan(self) -> OutputPlan:
        """Where the run writes, and what it reads: the outputs' part of a :class:`RunPlan` (see :meth:`validate`)."""
        return OutputPlan(output=self.output, folder=self.writes_folder, log=self.log_path(),
                          checkpoints=self.checkpoint_folder() if self.save_every else None,
                          inputs=tuple(self.inputs()), checkpoint_inputs=tuple(self._checkpoint_inputs()),
                          overwrite=self.overwrite)

    @property
    def writes_folder(self) -> bool:
        """True when the output is a folder (an adapter or a checkpoint), False for a gain file."""
        return self.method not in GAIN_METHODS

    @property
    def resumes_checkpoint(self) -> bool:
        """True when ``resume`` names a training checkpoint folder (exact resume), not a gain file."""
        return bool(self.resume) and Path(self.resume).is_dir()  # type: ignore[arg-type]

    def inputs(self) -> list[str]:
        """Every path the run reads: the base folder, data, validation data, resume file, adapter.

        An output (``-o``, the log) is never, never holds and never lies inside any
        of them. An embedded base counts as its cache folder (not converted here).
        """
        base = local_folder_of(self.base)
        found = [str(base)] if base is not None else []
        found += [str(p) for p in (*self.data, *self.eval_data, self.resume, self.init_adapter) if p]
        return found

    def log_path(self) -> Path:
        """Where the JSON-lines training log goes: ``log``, else beside the output."""
        if self.log:
            return Path(self.log)
        out = Path(self.output)
        return out.with_name(out.stem + ".train.jsonl") if out.suffix else out.parent / (out.name + ".train.jsonl")

    def checkpoint_folder(self) -> Path:
        """Where checkpoints are written: ``checkpoint_dir``, or ``<output>.checkpoints`` beside the output."""
        if self.checkpoint_dir:
            return Path(self.checkpoint_dir)
        out = Path(self.output)
        return out.with_name((out.stem if out.suffix else out.name) + ".checkpoints")

    def warmup_steps(self) -> int:
        """Warmup length in steps."""
        return int(self.warmup) if self.warmup >= 1 else int(round(self.warmup * self.steps))

    def _checkpoint_inputs(self) -> list[str]:
        """The inputs the checkpoint folder is kept apart from.

        All of them but one: the checkpoint this run resumes from when it is the
        checkpoint folder itself or one of its ``step-*`` folders — continuing a run in
        its own checkpoint folder is what ``--resume CHECKPOINT_DIR --save-every N`` is
        for (the checkpoint is read whole before anything is written there).
        """
        inputs = self.inputs()
        if not (self.resumes_checkpoint and self.save_every):
            return inputs
        resumed = Path(os.path.realpath(self.resume))  # type: ignore[arg-type]
        folder = Path(os.path.realpath(output_path(self.checkpoint_folder())))
        if resumed == folder or (resumed.parent == folder and is_step_name(resumed.name)):
            return [p for p in inputs if p != str(self.resume)]
        return inputs


#: Why --fsdp and full fine-tuning do not go together (checked before and after launch).
FSDP_FULL = "--fsdp shards the frozen base; full fine-tuning trains every weight (use several processes without --fsdp)"


def check_checkpoint_folder(folder: Path, inputs: Iterable[str | os.PathLike[str]]) -> Path:
    """Check the checkpoint folder as an output (:func:`gainsurgery.io.checks.check_output`); return it.

    It is never, never holds and never lies inside one of ``inputs`` (the base, data...:
    :meth:`TrainConfig._checkpoint_inputs`; a run checks it again with the base's
    resolved folder once that is known).

    Raises:
        TrainingError: an unusable checkpoint folder.
    """
    return check_output(folder, inputs=inputs, kind="folder", overwrite=True, what="--checkpoint-dir",
                        error=TrainingError)


@dataclass(frozen=True)
class ModelPlan:
    """What is trained, on which base: the part of a :class:`RunPlan` that builds the model.

    Attributes:
        base, method, side, dtype, gradient_checkpointing, fsdp, lora_rank, lora_alpha:
            as in :class:`TrainConfig`.
        init_gains: a gain file the gains start from (``--resume`` with a file), or None.
        init_adapter: a PEFT adapter folder to continue, or None.
        lora_targets: LoRA's target modules; None: every linear layer but the head.
    """

    base: str
    method: str
    side: str
    dtype: str
    gradient_checkpointing: bool
    fsdp: bool
    init_gains: str | None
    init_adapter: str | None
    lora_rank: int
    lora_alpha: int
    lora_targets: tuple[str, ...] | None


@dataclass(frozen=True)
class DataPlan:
    """What the run reads, and in which shape: the part of a :class:`RunPlan` that makes batches.

    Attributes:
        files: training text; eval_files: validation text.
        text_field, seq_len, seed, streaming, eval_windows: as in :class:`TrainConfig`.
        batch_size: the *global* batch, in windows (each process takes its share).
        block_bytes: block size of streamed .txt/.jsonl files, in bytes.
    """

    files: tuple[str, ...]
    eval_files: tuple[str, ...]
    text_field: str
    seq_len: int
    batch_size: int
    seed: int
    streaming: bool
    block_bytes: int
    eval_windows: int


@dataclass(frozen=True)
class OutputPlan:
    """Where the run writes, checked: what :class:`~gainsurgery.training.outputs.RunOutputs` receives.

    Attributes:
        output: ``-o`` as given: a gain file, or (``folder``) an adapter or checkpoint folder.
        folder: True when ``output`` is a folder, claimed when the run starts and published whole.
        log: the JSON-lines training log.
        checkpoints: the checkpoint folder; None without ``--save-every``.
        inputs: every path the run reads; no output is, holds or lies inside one.
        checkpoint_inputs: the inputs the checkpoint folder is kept apart from (``inputs``
            without the checkpoint a run resumes inside its own checkpoint folder).
        overwrite: replace an existing folder ``output``.
    """

    output: str
    folder: bool
    log: Path
    checkpoints: Path | None
    inputs: tuple[str, ...]
    checkpoint_inputs: tuple[str, ...]
    overwrite: bool


@dataclass(frozen=True)
class RunPlan:
    """A :class:`TrainConfig` after :meth:`TrainConfig.validate`, settled: plain values, nothing left to decide.

    A run reads no ``TrainConfig``: each of its parts receives its own part of the plan.

    Attributes:
        model, data, outputs: what builds the model, makes the batches, takes the outputs.
        steps: optimizer steps; grad_accum: micro-batches per step.
        lr: the peak learning rate; schedule: ``cosine``, ``linear`` or ``constant``;
            warmup_steps: its warmup, in steps.
        mixed_precision: ``no``, ``bf16``, ``fp16``, or None: what ``accelerate launch`` asks for.
        eval_every, save_every: steps between evaluations and checkpoints (0: none between).
        resume_checkpoint: a training checkpoint folder to continue exactly, or None.
        progress: show a progress bar.
        options: every option as given (``dataclasses.asdict`` of the config): recorded in
            each checkpoint, and in the output without its local paths.
    """

    model: ModelPlan
    data: DataPlan
    outputs: OutputPlan
    steps: int
    grad_accum: int
    lr: float
    schedule: str
    warmup_steps: int
    mixed_precision: str | None
    eval_every: int
    save_every: int
    resume_checkpoint: str | None
    progress: bool
    options: dict[str, Any]


@dataclass
class TrainResult:
    """What a training run produced and measured.

    Attributes:
        output: where the gain file or adapter was written.
        method: the method trained.
        trainable_parameters: number of trained values.
        steps: optimizer steps done.
        final_loss: training loss of the last step.
        seconds: wall time of the loop; seconds_per_step: its average per step.
        tokens: tokens trained on (predicted positions).
        eval: one row per evaluation: ``step`` and ``eval_ppl/<name>`` per validation file.
        parameter_bytes: bytes of model parameters this process held while training (with
            ``fsdp``, its shard of the base plus the whole trainable numbers).
        resumed_from: the step a checkpoint resumed at (0: from the start).
    """

    output: str
    method: str
    trainable_parameters: int
    steps: int
    final_loss: float
    seconds: float
    seconds_per_step: float
    tokens: int
    eval: list[dict] = field(default_factory=list)
    parameter_bytes: int = 0
    resumed_from: int = 0
