"""Ready configurations of the forgetting experiment, and building a config from flags."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gainsurgery_lab import probes, yesno
from gainsurgery_lab.forgetting.data import ForgettingError, parse_domain  # noqa: F401 (ForgettingError: the CLI's)
from gainsurgery_lab.forgetting.methods import METHODS, lr_label
from gainsurgery_lab.forgetting.config import ExperimentConfig
from gainsurgery_lab.forgetting.selection import TIE_RULE

DEFAULT_BASE = "embedded:gemma-3-270m"

#: The CPU runs of issue 21 (2 cores, Gemma 3 270M, 30 steps x 4 x 128 tokens per stage): every lr of a
#: front with 2 seeds (the lr chosen on their mean dev score, selection.py's tie rule), a third seed at
#: the chosen lr, the knowledge probes for the base and every seed at the chosen (and best) lrs.
_CPU_RUN = dict(eval_domains=["science", "literature"], seeds=3, select_seeds=2, steps=30, batch_size=4,
                seq_len=128, test_windows=32, dev_windows=16, yesno=0, probes=True, variants=[],
                max_extensions=2, phases=["fronts", "seeds", "probes", "extras"],
                grids={"gain-ffn": [-6, -5, -4, -3], "lora": [-8, -7, -6, -5], "lora-matched": [-7, -6, -5, -4]})

PRESETS: dict[str, dict[str, Any]] = {
    # order 1: the three main methods (GAIN-FFN, LoRA r8, parameter-matched LoRA r1) as fronts
    "cpu-order1": dict(_CPU_RUN, domains=["legal", "code", "medical"], front_methods=["gain-ffn", "lora", "lora-matched"],
                       seed_methods=["gain-ffn", "lora", "lora-matched"], extra_methods=[]),
    # order 2: another order of the same domains; parameter-matched LoRA only after the rest (an extra)
    "cpu-order2": dict(_CPU_RUN, domains=["code", "medical", "legal"], front_methods=["gain-ffn", "lora"],
                       seed_methods=["gain-ffn", "lora"], extra_methods=["lora-matched"]),
    # five stages: order 1's domains, then the PARI/GP manuals and the KJV
    "cpu-long": dict(_CPU_RUN, domains=["legal", "code", "medical", "math", "religion"],
                     front_methods=["gain-ffn", "lora"], seed_methods=["gain-ffn", "lora"],
                     extra_methods=["lora-matched"]),
    # 2 CPU cores, Gemma 3 270M: ~3.5 min per stage; fronts of the three main methods, 3 seeds at the
    # chosen lrs and yes/no come first (~4 h); extras after that, if time allows. (The 2026-12 run:
    # one seed per lr, CoQA yes/no; superseded by the cpu-order* presets.)
    "cpu": dict(domains=["legal", "code", "medical"], eval_domains=["science", "literature"],
                front_methods=["gain-ffn", "lora", "lora-matched"],
                seed_methods=["gain-ffn", "lora", "lora-matched"],
                extra_methods=["gain", "ia3", "full", "gain-ffn-out"],
                variants=["gain-ffn:continue", "gain-ffn:swap", "lora:continue"],
                # LoRA r8's grid is centred on its CPU optimum (1e-3): 1e-2 diverges at 30 steps x 4 x 128
                grids={"lora": [-8, -7, -6, -5]},
                seeds=3, steps=30, batch_size=4, seq_len=128, test_windows=32, dev_windows=16, yesno=400),
    # one GPU (run as parallel workers, see docs/results/forgetting.md): five sequential adaptations with
    # 512-token windows and 100-step stages; fronts of the three main methods over five lrs, yes/no
    "paper": dict(domains=["medical", "legal", "code", "math", "finance"],
                  eval_domains=["science", "religion", "literature"],
                  front_methods=["gain-ffn", "lora", "lora-matched"], seed_methods=["gain-ffn", "lora", "lora-matched"],
                  extra_methods=["gain", "ia3"], variants=[],
                  grids={"gain-ffn": [-6, -5, -4, -3, -2], "lora": [-8, -7, -6, -5, -4],
                         "lora-matched": [-7, -6, -5, -4, -3], "gain": [-6, -5, -4, -3], "ia3": [-6, -5, -4, -3]},
                  max_extensions=1, seeds=1, steps=100, batch_size=8, grad_accum=2, seq_len=512, test_windows=48,
                  dev_windows=24,
                  yesno=1000, phases=["fronts", "yesno"]),
    # a 15-minute GPU lease (scripts/gpu_session.sh, ~5 min of it for the front, 6 workers): four sequential
    # adaptations with 512-token windows and 50-step stages; fronts of the three main methods over four lrs
    "gpu": dict(domains=["medical", "legal", "code", "math"], eval_domains=["science", "religion", "literature"],
                front_methods=["gain-ffn", "lora", "lora-matched"], seed_methods=["gain-ffn", "lora", "lora-matched"],
                extra_methods=["gain", "ia3"], variants=[],
                grids={"gain-ffn": [-6, -5, -4, -3], "lora": [-8, -7, -6, -5], "lora-matched": [-7, -6, -5, -4],
                       "gain": [-5, -4, -3], "ia3": [-5, -4, -3]},
                max_extensions=1, seeds=1, steps=50, batch_size=8, grad_accum=1, seq_len=512, test_windows=48,
                dev_windows=24, yesno=600, phases=["fronts", "yesno"]),
    # minutes: a smoke run of the whole pipeline
    "smoke": dict(domains=["legal", "code"], eval_domains=["science"], front_methods=["gain-ffn", "lora"],
                  seed_methods=["gain-ffn"], extra_methods=[], variants=[], grids={"gain-ffn": [-4, -3],
                                                                                      "lora": [-6, -5]},
                  seeds=2, steps=3, batch_size=2, seq_len=64, test_windows=8, dev_windows=4, yesno=8),
}


def parse_grids(items: tuple[str, ...] | list[str]) -> dict[str, list[int]]:
    """``("lora=-7,-6,-5,-4",)`` -> ``{"lora": [-7, -6, -5, -4]}``."""
    grids: dict[str, list[int]] = {}
    for item in items:
        method, sep, values = item.partition("=")
        try:
            exps = [int(v) for v in values.split(",") if v.strip()]
        except ValueError:
            exps = []
        if not sep or method not in METHODS or not exps:
            raise ForgettingError(f"--grid {item!r}: expected METHOD=E1,E2,... with integer exponents "
                                  f"(lr = 10^(E/2)); methods: {', '.join(METHODS)}")
        grids[method] = exps
    return grids


def parse_worker(value: str | None) -> tuple[int, int] | None:
    """``"2/6"`` -> ``(2, 6)``."""
    if value is None:
        return None
    i, sep, n = value.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise ForgettingError(f"--worker {value!r}: expected I/N with 0 <= I < N")
    return int(i), int(n)


def make_config(*, out: str, preset: str | None = None, base: str | None = None, domains: list[str] = (),
                eval_domains: list[str] = (), data_dir: Path | None = None, text_field: str = "text",
                **overrides: Any) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from a preset and flags (flags win; None means "not given")."""
    p = dict(PRESETS.get(preset, {}) if preset else {})
    given = {k: v for k, v in overrides.items() if v is not None}
    seq_names = list(domains) or p.pop("domains", None)
    if not seq_names:
        raise ForgettingError("give the training domains in order (--domain NAME[=FILES] ...) or a --preset")
    extra_names = list(eval_domains) or p.pop("eval_domains", [])
    p.pop("domains", None)
    p.pop("eval_domains", None)
    settings = {**p, **given}
    # --grid overrides one method's grid; the preset's grids for the other methods stay
    settings["grids"] = {**p.get("grids", {}), **given.get("grids", {})}
    if "yesno" not in settings:
        settings["yesno"] = 0
    if settings.get("yesno"):
        settings["yesno_file"] = str(yesno.default_yesno_out() / yesno.YESNO_FILE)
    if settings.pop("probes", False) and not settings.get("probe_file"):
        settings["probe_file"] = str(probes.default_out() / probes.ITEMS_FILE)
    cfg = ExperimentConfig(base=DEFAULT_BASE if base is None else base, out=out,
                           sequence=[parse_domain(d, data_dir, text_field) for d in seq_names],
                           extra_eval=[parse_domain(d, data_dir, text_field) for d in extra_names], **settings)
    cfg.validate()
    return cfg


def describe_plan(cfg: ExperimentConfig) -> str:
    """A human summary of what :meth:`Experiment.execute` will run (before grid extensions)."""
    k = len(cfg.sequence)
    lines = [f"sequence: {' -> '.join(d.name for d in cfg.sequence)}; also scored: "
             f"{', '.join(d.name for d in cfg.extra_eval) or 'none'}",
             f"per stage: {cfg.steps} steps x {cfg.batch_size} windows x {cfg.seq_len} tokens; "
             f"{cfg.test_windows} test + {cfg.dev_windows} dev windows per domain"]
    runs = 0
    for m in cfg.front_methods:
        grid = cfg.grid(m)
        runs += len(grid)
        lines.append(f"front {m}: lrs {', '.join(lr_label(e) for e in grid)} (extended while the best lr is the "
                     f"largest or the chosen lr the smallest, up to {cfg.max_extensions} more)")
    runs *= cfg.select_seeds
    if cfg.select_seeds > 1:
        lines.append(f"every lr with {cfg.select_seeds} seeds; the lr is chosen on their mean dev score: "
                     f"{TIE_RULE}")
    if "seeds" in cfg.phases:
        runs += (cfg.seeds - cfg.select_seeds) * len(cfg.seed_methods)
        lines.append(f"seeds: {cfg.seeds} at the chosen lr of {', '.join(cfg.seed_methods)}")
    if "probes" in cfg.phases and cfg.probe_file:
        lines.append(f"knowledge probes ({cfg.probe_file}): the base (dev and test items), then every seed at "
                     "the chosen and best lrs (test items)")
    if "yesno" in cfg.phases and cfg.yesno:
        lines.append(f"yes/no: {cfg.yesno} items for the base and those runs")
    if "extras" in cfg.phases:
        for m in cfg.extra_methods:
            runs += len(cfg.grid(m)) * cfg.select_seeds
            lines.append(f"extra front {m}: lrs {', '.join(lr_label(e) for e in cfg.grid(m))}")
        runs += len(cfg.variants)
        if cfg.variants:
            lines.append(f"variants at the chosen lr: {', '.join(cfg.variants)}")
    lines.append(f"at least {runs} sequences = {runs * k} stages")
    return "\n".join(lines)
