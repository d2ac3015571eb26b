"""Evaluation: perplexity over fixed token windows, zero-shot yes/no accuracy.

Perplexity is exp(mean NLL) over every predicted token of the windows from
:func:`gainsurgery.training.data.pack` (first ``max_windows`` windows of the held-out
file, in document order): deterministic, so two models are compared on exactly
the same tokens.

Yes/no accuracy scores a passage + question prompt by comparing the model's
log-likelihood of " yes" and " no" as the next token.

:func:`evaluate` is what ``gainsurgery eval`` runs: load a model (or an adapter on
its base), optionally attach gains as hooks, and measure both.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from gainsurgery.errors import DataError
from gainsurgery.extras import require_extra
from gainsurgery.gainfile import load_many
from gainsurgery.io import jsonsafe
from gainsurgery.io.inputs import open_regular, show_path
from gainsurgery.training.data import Windows, adds_bos, pack, read_documents
from gainsurgery.training.hooks import attach
from gainsurgery.training.modeling import load_for_eval


def perplexity(model: Any, windows: Windows, batch_size: int = 8, device: Any = None) -> dict[str, float]:
    """Mean NLL (nats/token), token count and perplexity of ``model`` on ``windows``.

    The windows go to ``device`` (default: where the model's first parameter is).
    """
    import torch

    nll, count = 0.0, 0
    device = device if device is not None else next(model.parameters()).device
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
    """Items with ``passage``, ``question`` and ``answer`` ("yes"/"no"), one JSON object per line.

    Read as hostile input: opened without blocking, each line parsed within limits,
    every field a string.

    Raises:
        DataError: one line naming the file and line.
    """
    items = []
    p = Path(path)
    shown = show_path(p)
    if not p.exists():
        raise DataError(f"yes/no file not found: {shown}")
    with open_regular(p, error=DataError) as f:
        for lineno, obj in jsonsafe.iter_jsonl(f, where=shown, error=DataError):
            row = jsonsafe.Fields(obj, where=f"{shown}:{lineno}", error=DataError)
            question = row.str("question", "")
            answer = row.str("answer", "").strip().lower()
            if answer not in ("yes", "no") or not question:
                raise DataError(f"{shown}:{lineno}: needs 'question' and an 'answer' of yes/no")
            items.append({"passage": row.str("passage", ""), "question": question, "answer": answer})
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise DataError(f"{shown}: no yes/no items")
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


def evaluate(
    model: str,
    *,
    gains: Sequence[str | os.PathLike[str]] = (),
    base: str | None = None,
    data: Mapping[str, str | os.PathLike[str]] | None = None,
    yesno: str | os.PathLike[str] | None = None,
    yesno_limit: int | None = None,
    seq_len: int = 256,
    max_windows: int = 32,
    batch_size: int = 8,
    dtype: str = "float32",
    text_field: str = "text",
) -> dict[str, Any]:
    """Perplexity per domain (and yes/no accuracy) of ``model``, optionally with gains as hooks.

    Args:
        model: a checkpoint folder (base or merged), ``embedded:NAME``, or a PEFT adapter folder.
        gains: gain files applied as forward hooks (stacked; no merge).
        base: the base of a PEFT adapter (default: from its config).
        data: domain name -> held-out text file.
        yesno: a JSON-lines file of passage/question/answer(yes|no).
        yesno_limit: score only the first N yes/no items.
        seq_len: tokens per window; max_windows: windows per domain; batch_size: windows per forward.
        dtype: model dtype; text_field: the text field of .jsonl/.parquet files.

    Returns:
        ``{"model", "gains", ..., "domains": {name: {"nll", "tokens", "ppl"}}, "yesno": {...}}``.

    Example:
        >>> evaluate("embedded:gemma-3-270m", gains=["legal.safetensors"],
        ...          data={"legal": "legal/validation.txt"})["domains"]["legal"]["ppl"]  # doctest: +SKIP
    """
    require_extra("train", "evaluate()")
    data = dict(data or {})
    lm, tokenizer, info = load_for_eval(model, dtype, base)
    if gains:
        gain, _ = load_many(gains, allow_negative=True)
        attach(lm, gain)
    results: dict[str, Any] = {"model": model, "gains": [str(g) for g in gains], **info, "seq_len": seq_len,
                               "domains": {}}
    for name, path in data.items():
        windows = pack(tokenizer, read_documents(path, text_field), seq_len, max_windows)
        results["domains"][name] = perplexity(lm, windows, batch_size)
    if yesno:
        results["yesno"] = yesno_accuracy(lm, tokenizer, read_yesno(yesno, yesno_limit))
    return results
