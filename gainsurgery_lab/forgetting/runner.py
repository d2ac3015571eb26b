"""Running the forgetting experiment: runs, stages, the lr fronts, seeds, yes/no; resumable.

A **run** is one whole sequence (domain 1 → … → domain K) for one method, staging
variant, learning rate and seed. After every stage the merged model is scored on
the fixed test windows of every evaluation domain and on the dev windows of the
stage's own domain; only per-window NLL sums are stored, every statistic is
computed afterwards (:mod:`gainsurgery_lab.forgetting.analysis`).

The schedule, in order of importance (a run that is cut short keeps what matters):

1. **fronts**: every method of ``front_methods`` at every lr of its grid (seed 0); a
   grid whose dev-optimal lr is at an edge is extended by one half-decade on that
   side, until the optimum is interior (or ``max_extensions`` is reached); then a
   front whose smallest lr adapts more than another method's chosen point gets
   smaller lrs, so that every chosen point can be compared at matched in-domain change;
2. **seeds**: ``seeds - 1`` more seeds at each ``seed_methods`` method's dev-optimal lr;
3. **yes/no** for the base and those runs;
4. **extras**: the staging ``variants`` at the dev-optimal lr, the fronts of
   ``extra_methods``, and their yes/no.

Resumable: a finished stage is written atomically to ``runs/<run>/stage-<k>.json``
with its artifact (gain file or adapter folder); rerunning with the same ``--out``
skips it. Only the latest merged model of a run is kept; it is rebuilt from the
artifacts when needed.
"""

from __future__ import annotations

import gc
import json
import math
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from gainsurgery_lab.forgetting import records
from gainsurgery_lab.forgetting.data import DomainSpec, ForgettingError, PreparedDomain, prepare_domain
from gainsurgery_lab.forgetting.records import load_domain, save_domain
from gainsurgery_lab.forgetting.methods import MAX_EXPONENT, METHODS, MIN_EXPONENT, Method, lr_label, lr_of

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
    dtype: str = "float32"
    phases: list[str] = field(default_factory=lambda: ["fronts", "seeds", "yesno", "extras"])
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
        unknown = set(self.phases) - {"fronts", "seeds", "yesno", "extras"}
        if unknown:
            raise ForgettingError(f"unknown phase(s) {sorted(unknown)}; phases are fronts, seeds, yesno, extras")
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
    from gainsurgery.io.inputs import classify_base_spec

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


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, in MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Start a new peak-memory window for this process (Linux >= 4.0: ``clear_refs`` 5).

    Without it the peak only ever grows over a process's life, so a stage run after a
    bigger one would report the bigger one's peak; after this reset ``VmHWM`` (see
    :func:`window_peak_rss_mib`), and ``ru_maxrss`` with it, is the peak since the reset.
    False where unsupported (then only the process's peak so far is known).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def window_peak_rss_mib() -> float | None:
    """``VmHWM`` of this process in MiB: its peak since the last :func:`reset_peak_rss`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class Experiment:
    """Prepares the data, runs the schedule and keeps every result on disk."""

    def __init__(self, cfg: ExperimentConfig, echo: Callable[[str], None] | None = print) -> None:
        """Check the configuration and the folder; nothing is written until :meth:`prepare` (``write``)."""
        from gainsurgery.sources import resolve_base

        cfg.validate()
        if not cfg.progress:  # the log says what runs; per-load bars would drown it
            from huggingface_hub.utils import disable_progress_bars
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            disable_progress_bars()
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.echo = echo
        self.base_folder = resolve_base(cfg.base)
        # The experiment folder is reused (resumable) but never "", ".", the home folder, the
        # base or a data file, nor around or inside one; and only if it is new, empty or ours.
        from gainsurgery.io.checks import check_output

        data = [p for d in (*cfg.sequence, *cfg.extra_eval) for p in d.files()]
        check_output(self.out, inputs=[self.base_folder, *data], kind="folder", overwrite=True, what="--out",
                     error=ForgettingError)
        self.sequence = [d.name for d in cfg.sequence]
        self.columns = self.sequence + [d.name for d in cfg.extra_eval]
        self._saved = self._check_folder()
        self._tokenizer = None
        self._device = None
        self.layout: records.Layout | None = None
        self.domains: dict[str, PreparedDomain] = {}
        self._fresh: list[PreparedDomain] = []

    # ------------------------------------------------------------------------------ bookkeeping
    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        if (self.out / "experiment.json").is_file():  # only into a folder that is ours
            from gainsurgery.io.atomic import open_log_file

            with open_log_file(self.out / "log.txt", append=True, what="the experiment log",
                               error=ForgettingError) as f:
                f.write(line + "\n")
        if self.echo:
            self.echo(line)

    def _check_folder(self) -> dict[str, Any] | None:
        """The folder's ``experiment.json`` (checked), None for a new or empty folder; anything else refused.

        Resuming needs the same signature (the message names what differs) and the same
        domain files, by content (a data file edited since the split is refused).
        """
        out = self.out
        if out.is_symlink() or (out.exists() and not out.is_dir()):
            raise ForgettingError(f"--out {out}: is not a folder")
        saved_raw = records.read(out, "experiment.json") if out.is_dir() else None
        if saved_raw is None:
            if out.is_dir() and any(p.name != LOCK_NAME for p in out.iterdir()):
                raise ForgettingError(f"--out {out}: a folder that is not empty and holds no experiment.json "
                                      "(not an experiment folder); give a new or empty folder")
            return None
        saved = records.experiment_record(saved_raw, str(out / "experiment.json"))
        sig, old = self.cfg.signature(), dict(saved["signature"])
        if isinstance(old.get("base"), str):
            old["base"] = _normal_base(old["base"])  # folders made before bases were normalised
        if old != sig:
            keys = [k for k in sorted(set(sig) | set(old)) if sig.get(k) != old.get(k)]
            shown = "; ".join(f"{k}: {_short(sig.get(k))} here, {_short(old.get(k))} in the folder" for k in keys)
            raise ForgettingError(f"{out} holds an experiment with other settings ({shown}); use another --out, "
                                  "or the same settings to resume")
        sources = saved.get("sources") or {}
        for name, digest in self._sources().items():
            if name in sources and sources[name] != digest:
                raise ForgettingError(f"domain {name}: its files changed since {out} split them (sha256 "
                                      f"{_short(sources[name])} then, {_short(digest)} now); use another --out")
        return saved

    def _sources(self) -> dict[str, list[str]]:
        """sha256 of each domain's data files, in order (what its frozen split was made from)."""
        from gainsurgery.io.hashing import sha256_file

        if not hasattr(self, "_source_digests"):
            self._source_digests = {d.name: [sha256_file(f) for f in d.files()]
                                    for d in self.cfg.sequence + self.cfg.extra_eval}
        return self._source_digests

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from gainsurgery.training.modeling import load_tokenizer

            self._tokenizer = load_tokenizer(self.base_folder)
        return self._tokenizer

    def prepare(self, write: bool = True) -> None:
        """Split every domain and check the yes/no items, before anything trains.

        Every domain is split in memory first (the first bad one is a one-line error and
        nothing is written); then, with ``write``, the folder becomes ours:
        ``experiment.json`` and each domain's frozen split (``data/<name>/``). A dry run
        (``write=False``) writes nothing. A folder resumed keeps its frozen splits.
        """
        c = self.cfg
        if not self.domains:
            self._split()
        if not write:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        if self._saved is None:
            records.write(self.out / "experiment.json", {"signature": c.signature(), "config": _config_record(c),
                                                        "sources": self._sources()})
            self._saved = records.read(self.out, "experiment.json")
        elif "sources" not in self._saved:  # a folder from before sources were recorded: record them now
            records.write(self.out / "experiment.json", {**self._saved, "sources": self._sources()})
        fresh, self._fresh = self._fresh, []
        for dom in fresh:
            save_domain(dom)
            i = dom.info
            self.log(f"domain {dom.name}: {i['test_windows']} test windows ({i['test_units']} documents), "
                     f"{i['dev_windows']} dev windows ({i['dev_units']}), {i['documents_train']} training "
                     f"documents ({i['train_windows']} windows); split: {i['split']}"
                     + (f"; {i['duplicates_dropped']} training documents dropped: they repeat a held-out one"
                        if i.get("duplicates_dropped") else ""))
            drawn = c.steps * c.batch_size
            if dom.name in self.sequence and i["train_windows"] and drawn > 4 * i["train_windows"]:
                self.log(f"domain {dom.name}: warning: a stage draws {drawn} windows from {i['train_windows']} "
                         f"({drawn / i['train_windows']:.0f} epochs); expect it to overfit (give more text, "
                         f"or fewer steps or a smaller batch)")

    def _split(self) -> None:
        """Every domain split in memory (or loaded, when frozen), the yes/no items and the base checked."""
        c = self.cfg
        limit = _max_positions(self.base_folder)
        if limit is not None and c.seq_len > limit:
            raise ForgettingError(f"--seq-len {c.seq_len} is longer than the base model's {limit} positions")
        vocab = len(self.tokenizer)
        fresh: list[PreparedDomain] = []
        for spec in c.sequence + c.extra_eval:
            dom = load_domain(self.out, spec.name, c.seq_len) if self._saved is not None else None
            if dom is None:
                trained = spec.name in self.sequence  # a domain only scored needs no training text
                dom = prepare_domain(spec, self.tokenizer, c.seq_len, c.test_windows, c.dev_windows,
                                     self.out / "data" / spec.name, min_train_windows=c.batch_size if trained else 0)
                frozen = records.frozen_windows(self.out, spec.name, c.seq_len) if self._saved is not None else None
                if frozen is not None and (frozen["test"]["ids"] != dom.test.ids or frozen["dev"]["ids"] !=
                                           dom.dev.ids or frozen["info"].get("train_sha256") !=
                                           dom.info["train_sha256"]):
                    # a packed folder (windows.json kept, train.txt left out) whose data no longer split the same
                    raise ForgettingError(f"domain {spec.name}: {self.out}/data/{spec.name}/windows.json was split "
                                          "from other data than the files given now; use another --out")
                fresh.append(dom)
            elif max(max(w) for w in dom.test.ids + dom.dev.ids) >= vocab:
                raise ForgettingError(f"{self.out}/data/{spec.name}/windows.json: holds token ids beyond the "
                                      f"tokenizer's {vocab}; use another --out")
            self.domains[spec.name] = dom
        self.layout = records.Layout(tuple(self.sequence), tuple(self.columns),
                                     {d: len(self.domains[d].test.ids) for d in self.columns},
                                     {d: len(self.domains[d].dev.ids) for d in self.columns}, c.seq_len)
        if c.yesno:
            self.yesno_items()  # a missing or short file now, not after hours of training
        self._fresh = fresh

    # ------------------------------------------------------------------------------ evaluation
    @property
    def device(self) -> str:
        """Where models are scored: the GPU when there is one (training places itself, via accelerate)."""
        if self._device is None:
            import torch

            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    def _load(self, folder: Path) -> Any:
        from gainsurgery.training.modeling import load_causal_lm

        return load_causal_lm(folder, self.cfg.dtype).to(self.device)

    def _nll(self, model: Any, ids: list[list[int]]) -> list[float]:
        """NLL summed over each window's predicted tokens (nats), in window order."""
        import torch

        out: list[float] = []
        with torch.no_grad():
            for i in range(0, len(ids), self.cfg.eval_batch):
                batch = torch.tensor(ids[i:i + self.cfg.eval_batch], dtype=torch.long, device=self.device)
                logits = model(input_ids=batch).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
                out.extend(loss.sum(dim=1).double().tolist())
        return out

    def score(self, folder: Path, test_domains: list[str], dev_domains: list[str]) -> dict[str, Any]:
        """Per-window NLLs of the checkpoint in ``folder`` on the given test and dev windows."""
        model = self._load(folder)
        try:
            return {"test_nll": {d: self._nll(model, self.domains[d].test.ids) for d in test_domains},
                    "dev_nll": {d: self._nll(model, self.domains[d].dev.ids) for d in dev_domains}}
        finally:
            del model
            gc.collect()

    def yesno_items(self) -> list[dict[str, str]]:
        from gainsurgery.training.evaluation import read_yesno

        from gainsurgery.errors import GainSurgeryError

        try:
            items = read_yesno(self.cfg.yesno_file)
        except GainSurgeryError as exc:
            raise ForgettingError(f"--yesno: {exc}") from None
        if len(items) < self.cfg.yesno:
            raise ForgettingError(f"{self.cfg.yesno_file}: {len(items)} yes/no items, asked for {self.cfg.yesno}")
        pick = np.sort(np.random.default_rng(0).choice(len(items), self.cfg.yesno, replace=False))
        return [items[int(i)] for i in pick]

    def yesno(self, folder: Path) -> dict[str, Any]:
        """Per-item yes/no predictions (" yes" vs " no" next-token log-likelihood)."""
        import torch

        from gainsurgery.training.data import adds_bos
        from gainsurgery.training.evaluation import yesno_prompt

        tok = self.tokenizer
        yes = tok(" yes", add_special_tokens=False)["input_ids"][0]
        no = tok(" no", add_special_tokens=False)["input_ids"][0]
        bos = [tok.bos_token_id] if adds_bos(tok) else []
        model = self._load(folder)
        items = self.yesno_items()
        said_yes, correct = [], []
        t0 = time.perf_counter()
        c0 = time.process_time()
        with torch.no_grad():
            for item in items:
                ids = tok(yesno_prompt(item["passage"], item["question"]), add_special_tokens=False)["input_ids"]
                ids = bos + ids[-(self.cfg.yesno_max_tokens - len(bos)):]
                # only the last position's logits are needed: skip the LM head elsewhere
                logits = model(input_ids=torch.tensor([ids], device=self.device), logits_to_keep=1).logits[0, -1].float()
                y = bool(logits[yes] > logits[no])
                said_yes.append(y)
                correct.append(y == (item["answer"] == "yes"))
        del model
        gc.collect()
        return {"items": len(items), "said_yes": said_yes, "correct": correct,
                "answers_yes": [it["answer"] == "yes" for it in items],
                "accuracy": float(np.mean(correct)), "yes_rate": float(np.mean(said_yes)),
                "seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1)}

    def base_scores(self) -> dict[str, Any]:
        saved = records.read(self.out, "base.json")
        if saved is not None:
            return records.scores_record(saved, str(self.out / "base.json"), self.layout)
        self.log("scoring the base model on every domain (test and dev windows)")
        t0 = time.perf_counter()
        rec = self.score(self.base_folder, self.columns, self.columns)
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        records.write(self.out / "base.json", rec)
        return rec

    def _read_yesno(self, rel: str) -> dict[str, Any] | None:
        saved = records.read(self.out, rel)
        return None if saved is None else records.yesno_record(saved, str(self.out / rel))

    def base_yesno(self) -> dict[str, Any] | None:
        if not self.cfg.yesno:
            return None
        saved = self._read_yesno("base_yesno.json")
        if saved is not None and saved.get("items") == self.cfg.yesno:
            return saved
        self.log(f"yes/no: base on {self.cfg.yesno} items")
        rec = self.yesno(self.base_folder)
        records.write(self.out / "base_yesno.json", rec)
        self.log(f"yes/no: base accuracy {rec['accuracy']:.3f}, says yes {rec['yes_rate']:.0%} ({rec['seconds']} s)")
        return rec

    # ------------------------------------------------------------------------------ one run
    def run_dir(self, key: RunKey) -> Path:
        return self.out / "runs" / key.name

    def stages_done(self, key: RunKey) -> list[dict]:
        done = []
        for k in range(len(self.sequence)):
            rel = f"runs/{key.name}/stage-{k + 1}.json"
            rec = records.read(self.out, rel)
            if rec is None:
                break
            done.append(records.stage_record(rec, str(self.out / rel), self.layout, k + 1))
            if rec.get("failed"):
                break
        return done

    def is_finished(self, key: RunKey) -> bool:
        done = self.stages_done(key)
        return bool(done) and (bool(done[-1].get("failed")) or len(done) == len(self.sequence))

    def out_of_time(self) -> bool:
        return self.cfg.deadline is not None and time.time() > self.cfg.deadline

    def run(self, key: RunKey) -> list[dict]:
        """Run (or finish) the sequence ``key``; returns its stage records.

        Past the config's deadline no further stage is started (the records so far are
        returned): resume later without a deadline to finish the run.
        """
        done = self.stages_done(key)
        if done and (done[-1].get("failed") or len(done) == len(self.sequence)):
            return done
        if self.out_of_time():
            return done
        d = self.run_dir(key)
        if d.is_symlink():
            raise ForgettingError(f"{d}: is a symbolic link, not a run folder of this experiment; remove it")
        d.mkdir(parents=True, exist_ok=True)
        from gainsurgery.io.locks import hold_lock

        # parallel workers share the folder (a plain run holds it alone): one runs a sequence, the others skip it
        with hold_lock(d / ".run.lock", what=f"run {key.name}", busy_ok=True, error=ForgettingError) as mine:
            if not mine:
                self.log(f"{key.name}: another worker runs it; skipped")
                return done
            return self._run_stages(key, self.stages_done(key))

    def _run_stages(self, key: RunKey, done: list[dict]) -> list[dict]:
        method = METHODS[key.method]
        d = self.run_dir(key)
        records.write(d / "run.json", key.describe())
        for k in range(len(done), len(self.sequence)):
            if k > 0 and self.out_of_time():  # a run cut between stages resumes from its last stage
                self.log(f"{key.name}: out of time after stage {k}; resume without a deadline to finish it")
                return done
            rec = self._stage(key, method, k, done)
            records.write(d / f"stage-{k + 1}.json", rec)
            done.append(rec)
            # only the latest merged model is kept (gains/adapters are the artifacts)
            if k > 0:
                _remove(d / f"merged-{k}")
            if rec.get("failed"):
                self.log(f"{key.name}: stage {k + 1} failed: {rec['failed']}")
                break
            own = self.sequence[k]
            self.log(f"{key.name}: stage {k + 1}/{len(self.sequence)} ({own}) done in {rec['seconds']['stage']:.0f} s; "
                     f"{own} test PPL {math.exp(sum(rec['test_nll'][own]) / (len(rec['test_nll'][own]) * (self.cfg.seq_len - 1))):.3f}")
        if method.family != "full":  # rebuildable from the artifacts; full fine-tuning keeps its last model
            _remove(d / f"merged-{len(done)}")
        return done

    def _artifact(self, key: RunKey, k: int) -> Path:
        method = METHODS[key.method]
        name = f"stage-{k + 1}"
        return self.run_dir(key) / (name + ".safetensors" if method.family == "gain" else name)

    def _stage(self, key: RunKey, method: Method, k: int, done: list[dict]) -> dict[str, Any]:
        from gainsurgery.errors import TrainingError
        from gainsurgery.training import TrainConfig, train

        d = self.run_dir(key)
        domain = self.domains[self.sequence[k]]
        t0 = time.perf_counter()
        c0 = time.process_time()  # CPU seconds of this process (all threads): immune to a paused or shared machine
        windowed = reset_peak_rss()  # so that this stage's peak memory is its own, not an earlier stage's
        from_base = key.variant in ("continue", "swap")
        prev = self.base_folder if (k == 0 or from_base) else self.merged(key, k)
        artifact = self._artifact(key, k)
        _remove(artifact)
        tc = TrainConfig(base=str(prev), data=[str(domain.train_file)], output=str(artifact),
                         method=method.train_method, side=method.side, steps=self.cfg.steps, lr=key.lr,
                         batch_size=self.cfg.batch_size // self.cfg.grad_accum, grad_accum=self.cfg.grad_accum,
                         seq_len=self.cfg.seq_len, dtype=self.cfg.dtype,
                         seed=key.seed * 1000 + k, lora_rank=method.lora_rank, lora_alpha=2 * method.lora_rank,
                         lora_targets=list(method.lora_targets) if method.lora_targets else None,
                         log=str(d / f"stage-{k + 1}.train.jsonl"), progress=self.cfg.progress)
        if key.variant == "continue" and k > 0:
            if method.family == "gain":
                tc.resume = str(self._artifact(key, k - 1))
            else:
                tc.init_adapter = str(self._artifact(key, k - 1))
        self.log(f"{key.name}: stage {k + 1}/{len(self.sequence)}: train on {domain.name} "
                 f"({self.cfg.steps} steps, lr {key.lr:.3g}, seed {key.seed}) from "
                 f"{'the base' if prev == self.base_folder else prev.name}")
        try:
            res = train(tc)
        except TrainingError as exc:
            return {"stage": k + 1, "domain": domain.name, "failed": str(exc)}
        t1 = time.perf_counter()
        merged = d / f"merged-{k + 1}"
        self._build_merged(key, k + 1, merged)
        t2 = time.perf_counter()
        own = domain.name
        tests = self.test_domains(key, k)
        rec: dict[str, Any] = {"stage": k + 1, "domain": own, **self.score(merged, tests, [own])}
        bad = sorted(d for part in ("test_nll", "dev_nll") for d, v in rec[part].items()
                     if not all(math.isfinite(x) and x <= records.MAX_NATS_PER_TOKEN * (self.cfg.seq_len - 1)
                                for x in v))
        if bad:  # a diverged model: the run ends here, as a failed run, never as numbers nobody can read back
            return {"stage": k + 1, "domain": own, "failed": f"the model after this stage scores a non-finite or "
                                                              f"overflowing NLL on {', '.join(bad)} (diverged)"}
        t3 = time.perf_counter()
        rec["train"] = {"trainable_parameters": res.trainable_parameters, "final_loss": res.final_loss,
                        "steps": res.steps, "tokens": res.tokens, "seconds_per_step": res.seconds_per_step}
        if method.family == "gain":
            rec["gains"] = self._gain_stats(key, k)
        if method.family == "peft":
            rec["peft"] = _peft_summary(self.out, f"runs/{key.name}/{artifact.name}")
        rec["cpu_seconds"] = round(time.process_time() - c0, 1)
        rec["seconds"] = {"train": round(t1 - t0, 1), "merge": round(t2 - t1, 1), "eval": round(t3 - t2, 1),
                          "stage": round(t3 - t0, 1)}
        rec["peak_rss_mib"] = round(peak_rss_mib())
        stage_peak = window_peak_rss_mib() if windowed else None
        if stage_peak is not None:
            rec["stage_peak_rss_mib"] = round(stage_peak)
        return rec

    def test_domains(self, key: RunKey, k: int) -> list[str]:
        """Domains scored on their test windows after stage ``k`` (0-based).

        Every metric needs only these: a stage's own domain and the earlier ones (for
        in-domain and the per-stage earlier-domain change), and every domain after the
        last stage. Never-trained domains are scored once, at the end; that saves
        about 40% of the evaluation on a 3-stage run. ``swap`` serves each domain with
        its own file, so only the stage's own domain is scored.
        """
        if key.variant == "swap":
            return [self.sequence[k]]
        return self.columns if k == len(self.sequence) - 1 else self.sequence[:k + 1]

    def _gain_stats(self, key: RunKey, k: int) -> dict[str, float]:
        from gainsurgery.gainfile import load, stack

        this = load(self._artifact(key, k), allow_negative=True)
        files = [load(self._artifact(key, i), allow_negative=True) for i in range(k + 1)]
        # Stage files of the stack variant record different bases (each its merged predecessor).
        effective = this if key.variant in ("continue", "swap") else stack(files, allow_base_mismatch=True)
        mx = lambda g: float(max(np.max(np.abs(v - 1.0)) for v in g.vectors.values()))  # noqa: E731
        return {"max_abs_s_minus_1_stage": mx(this), "max_abs_s_minus_1_effective": mx(effective)}

    def merged(self, key: RunKey, k: int) -> Path:
        """The merged model after stage ``k`` (1-based) of ``key``, rebuilt from the artifacts if gone."""
        folder = self.run_dir(key) / f"merged-{k}"
        if not (folder / "config.json").is_file():
            self._build_merged(key, k, folder)
        return folder

    def _build_merged(self, key: RunKey, k: int, dst: Path) -> None:
        method = METHODS[key.method]
        _remove(dst)
        if method.family == "gain":
            if key.variant == "stack":
                files = [self._artifact(key, i) for i in range(k)]
            else:  # continue: the last vector holds everything; swap: only the current domain's file
                files = [self._artifact(key, k - 1)]
            self._apply_gains(files, dst)
        elif method.family == "peft":
            if key.variant == "continue":
                _merge_adapter(self.base_folder, self._artifact(key, k - 1), dst)
            else:
                prev = self.base_folder if k == 1 else self.merged(key, k - 1)
                _merge_adapter(prev, self._artifact(key, k - 1), dst)
        else:
            art = self._artifact(key, k - 1)
            if not (art / "config.json").is_file():
                raise ForgettingError(f"{key.name}: the stage-{k} model is gone; delete {self.run_dir(key)} "
                                      "to rerun it")
            os.replace(art, dst)  # the fine-tuned checkpoint is the merged model
            art.mkdir()
            from gainsurgery.io.atomic import write_file

            write_file(art / "MOVED", f"moved to {dst.name}\n", error=ForgettingError)

    def _apply_gains(self, files: list[Path], dst: Path) -> None:
        """Base + the product of ``files`` (float32), streamed and rounded once: gainsurgery's own apply.

        Stage k > 1 of the ``stack`` variant was trained on merged-(k-1), and its file
        records those weights as its base: applying the product of the stages to the base
        is the design here, so the base fingerprints are not required to match.
        """
        from gainsurgery.merge import apply

        apply(str(self.base_folder), files, dst, overwrite=True, allow_negative=True, allow_base_mismatch=True,
              warn=lambda message: None)

    def run_yesno(self, key: RunKey) -> dict[str, Any] | None:
        path = self.run_dir(key) / "yesno.json"
        saved = self._read_yesno(f"runs/{key.name}/yesno.json")
        if saved is not None and saved.get("items") == self.cfg.yesno:
            return saved
        if self.out_of_time():
            return None
        done = self.stages_done(key)
        if not done or done[-1].get("failed") or len(done) < len(self.sequence):
            return None
        if key.variant == "swap":
            return None  # no single final model: the domain's own file is applied at use time
        self.log(f"yes/no: {key.name} on {self.cfg.yesno} items")
        folder = self.merged(key, len(self.sequence))
        rec = self.yesno(folder)
        records.write(path, rec)
        if METHODS[key.method].family != "full":
            _remove(folder)
        self.log(f"yes/no: {key.name} accuracy {rec['accuracy']:.3f}, says yes {rec['yes_rate']:.0%}")
        return rec

    # ------------------------------------------------------------------------------ selection
    def dev_score(self, key: RunKey, base: dict[str, Any]) -> float:
        """Mean over stages of the in-domain dev NLL change at the stage's own step (nats/token).

        Lower is better; a failed or unfinished run scores +inf. Only dev windows are
        used: the test windows that are reported never choose anything.
        """
        done = self.stages_done(key)
        if len(done) < len(self.sequence) or done[-1].get("failed"):
            return math.inf
        diffs = []
        for rec in done:
            dom = rec["domain"]
            tok = len(rec["dev_nll"][dom]) * (self.cfg.seq_len - 1)
            diffs.append((sum(rec["dev_nll"][dom]) - sum(base["dev_nll"][dom])) / tok)
        return float(np.mean(diffs))

    def front_keys(self, method: str, base: dict[str, Any]) -> Iterator[RunKey]:
        """Seed-0 runs of ``method`` over its grid, extended until the dev optimum is interior.

        At most ``max_extensions`` lrs are added beyond the initial grid, counted over
        the whole life of the experiment folder (a resumed run does not extend again).
        The caller runs each key before asking for the next: extensions depend on results.
        """
        variant = METHODS[method].default_variant
        grid0 = self.cfg.grid(method)
        for e in grid0:
            yield RunKey(method, variant, e, 0)
        if not METHODS[method].extend:
            return
        while not self.out_of_time():
            tried = sorted(set(grid0) | set(self.tried_exponents(method)))
            for e in tried:  # an extension interrupted by a kill is finished first
                if not self.is_finished(RunKey(method, variant, e, 0)):
                    yield RunKey(method, variant, e, 0)
            scores = {e: self.dev_score(RunKey(method, variant, e, 0), base) for e in tried}
            best = min(tried, key=lambda e: scores[e])
            if not math.isfinite(scores[best]) or 0 < tried.index(best) < len(tried) - 1:
                return
            nxt = tried[0] - 1 if best == tried[0] else tried[-1] + 1
            if len(tried) - len(grid0) >= self.cfg.max_extensions or not MIN_EXPONENT <= nxt <= MAX_EXPONENT:
                self.log(f"{method}: dev optimum at the edge of the grid (lr {lr_label(best)}); "
                         "not extending further (limit reached)")
                return
            self.log(f"{method}: dev optimum at the {'lower' if nxt < best else 'upper'} edge of the grid "
                     f"(lr {lr_label(best)}); extending to lr {lr_label(nxt)}")
            yield RunKey(method, variant, nxt, 0)

    def matching_keys(self, method: str, base: dict[str, Any]) -> Iterator[RunKey]:
        """Smaller lrs for ``method`` until its front reaches down to the other methods' chosen points.

        The matched comparison reads each front at another method's chosen in-domain
        change. A front whose smallest lr already adapts more than that point cannot be
        read there (nothing is extrapolated), so it gets one more lr below its smallest
        while that is so. Judged on dev scores, never on the reported windows; at most
        ``max_extensions`` lrs below the initial grid in all (the optimum's extensions
        included). Run after every front method's front.
        """
        variant = METHODS[method].default_variant
        floor = max(MIN_EXPONENT, min(self.cfg.grid(method)) - self.cfg.max_extensions)
        while not self.out_of_time():
            tried = sorted(e for e in self.tried_exponents(method) if self.is_finished(RunKey(method, variant, e, 0)))
            if not tried:
                return
            lowest = self.dev_score(RunKey(method, variant, tried[0], 0), base)
            others = {}
            for other in self.cfg.front_methods:
                e = self.chosen(other, base) if other != method else None
                if e is not None:
                    others[other] = self.dev_score(RunKey(other, METHODS[other].default_variant, e, 0), base)
            short = sorted(o for o, score in others.items() if math.isfinite(lowest) and score > lowest)
            if not short:
                return
            nxt = tried[0] - 1
            if nxt < floor:
                self.log(f"{method}: its smallest lr ({lr_label(tried[0])}) adapts more than the chosen point of "
                         f"{', '.join(short)}; not extending further (limit reached)")
                return
            self.log(f"{method}: its smallest lr ({lr_label(tried[0])}) adapts more than the chosen point of "
                     f"{', '.join(short)}; adding lr {lr_label(nxt)} to compare at matched in-domain change")
            yield RunKey(method, variant, nxt, 0)

    def tried_exponents(self, method: str) -> list[int]:
        variant = METHODS[method].default_variant
        found = []
        runs = self.out / "runs"
        if runs.is_dir() and not runs.is_symlink():
            for p in sorted(runs.iterdir()):
                rel = f"runs/{p.name}/run.json"
                info = records.read(self.out, rel)
                if info is None:
                    continue
                info = records.run_record(info, str(self.out / rel), p.name)
                if info["method"] == method and info["variant"] == variant and info["seed"] == 0:
                    found.append(info["lr_exponent"])
        return found

    def chosen(self, method: str, base: dict[str, Any]) -> int | None:
        """The dev-optimal lr exponent among the finished seed-0 runs of ``method``'s default variant."""
        variant = METHODS[method].default_variant
        scores = {e: self.dev_score(RunKey(method, variant, e, 0), base) for e in self.tried_exponents(method)}
        scores = {e: s for e, s in scores.items() if math.isfinite(s)}
        return min(scores, key=scores.get) if scores else None

    # ------------------------------------------------------------------------------ the schedule
    def static_keys(self) -> list[RunKey]:
        """The runs known before any result: the initial grids of the front and extra methods (seed 0).

        Ordered so that a schedule cut short by a deadline stays balanced: the front
        methods before the extras, and within each group the methods interleaved, each
        grid taken from its middle outwards (where the optimum usually is).
        """
        def middle_out(grid: list[int]) -> list[int]:
            mid = (len(grid) - 1) // 2
            order = sorted(range(len(grid)), key=lambda i: (abs(i - mid), i))
            return [grid[i] for i in order]

        keys = []
        extras = [m for m in self.cfg.extra_methods if m not in self.cfg.front_methods]
        for group in (self.cfg.front_methods, extras):
            grids = {m: middle_out(self.cfg.grid(m)) for m in group}
            for i in range(max((len(g) for g in grids.values()), default=0)):
                keys.extend(RunKey(m, METHODS[m].default_variant, g[i], 0) for m, g in grids.items() if i < len(g))
        return keys

    def execute(self, worker: tuple[int, int] | None = None) -> None:
        """Run the whole schedule (resuming whatever is on disk).

        ``worker=(i, n)``: run only every n-th of :meth:`static_keys`, starting at i, so
        that n processes (on one GPU, say) share the fixed part of the schedule; a
        plain ``execute()`` afterwards does the rest (extensions, seeds, yes/no).
        Score the base (a plain call with ``phases=[]``) before starting workers.
        """
        c = self.cfg
        t0 = time.perf_counter()
        self.log(f"experiment: {' -> '.join(self.sequence)}; scored on {', '.join(self.columns)}; "
                 f"{c.steps} steps x {c.batch_size} x {c.seq_len} tokens per stage; phases {', '.join(c.phases)}"
                 + (f"; worker {worker[0]}/{worker[1]}" if worker else ""))
        from gainsurgery.io.locks import hold_lock

        self.prepare(write=False)  # every domain checked before the folder is touched
        self.out.mkdir(parents=True, exist_ok=True)
        # a plain run holds the folder alone; parallel workers share it (each run has its own lock)
        with hold_lock(self.out / LOCK_NAME, shared=worker is not None, what=f"experiment {self.out}",
                       error=ForgettingError):
            saved = self._check_folder()  # again, under the lock: another run may have made it ours meanwhile
            if saved is not None and self._saved is None:
                self._saved, self.domains, self._fresh = saved, {}, []  # use its frozen splits, not ours
            self.prepare()
            self._schedule(worker, t0)

    def _schedule(self, worker: tuple[int, int] | None, t0: float) -> None:
        c = self.cfg
        base = self.base_scores()
        if worker is not None:
            i, n = worker
            for key in self.static_keys()[i::n]:
                self.run(key)
            self.log(f"worker {i}/{n} done ({time.perf_counter() - t0:.0f} s)")
            return
        if "fronts" in c.phases:
            for m in c.front_methods:
                for key in self.front_keys(m, base):
                    self.run(key)
            for m in c.front_methods:  # then down to the others' chosen points, for matched comparisons
                for key in self.matching_keys(m, base):
                    self.run(key)
        if "seeds" in c.phases:
            for m in c.seed_methods:
                e = self.chosen(m, base)
                if e is None:
                    continue
                for s in range(1, c.seeds):
                    self.run(RunKey(m, METHODS[m].default_variant, e, s))
        if "yesno" in c.phases and c.yesno:
            self.base_yesno()
            for m in c.seed_methods:
                e = self.chosen(m, base)
                if e is not None:
                    for s in range(c.seeds):
                        self.run_yesno(RunKey(m, METHODS[m].default_variant, e, s))
        if "extras" in c.phases:
            for v in c.variants:
                m, _, var = v.partition(":")
                e = self.chosen(m, base)
                if e is not None:
                    self.run(RunKey(m, var, e, 0))
            for m in c.extra_methods:
                for key in self.front_keys(m, base):
                    self.run(key)
            if c.yesno:
                self.base_yesno()
                for m in c.extra_methods:
                    e = self.chosen(m, base)
                    if e is not None:
                        self.run_yesno(RunKey(m, METHODS[m].default_variant, e, 0))
                for v in c.variants:
                    m, _, var = v.partition(":")
                    e = self.chosen(m, base)
                    if e is not None:
                        self.run_yesno(RunKey(m, var, e, 0))
        self.log(f"schedule complete ({time.perf_counter() - t0:.0f} s in this process)")


def _merge_adapter(prev: Path, adapter: Path, dst: Path) -> None:
    """prev + adapter merged in float32, saved in prev's dtype, with prev's tokenizer files."""
    import torch
    from peft import PeftModel

    from gainsurgery.io.checkpoint import copy_extra_files, open_checkpoint
    from gainsurgery.merge.provenance import OUTPUT_FILES
    from gainsurgery.training.modeling import checkpoint_dtype, load_causal_lm

    from gainsurgery.io.claims import claim_folder

    model = PeftModel.from_pretrained(load_causal_lm(prev, "float32"), adapter)
    merged = model.merge_and_unload().to(getattr(torch, checkpoint_dtype(prev)))
    # written into a claimed temp (unguessable, never through a link) and published whole
    with claim_folder(dst, overwrite=True, what="merged model", error=ForgettingError) as claim:
        merged.save_pretrained(claim.tmp)
        # tokenizer, generation config, license... (read safely; those save_pretrained wrote are kept)
        copy_extra_files(open_checkpoint(prev), claim.tmp, skip=OUTPUT_FILES, keep_existing=True)
        claim.publish()
    del model, merged
    gc.collect()


def _peft_summary(out: Path, rel: str) -> dict[str, Any]:
    """The adapter's shape, from ``out/rel/adapter_config.json`` (written by PEFT in this run's folder)."""
    cfg = records.read(out, f"{rel}/adapter_config.json") or {}
    keep = ("peft_type", "r", "lora_alpha", "target_modules", "feedforward_modules")
    return {k: (sorted(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in keep} \
        if isinstance(cfg, dict) else {}


#: The experiment folder's lock file (see :meth:`Experiment.execute`).
LOCK_NAME = ".experiment.lock"


def _config_record(cfg: ExperimentConfig) -> dict[str, Any]:
    """The settings as stored in ``experiment.json`` (the deadline and progress bars are per call)."""
    return {k: v for k, v in asdict(cfg).items() if k not in ("deadline", "progress")}


def _remove(path: Path) -> None:
    """Delete a file, link or folder of this experiment's own (a link itself, never what it points to)."""
    from gainsurgery.io.mounts import remove_tree

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        remove_tree(path)


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _max_positions(base: Path) -> int | None:
    """The base model's position limit from its ``config.json`` (None when it states none)."""
    from gainsurgery.io import jsonsafe
    from gainsurgery.io.inputs import open_input

    try:
        with open_input(base, "config.json", error=ForgettingError) as f:
            cfg = jsonsafe.load(f, where=f"{base}/config.json", error=ForgettingError)
    except ForgettingError:
        return None  # the model loader gives the real error
    for obj in (cfg, cfg.get("text_config") if isinstance(cfg, dict) else None):
        if isinstance(obj, dict) and type(obj.get("max_position_embeddings")) is int:
            return obj["max_position_embeddings"]
    return None
