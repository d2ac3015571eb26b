"""The α-front: one trained run dialled down (or up) after training, scored like a run; no training.

For a finished run and a strength α, the model after stage k is

- **gains**: the base with every stage's gain file at power α applied, s_i → s_i^α (what
  ``gainsurgery apply BASE G1.safetensors@α ... OUT`` writes); α = 1 is the run itself;
- **LoRA and other adapters**: the base plus α times the run's weight change after stage
  k, W_base + α·(W_k − W_base), in float32 and rounded once to the checkpoint's dtype
  (LoRA's counterpart: scaling the merged adapters' delta).

Each such model is scored on exactly the windows a run's stage is scored on (the
stage's own domain and the earlier ones, every domain after the last stage; dev windows
of its own domain) and stored as ``alpha/<run>/a<α>/stage-<k>.json``. The report puts
the α-front beside the lr-front: if they coincide, a user can trade in-domain gain for
less forgetting after training, with one trained file.
"""

from __future__ import annotations

import gc
import math
import time
from pathlib import Path
from typing import Any

from gainsurgery_lab.forgetting import records
from gainsurgery_lab.forgetting.config import Room, RunKey
from gainsurgery_lab.forgetting.data import ForgettingError
from gainsurgery_lab.forgetting.methods import METHODS
from gainsurgery_lab.forgetting.stages import _remove
from gainsurgery import gainfile as gf
from gainsurgery.io.checkpoint import copy_extra_files, open_checkpoint
from gainsurgery.io.claims import claim_folder
from gainsurgery.api import apply
from gainsurgery.merge.provenance import OUTPUT_FILES
from gainsurgery.training.modeling import checkpoint_dtype, load_causal_lm

#: Strengths scored by default (1 is the run itself, kept as a check of the pipeline).
DEFAULT_ALPHAS = (0.25, 0.5, 0.75, 1.0)
MAX_ALPHA = 16.0


def alpha_label(alpha: float) -> str:
    """A folder-safe label: 0.5 -> ``a0.5``, 1 -> ``a1``."""
    return "a" + f"{alpha:g}".replace("-", "m")


def parse_alphas(text: str) -> list[float]:
    """``"0.25,0.5,1"`` -> ``[0.25, 0.5, 1.0]``; each finite, 0 < α ≤ :data:`MAX_ALPHA`, no repeats."""
    try:
        alphas = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        alphas = []
    if not alphas or len(set(alphas)) != len(alphas) or not all(
            math.isfinite(a) and 0 < a <= MAX_ALPHA for a in alphas):
        raise ForgettingError(f"--alphas {text!r}: give distinct numbers in (0, {MAX_ALPHA:g}], e.g. 0.25,0.5,0.75,1")
    return alphas


class AlphaFront(Room):
    """Scores the α-scaled models of finished runs (see the module docstring); resumable."""

    def __init__(self, exp: Any) -> None:
        super().__init__(exp)
        self.runs = exp.runs

    def folder(self, key: RunKey, alpha: float) -> Path:
        return self.out / "alpha" / key.name / alpha_label(alpha)

    def run(self, key: RunKey, alphas: list[float]) -> list[dict]:
        """Every stage of ``key`` at every α (skipping what is stored); returns the records written now."""
        done = self.runs.stages_done(key)
        if len(done) < len(self.sequence) or done[-1].get("failed"):
            raise ForgettingError(f"{key.name}: not a finished run; the α-front scales a finished run")
        if key.variant == "swap" or METHODS[key.method].family == "full":
            raise ForgettingError(f"{key.name}: the α-front needs a stacked gain run or a merged adapter run")
        written = []
        for alpha in alphas:
            for k in range(1, len(self.sequence) + 1):
                rel = f"alpha/{key.name}/{alpha_label(alpha)}/stage-{k}.json"
                if records.read(self.out, rel) is not None:
                    continue
                if self.out_of_time():
                    return written
                rec = self._stage(key, alpha, k)
                records.write(self.out / rel, rec)
                written.append(rec)
                own = self.sequence[k - 1]
                self.log(f"alpha: {key.name} at α={alpha:g}, stage {k} ({own}) scored in {rec['seconds']:.0f} s")
        _remove(self.runs.run_dir(key) / f"merged-{len(self.sequence)}")  # rebuildable from the artifacts
        return written

    def _stage(self, key: RunKey, alpha: float, k: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        dst = self.folder(key, alpha) / f"merged-{k}"
        _remove(dst)
        dst.parent.mkdir(parents=True, exist_ok=True)
        if METHODS[key.method].family == "gain":
            self._gains(key, alpha, k, dst)
        else:
            self._blend(self.runs.merged(key, k), alpha, dst)
        own = self.sequence[k - 1]
        rec: dict[str, Any] = {"stage": k, "domain": own, "alpha": alpha,
                               **self.runs.scorer.score(dst, self.runs.test_domains(key, k - 1), [own])}
        _remove(dst)
        if k > 1:
            _remove(self.runs.run_dir(key) / f"merged-{k - 1}")  # the run keeps only its latest model too
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        return rec

    def _gains(self, key: RunKey, alpha: float, k: int, dst: Path) -> None:
        """The base with stage files 1..k at power α (the run's own stacking: a product, rounded once)."""

        if key.variant == "stack":
            files = [self.runs._artifact(key, i) for i in range(k)]
        else:  # continue: the last vector holds everything
            files = [self.runs._artifact(key, k - 1)]
        gains = [gf.power(gf.load(f, allow_negative=True), alpha) for f in files]
        apply(str(self.base_folder), gains, dst, overwrite=True, allow_negative=True, allow_base_mismatch=True,
              warn=lambda message: None)

    def _blend(self, merged: Path, alpha: float, dst: Path) -> None:
        """W_base + α·(W_merged − W_base) for every weight, float32, saved in the merged model's dtype."""
        import torch

        model = load_causal_lm(merged, "float32")
        base = load_causal_lm(self.base_folder, "float32").state_dict()
        with torch.no_grad():
            for name, w in model.state_dict().items():
                if name in base and base[name].shape == w.shape and w.is_floating_point():
                    w.copy_(base[name] + alpha * (w - base[name]))
        del base
        model = model.to(getattr(torch, checkpoint_dtype(merged)))
        with claim_folder(dst, overwrite=True, what="α-scaled model", error=ForgettingError) as claim:
            model.save_pretrained(claim.tmp)
            copy_extra_files(open_checkpoint(merged), claim.tmp, skip=OUTPUT_FILES, keep_existing=True)
            claim.publish()
        del model
        gc.collect()
