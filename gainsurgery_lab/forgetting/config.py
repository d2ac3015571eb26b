"""The forgetting experiment's settings: what a run depends on, checked before anything runs.

:class:`ExperimentConfig` holds every setting (its :meth:`~ExperimentConfig.signature` is
what makes two folders' results comparable); :class:`RunKey` names one sequence (method,
staging variant, lr, seed).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gainsurgery_lab.forgetting.data import DomainSpec, ForgettingError
from gainsurgery_lab.forgetting.methods import MAX_EXPONENT, METHODS, MIN_EXPONENT, lr_label, lr_of
from gainsurgery.sources.spec import classify_base_spec

FORMAT = "gainsurgery.forgetting/2"


@dataclass
class ExperimentConfig:
    """Everything a run of the experiment depends on (its signature is checked on resume)."""

    base: str
    out: str
    sequence: list[DomainSpec]
    extra_eval: list[DomainSpec] = field(default_factory=list)
    front_methods: list[str] = field(default_factory=lambda: ["gain-ffn", "lora", "lora-matched"])
    seed_methods: list[str] = field(default_factory=lambda: ["gain-ffn", "lora", "lora-matched"])
    extra_methods: list[str] = field(default_factory=lambda: ["gain", "ia3", "full"])
    variants: list[str] = field(default_factory=lambda: ["gain-ffn:continue", "gain-ffn:swap", "lora:continue"])
    grids: dict[str, list[int]] = field(default_factory=dict)  # method -> half-decade exponents (override)
    max_extensions: int = 3
    seeds: int = 3
    #: seeds run at every lr of a front; the lr is chosen on their mean dev score (selection.py)
    select_seeds: int = 1
    steps: int = 30
    batch_size: int = 4
    grad_accum: int = 1  # micro-batches per step (same global batch; bounds activation memory)
    seq_len: int = 128
    test_windows: int = 32
    dev_windows: int = 16
    eval_batch: int = 8
    yesno: int = 400
    yesno_file: str | None = None
    yesno_max_tokens: int = 384
    #: knowledge probe items (gainsurgery_lab.probes); None: no probes
    probe_file: str | None = None
    #: strengths of the α-front (alpha.py): the chosen run of each seed method dialled to s^α, scored
    alphas: list[float] = field(default_factory=list)
    dtype: str = "float32"
    phases: list[str] = field(default_factory=lambda: ["fronts", "seeds", "yesno", "probes", "extras"])
    progress: bool = False
    #: Wall-clock time (``time.time()``) after which no new run starts; None: no limit. Not part of
    #: the signature: a later call without it resumes and finishes the schedule.
    deadline: float | None = None

    def validate(self) -> None:
        if not self.sequence:
            raise ForgettingError("give at least one training domain")
        names = [d.name for d in self.sequence] + [d.name for d in self.extra_eval]
        if len(set(names)) != len(names):
            raise ForgettingError(f"a domain appears twice: {names}")
        for m in self.front_methods + self.seed_methods + self.extra_methods:
            if m not in METHODS:
                raise ForgettingError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        for v in self.variants:
            m, _, var = v.partition(":")
            if m not in METHODS or var not in METHODS[m].variants:
                raise ForgettingError(f"unknown variant {v!r}; e.g. gain-ffn:continue, gain-ffn:swap, lora:continue")
        for m, grid in self.grids.items():
            if m not in METHODS or not grid or not all(type(e) is int for e in grid):
                raise ForgettingError(f"grid for {m!r} must be a non-empty list of integer half-decade exponents")
            if not all(MIN_EXPONENT <= e <= MAX_EXPONENT for e in grid):
                raise ForgettingError(f"grid for {m!r}: exponents must lie in {MIN_EXPONENT}..{MAX_EXPONENT} "
                                      f"(lr = 10^(E/2) from {lr_of(MIN_EXPONENT):.0e} to 1)")
            if len(set(grid)) != len(grid):
                raise ForgettingError(f"grid for {m!r} lists an exponent twice: {grid}")
        if self.grad_accum < 1 or self.batch_size % self.grad_accum:
            raise ForgettingError("--batch-size must be a multiple of the gradient accumulation steps")
        for name, value, hi in (("--steps", self.steps, MAX_STEPS), ("--batch-size", self.batch_size, MAX_BATCH),
                                ("--test-windows", self.test_windows, MAX_WINDOWS),
                                ("--dev-windows", self.dev_windows, MAX_WINDOWS), ("--seeds", self.seeds, MAX_SEEDS),
                                ("--seq-len", self.seq_len, MAX_SEQ_LEN), ("--yesno", self.yesno, MAX_WINDOWS),
                                ("--max-extensions", self.max_extensions, MAX_EXTENSIONS)):
            if type(value) is not int or not (0 if name in ("--yesno", "--max-extensions") else 1) <= value <= hi:
                low = 0 if name in ("--yesno", "--max-extensions") else 1
                raise ForgettingError(f"{name} must be an integer from {low} to {hi:,}, got {value!r}")
        if self.deadline is not None and not (isinstance(self.deadline, (int, float)) and math.isfinite(self.deadline)):
            raise ForgettingError("--stop-after must be a finite number of minutes")
        seen: dict[Path, str] = {}
        for d in self.sequence + self.extra_eval:
            for f in d.files():
                real = f.resolve()
                if real in seen and seen[real] != d.name:
                    raise ForgettingError(f"domains {seen[real]} and {d.name} read the same file {f}: one domain's "
                                          "test windows would be another's training text; give each its own files")
                seen[real] = d.name
        unknown = set(self.phases) - set(PHASES)
        if unknown:
            raise ForgettingError(f"unknown phase(s) {sorted(unknown)}; phases are {', '.join(PHASES)}")
        if not isinstance(self.alphas, list) or not all(
                isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) and 0 < a <= 16
                for a in self.alphas) or len(set(self.alphas)) != len(self.alphas):
            raise ForgettingError("--alphas: give distinct numbers in (0, 16]")
        if type(self.select_seeds) is not int or not 1 <= self.select_seeds <= self.seeds:
            raise ForgettingError(f"--select-seeds must be an integer from 1 to --seeds ({self.seeds}), "
                                  f"got {self.select_seeds!r}")
        if self.seq_len < 16:
            raise ForgettingError("--seq-len must be at least 16")
        if not self.base:
            raise ForgettingError("--base is empty; name a checkpoint folder, embedded:NAME or a Hub repo")
        if (self.test_windows + self.dev_windows) * self.seq_len > MAX_WINDOW_TOKENS:
            raise ForgettingError(f"--test-windows + --dev-windows times --seq-len is more than "
                                  f"{MAX_WINDOW_TOKENS:,} tokens per domain to score; ask for fewer or shorter windows")
        if self.yesno and not self.yesno_file:
            raise ForgettingError("--yesno needs a yes/no items file (python scripts/fetch_domains.py --yesno)")

    def signature(self) -> dict[str, Any]:
        """What makes stored results comparable: changing any of it needs a fresh --out."""
        return {"format": FORMAT, "base": _normal_base(self.base), "sequence": [d.describe() for d in self.sequence],
                "extra_eval": [d.describe() for d in self.extra_eval], "steps": self.steps,
                "batch_size": self.batch_size, "seq_len": self.seq_len, "test_windows": self.test_windows,
                "dev_windows": self.dev_windows, "dtype": self.dtype}

    def grid(self, method: str) -> list[int]:
        return sorted(self.grids.get(method) or METHODS[method].grid)

    def out_of_time(self) -> bool:
        """True once the wall clock has passed :attr:`deadline` (no new run or stage starts then)."""
        return self.deadline is not None and time.time() > self.deadline


PHASES = ("fronts", "seeds", "yesno", "probes", "extras", "alpha")

#: Upper limits of the settings (far above any real run; they keep typos from meaning years).
MAX_STEPS = 10_000_000
MAX_BATCH = 65_536
MAX_WINDOWS = 1_000_000
MAX_SEEDS = 1_000
MAX_SEQ_LEN = 1 << 20
MAX_EXTENSIONS = 20
#: Tokens of test + dev windows per domain (their frozen ids stay within records.MAX_WINDOWS_BYTES).
MAX_WINDOW_TOKENS = 50_000_000


def _normal_base(base: str) -> str:
    """A local base path without a trailing slash or ``./`` (the same folder compares equal)."""

    try:
        local = classify_base_spec(base, error=ForgettingError).kind == "local"
    except ForgettingError:
        local = False
    return os.path.normpath(base) if local else base


@dataclass(frozen=True)
class RunKey:
    """One sequence: method, staging variant, lr (half-decade exponent) and seed."""

    method: str
    variant: str
    e: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}__{self.variant}__lr{self.e}__s{self.seed}"

    @property
    def lr(self) -> float:
        return lr_of(self.e)

    def describe(self) -> dict[str, Any]:
        return {"method": self.method, "variant": self.variant, "lr": self.lr, "lr_exponent": self.e,
                "lr_label": lr_label(self.e), "seed": self.seed}


def _config_record(cfg: ExperimentConfig) -> dict[str, Any]:
    """The settings as stored in ``experiment.json`` (the deadline and progress bars are per call)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("deadline", "progress")}


class Room:
    """One part of an experiment (planning, running, scoring) and the state it shares with the others.

    The :class:`~gainsurgery_lab.forgetting.runner.Experiment` owns the folder, the settings and
    the prepared domains; a room reads them through it, so every part sees the same state.
    """

    def __init__(self, exp: Any) -> None:
        self.exp = exp

    @property
    def cfg(self) -> ExperimentConfig:
        return self.exp.cfg

    @property
    def out(self) -> Path:
        return self.exp.out

    @property
    def sequence(self) -> list[str]:
        return self.exp.sequence

    @property
    def columns(self) -> list[str]:
        return self.exp.columns

    @property
    def base_folder(self) -> Path:
        return self.exp.base_folder

    @property
    def domains(self) -> dict[str, Any]:
        return self.exp.domains

    @property
    def layout(self) -> Any:
        return self.exp.layout

    @property
    def tokenizer(self) -> Any:
        return self.exp.tokenizer

    def log(self, msg: str) -> None:
        self.exp.log(msg)

    def out_of_time(self) -> bool:
        return self.exp.out_of_time()
