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

Default learning rates (documented in docs/training.md): gains are O(1)
multipliers trained with Adam, whose step is about ``lr`` in parameter units,
so lr=5e-3 moves a gain by at most ~0.5% per step — enough to adapt in a few
hundred steps without overshooting 1.0 into sign flips. LoRA's B starts at 0
and its effective step scales with alpha/r, so it takes the customary smaller
lr (5e-4 for short runs); IA3 vectors are gains too (5e-3).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gainsurgery.architectures import Target, model_type_of, num_layers, resolve_targets
from gainsurgery.io.checkpoint import fingerprint, open_checkpoint
from gainsurgery.data import fingerprint_files, pack, read_documents
from gainsurgery.errors import TrainingError
from gainsurgery.gainfile import GainFile
from gainsurgery.architectures.modules import find_module
from gainsurgery.architectures.registry import INPUT_DIM, bias_key
from gainsurgery.sources import resolve_base

METHODS = ("gain", "gain-ffn", "lora", "ia3")
DEFAULT_LR = {"gain": 5e-3, "gain-ffn": 5e-3, "ia3": 5e-3, "lora": 5e-4}
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class TrainConfig:
    """Everything ``gainsurgery train`` needs. Field names mirror the CLI options."""

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
    seed: int = 0
    warmup: float = 0.1
    schedule: str = "cosine"
    eval_data: list[str] = field(default_factory=list)
    eval_every: int = 0
    eval_windows: int = 32
    text_field: str = "text"
    resume: str | None = None
    log: str | None = None
    lora_rank: int = 8
    lora_alpha: int = 16
    progress: bool = True

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    def validate(self) -> None:
        if self.method not in METHODS:
            raise TrainingError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise TrainingError("--steps, --batch-size and --grad-accum must be at least 1")
        if self.schedule not in SCHEDULES:
            raise TrainingError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if not 0 <= self.warmup < 1 and not (self.warmup >= 1 and float(self.warmup).is_integer()):
            raise TrainingError("--warmup is a fraction of the steps in [0, 1) or a whole number of steps")
        if self.resume and self.method not in ("gain", "gain-ffn"):
            raise TrainingError("--resume continues a GAIN gain file; it needs --method gain or gain-ffn")
        if not self.data:
            raise TrainingError("give training text with --data FILE")
        out = Path(self.output)
        if not out.resolve().parent.is_dir():
            raise TrainingError(f"the folder for -o does not exist: {out.resolve().parent}")
        if self.method in ("gain", "gain-ffn") and out.is_dir():
            raise TrainingError(f"-o {out} is a folder; gain methods write a .safetensors file")

    def warmup_steps(self) -> int:
        return int(self.warmup) if self.warmup >= 1 else int(round(self.warmup * self.steps))


class GainAdapter:
    """Trainable gain vectors attached to a model's modules with forward hooks.

    The parameters live in a ``torch.nn.Module`` registered on the model as
    ``gainsurgery_gains`` so optimisers, DDP and ``state_dict`` all see them.
    """

    def __init__(self, model: Any, targets: list[Target], init: GainFile | None = None) -> None:
        import torch
        from torch import nn

        self.weight_targets = [t for t in targets if t.kind != "bias"]
        self.bias_keys = {t.key for t in targets if t.kind == "bias"}
        modules = dict(model.named_modules())
        params = []
        for t in self.weight_targets:
            vec = torch.ones(t.length, dtype=torch.float32)
            if init is not None:
                if t.key not in init.vectors or init.vectors[t.key].size != t.length or init.dims[t.key] != t.dim:
                    raise TrainingError(f"--resume file does not match this model at {t.key!r}")
                vec = torch.from_numpy(init.vectors[t.key].copy())
            params.append(nn.Parameter(vec))
        holder = nn.Module()
        holder.gains = nn.ParameterList(params)
        model.add_module("gainsurgery_gains", holder)
        self.holder = holder
        self.handles = []
        for i, t in enumerate(self.weight_targets):
            name, module = find_module(modules, t.key)
            on_input = t.dim == INPUT_DIM[t.layout]
            self.handles.append(module.register_forward_pre_hook(_input_hook(holder, i)) if on_input
                                else module.register_forward_hook(_output_hook(holder, i)))

    def gain_file(self, metadata: dict[str, Any]) -> GainFile:
        """The current gains as a v1 gain file (output-side biases share their weight's vector)."""
        vectors, dims = {}, {}
        for t, p in zip(self.weight_targets, self.holder.gains):
            vectors[t.key] = p.detach().float().cpu().numpy().astype(np.float32)
            dims[t.key] = t.dim
            bias = bias_key(t.key)
            if bias in self.bias_keys:
                vectors[bias], dims[bias] = vectors[t.key], 0
        return GainFile(vectors, dims, metadata)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _input_hook(holder, i):
    def hook(module, args):
        x = args[0]
        return (x * holder.gains[i].to(x.dtype),) + tuple(args[1:])

    return hook


def _output_hook(holder, i):
    def hook(module, args, output):
        return output * holder.gains[i].to(output.dtype)

    return hook


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


@dataclass
class TrainResult:
    """What a training run produced and measured."""

    output: str
    method: str
    trainable_parameters: int
    steps: int
    final_loss: float
    seconds: float
    seconds_per_step: float
    tokens: int
    eval: list[dict] = field(default_factory=list)


def train(cfg: TrainConfig) -> TrainResult:
    """Train gains (or a PEFT baseline) and save them to ``cfg.output``.

    GAIN methods save a v1 gain file; ``lora``/``ia3`` save a PEFT adapter folder.
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, set_seed
    from torch.utils.data import DataLoader

    from gainsurgery.evaluation import perplexity
    from gainsurgery.modeling import load_causal_lm, load_tokenizer

    cfg.validate()
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum,
                              dataloader_config=DataLoaderConfiguration(split_batches=True))
    if cfg.batch_size % accelerator.num_processes:
        raise TrainingError(f"--batch-size {cfg.batch_size} must be divisible by the "
                            f"{accelerator.num_processes} processes (it is the global batch)")
    set_seed(cfg.seed)
    folder = resolve_base(cfg.base)
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
        p.requires_grad_(False)
    adapter = None
    if cfg.method in ("gain", "gain-ffn"):
        targets, ckpt = resolve_gain_targets(folder, cfg.method, cfg.side)
        init = None
        if cfg.resume:
            from gainsurgery.gainfile import load

            init = load(cfg.resume, allow_negative=True)
        adapter = GainAdapter(model, targets, init)
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

    log_path = Path(cfg.log) if cfg.log else _default_log(cfg.output)
    log = open(log_path, "w", encoding="utf-8") if accelerator.is_main_process else None
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
        training_meta = {k: v for k, v in asdict(cfg).items() if k not in ("progress", "output", "log")}
        training_meta.update(lr=cfg.learning_rate, data_fingerprint=fingerprint_files(cfg.data),
                             final_loss=last_loss, seconds=round(seconds, 1), tokens=result.tokens,
                             processes=accelerator.num_processes, windows=len(windows.ids),
                             bos_first=windows.bos is not None)
        if adapter is not None:
            gain = adapter.gain_file({"method": cfg.method, "side": cfg.side, "base_model": cfg.base,
                                      "base_fingerprint": fingerprint(ckpt), "training": training_meta,
                                      "description": f"GAIN ({cfg.method}) trained on {', '.join(Path(d).name for d in cfg.data)}"})
            gain.save(cfg.output)
        else:
            unwrapped = accelerator.unwrap_model(model)
            unwrapped.save_pretrained(cfg.output)
            (Path(cfg.output) / "gainsurgery_training.json").write_text(json.dumps(training_meta, indent=2))
    accelerator.wait_for_everyone()
    return result


def _peft_model(model: Any, cfg: TrainConfig):
    from peft import IA3Config, LoraConfig, get_peft_model

    if cfg.method == "lora":
        pcfg = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                          task_type="CAUSAL_LM")
    else:
        pcfg = IA3Config(task_type="CAUSAL_LM")  # PEFT's per-architecture default targets (k, v, down)
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
