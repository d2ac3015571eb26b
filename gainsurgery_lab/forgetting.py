"""Sequential-adaptation (catastrophic forgetting) experiment.

One model is adapted to K domains in sequence, once per method, and after every
stage the merged model is scored on the same fixed validation windows of every
evaluation domain. Each method gets a stage × domain perplexity matrix plus the
base row, from which the forgetting metrics are computed (see
``docs/results/forgetting.md`` for their definitions).

Staging (the way each method is used in practice):

- ``gain`` / ``gain-ffn``: fresh gains (init 1) are trained by hooks on the
  previous stage's merged folder; the merged folder of stage k is the *base*
  with ``stack(g1..gk)`` streamed in by :func:`gainsurgery.merge.apply`
  (the product is taken in float32 and rounded to the checkpoint dtype once).
  Gain keys are checkpoint tensor names, identical in every merged folder,
  because apply mirrors the layout.
- ``lora`` / ``ia3``: a fresh PEFT adapter is trained on the previous stage's
  merged folder, then merged into the weights (``merge_and_unload``, in
  float32, saved in the checkpoint dtype) and saved as the stage's folder with
  the tokenizer files copied over.

Resumable: a finished (method, stage) is recorded in ``<out>/<method>/progress.json``
together with its artifact (gain file or adapter folder) and skipped on rerun;
only the latest merged folder of each method is kept.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from gainsurgery.architectures.registry import METHODS as GAIN_METHODS
from gainsurgery.errors import GainSurgeryError
from gainsurgery.training.config import DEFAULT_LR as DEFAULT_LRS

METHODS = ("gain-ffn", "gain", "lora", "ia3", "full")
TRAINABLE_METHODS = ("gain-ffn", "gain", "lora", "ia3")
SWEEP_LRS = {"gain": [2e-3, 5e-3, 1e-2], "gain-ffn": [2e-3, 5e-3, 1e-2], "ia3": [2e-3, 5e-3, 1e-2],
             "lora": [2e-4, 5e-4, 1e-3]}

#: Measured on this project's 2-core CPU, Gemma 3 270M in float32 (docs/training.md).
CPU_SECONDS_PER_STEP_PER_WINDOW = 5.4 / (4 * 128)   # training: 5.4 s per 4 × 128 tokens
CPU_SECONDS_PER_EVAL_WINDOW = 0.8 / 4 / 128          # evaluation: 0.8 s per 4 windows of 128 tokens
CPU_SECONDS_OVERHEAD_PER_STAGE = 30.0                # load model + tokenizer twice, pack data, merge + save
CPU_SECONDS_PER_YESNO_ITEM = 1.5                     # passages of a few hundred tokens + load

PRESETS: dict[str, dict[str, Any]] = {
    # ~60-75 min on 2 CPU cores for gain-ffn, gain, lora, ia3 (see estimate_seconds)
    "cpu-small": dict(domains=["legal", "code", "medical"], eval_domains="all", steps=30, seq_len=128,
                      batch_size=4, eval_windows=12, sweep_steps=8, yesno=40),
    # one GPU: the paper's shape (8 domains, longer windows, more steps)
    "paper": dict(domains="all", eval_domains="all", steps=500, seq_len=512, batch_size=16, eval_windows=64,
                  sweep_steps=150, yesno=500, dtype="float32"),
}


class ForgettingError(GainSurgeryError):
    """The experiment was asked for something that cannot work."""


@dataclass
class Domain:
    name: str
    train: str
    validation: str


@dataclass
class ForgettingConfig:
    base: str
    domains: list[Domain]                      # training sequence, in order
    out: str
    methods: list[str] = field(default_factory=lambda: list(TRAINABLE_METHODS))
    eval_domains: list[Domain] | None = None   # scored after every stage (default: the training domains)
    steps: int = 20
    seq_len: int = 128
    batch_size: int = 4
    eval_windows: int = 12
    lrs: dict[str, float] = field(default_factory=dict)  # explicit per-method lr (beats the sweep)
    sweep: bool = False
    sweep_steps: int = 8
    sweep_lrs: dict[str, list[float]] = field(default_factory=lambda: {k: list(v) for k, v in SWEEP_LRS.items()})
    yesno: int = 0
    yesno_file: str | None = None
    dtype: str = "float32"
    seed: int = 0
    lora_rank: int = 8
    progress: bool = False

    def evaluation_domains(self) -> list[Domain]:
        """Training domains first (in sequence order), then any extra evaluation domains."""
        names = [d.name for d in self.domains]
        extra = [d for d in (self.eval_domains or []) if d.name not in names]
        return list(self.domains) + extra

    def validate(self) -> None:
        if not self.domains:
            raise ForgettingError("give at least one domain")
        names = [d.name for d in self.domains]
        if len(set(names)) != len(names):
            raise ForgettingError(f"a domain appears twice in the sequence: {names}")
        for m in self.methods:
            if m not in METHODS:
                raise ForgettingError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
        if self.steps < 1 or self.batch_size < 1 or self.eval_windows < 1:
            raise ForgettingError("--steps, --batch-size and --eval-windows must be at least 1")
        if self.yesno and not self.yesno_file:
            raise ForgettingError("--yesno needs a yes/no items file")


# ----------------------------------------------------------------------------------------- metrics


def pct(x: float, ref: float) -> float:
    """Relative change in percent: 100·(x/ref − 1)."""
    return 100.0 * (x / ref - 1.0)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def compute_metrics(base_row: list[float], rows: list[list[float]], columns: list[str],
                    sequence: list[str]) -> dict[str, Any]:
    """Forgetting metrics from a PPL matrix.

    Args:
        base_row: base-model PPL per column.
        rows: ``rows[k][j]``: PPL on column ``j`` after stage ``k`` (trained on ``sequence[k]``).
            May be shorter than ``sequence`` (an unfinished run).
        columns: evaluation domain per column (contains every domain of ``sequence``).
        sequence: the training domains in order.

    Returns per stage: ``in_domain_vs_base`` (stage k's domain), ``earlier_vs_base``
    and ``earlier_vs_own_stage`` (means over domains trained before k; None at k=0),
    ``untrained_vs_base`` (mean over domains not trained up to stage k); and the
    final change on every column.
    """
    col = {name: j for j, name in enumerate(columns)}
    stages = []
    for k, row in enumerate(rows):
        d = col[sequence[k]]
        earlier = [col[n] for n in sequence[:k]]
        trained = set(col[n] for n in sequence[: k + 1])
        untrained = [j for j in range(len(columns)) if j not in trained]
        stages.append({
            "stage": k + 1,
            "domain": sequence[k],
            "in_domain_vs_base": pct(row[d], base_row[d]),
            "earlier_vs_base": _mean([pct(row[j], base_row[j]) for j in earlier]),
            "earlier_vs_own_stage": _mean([pct(row[col[n]], rows[i][col[n]]) for i, n in enumerate(sequence[:k])]),
            "untrained_vs_base": _mean([pct(row[j], base_row[j]) for j in untrained]),
            "all_vs_base": _mean([pct(row[j], base_row[j]) for j in range(len(columns))]),
        })
    final: dict[str, Any] = {}
    if rows:
        last = rows[-1]
        done = sequence[: len(rows)]
        final = {
            "vs_base": {c: pct(last[j], base_row[j]) for j, c in enumerate(columns)},
            "vs_own_stage": {n: pct(last[col[n]], rows[i][col[n]]) for i, n in enumerate(done)},
            "mean_trained_vs_base": _mean([pct(last[col[n]], base_row[col[n]]) for n in done]),
            "mean_untrained_vs_base": _mean([pct(last[j], base_row[j]) for j, c in enumerate(columns)
                                             if c not in done]),
            "mean_in_domain_vs_base": _mean([s["in_domain_vs_base"] for s in stages]),
        }
    return {"stages": stages, "final": final}


# ----------------------------------------------------------------------------------------- estimate


def estimate_seconds(cfg: ForgettingConfig) -> dict[str, float]:
    """Wall-time estimate on the 2-core CPU this project measured (Gemma 3 270M, float32)."""
    methods = [m for m in cfg.methods if m in TRAINABLE_METHODS]
    k = len(cfg.domains)
    d = len(cfg.evaluation_domains())
    tok = cfg.seq_len / 128
    step = CPU_SECONDS_PER_STEP_PER_WINDOW * cfg.batch_size * cfg.seq_len
    ev_domain = CPU_SECONDS_PER_EVAL_WINDOW * cfg.eval_windows * cfg.seq_len
    stage = cfg.steps * step + d * ev_domain + 2 * ev_domain + CPU_SECONDS_OVERHEAD_PER_STAGE
    out = {
        "base_row": d * ev_domain,
        "sequence": len(methods) * k * stage,
        "sweep": (sum(len(cfg.sweep_lrs.get(m, [])) for m in methods if m not in cfg.lrs)
                  * (cfg.sweep_steps * step + 2 * ev_domain + CPU_SECONDS_OVERHEAD_PER_STAGE * 0.6)
                  if cfg.sweep else 0.0),
        "yesno": (1 + len(methods)) * cfg.yesno * CPU_SECONDS_PER_YESNO_ITEM * max(1.0, tok) if cfg.yesno else 0.0,
    }
    out["total"] = sum(out.values())
    return out


# ----------------------------------------------------------------------------------------- helpers


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def _copy_non_weight_files(src: Path, dst: Path) -> None:
    """Tokenizer (and other non-weight) files of ``src`` that ``dst`` lacks."""
    for p in src.iterdir():
        if not p.is_file() or p.suffix == ".safetensors" or p.name in _WEIGHT_FILES:
            continue
        if p.name in ("gainsurgery.json", "gainsurgery-embedded.json", "README.md") or (dst / p.name).exists():
            continue
        shutil.copyfile(p, dst / p.name)


def _checkpoint_dtype(folder: Path) -> str:
    cfg = _read_json(folder / "config.json") or {}
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


class _Log:
    def __init__(self, out: Path, echo: Callable[[str], None] | None) -> None:
        self.path = out / "log.txt"
        self.echo = echo

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        if self.echo:
            self.echo(line)


# ----------------------------------------------------------------------------------------- experiment


class Experiment:
    """Runs (and resumes) the experiment described by a :class:`ForgettingConfig`."""

    def __init__(self, cfg: ForgettingConfig, echo: Callable[[str], None] | None = print) -> None:
        from gainsurgery.sources import resolve_base

        cfg.validate()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = _Log(self.out, echo)
        self.base_folder = resolve_base(cfg.base)
        self.columns = cfg.evaluation_domains()
        self.sequence = [d.name for d in cfg.domains]
        self.trained_now = 0          # training runs done by this process (sweep + stages)
        self._windows = None
        self._tokenizer = None

    # -- data -------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from gainsurgery.training.modeling import load_tokenizer

            self._tokenizer = load_tokenizer(self.base_folder)
        return self._tokenizer

    def windows(self) -> dict:
        """Fixed validation windows per evaluation domain (first N windows, BOS first)."""
        if self._windows is None:
            from gainsurgery.training.data import pack, read_documents

            self._windows = {d.name: pack(self.tokenizer, read_documents(d.validation), self.cfg.seq_len,
                                          self.cfg.eval_windows) for d in self.columns}
        return self._windows

    def eval_row(self, folder: Path) -> list[float]:
        """PPL of the checkpoint in ``folder`` on every evaluation domain (column order)."""
        from gainsurgery.training.evaluation import perplexity
        from gainsurgery.training.modeling import load_causal_lm

        model = load_causal_lm(folder, self.cfg.dtype)
        wins = self.windows()
        row = [perplexity(model, wins[d.name])["ppl"] for d in self.columns]
        del model
        return row

    def yesno(self, folder: Path) -> dict:
        from gainsurgery.training.evaluation import read_yesno, yesno_accuracy
        from gainsurgery.training.modeling import load_causal_lm

        items = read_yesno(self.cfg.yesno_file, self.cfg.yesno)
        model = load_causal_lm(folder, self.cfg.dtype)
        return yesno_accuracy(model, self.tokenizer, items)

    # -- settings that make a finished stage reusable ---------------------------------------------
    def _signature(self, method: str, lr: float) -> dict:
        c = self.cfg
        return {"base": str(c.base), "method": method, "lr": lr, "steps": c.steps, "seq_len": c.seq_len,
                "batch_size": c.batch_size, "eval_windows": c.eval_windows, "dtype": c.dtype, "seed": c.seed,
                "lora_rank": c.lora_rank, "columns": [d.name for d in self.columns]}

    # -- base row ---------------------------------------------------------------------------------
    def base_row(self) -> list[float]:
        path = self.out / "base.json"
        sig = {"base": str(self.cfg.base), "seq_len": self.cfg.seq_len, "eval_windows": self.cfg.eval_windows,
               "dtype": self.cfg.dtype, "columns": [d.name for d in self.columns]}
        saved = _read_json(path)
        if saved and saved.get("signature") == sig:
            return saved["ppl"]
        self.log("evaluating the base model on every domain")
        row = self.eval_row(self.base_folder)
        _write_json(path, {"signature": sig, "ppl": row})
        return row

    def base_yesno(self) -> dict | None:
        if not self.cfg.yesno:
            return None
        path = self.out / "base_yesno.json"
        saved = _read_json(path)
        if saved and saved.get("items") == self.cfg.yesno:
            return saved
        self.log(f"yes/no accuracy of the base on {self.cfg.yesno} items")
        acc = self.yesno(self.base_folder)
        _write_json(path, acc)
        return acc

    # -- training ---------------------------------------------------------------------------------
    def _train(self, method: str, base: Path, domain: Domain, output: Path, lr: float, steps: int,
               eval_validation: bool) -> Any:
        from gainsurgery.training import TrainConfig, train

        self.trained_now += 1
        c = self.cfg
        tc = TrainConfig(base=str(base), data=[domain.train], output=str(output), method=method, steps=steps,
                         lr=lr, batch_size=c.batch_size, seq_len=c.seq_len, dtype=c.dtype, seed=c.seed,
                         eval_data=[domain.validation] if eval_validation else [], eval_windows=c.eval_windows,
                         lora_rank=c.lora_rank, lora_alpha=2 * c.lora_rank, progress=c.progress)
        return train(tc)

    @staticmethod
    def _first_eval(result: Any) -> float | None:
        if not result.eval:
            return None
        return next(v for k, v in result.eval[0].items() if k != "step")

    @staticmethod
    def _last_eval(result: Any) -> float | None:
        if not result.eval:
            return None
        return next(v for k, v in result.eval[-1].items() if k != "step")

    # -- lr sweep ---------------------------------------------------------------------------------
    def learning_rate(self, method: str) -> tuple[float, str]:
        """The lr for ``method`` and where it came from (flag, sweep, default)."""
        if method in self.cfg.lrs:
            return self.cfg.lrs[method], "flag"
        if self.cfg.sweep:
            return self.sweep(method)["picked"], "sweep"
        return DEFAULT_LRS[method], "default"

    def sweep(self, method: str) -> dict:
        """Train ``sweep_steps`` on the first domain per candidate lr; pick by its validation PPL."""
        path = self.out / "sweep.json"
        table = _read_json(path) or {}
        first = self.cfg.domains[0]
        sig = {"domain": first.name, "steps": self.cfg.sweep_steps, "seq_len": self.cfg.seq_len,
               "batch_size": self.cfg.batch_size, "eval_windows": self.cfg.eval_windows, "seed": self.cfg.seed}
        entry = table.get(method)
        if not entry or entry.get("signature") != sig:
            entry = {"signature": sig, "runs": {}}
        work = self.out / "sweep" / method
        work.mkdir(parents=True, exist_ok=True)
        for lr in self.cfg.sweep_lrs[method]:
            key = repr(float(lr))
            if key in entry["runs"]:
                continue
            self.log(f"sweep {method} lr={lr:g}: {self.cfg.sweep_steps} steps on {first.name}")
            output = work / (f"lr{lr:g}.safetensors" if method in GAIN_METHODS else f"lr{lr:g}")
            res = self._train(method, self.base_folder, first, output, lr, self.cfg.sweep_steps, True)
            ppl = self._last_eval(res)
            entry["runs"][key] = {"lr": float(lr), "ppl": ppl, "final_loss": res.final_loss,
                                  "seconds_per_step": res.seconds_per_step}
            table[method] = entry
            _write_json(path, table)
            if output.is_dir():
                shutil.rmtree(output)
            elif output.exists():
                output.unlink()
        runs = [entry["runs"][repr(float(lr))] for lr in self.cfg.sweep_lrs[method]]
        ok = [r for r in runs if r["ppl"] is not None and math.isfinite(r["ppl"])]
        if not ok:
            raise ForgettingError(f"sweep for {method}: no learning rate gave a finite PPL")
        entry["picked"] = min(ok, key=lambda r: r["ppl"])["lr"]
        table[method] = entry
        _write_json(path, table)
        return entry

    # -- merging ----------------------------------------------------------------------------------
    def _merge_gains(self, gain_files: list[Path], dst: Path) -> None:
        """Base + stack(g1..gk), streamed (rounded once to the checkpoint dtype)."""
        from gainsurgery.merge import apply

        apply(str(self.cfg.base), gain_files, dst, overwrite=True)

    def _merge_adapter(self, prev: Path, adapter: Path, dst: Path) -> None:
        """prev + adapter, merged in float32 and saved in prev's dtype, tokenizer copied."""
        import torch
        from peft import PeftModel

        from gainsurgery.training.modeling import load_causal_lm

        model = PeftModel.from_pretrained(load_causal_lm(prev, "float32"), adapter)
        merged = model.merge_and_unload()
        merged = merged.to(getattr(torch, _checkpoint_dtype(prev)))
        tmp = dst.with_name(dst.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        merged.save_pretrained(tmp)
        _copy_non_weight_files(prev, tmp)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)

    def _rebuild_merged(self, method: str, stages: list[dict], dst: Path) -> None:
        """Recreate the latest merged folder from the saved artifacts (it was deleted)."""
        mdir = self.out / method
        self.log(f"{method}: rebuilding merged folder of stage {len(stages)} from saved artifacts")
        if method in GAIN_METHODS:
            self._merge_gains([mdir / s["artifact"] for s in stages], dst)
            return
        prev = self.base_folder
        for i, s in enumerate(stages):
            step_dst = dst if i == len(stages) - 1 else mdir / f".rebuild-{i + 1}"
            self._merge_adapter(prev, mdir / s["artifact"], step_dst)
            if prev != self.base_folder:
                shutil.rmtree(prev, ignore_errors=True)
            prev = step_dst

    # -- one method -------------------------------------------------------------------------------
    def run_method(self, method: str) -> dict:
        if method == "full":
            self.log("full fine-tuning: not implemented in this experiment (skipped)")
            return {"method": "full", "status": "not implemented"}
        lr, lr_source = self.learning_rate(method)
        mdir = self.out / method
        mdir.mkdir(parents=True, exist_ok=True)
        ppath = mdir / "progress.json"
        sig = self._signature(method, lr)
        progress = _read_json(ppath)
        if progress and progress.get("signature") != sig:
            raise ForgettingError(f"{mdir} holds a run with other settings ({progress.get('signature')}); "
                                  "use another --out or delete it")
        if not progress:
            progress = {"signature": sig, "lr_source": lr_source, "stages": []}
        stages: list[dict] = progress["stages"]
        # the recorded prefix must be this sequence's prefix
        for i, s in enumerate(stages):
            if i >= len(self.sequence) or s["domain"] != self.sequence[i]:
                raise ForgettingError(f"{mdir}: finished stages {[s['domain'] for s in stages]} do not start "
                                      f"the sequence {self.sequence}; use another --out")
        for k, domain in enumerate(self.cfg.domains):
            if k < len(stages):
                self.log(f"{method} stage {k + 1} ({domain.name}): done, skipped")
                continue
            prev = self.base_folder if k == 0 else mdir / f"merged-{k}"
            if k > 0 and not (prev / "config.json").is_file():
                self._rebuild_merged(method, stages, prev)
            name = f"stage{k + 1}-{domain.name}"
            artifact = mdir / (name + ".safetensors" if method in GAIN_METHODS else name)
            self.log(f"{method} stage {k + 1}/{len(self.sequence)}: train on {domain.name} "
                     f"({self.cfg.steps} steps, lr {lr:g}) from {'base' if k == 0 else prev.name}")
            t0 = time.perf_counter()
            res = self._train(method, prev, domain, artifact, lr, self.cfg.steps, True)
            dst = mdir / f"merged-{k + 1}"
            t1 = time.perf_counter()
            if method in GAIN_METHODS:
                self._merge_gains([mdir / s["artifact"] for s in stages] + [artifact], dst)
            else:
                self._merge_adapter(prev, artifact, dst)
            t2 = time.perf_counter()
            row = self.eval_row(dst)
            t3 = time.perf_counter()
            record = {
                "stage": k + 1, "domain": domain.name, "artifact": artifact.name, "ppl": row,
                "trainable_parameters": res.trainable_parameters, "steps": res.steps,
                "final_loss": res.final_loss, "seconds_per_step": res.seconds_per_step,
                "train_seconds": res.seconds, "merge_seconds": t2 - t1, "eval_seconds": t3 - t2,
                "stage_seconds": t3 - t0,
                # in-domain PPL of the unmerged adapter (float32 hooks / PEFT): the merge's rounding shows as the gap
                "in_domain_ppl_unmerged": self._last_eval(res),
                "in_domain_ppl_before": self._first_eval(res),
            }
            stages.append(record)
            _write_json(ppath, progress)
            if k > 0:
                shutil.rmtree(prev, ignore_errors=True)
            self.log(f"{method} stage {k + 1} ({domain.name}) done in {t3 - t0:.0f}s: "
                     + ", ".join(f"{c.name} {p:.3f}" for c, p in zip(self.columns, row)))
        if self.cfg.yesno and progress.get("yesno", {}).get("items") != self.cfg.yesno:
            last = mdir / f"merged-{len(stages)}"
            if not (last / "config.json").is_file():
                self._rebuild_merged(method, stages, last)
            self.log(f"{method}: yes/no accuracy after the sequence on {self.cfg.yesno} items")
            progress["yesno"] = self.yesno(last)
            _write_json(ppath, progress)
        return progress

    # -- everything -------------------------------------------------------------------------------
    def run(self) -> dict:
        est = estimate_seconds(self.cfg)
        self.log(f"plan: methods {', '.join(self.cfg.methods)}; sequence {' -> '.join(self.sequence)}; "
                 f"eval on {len(self.columns)} domains; {self.cfg.steps} steps × {self.cfg.batch_size} × "
                 f"{self.cfg.seq_len} tokens; estimate on a 2-core CPU (Gemma 3 270M): "
                 f"{est['total'] / 60:.0f} min (sweep {est['sweep'] / 60:.0f}, sequence {est['sequence'] / 60:.0f}, "
                 f"yes/no {est['yesno'] / 60:.0f})")
        t0 = time.perf_counter()
        base_row = self.base_row()
        base_yn = self.base_yesno()
        per_method = {m: self.run_method(m) for m in self.cfg.methods}
        results = self.collect(base_row, base_yn, per_method)
        results["estimate_seconds"] = est
        results["wall_seconds_this_run"] = time.perf_counter() - t0
        results["trained_this_run"] = self.trained_now
        _write_json(self.out / "results.json", results)
        (self.out / "results.md").write_text(render_markdown(results), encoding="utf-8")
        results["plots"] = [str(p) for p in make_plots(results, self.out)]
        self.log(f"done: {self.out / 'results.json'}, {self.out / 'results.md'}")
        return results

    def collect(self, base_row: list[float], base_yn: dict | None, per_method: dict) -> dict:
        columns = [d.name for d in self.columns]
        methods = {}
        for m, prog in per_method.items():
            if prog.get("status") == "not implemented":
                methods[m] = {"status": "not implemented"}
                continue
            rows = [s["ppl"] for s in prog["stages"]]
            methods[m] = {
                "lr": prog["signature"]["lr"], "lr_source": prog.get("lr_source"),
                "ppl": rows,
                "change_vs_base": [[pct(p, b) for p, b in zip(r, base_row)] for r in rows],
                "metrics": compute_metrics(base_row, rows, columns, self.sequence),
                "trainable_parameters": prog["stages"][0]["trainable_parameters"] if rows else None,
                "seconds_per_step": _mean([s["seconds_per_step"] for s in prog["stages"]]),
                "stages": prog["stages"],
                "yesno": prog.get("yesno"),
            }
        return {
            "base": str(self.cfg.base), "sequence": self.sequence, "columns": columns,
            "config": {k: v for k, v in asdict(self.cfg).items() if k not in ("domains", "eval_domains", "progress")},
            "base_ppl": base_row, "base_yesno": base_yn,
            "sweep": _read_json(self.out / "sweep.json"),
            "methods": methods,
        }


# ----------------------------------------------------------------------------------------- reports


def _f(x: float | None, fmt: str = "{:+.1f}%") -> str:
    return "—" if x is None else fmt.format(x)


def render_markdown(r: dict) -> str:
    cols, seq = r["columns"], r["sequence"]
    ok = {m: v for m, v in r["methods"].items() if "ppl" in v}
    lines = [f"# Sequential adaptation: {' → '.join(seq)}", "",
             f"Base `{r['base']}`; {r['config']['steps']} steps × {r['config']['batch_size']} windows × "
             f"{r['config']['seq_len']} tokens per stage; validation PPL on the first "
             f"{r['config']['eval_windows']} windows of each domain.", ""]
    lines += ["## Summary (after the last stage)", "",
              "| method | lr | trainable params | s/step | mean in-domain (at own stage) vs base | "
              "earlier domains vs base | earlier vs own stage (BWT) | never-trained vs base |"
              + (" yes/no acc |" if r.get("base_yesno") else ""),
              "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if r.get("base_yesno") else "")]
    for m, v in ok.items():
        st = v["metrics"]["stages"]
        last = st[-1] if st else {}
        yn = ""
        if r.get("base_yesno"):
            acc = (v.get("yesno") or {}).get("accuracy")
            yn = f" {_f(None if acc is None else 100 * acc, '{:.1f}%')} |"
        lines.append(f"| {m} | {v['lr']:g} ({v['lr_source']}) | {v['trainable_parameters']:,} | "
                     f"{_f(v['seconds_per_step'], '{:.2f}')} | "
                     f"{_f(v['metrics']['final'].get('mean_in_domain_vs_base'))} | "
                     f"{_f(last.get('earlier_vs_base'))} | {_f(last.get('earlier_vs_own_stage'))} | "
                     f"{_f(v['metrics']['final'].get('mean_untrained_vs_base'))} |{yn}")
    if r.get("base_yesno"):
        lines += ["", f"Base yes/no accuracy: {100 * r['base_yesno']['accuracy']:.1f}% on "
                      f"{r['base_yesno']['items']} items."]
    lines += ["", "## Per stage", "",
              "| method | stage | domain | in-domain vs base | earlier vs base | earlier vs own stage | "
              "not yet trained vs base |", "|---|---:|---|---:|---:|---:|---:|"]
    for m, v in ok.items():
        for s in v["metrics"]["stages"]:
            lines.append(f"| {m} | {s['stage']} | {s['domain']} | {_f(s['in_domain_vs_base'])} | "
                         f"{_f(s['earlier_vs_base'])} | {_f(s['earlier_vs_own_stage'])} | "
                         f"{_f(s['untrained_vs_base'])} |")
    lines += ["", "## Final change vs base on every domain", "",
              "| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for m, v in ok.items():
        fin = v["metrics"]["final"].get("vs_base", {})
        lines.append(f"| {m} | " + " | ".join(_f(fin.get(c)) for c in cols) + " |")
    lines += ["", "## PPL matrices", ""]
    hdr = "| stage | " + " | ".join(cols) + " |"
    sep = "|---|" + "---:|" * len(cols)
    for m, v in ok.items():
        lines += [f"### {m}", "", hdr, sep, "| base | " + " | ".join(f"{p:.3f}" for p in r["base_ppl"]) + " |"]
        for s, row in zip(v["stages"], v["ppl"]):
            lines.append(f"| {s['stage']}: {s['domain']} | " + " | ".join(f"{p:.3f}" for p in row) + " |")
        lines.append("")
    if r.get("sweep"):
        lines += ["## Learning-rate sweep (first domain)", "", "| method | lr | val PPL | picked |",
                  "|---|---:|---:|:-:|"]
        for m, e in r["sweep"].items():
            for run in e["runs"].values():
                lines.append(f"| {m} | {run['lr']:g} | {_f(run['ppl'], '{:.3f}')} | "
                             f"{'✓' if run['lr'] == e.get('picked') else ''} |")
        lines.append("")
    for m, v in r["methods"].items():
        if v.get("status") == "not implemented":
            lines.append(f"`{m}`: not implemented in this experiment.")
    return "\n".join(lines) + "\n"


def make_plots(r: dict, out: Path, prefix: str = "") -> list[Path]:
    """Per-method heatmap (stage × domain, % vs base) and one line plot of earlier-domain change."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    cols = r["columns"]
    ok = {m: v for m, v in r["methods"].items() if v.get("ppl")}
    if not ok:
        return paths
    lim = max(1.0, max(abs(x) for v in ok.values() for row in v["change_vs_base"] for x in row))
    for m, v in ok.items():
        data = v["change_vs_base"]
        fig, ax = plt.subplots(figsize=(max(5.5, 2.5 + 0.8 * len(cols)), 2.2 + 0.45 * len(data)))
        im = ax.imshow(data, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
        ax.set_yticks(range(len(data)), [f"{s['stage']}: {s['domain']}" for s in v["stages"]])
        for i, row in enumerate(data):
            for j, x in enumerate(row):
                ax.text(j, i, f"{x:+.1f}", ha="center", va="center", fontsize=7,
                        color="white" if abs(x) > 0.6 * lim else "black")
        ax.set_xlabel("evaluated domain")
        ax.set_ylabel("after stage")
        ax.set_title(f"{m}: validation PPL change vs base (%)", fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8)
        fig.tight_layout()
        p = out / f"{prefix}heatmap-{m}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for m, v in ok.items():
        st = [s for s in v["metrics"]["stages"] if s["earlier_vs_base"] is not None]
        xs = [s["stage"] for s in st]
        axes[0].plot(xs, [s["earlier_vs_base"] for s in st], marker="o", label=m)
        axes[1].plot(xs, [s["earlier_vs_own_stage"] for s in st], marker="o", label=m)
    for ax, title in zip(axes, ("vs base model", "vs right after own stage (BWT)")):
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("stage")
        ax.set_ylabel("mean PPL change on earlier domains (%)")
        ax.set_title(title)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend()
    fig.tight_layout()
    p = out / f"{prefix}earlier-domains.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    paths.append(p)
    return paths
