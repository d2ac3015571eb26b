"""The forgetting experiment: its folder, its prepared domains, and the schedule; resumable.

The work is done in three rooms: :mod:`~gainsurgery_lab.forgetting.plan` (which runs and
lrs), :mod:`~gainsurgery_lab.forgetting.stages` (training, merging and recording each
stage) with :mod:`~gainsurgery_lab.forgetting.scoring` (NLLs, yes/no, probes), and the
report, :mod:`~gainsurgery_lab.forgetting.analysis`, made from the records alone. This
module owns the folder (new, empty or ours; checked under its lock) and runs the schedule.

The schedule, in order of importance (a run that is cut short keeps what matters):

1. **fronts**: every method of ``front_methods`` at every lr of its grid, with
   ``select_seeds`` seeds each (seed 0 of every front first); the lr is chosen on the mean
   dev score over those seeds with the tie rule of :mod:`~gainsurgery_lab.forgetting.selection`.
   A grid whose best lr is its largest, or whose chosen lr is its smallest, is extended by
   one half-decade on that side (up to ``max_extensions``); then a front whose smallest lr
   adapts more than another method's chosen point gets smaller lrs, so that every chosen
   point can be compared at matched in-domain change;
2. **seeds**: more seeds (up to ``seeds`` in all) at each ``seed_methods`` method's chosen lr;
3. **yes/no** for the base and those runs; **probes** (knowledge probes, see
   :mod:`gainsurgery_lab.probes`) for the base and every seed at each chosen and best lr;
4. **extras**: the staging ``variants`` at the chosen lr, the fronts of
   ``extra_methods``, and their yes/no.

Resumable: a finished stage is written atomically to ``runs/<run>/stage-<k>.json``
with its artifact (gain file or adapter folder); rerunning with the same ``--out``
skips it. Only the latest merged model of a run is kept; it is rebuilt from the
artifacts when needed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from gainsurgery_lab.forgetting import records
from gainsurgery_lab.forgetting.alpha import AlphaFront
from gainsurgery_lab.forgetting.config import ExperimentConfig, RunKey, _config_record, _normal_base
from gainsurgery_lab.forgetting.data import ForgettingError, PreparedDomain, prepare_domain
from gainsurgery_lab.forgetting.methods import METHODS
from gainsurgery_lab.forgetting.plan import Plan
from gainsurgery_lab.forgetting.records import load_domain, save_domain
from gainsurgery_lab.forgetting.scoring import Scorer
from gainsurgery_lab.forgetting.stages import Runs
from gainsurgery.io import jsonsafe
from gainsurgery.io.hashing import sha256_file
from gainsurgery.io.inputs import open_input
from gainsurgery.io.atomic import open_log_file
from gainsurgery.io.checks import check_output
from gainsurgery.io.locks import hold_lock
from gainsurgery.sources import resolve_base
from gainsurgery.training.modeling import load_tokenizer


class Experiment:
    """Owns the folder, the settings and the prepared domains; runs the schedule with its three rooms.

    ``plan`` decides what runs next (:class:`~gainsurgery_lab.forgetting.plan.Plan`), ``runs``
    trains, merges and records sequences (:class:`~gainsurgery_lab.forgetting.stages.Runs`) and
    ``scorer`` scores checkpoints (:class:`~gainsurgery_lab.forgetting.scoring.Scorer`); the
    report is :mod:`gainsurgery_lab.forgetting.analysis`, from the records alone.
    """

    def __init__(self, cfg: ExperimentConfig, echo: Callable[[str], None] | None = print) -> None:
        """Check the configuration and the folder; nothing is written until :meth:`prepare` (``write``)."""

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
        self.scorer = Scorer(self)
        self.runs = Runs(self, self.scorer)
        self.plan = Plan(self, self.runs)

    def out_of_time(self) -> bool:
        """Past the deadline: no new run or stage starts (every room asks here)."""
        return self.cfg.out_of_time()

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}"
        if (self.out / "experiment.json").is_file():  # only into a folder that is ours

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

        if not hasattr(self, "_source_digests"):
            self._source_digests = {d.name: [sha256_file(f) for f in d.files()]
                                    for d in self.cfg.sequence + self.cfg.extra_eval}
        return self._source_digests

    @property
    def tokenizer(self):
        if self._tokenizer is None:

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
            self.scorer.yesno_items()  # a missing or short file now, not after hours of training
        if c.probe_file:
            self.scorer.probe_items()
        self._fresh = fresh

    def execute(self, worker: tuple[int, int] | None = None) -> bool:
        """Run the whole schedule (resuming whatever is on disk); False when the deadline cut it short.

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
        return not self.out_of_time()

    def _schedule(self, worker: tuple[int, int] | None, t0: float) -> None:
        c = self.cfg
        base = self.runs.base_scores()
        if worker is not None:
            i, n = worker
            for key in self.plan.static_keys()[i::n]:
                self.runs.run(key)
            self.log(f"worker {i}/{n} done ({time.perf_counter() - t0:.0f} s)")
            return
        if "fronts" in c.phases:
            for key in self.plan.static_keys():  # the initial grids, methods interleaved: a cut run stays balanced
                if key.method in c.front_methods:
                    self.runs.run(key)
            for m in c.front_methods:
                for key in self.plan.front_keys(m, base):
                    self.runs.run(key)
            for m in c.front_methods:  # then down to the others' chosen points, for matched comparisons
                for key in self.plan.matching_keys(m, base):
                    self.runs.run(key)
        if "seeds" in c.phases:
            for m in c.seed_methods:
                e = self.plan.chosen(m, base)
                if e is None:
                    continue
                for s in range(c.select_seeds, c.seeds):
                    self.runs.run(RunKey(m, METHODS[m].default_variant, e, s))
        if "yesno" in c.phases and c.yesno:
            self.runs.base_yesno()
            for m in c.seed_methods:
                e = self.plan.chosen(m, base)
                if e is not None:
                    for s in range(c.seeds):
                        self.runs.run_yesno(RunKey(m, METHODS[m].default_variant, e, s))
        if "probes" in c.phases and c.probe_file:
            self.runs.base_probes()
            for m in c.seed_methods:
                for e in self.plan.probed_lrs(m, base):
                    for s in range(c.seeds):
                        self.runs.run_probes(RunKey(m, METHODS[m].default_variant, e, s))
        if "alpha" in c.phases and c.alphas:
            front = AlphaFront(self)
            for m in c.seed_methods:
                e = self.plan.chosen(m, base)
                if e is not None:
                    front.run(RunKey(m, METHODS[m].default_variant, e, 0), sorted(c.alphas))
        if "extras" in c.phases:
            for v in c.variants:
                m, _, var = v.partition(":")
                e = self.plan.chosen(m, base)
                if e is not None:
                    self.runs.run(RunKey(m, var, e, 0))
            for m in c.extra_methods:
                for key in self.plan.front_keys(m, base):
                    self.runs.run(key)
            if c.yesno:
                self.runs.base_yesno()
                for m in c.extra_methods:
                    e = self.plan.chosen(m, base)
                    if e is not None:
                        self.runs.run_yesno(RunKey(m, METHODS[m].default_variant, e, 0))
                for v in c.variants:
                    m, _, var = v.partition(":")
                    e = self.plan.chosen(m, base)
                    if e is not None:
                        self.runs.run_yesno(RunKey(m, var, e, 0))
        if self.out_of_time():
            self.log(f"stopped at the deadline ({time.perf_counter() - t0:.0f} s in this process); rerun the same "
                     "command to continue")
        else:
            self.log(f"schedule complete ({time.perf_counter() - t0:.0f} s in this process)")


LOCK_NAME = ".experiment.lock"


def _short(value: Any, limit: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _max_positions(base: Path) -> int | None:
    """The base model's position limit from its ``config.json`` (None when it states none)."""

    try:
        with open_input(base, "config.json", error=ForgettingError) as f:
            cfg = jsonsafe.load(f, where=f"{base}/config.json", error=ForgettingError)
    except ForgettingError:
        return None  # the model loader gives the real error
    for obj in (cfg, cfg.get("text_config") if isinstance(cfg, dict) else None):
        if isinstance(obj, dict) and type(obj.get("max_position_embeddings")) is int:
            return obj["max_position_embeddings"]
    return None
