"""Scoring a checkpoint: per-window NLLs on the frozen windows, yes/no answers, knowledge-probe answers.

Only raw per-window or per-item numbers are returned; every statistic is computed later
(:mod:`gainsurgery_lab.forgetting.analysis`).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import numpy as np

from gainsurgery_lab.forgetting.config import Room
from gainsurgery_lab.forgetting.data import ForgettingError
from gainsurgery.errors import GainSurgeryError
from gainsurgery.training.data import adds_bos
from gainsurgery.training.evaluation import read_yesno, yesno_prompt
from gainsurgery.training.modeling import load_causal_lm
from gainsurgery_lab.forgetting.probing import score_items
from gainsurgery_lab.probes import read_items


class Scorer(Room):
    """Loads a checkpoint and scores it (on the GPU when there is one)."""

    _device: str | None = None

    @property
    def device(self) -> str:
        """Where models are scored: the GPU when there is one (training places itself, via accelerate)."""
        if self._device is None:
            import torch

            self._device = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device

    def _load(self, folder: Path) -> Any:

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

    def probe_items(self) -> list[dict]:
        """The probe items (checked), in file order."""

        try:
            return read_items(self.cfg.probe_file)
        except GainSurgeryError as exc:
            raise ForgettingError(f"--probes: {exc}") from None

    def probe(self, folder: Path, splits: tuple[str, ...]) -> dict[str, Any]:
        """Per-item answers of the checkpoint in ``folder`` on the probe items of ``splits``."""

        items = [it for it in self.probe_items() if it["split"] in splits]
        model = self._load(folder)
        try:
            res = score_items(model, self.tokenizer, items, self.device)
        finally:
            del model
            gc.collect()
        return {"items": len(items), "ids": [it["id"] for it in items], "probe": [it["probe"] for it in items],
                "split": [it["split"] for it in items], "choices": [len(it["choices"]) for it in items],
                "answer": [it["answer"] for it in items], "pred": res["pred"],
                "seconds": res["seconds"], "cpu_seconds": res["cpu_seconds"]}
