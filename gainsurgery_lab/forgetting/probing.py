"""Scoring knowledge probes: the choice of highest length-normalised log-likelihood.

For an item (see :mod:`gainsurgery_lab.probes`) every choice is appended to the
prefix and scored as the mean log-probability of its own tokens given the prefix
(BOS + prefix + choice, tokenised as two pieces, so every choice sees the same
prefix tokens). Sequences of equal length are batched without padding, and the
LM head is applied only to the positions that predict a choice token: on Gemma 3
the head (262k words) costs as much per position as the rest of the model.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
from gainsurgery.training.data import adds_bos


def encode(tokenizer: Any, items: Sequence[dict], bos: list[int]) -> list[tuple[int, int, list[int], int]]:
    """``(item, choice, token ids, continuation length)`` for every choice of every item."""
    out = []
    for i, item in enumerate(items):
        prefix = bos + tokenizer(item["prefix"], add_special_tokens=False)["input_ids"]
        for j, choice in enumerate(item["choices"]):
            cont = tokenizer(choice, add_special_tokens=False)["input_ids"]
            out.append((i, j, prefix + cont, len(cont)))
    return out


def score_items(model: Any, tokenizer: Any, items: Sequence[dict], device: str = "cpu",
                batch_size: int = 64) -> dict[str, Any]:
    """Each item's predicted choice, and how long that took.

    Returns ``pred`` (index of the choice with the highest mean log-probability per
    token), ``correct`` (booleans) and ``scores`` (per item, per choice, nats/token),
    with ``seconds`` and ``cpu_seconds``.
    """
    import torch

    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    seqs = encode(tokenizer, items, bos)
    scores = [[-np.inf] * len(it["choices"]) for it in items]
    by_len: dict[int, list[int]] = {}
    for n, (_, _, ids, _) in enumerate(seqs):
        by_len.setdefault(len(ids), []).append(n)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for length, members in sorted(by_len.items()):
            for b in range(0, len(members), batch_size):
                chunk = members[b:b + batch_size]
                ids = torch.tensor([seqs[n][2] for n in chunk], dtype=torch.long, device=device)
                hidden = decoder(input_ids=ids).last_hidden_state
                # the LM head only where a choice token is predicted: position t predicts token t + 1
                rows = torch.tensor([r for r, n in enumerate(chunk) for _ in range(seqs[n][3])], device=device)
                cols = torch.tensor([length - 1 - seqs[n][3] + t for n in chunk for t in range(seqs[n][3])],
                                    device=device)
                logits = head(hidden[rows, cols]).float()
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                tok_lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[rows, cols + 1].unsqueeze(-1))
                tok_lp = tok_lp.squeeze(-1).cpu().numpy()
                at = 0
                for n in chunk:
                    i, j, _, c = seqs[n]
                    scores[i][j] = float(tok_lp[at:at + c].mean())
                    at += c
    pred = [int(np.argmax(s)) for s in scores]
    return {"pred": pred, "correct": [p == it["answer"] for p, it in zip(pred, items)], "scores": scores,
            "seconds": round(time.perf_counter() - t0, 1), "cpu_seconds": round(time.process_time() - c0, 1)}
