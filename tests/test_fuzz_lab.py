"""Fuzzing the forgetting experiment's records: a report over a folder someone else made.

``scripts/forgetting.py report`` and ``compare`` read experiment folders other
people made; every record there (experiment.json, base.json, windows.json,
run.json, stage-k.json, the yes/no records) is hostile input. A small complete
experiment is written, one of its records is mutated, and the report is computed
(``Results`` with its bootstrap, the markdown and the JSON): a report, or one line
(see tests/fuzzing.py).

CI runs a bounded number of examples; ``GAINSURGERY_FUZZ_EXAMPLES=N`` runs N per test.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzzing import failed, fuzz_settings, json_text, outcome, write

pytest.importorskip("numpy")
from gainsurgery_lab.forgetting.analysis import Results  # noqa: E402
from gainsurgery_lab.forgetting.report import render_markdown  # noqa: E402
from gainsurgery_lab.forgetting.data import ForgettingError  # noqa: E402

SEQ, SEQ_LEN, TEST, DEV = ["a", "b"], 4, 3, 2
RUN = "gain-ffn__stack__lr-4__s0"


def _nll(n: int, scale: float) -> list[float]:
    return [scale * (i + 1) for i in range(n)]


def experiment_records() -> dict[str, object]:
    """The records of a finished two-domain experiment with one run (relative path -> JSON value)."""
    recs: dict[str, object] = {
        "experiment.json": {"signature": {"sequence": [{"name": d} for d in SEQ], "extra_eval": [],
                                          "seq_len": SEQ_LEN, "steps": 1},
                            "config": {"steps": 1, "batch_size": 1, "test_windows": TEST, "dev_windows": DEV,
                                       "seq_len": SEQ_LEN, "base": "embedded:x"}},
        "base.json": {"test_nll": {d: _nll(TEST, 2.0) for d in SEQ}, "dev_nll": {d: _nll(DEV, 2.0) for d in SEQ},
                      "seconds": 1.0},
        "base_yesno.json": {"items": 2, "said_yes": [True, False], "correct": [True, True],
                            "answers_yes": [True, False], "seconds": 1.0},
        f"runs/{RUN}/run.json": {"method": "gain-ffn", "variant": "stack", "lr": 0.01, "lr_exponent": -4,
                                 "lr_label": "1e-02", "seed": 0},
        f"runs/{RUN}/yesno.json": {"items": 2, "said_yes": [True, True], "correct": [True, False],
                                   "answers_yes": [True, False], "seconds": 1.0},
    }
    for d in SEQ:
        recs[f"data/{d}/windows.json"] = {
            "name": d, "info": {"test_windows": TEST, "test_units": TEST, "dev_windows": DEV, "dev_units": DEV,
                                "documents_train": 4, "train_windows": 8, "split": "documents"},
            "test": {"ids": [[1, 2, 3, 4]] * TEST, "units": list(range(TEST))},
            "dev": {"ids": [[5, 6, 7, 8]] * DEV, "units": list(range(DEV))}}
    for k, d in enumerate(SEQ, start=1):
        recs[f"runs/{RUN}/stage-{k}.json"] = {
            "stage": k, "domain": d, "test_nll": {x: _nll(TEST, 1.5 + 0.1 * k) for x in SEQ[:k] or SEQ},
            "dev_nll": {d: _nll(DEV, 1.5)},
            "train": {"trainable_parameters": 10, "final_loss": 1.0, "steps": 1, "tokens": 12,
                      "seconds_per_step": 0.1},
            "seconds": {"train": 1.0, "merge": 0.5, "eval": 0.5, "stage": 2.0},
            "gains": {"max_abs_s_minus_1_stage": 0.1, "max_abs_s_minus_1_effective": 0.2}}
    recs[f"runs/{RUN}/stage-{len(SEQ)}.json"]["test_nll"] = {x: _nll(TEST, 1.7) for x in SEQ}  # type: ignore[index]
    return recs


RECORD_KEYS = ["signature", "config", "sequence", "extra_eval", "seq_len", "name", "test_nll", "dev_nll", "ids",
               "units", "info", "test", "dev", "method", "variant", "lr", "lr_exponent", "seed", "stage", "domain",
               "failed", "train", "seconds", "items", "said_yes", "correct", "answers_yes", "peft", "gains"]


def _report(out: Path) -> tuple[dict, str]:
    res = Results(out, resamples=20)
    return res.to_json(), render_markdown(res)


def test_the_seed_experiment_reports(tmp_path):
    """The unmutated records make a report with the one run in it (the fuzzer starts from a valid folder)."""
    for rel, value in experiment_records().items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(value))
    data, markdown = _report(tmp_path)
    assert [r["name"] for r in data["runs"]] == [RUN] and "gain-ffn" in markdown


@fuzz_settings(60)
@given(data=st.data())
def test_experiment_records_give_a_report_or_one_line(data):
    recs = experiment_records()
    rel = data.draw(st.sampled_from(sorted(recs)), label="record")
    work = Path(tempfile.mkdtemp(prefix="gainsurgery-fuzz-lab-"))
    try:
        for name, value in recs.items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            write(work / name, json.dumps(value).encode())
        write(work / rel, data.draw(json_text(recs[rel], 3, keys=RECORD_KEYS), label="bytes"))
        got = outcome(_report, work)
        if failed(got):
            assert isinstance(got, ForgettingError), got
        else:
            json.dumps(got[0], allow_nan=True)  # the report is data, whatever the records held
    finally:
        shutil.rmtree(work, ignore_errors=True)
