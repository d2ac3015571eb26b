"""The forgetting–adaptation front experiment (gainsurgery_lab.forgetting).

Statistics are checked against hand-computed values; the data split and the
runner run for real on a tiny random llama with a tiny tokenizer (tests/models.py).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from gainsurgery.errors import GainFileError
from gainsurgery_lab.forgetting import stats
from gainsurgery_lab.forgetting.data import ForgettingError, parse_domain, prepare_domain
from gainsurgery_lab.forgetting.records import save_domain
from gainsurgery_lab.forgetting.methods import METHODS, lr_label, lr_of
from models import TEXT_A, TEXT_B, save_tiny_lm, tiny_tokenizer

# ---------------------------------------------------------------------------------------------- stats


def test_bootstrap_point_is_the_pooled_perplexity_and_pairing_cancels():
    dw = stats.DomainWindows(units=(0, 0, 1, 2), tokens=(10, 10, 10, 5))
    bs = stats.Bootstrap({"d": dw}, resamples=500, seed=1)
    nll = np.array([20.0, 22.0, 31.0, 9.0])
    est = bs.ppl("d", nll)
    assert est.point == pytest.approx(math.exp(82.0 / 35.0))
    lo, hi = est.interval()
    assert lo <= est.point <= hi
    same = est.change_vs(bs.ppl("d", nll))
    assert same.point == 0.0 and np.all(same.boot == 0.0)  # paired: identical models never differ
    # windows of one unit move together: a resample counts both windows of unit 0 equally often
    w = bs.weights["d"]
    assert np.array_equal(w[:, 0], w[:, 1])
    assert w.shape == (500, 4) and np.all(w[:, 1:].sum(axis=1) == 3)  # 3 units drawn per resample


def test_paired_change_interval_is_narrower_than_unpaired_noise():
    rng = np.random.default_rng(0)
    units = tuple(range(40))
    bs = stats.Bootstrap({"d": stats.DomainWindows(units, (100,) * 40)}, resamples=1000, seed=0)
    doc_difficulty = rng.normal(300, 60, 40)  # documents differ a lot ...
    base = bs.ppl("d", doc_difficulty)
    better = bs.ppl("d", doc_difficulty * 0.97)  # ... but the model is uniformly 3% better in NLL
    change = better.change_vs(base)
    expected = 100 * (math.exp(0.97 * doc_difficulty.sum() / 4000) / math.exp(doc_difficulty.sum() / 4000) - 1)
    assert change.point == pytest.approx(expected)
    lo, hi = change.interval()
    assert hi < 0  # significant although per-document PPLs overlap widely
    assert hi - lo < 0.3 * abs(change.point)


def test_interpolation_along_a_front():
    xs = [0.0, -10.0, -20.0]
    ys = [0.0, 5.0, 25.0]
    assert stats.interpolate_at(xs, ys, -5.0) == pytest.approx(2.5)
    assert stats.interpolate_at(xs, ys, -15.0) == pytest.approx(15.0)
    assert math.isnan(stats.interpolate_at(xs, ys, -30.0))  # never extrapolated
    # a front that turns back (too high an lr adapts worse): the low-lr branch is used
    assert stats.interpolate_at([0.0, -10.0, -4.0], [0.0, 10.0, 40.0], -5.0) == pytest.approx(5.0)
    # a front whose smallest lr already adapts more than the target: only the returning branch crosses
    # it, so matching is cut at the best in-domain point and says "not reached" (the CPU run's gain-ffn)
    cpu = [-14.7, -22.1, -20.1, 25.8]
    assert stats.efficient_prefix(cpu) == 2 and stats.efficient_prefix([]) == 0
    assert stats.interpolate_at(cpu, [-7.5, -7.3, 26.8, 576.8], -5.0) == pytest.approx(
        26.8 + (576.8 - 26.8) * (-5.0 + 20.1) / (25.8 + 20.1))
    assert math.isnan(stats.interpolate_at(cpu[:2], [-7.5, -7.3], -5.0))
    assert stats.interpolate_at(cpu[:2], [-7.5, -7.3], -20.0) == pytest.approx(-7.5 + 0.2 * (5.3 / 7.4))
    e = [stats.Estimate(x, np.array([x, x + 1.0])) for x in xs]
    f = [stats.Estimate(y, np.array([y, y])) for y in ys]
    got = stats.interpolate_estimate(e, f, -5.0)
    assert got.point == pytest.approx(2.5)
    assert got.boot.tolist() == pytest.approx([2.5, 3.0])


def test_seed_mean_adds_a_t_interval_over_seeds_to_the_documents():
    # three seeds whose document-level replicates are constant: the spread left is the seeds'
    seeds = [stats.Estimate(v, np.full(200_000, v)) for v in (-10.0, -4.0, -1.0)]
    m = stats.seed_mean_estimate(seeds, seed=3)
    assert m.point == pytest.approx(-5.0)
    # a t-interval for the mean of 3 values: mean +- t(2, 0.975) * sd / sqrt(3), sd = sqrt(21)
    half = 4.302653 * math.sqrt(21) / math.sqrt(3)
    lo, hi = m.interval()
    assert lo == pytest.approx(-5.0 - half, rel=0.04) and hi == pytest.approx(-5.0 + half, rel=0.04)
    # identical seeds: the document-level replicates pass through unchanged, pairing kept
    docs = np.linspace(-2.0, 2.0, 4000)
    same = stats.seed_mean_estimate([stats.Estimate(0.0, docs)] * 3)
    assert same.boot.tolist() == pytest.approx(docs.tolist())
    assert (same - stats.Estimate(0.0, docs)).boot.tolist() == pytest.approx([0.0] * 4000)
    # one seed: the documents' interval alone; two methods draw their seed terms independently
    assert stats.seed_mean_estimate([stats.Estimate(1.0, docs)]).boot.tolist() == pytest.approx(docs.tolist())
    a = stats.seed_mean_estimate(seeds, seed=1)
    b = stats.seed_mean_estimate(seeds, seed=2)
    assert abs(np.corrcoef(a.boot, b.boot)[0, 1]) < 0.05
    assert stats.seed_mean_estimate([]) is None


def test_mcnemar_and_wilson_against_hand_computed_values():
    a = [True] * 6 + [True] * 10
    b = [False] * 6 + [True] * 10
    t = stats.mcnemar_exact(a, b)
    assert (t["a_only"], t["b_only"]) == (6, 0)
    assert t["p_value"] == pytest.approx(2 / 64)
    assert stats.mcnemar_exact([True, False], [True, False])["p_value"] == 1.0
    lo, hi = stats.wilson_interval(50, 100)
    assert (lo, hi) == pytest.approx((0.4038, 0.5962), abs=1e-4)


def test_a_grid_flag_overrides_one_method_and_keeps_the_presets_others(tmp_path, monkeypatch):
    from gainsurgery_lab.forgetting import presets

    # the smoke preset also scores the built-in "science" domain: this test brings its own instead
    folder, other = tmp_path / "d", tmp_path / "e"
    for f, text in ((folder, TEXT_A), (other, TEXT_B)):
        f.mkdir()
        _write(f / "train.txt", _docs(text, 10))
    monkeypatch.setitem(presets.PRESETS, "t", dict(presets.PRESETS["smoke"], yesno=0, eval_domains=[f"b={other}"]))
    kw = dict(out=str(tmp_path / "out"), preset="t", domains=[f"a={folder}"], eval_domains=[])
    cfg = presets.make_config(**kw, grids=presets.parse_grids(["lora=-9,-8"]))
    assert cfg.grids == {"gain-ffn": [-4, -3], "lora": [-9, -8]}
    assert presets.make_config(**kw, grids={}).grids == {"gain-ffn": [-4, -3], "lora": [-6, -5]}


def test_lr_grid_is_half_decades():
    assert lr_of(-4) == pytest.approx(1e-2)
    assert lr_of(-5) == pytest.approx(10 ** -2.5)
    assert lr_label(-5) == "3.2e-03" and lr_label(-4) == "1e-02"
    for m in METHODS.values():
        if m.extend:
            assert len(m.grid) >= 4 and list(m.grid) == list(range(m.grid[0], m.grid[0] + len(m.grid)))


# ----------------------------------------------------------------------------------------------- data


def _docs(text: str, n: int, seed: int = 0) -> list[str]:
    """``n`` documents of varied length, each opening with a unique marker ``(doc i)``.

    Each is a random draw of ``text``'s words, so no two share a run of 13 words (the
    split drops training documents that share one with a held-out window).
    """
    rng = random.Random(seed)
    words = text.split()
    docs = []
    for i in range(n):
        body, size = [], rng.randint(60, 700)
        while sum(len(w) + 1 for w in body) < size:
            body.append(rng.choice(words))
        docs.append(f"(doc {i:b}) " + " ".join(body))
    return docs


def _write(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n\n".join(docs), encoding="utf-8")
    return path


def test_domain_split_is_by_document_disjoint_and_stable(tmp_path):
    tok = tiny_tokenizer()
    train = _write(tmp_path / "a.txt", _docs(TEXT_A, 60))
    spec = parse_domain(f"a={train}")
    dom = prepare_domain(spec, tok, 32, 10, 6, tmp_path / "w", min_train_windows=2)
    assert not (tmp_path / "w").exists()  # split in memory; written only when saved
    save_domain(dom)
    assert len(dom.test.ids) == 10 and len(dom.dev.ids) == 6
    assert all(len(w) == 32 and w[0] == tok.bos_token_id for w in dom.test.ids + dom.dev.ids)
    for split in (dom.test, dom.dev):
        counts = {u: split.units.count(u) for u in split.units}
        assert max(counts.values()) <= 2
    assert not set(dom.test.units) & set(dom.dev.units)
    # no test or dev document is trained on
    import re

    train_text = (tmp_path / "w" / "train.txt").read_text(encoding="utf-8")
    held_out = {m for w in dom.test.ids + dom.dev.ids for m in re.findall(r"\(doc [01]+\)", tok.decode(w))}
    assert held_out and not any(m in train_text for m in held_out)
    assert len(re.findall(r"\(doc [01]+\)", train_text)) == dom.train_documents
    again = prepare_domain(spec, tok, 32, 10, 6, tmp_path / "w2", min_train_windows=2)
    assert again.test.ids == dom.test.ids and again.dev.ids == dom.dev.ids


def test_domain_forms_and_one_line_errors(tmp_path):
    tok = tiny_tokenizer()
    folder = tmp_path / "corpus"
    folder.mkdir()
    _write(folder / "train.txt", _docs(TEXT_B, 40))
    (folder / "validation.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in _docs(TEXT_B, 30, 1)))
    spec = parse_domain(f"code={folder}")
    assert spec.train.name == "train.txt" and spec.valid.name == "validation.jsonl"
    dom = prepare_domain(spec, tok, 32, 8, 4, tmp_path / "w", min_train_windows=2)
    assert dom.info["split"] == "validation file" and dom.train_documents == 40
    with pytest.raises(ForgettingError, match="no such file"):
        parse_domain(f"x={tmp_path / 'missing.txt'}")
    with pytest.raises(ForgettingError, match="unknown built-in domain"):
        parse_domain("not-a-domain")
    small = _write(tmp_path / "small.txt", _docs(TEXT_A, 3))
    with pytest.raises(ForgettingError, match="test windows") as err:
        prepare_domain(parse_domain(f"s={small}"), tok, 32, 32, 8, tmp_path / "w3", min_train_windows=2)
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------- runner


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory):
    """A real (tiny) experiment: 2 stages, gain-ffn and parameter-matched LoRA, extras and yes/no."""
    from gainsurgery_lab.forgetting.config import ExperimentConfig
    from gainsurgery_lab.forgetting.runner import Experiment

    root = tmp_path_factory.mktemp("forgetting")
    base = save_tiny_lm(root / "base", "llama", torch.bfloat16)
    files = {n: _write(root / f"{n}.txt", _docs(t, 60, i)) for i, (n, t) in
             enumerate([("a", TEXT_A), ("b", TEXT_B), ("c", TEXT_A[::-1])])}
    yn = root / "yesno.jsonl"
    yn.write_text("\n".join(json.dumps({"passage": "the court held", "question": f"is it {i}",
                                        "answer": "yes" if i % 3 else "no"}) for i in range(12)))
    cfg = ExperimentConfig(
        base=str(base), out=str(root / "out"), sequence=[parse_domain(f"a={files['a']}"),
                                                         parse_domain(f"b={files['b']}")],
        extra_eval=[parse_domain(f"c={files['c']}")], front_methods=["gain-ffn", "lora-matched"],
        seed_methods=["gain-ffn"], extra_methods=["full"], variants=["gain-ffn:continue", "gain-ffn:swap"],
        grids={"gain-ffn": [-4, -3], "lora-matched": [-4, -3], "full": [-8]}, max_extensions=1, seeds=2,
        steps=3, batch_size=2, seq_len=32, test_windows=8, dev_windows=4, yesno=10, yesno_file=str(yn))
    exp = Experiment(cfg, echo=None)
    exp.execute()
    return exp


def _runs(exp) -> dict[str, list[dict]]:
    return {p.name: exp.runs.stages_done(_key(exp, p.name)) for p in (exp.out / "runs").iterdir()}


def _key(exp, name):
    from gainsurgery_lab.forgetting.config import RunKey

    info = json.loads((exp.out / "runs" / name / "run.json").read_text())
    return RunKey(info["method"], info["variant"], info["lr_exponent"], info["seed"])


def test_runner_runs_the_schedule(tiny_experiment):
    exp = tiny_experiment
    runs = _runs(exp)
    names = set(runs)
    # fronts (+ one extension each, the tiny model wants the largest lr), seeds, variants, extras
    assert {"gain-ffn__stack__lr-4__s0", "gain-ffn__stack__lr-3__s0", "lora-matched__merge__lr-4__s0",
            "lora-matched__merge__lr-3__s0", "full__sequential__lr-8__s0"} <= names
    chosen = exp.plan.chosen("gain-ffn", exp.runs.base_scores())
    assert f"gain-ffn__stack__lr{chosen}__s1" in names
    assert f"gain-ffn__continue__lr{chosen}__s0" in names and f"gain-ffn__swap__lr{chosen}__s0" in names
    for name, stages in runs.items():
        assert len(stages) == 2 and not stages[-1].get("failed"), name
        for rec in stages:
            assert len(rec["dev_nll"][rec["domain"]]) == 4
            tests = rec["test_nll"]
            expect = {rec["domain"]} if "__swap__" in name else ({"a"} if rec["stage"] == 1 else {"a", "b", "c"})
            assert set(tests) == expect
            assert all(len(v) == 8 and all(math.isfinite(x) and x > 0 for x in v) for v in tests.values())
    # parameter-matched LoRA: rank 1 on o_proj (32 -> 32) and down_proj (64 -> 32), 2 layers
    lm = runs["lora-matched__merge__lr-4__s0"][0]
    assert lm["train"]["trainable_parameters"] == 2 * ((32 + 32) + (64 + 32))
    assert lm["peft"]["target_modules"] == ["down_proj", "o_proj"] and lm["peft"]["r"] == 1
    assert runs["gain-ffn__stack__lr-4__s0"][0]["train"]["trainable_parameters"] == 2 * (32 + 64)
    # stacking: the effective gain after stage 2 moved further than either file alone
    g = runs["gain-ffn__stack__lr-3__s0"][1]["gains"]
    assert g["max_abs_s_minus_1_effective"] > 0
    # memory: each stage records its own peak (a window reset at its start)
    assert all(rec["stage_peak_rss_mib"] > 0 for stages in runs.values() for rec in stages)


def test_a_stage_peak_memory_window_forgets_an_earlier_bigger_peak():
    import subprocess
    import sys

    from gainsurgery_lab.forgetting.stages import reset_peak_rss

    if not reset_peak_rss():
        pytest.skip("no /proc/self/clear_refs (not Linux)")
    # in a fresh process: a test worker's allocator may hand back memory it already holds
    code = """
import numpy as np
from gainsurgery_lab.forgetting.stages import reset_peak_rss, window_peak_rss_mib
assert reset_peak_rss()
start = window_peak_rss_mib()
big = np.ones(64 * 2**20 // 8 * 4)  # 256 MiB, touched
before = window_peak_rss_mib()
del big  # an allocation this large is unmapped on free
assert reset_peak_rss()
print(start, before, window_peak_rss_mib())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    start, before, after = map(float, out.split())
    assert before - start > 200  # the window saw the 256 MiB
    assert before - after > 200  # the next window does not carry them


def test_seed_changes_the_run_and_the_same_seed_reproduces(tiny_experiment, tmp_path):
    exp = tiny_experiment
    e = exp.plan.chosen("gain-ffn", exp.runs.base_scores())
    s0 = exp.runs.stages_done(_key(exp, f"gain-ffn__stack__lr{e}__s0"))
    s1 = exp.runs.stages_done(_key(exp, f"gain-ffn__stack__lr{e}__s1"))
    assert s0[0]["test_nll"]["a"] != s1[0]["test_nll"]["a"]  # another data order


def test_stack_merge_equals_the_product_of_the_stage_files(tiny_experiment):
    import safetensors.torch as st

    from gainsurgery.io.checkpoint import open_checkpoint
    from gainsurgery.gainfile import load, stack

    exp = tiny_experiment
    key = _key(exp, "gain-ffn__stack__lr-3__s0")
    merged = exp.runs.merged(key, 2)  # rebuilt from the artifacts: the run kept no merged model
    first, second = load(exp.runs._artifact(key, 0)), load(exp.runs._artifact(key, 1))
    # Staged gains record what they were trained on: stage 2 trained on merged-1, not on the base.
    assert first.metadata["base_tensors_sha256"] != second.metadata["base_tensors_sha256"]
    with pytest.raises(GainFileError, match="trained on different bases"):
        stack([first, second])
    g = stack([first, second], allow_base_mismatch=True)
    base = open_checkpoint(exp.base_folder)
    for k, vec in g.vectors.items():
        shard = base.tensors[k].shard
        w = st.load_file(str(exp.base_folder / shard))[k].float()
        expect = (w * torch.from_numpy(vec)).to(torch.bfloat16)  # float32 product, rounded once
        assert torch.equal(st.load_file(str(merged / shard))[k], expect), k


def test_rerun_is_a_no_op_and_a_lost_stage_is_redone(tiny_experiment):
    from gainsurgery_lab.forgetting.runner import Experiment

    exp = tiny_experiment
    before = {p: p.stat().st_mtime_ns for p in (exp.out / "runs").rglob("stage-*.json")}
    again = Experiment(exp.cfg, echo=None)
    again.execute()
    after = {p: p.stat().st_mtime_ns for p in (exp.out / "runs").rglob("stage-*.json")}
    assert before == after
    # a run killed after stage 1: its stage-2 record and every merged model are gone
    key = _key(exp, "lora-matched__merge__lr-3__s0")
    d = exp.runs.run_dir(key)
    old = json.loads((d / "stage-2.json").read_text())
    (d / "stage-2.json").unlink()
    again.runs.run(key)
    new = json.loads((d / "stage-2.json").read_text())
    assert set(new["test_nll"]) == set(old["test_nll"])
    for d in old["test_nll"]:  # same seed, same data: the same result
        assert new["test_nll"][d] == pytest.approx(old["test_nll"][d], rel=1e-5)


def test_changed_settings_refuse_the_folder(tiny_experiment):
    import dataclasses

    from gainsurgery_lab.forgetting.runner import Experiment

    cfg = dataclasses.replace(tiny_experiment.cfg, steps=4)
    with pytest.raises(ForgettingError, match="other settings"):
        Experiment(cfg, echo=None)


def test_report_numbers_come_from_the_stored_nlls(tiny_experiment):
    from gainsurgery_lab.forgetting.report import write_report

    exp = tiny_experiment
    paths = write_report(exp.out, resamples=200)
    data = json.loads((exp.out / "results.json").read_text())
    base = json.loads((exp.out / "base.json").read_text())
    row = next(r for r in data["runs"] if r["name"] == "gain-ffn__stack__lr-4__s0")
    stages = exp.runs.stages_done(_key(exp, row["name"]))

    def ppl(nll):
        return math.exp(sum(nll) / (len(nll) * 31))

    own = [100 * (ppl(s["test_nll"][d]) / ppl(base["test_nll"][d]) - 1) for s, d in zip(stages, ["a", "b"])]
    assert row["in_domain"]["value"] == pytest.approx(np.mean(own))
    earlier = 100 * (ppl(stages[1]["test_nll"]["a"]) / ppl(base["test_nll"]["a"]) - 1)
    assert row["earlier_vs_base"]["value"] == pytest.approx(earlier)
    bwt = 100 * (ppl(stages[1]["test_nll"]["a"]) / ppl(stages[0]["test_nll"]["a"]) - 1)
    assert row["earlier_vs_own"]["value"] == pytest.approx(bwt)
    assert row["earlier_vs_base"]["lo"] <= row["earlier_vs_base"]["value"] <= row["earlier_vs_base"]["hi"]
    swap = next(r for r in data["runs"] if r["variant"] == "swap")
    assert swap["earlier_vs_own"]["value"] == 0.0  # zero forgetting by construction
    assert data["base_yesno"]["items"] == 10
    yn = [r for r in data["runs"] if r.get("yesno")]
    assert yn and all(0.0 <= r["yesno"]["mcnemar"]["p_value"] <= 1.0 for r in yn)
    md = (exp.out / "results.md").read_text()
    assert "## Fronts" in md and "lora-matched" in md and "McNemar" in md
    assert "peak RSS of a stage (MiB)" in md and row["stage_peak_rss_mib"] > 0
    assert any(p.name == "front.png" for p in paths) and any(p.name.startswith("heatmap-") for p in paths)


def test_report_averages_the_chosen_points_over_seeds_and_pairs_methods(tiny_experiment, tmp_path):
    import dataclasses
    import shutil

    from gainsurgery_lab.forgetting.analysis import Results
    from gainsurgery_lab.forgetting.report import write_report
    from gainsurgery_lab.forgetting.runner import Experiment

    out = tmp_path / "out"
    shutil.copytree(tiny_experiment.out, out)
    # a second seed of lora-matched too, so two methods have seeds to compare
    cfg = dataclasses.replace(tiny_experiment.cfg, out=str(out), seed_methods=["gain-ffn", "lora-matched"],
                              phases=["seeds", "yesno"])
    Experiment(cfg, echo=None).execute()
    write_report(out, resamples=300)
    data = json.loads((out / "results.json").read_text())
    summary = data["seeds_at_chosen"]
    assert set(summary["methods"]) == {"gain-ffn", "lora-matched"}
    res = Results(out, resamples=300)
    for m, row in summary["methods"].items():
        runs = res.seeds(m)
        assert row["seeds"] == [0, 1] and [r.seed for r in runs] == [0, 1]
        for key in ("in_domain", "earlier_vs_base", "earlier_vs_own", "untrained"):
            vals = [r.metrics[key].point for r in runs]
            got = row["metrics"][key]
            assert got["value"] == pytest.approx(np.mean(vals)) and got["per_seed"] == pytest.approx(vals)
            assert got["sd_over_seeds"] == pytest.approx(np.std(vals, ddof=1))
            assert got["lo"] <= got["value"] <= got["hi"]
        assert len(row["yesno"]["accuracy_per_seed"]) == 2
    diff = summary["differences"]["gain-ffn - lora-matched"]["earlier_vs_base"]
    a = summary["methods"]["gain-ffn"]["metrics"]["earlier_vs_base"]["value"]
    b = summary["methods"]["lora-matched"]["metrics"]["earlier_vs_base"]["value"]
    assert diff["value"] == pytest.approx(a - b) and diff["lo"] <= diff["value"] <= diff["hi"]
    md = (out / "results.md").read_text()
    assert "## The chosen points over seeds" in md and "| gain-ffn − lora-matched |" in md


def test_deadline_starts_nothing_new_and_a_later_run_finishes(tiny_experiment, tmp_path):
    import dataclasses
    import time

    from gainsurgery_lab.forgetting.runner import Experiment

    exp = tiny_experiment
    cfg = dataclasses.replace(exp.cfg, out=str(tmp_path / "out"), front_methods=["gain-ffn"], seed_methods=[],
                              extra_methods=[], variants=[], yesno=0, max_extensions=0)
    late = Experiment(dataclasses.replace(cfg, deadline=time.time() - 1), echo=None)
    late.execute()
    assert not (tmp_path / "out" / "runs").exists()  # past the deadline: no run even starts
    Experiment(cfg, echo=None).execute(worker=(1, 2))  # a worker: every second run of the initial grid
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir()) == ["gain-ffn__stack__lr-3__s0"]
    Experiment(cfg, echo=None).execute()
    assert sorted(p.name for p in (tmp_path / "out" / "runs").iterdir()) == [
        "gain-ffn__stack__lr-3__s0", "gain-ffn__stack__lr-4__s0"]


def test_a_deadline_between_stages_stops_the_run_and_a_later_call_resumes_it(tiny_experiment, tmp_path):
    import dataclasses
    import json

    from gainsurgery_lab.forgetting.runner import Experiment

    cfg = dataclasses.replace(tiny_experiment.cfg, out=str(tmp_path / "out"), front_methods=["gain-ffn"],
                              seed_methods=[], extra_methods=[], variants=[], yesno=0, max_extensions=0)

    class CutAfterOneStage(Experiment):  # the clock runs out once the first stage is on disk
        def out_of_time(self):
            return any(self.out.glob("runs/*/stage-1.json"))

    key = Experiment(cfg, echo=None).plan.static_keys()[0]
    cut = CutAfterOneStage(cfg, echo=None)
    cut.prepare()
    cut.runs.base_scores()
    assert len(cut.runs.run(key)) == 1
    assert not (cut.runs.run_dir(key) / "stage-2.json").exists()
    first = json.loads((cut.runs.run_dir(key) / "stage-1.json").read_text())
    later = Experiment(cfg, echo=None)
    later.prepare()
    done = later.runs.run(key)
    assert [r["stage"] for r in done] == [1, 2]
    assert done[0]["test_nll"] == first["test_nll"]  # stage 1 was kept, not retrained


def test_a_domain_only_scored_needs_no_training_text(tiny_experiment, tmp_path):
    import dataclasses

    from gainsurgery_lab.forgetting.data import ForgettingError
    from gainsurgery_lab.forgetting.runner import Experiment

    # twelve short documents: the 8 test + 4 dev windows fit, one batch of 64 training windows does not
    small = parse_domain(f"d={_write(tmp_path / 'd.txt', _docs(TEXT_B, 12, 7))}")
    cfg = dataclasses.replace(tiny_experiment.cfg, batch_size=64, grad_accum=1, steps=100)
    scored = Experiment(dataclasses.replace(cfg, out=str(tmp_path / "scored"), extra_eval=[small]), echo=None)
    scored.prepare()
    assert (len(scored.domains["d"].test.ids), len(scored.domains["d"].dev.ids)) == (8, 4)
    log = (scored.out / "log.txt").read_text()
    warned = []
    for name in ("a", "b"):  # a stage draws 100 x 64 windows: warned where that is over 4 epochs
        n = scored.domains[name].info["train_windows"]
        assert (f"domain {name}: warning: a stage draws 6400 windows from {n} " in log) == (6400 > 4 * n)
        warned.append(6400 > 4 * n)
    assert any(warned) and "domain d: warning" not in log  # d is scored only
    trained = Experiment(dataclasses.replace(cfg, out=str(tmp_path / "trained"), sequence=[cfg.sequence[0], small]),
                         echo=None)
    with pytest.raises(ForgettingError, match=r"domain d: its training text gives \d+ windows of 32 tokens; "
                                              r"need at least 64"):
        trained.prepare()


def test_compare_two_runs_with_paired_intervals(tiny_experiment):
    import re

    from gainsurgery_lab.forgetting.analysis import Results
    from gainsurgery_lab.forgetting.report import compare_runs
    from gainsurgery_lab.forgetting.data import ForgettingError

    exp = tiny_experiment
    a, b = "gain-ffn__stack__lr-4__s0", "lora-matched__merge__lr-4__s0"
    table = compare_runs(exp.out, a, b, resamples=200)
    runs = {r.name: r for r in Results(exp.out, resamples=200).runs}
    row = next(line for line in table.splitlines() if line.startswith("| earlier vs base |"))
    va, vb, diff = (float(re.match(r"\s*([+-]?[\d.]+)", c).group(1)) for c in row.split("|")[2:5])
    assert va == pytest.approx(runs[a].metrics["earlier_vs_base"].point, abs=0.051)
    assert vb == pytest.approx(runs[b].metrics["earlier_vs_base"].point, abs=0.051)
    assert diff == pytest.approx(va - vb, abs=0.11)
    with pytest.raises(ForgettingError, match="'nope' is not a finished run"):
        compare_runs(exp.out, a, "nope")


def test_a_front_that_adapts_too_much_at_its_smallest_lr_gets_smaller_lrs(tiny_experiment, tmp_path):
    import dataclasses

    from gainsurgery_lab.forgetting.runner import Experiment

    # lora-matched at lr 1e-6 barely moves the model; gain-ffn's smallest lr (1e-2) adapts far more,
    # so gain-ffn's front cannot be read at lora-matched's chosen point until it gets a smaller lr
    cfg = dataclasses.replace(tiny_experiment.cfg, out=str(tmp_path / "out"), seed_methods=[], extra_methods=[],
                              variants=[], yesno=0, max_extensions=1, phases=["fronts"],
                              grids={"gain-ffn": [-4, -3], "lora-matched": [-12, -11]})
    exp = Experiment(cfg, echo=None)
    exp.execute()
    base = exp.runs.base_scores()
    tried = sorted(exp.plan.tried_exponents("gain-ffn"))
    assert tried[0] == -5  # one below the grid: the limit (max_extensions=1)
    log = (exp.out / "log.txt").read_text()
    assert "gain-ffn: its smallest lr (1e-02) adapts more than the chosen point of lora-matched; adding lr 3.2e-03" in log
    chosen = exp.plan.chosen("lora-matched", base)
    target = exp.plan.dev_score(exp_key(exp, "lora-matched", chosen), base)
    assert exp.plan.dev_score(exp_key(exp, "gain-ffn", -4), base) < target  # the reason, on dev scores
    assert "lora-matched: its smallest lr" not in log  # it already reaches gain-ffn's point


def exp_key(exp, method, e):
    from gainsurgery_lab.forgetting.methods import METHODS
    from gainsurgery_lab.forgetting.config import RunKey

    return RunKey(method, METHODS[method].default_variant, e, 0)


def test_static_keys_interleave_methods_middle_out(tiny_experiment):
    import dataclasses

    from gainsurgery_lab.forgetting.runner import Experiment

    cfg = dataclasses.replace(tiny_experiment.cfg, front_methods=["gain-ffn", "lora-matched"], extra_methods=["full"],
                              grids={"gain-ffn": [-6, -5, -4, -3, -2], "lora-matched": [-5, -4, -3], "full": [-8]})
    keys = [(k.method, k.e) for k in Experiment(cfg, echo=None).plan.static_keys()]
    assert keys == [("gain-ffn", -4), ("lora-matched", -4), ("gain-ffn", -5), ("lora-matched", -5),
                    ("gain-ffn", -3), ("lora-matched", -3), ("gain-ffn", -6), ("gain-ffn", -2), ("full", -8)]
