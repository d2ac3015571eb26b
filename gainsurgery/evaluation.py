"""Evaluation: perplexity over fixed token windows, zero-shot yes/no accuracy.

Perplexity is exp(mean NLL) over every predicted token of the windows from
:func:`gainsurgery.data.pack` (first ``max_windows`` windows of the held-out
file, in document order): deterministic, so two models are compared on exactly
the same tokens.

Yes/no accuracy scores a passage + question prompt by comparing the model's
log-likelihood of " yes" and " no" as the next token.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from gainsurgery.io.atomic import iter_jsonl
from gainsurgery.data import Windows, adds_bos
from gainsurgery.errors import GainSurgeryError


def perplexity(model: Any, windows: Windows, batch_size: int = 8) -> dict[str, float]:
    """Mean NLL (nats/token), token count and perplexity of ``model`` on ``windows``."""
    import torch

    nll, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(windows.ids), batch_size):
            batch = torch.tensor(windows.ids[i : i + batch_size], dtype=torch.long, device=device)
            logits = model(input_ids=batch).logits[:, :-1].float()
            targets = batch[:, 1:]
            losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                       reduction="sum")
            nll += losses.item()
            count += targets.numel()
    mean = nll / count
    return {"nll": mean, "tokens": count, "ppl": math.exp(mean)}


def read_yesno(path: str | Path, limit: int | None = None) -> list[dict[str, str]]:
    """Items with ``passage``, ``question`` and ``answer`` ("yes"/"no"), one JSON object per line."""
    items = []
    p = Path(path)
    if not p.is_file():
        raise GainSurgeryError(f"yes/no file not found: {p}")
    for lineno, obj in iter_jsonl(p, GainSurgeryError):
        answer = str(obj.get("answer", "")).strip().lower() if isinstance(obj, dict) else ""
        if answer not in ("yes", "no") or not obj.get("question"):
            raise GainSurgeryError(f"{p}:{lineno}: needs 'question' and an 'answer' of yes/no")
        items.append({"passage": str(obj.get("passage", "")), "question": str(obj["question"]), "answer": answer})
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise GainSurgeryError(f"{p}: no yes/no items")
    return items


def yesno_prompt(passage: str, question: str) -> str:
    """The zero-shot prompt: passage, question, and an open answer slot."""
    q = question.strip()
    if not q.endswith("?"):
        q += "?"
    return f"{passage.strip()}\nQuestion: {q}\nAnswer:"


def yesno_accuracy(model: Any, tokenizer: Any, items: Iterable[dict[str, str]], max_len: int = 1024) -> dict[str, Any]:
    """Accuracy of choosing " yes" vs " no" by next-token log-likelihood.

    Long passages are cut from the left so the question always fits.
    """
    import torch

    yes = tokenizer(" yes", add_special_tokens=False)["input_ids"][0]
    no = tokenizer(" no", add_special_tokens=False)["input_ids"][0]
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    device = next(model.parameters()).device
    correct = total = said_yes = 0
    with torch.no_grad():
        for item in items:
            ids = tokenizer(yesno_prompt(item["passage"], item["question"]), add_special_tokens=False)["input_ids"]
            ids = bos + ids[-(max_len - len(bos)):]
            logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
            pred = "yes" if logits[yes] > logits[no] else "no"
            said_yes += pred == "yes"
            correct += pred == item["answer"]
            total += 1
    return {"accuracy": correct / total, "items": total, "predicted_yes": said_yes / total}
