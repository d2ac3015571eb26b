"""Running a sequence: each stage trained, merged, scored and written atomically; resumable.

A **run** is one whole sequence (domain 1 → … → domain K) for one method, staging
variant, learning rate and seed (:class:`~gainsurgery_lab.forgetting.config.RunKey`).
After every stage the merged model is scored on the fixed test windows and on the dev
windows of the stage's own domain; ``runs/<run>/stage-<k>.json`` is written with the
stage's artifact (gain file or adapter folder) beside it. Only the latest merged model
of a run is kept; it is rebuilt from the artifacts when needed. Also here: the base's
scores and the yes/no and probe passes of finished runs, each stored once.
"""

from __future__ import annotations

import gc
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from gainsurgery_lab.forgetting import records
from gainsurgery_lab.forgetting.config import Room, RunKey
from gainsurgery_lab.forgetting.data import ForgettingError
from gainsurgery_lab.forgetting.methods import METHODS, Method
from gainsurgery.errors import TrainingError
from gainsurgery.gainfile import load, stack
from gainsurgery.io.checkpoint import copy_extra_files, open_checkpoint
from gainsurgery.io.atomic import write_file
from gainsurgery.io.claims import claim_folder
from gainsurgery.io.locks import hold_lock
from gainsurgery.io.mounts import remove_tree
from gainsurgery.api import apply
from gainsurgery.merge.provenance import OUTPUT_FILES
from gainsurgery.training import TrainConfig, train
from gainsurgery.training.modeling import checkpoint_dtype, load_causal_lm


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


class Runs(Room):
    """Runs (and resumes) sequences, and keeps every record of them on disk."""

    def __init__(self, exp: Any, scorer: Any) -> None:
        super().__init__(exp)
        self.scorer = scorer

    def base_scores(self) -> dict[str, Any]:
        saved = records.read(self.out, "base.json")
        if saved is not None:
            return records.scores_record(saved, str(self.out / "base.json"), self.layout)
        self.log("scoring the base model on every domain (test and dev windows)")
        t0 = time.perf_counter()
        rec = self.scorer.score(self.base_folder, self.columns, self.columns)
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
        rec = self.scorer.yesno(self.base_folder)
        records.write(self.out / "base_yesno.json", rec)
        self.log(f"yes/no: base accuracy {rec['accuracy']:.3f}, says yes {rec['yes_rate']:.0%} ({rec['seconds']} s)")
        return rec

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
        rec: dict[str, Any] = {"stage": k + 1, "domain": own, **self.scorer.score(merged, tests, [own])}
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

            write_file(art / "MOVED", f"moved to {dst.name}\n", error=ForgettingError)

    def _apply_gains(self, files: list[Path], dst: Path) -> None:
        """Base + the product of ``files`` (float32), streamed and rounded once: gainsurgery's own apply.

        Stage k > 1 of the ``stack`` variant was trained on merged-(k-1), and its file
        records those weights as its base: applying the product of the stages to the base
        is the design here, so the base fingerprints are not required to match.
        """

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
        rec = self.scorer.yesno(folder)
        records.write(path, rec)
        if METHODS[key.method].family != "full":
            _remove(folder)
        self.log(f"yes/no: {key.name} accuracy {rec['accuracy']:.3f}, says yes {rec['yes_rate']:.0%}")
        return rec

    def base_probes(self) -> dict[str, Any] | None:
        """The base on every probe item, dev and test (dev decides which probes carry signal)."""
        saved = records.read(self.out, "base_probes.json")
        if saved is not None:
            return records.probes_record(saved, str(self.out / "base_probes.json"))
        self.log("probes: base on every item (dev and test)")
        rec = self.scorer.probe(self.base_folder, ("dev", "test"))
        records.write(self.out / "base_probes.json", rec)
        self.log(f"probes: base done in {rec['seconds']} s ({rec['items']} items)")
        return rec

    def run_probes(self, key: RunKey) -> dict[str, Any] | None:
        """A finished run's final model on the test items of every probe (resumable, skipped when stored)."""
        rel = f"runs/{key.name}/probes.json"
        saved = records.read(self.out, rel)
        if saved is not None:
            return records.probes_record(saved, str(self.out / rel))
        if self.out_of_time():
            return None
        done = self.stages_done(key)
        if not done or done[-1].get("failed") or len(done) < len(self.sequence) or key.variant == "swap":
            return None
        self.log(f"probes: {key.name}")
        folder = self.merged(key, len(self.sequence))
        rec = self.scorer.probe(folder, ("test",))
        records.write(self.run_dir(key) / "probes.json", rec)
        if METHODS[key.method].family != "full":
            _remove(folder)
        acc = sum(p == a for p, a in zip(rec["pred"], rec["answer"])) / max(rec["items"], 1)
        self.log(f"probes: {key.name} accuracy {acc:.3f} over {rec['items']} test items ({rec['seconds']} s)")
        return rec


def _merge_adapter(prev: Path, adapter: Path, dst: Path) -> None:
    """prev + adapter merged in float32, saved in prev's dtype, with prev's tokenizer files."""
    import torch
    from peft import PeftModel

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


def _remove(path: Path) -> None:
    """Delete a file, link or folder of this experiment's own (a link itself, never what it points to)."""

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        remove_tree(path)
