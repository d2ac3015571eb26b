"""Issue 21's parts of the forgetting experiment: clean test sets, knowledge probes, the lr choice over seeds.

Everything runs for real on a tiny random llama with a tiny tokenizer (tests/models.py) and on
corpora and probe items built here; nothing is read from the user's cache.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from gainsurgery_lab import probes
from gainsurgery_lab.forgetting.data import NGRAM, ForgettingError, ngram_words, ngrams, parse_domain, prepare_domain
from gainsurgery_lab.forgetting.selection import choose
from models import TEXT_A, TEXT_B, save_tiny_lm, tiny_tokenizer

WORDS = sorted(set(TEXT_A.split()) | set(TEXT_B.split()))


def _random_docs(n: int, seed: int, words: int = 80) -> list[str]:
    rng = random.Random(seed)
    return [f"(doc {i:b}) " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(n)]


# ----------------------------------------------------------------------------------- the lr choice


def test_the_tie_rule_takes_the_smallest_lr_within_one_seed_sd_of_the_best():
    # best mean at -4 (-0.255), its sd over two seeds 0.0071: -5's mean (-0.25) is within it, -6's is not
    scores = {-6: [-0.10, -0.12], -5: [-0.25, -0.25], -4: [-0.26, -0.25], -3: [-0.20, -0.10]}
    sel = choose(scores, seeds=2)
    assert sel.best == -4 and sel.chosen == -5
    assert sel.sd_best == pytest.approx(np.std([-0.26, -0.25], ddof=1))
    assert sel.threshold == pytest.approx(-0.255 + sel.sd_best)
    assert sel.margin == pytest.approx(0.005)
    assert sel.neighbours(-5) == {"smaller": -6, "larger": -4}
    # seeds that agree exactly: no tie, the best is chosen
    assert choose({-5: [-0.2, -0.2], -4: [-0.3, -0.3]}, seeds=2).chosen == -4
    # one seed: the sd is 0 and the rule is "the best"
    assert choose({-5: [-0.29], -4: [-0.3]}, seeds=1).chosen == -4


def test_the_choice_ignores_lrs_not_finished_at_every_seed_and_never_picks_a_failed_one():
    sel = choose({-5: [-0.2], -4: [-0.3, -0.31], -3: [math.inf, -0.5]}, seeds=2)
    assert sorted(sel.scores) == [-4, -3] and sel.best == -4 and sel.chosen == -4
    assert not math.isfinite(sel.mean[-3])
    empty = choose({-4: [math.inf, math.inf]}, seeds=2)
    assert empty.best is None and empty.chosen is None and math.isnan(empty.margin)
    d = sel.as_dict()
    assert d["per_lr"]["-3"]["mean"] is None and d["chosen"] == -4 and json.dumps(d, allow_nan=False)


# ------------------------------------------------------------------------------------ clean test sets


def test_ngram_normalisation_ignores_case_punctuation_and_layout():
    assert ngram_words("The  Software,\nis PROVIDED (as-is).") == ["the", "software", "is", "provided", "as", "is"]
    text = " ".join(f"w{i}" for i in range(20))
    assert len(ngrams(text)) == 20 - NGRAM + 1
    assert ngrams(text.upper().replace(" ", "\n  ")) == ngrams(text)
    assert ngrams("too short to hold a run") == set()


def test_training_documents_that_share_a_13_gram_with_a_held_out_window_are_dropped(tmp_path):
    tok = tiny_tokenizer()
    docs = _random_docs(50, seed=1)
    spec = parse_domain(f"a={_write(tmp_path / 'a.txt', docs)}")
    clean = prepare_domain(spec, tok, 64, 6, 4, tmp_path / "w0", min_train_windows=2)
    assert clean.info["ngram_dropped"] == 0 and clean.info["dev_skipped"] == 0
    # plant, in two training documents, runs of words copied from a test window and from a dev window
    test_words = ngram_words(tok.decode(clean.test.ids[0], skip_special_tokens=True))
    dev_words = ngram_words(tok.decode(clean.dev.ids[0], skip_special_tokens=True))
    assert len(test_words) >= NGRAM and len(dev_words) >= NGRAM + 2  # 64-token windows hold enough words
    train = [d for d in docs if d in clean.train_text.split("\n\n\n")]
    victims = train[:3]
    planted = {victims[0]: victims[0] + " " + " ".join(test_words[:NGRAM]).upper() + ".",
               victims[1]: victims[1] + "\n" + ", ".join(dev_words[2:2 + NGRAM]),
               victims[2]: victims[2] + " " + " ".join(test_words[:NGRAM - 1])}  # 12 words: kept
    spec2 = parse_domain(f"a={_write(tmp_path / 'b.txt', [planted.get(d, d) for d in docs])}")
    dom = prepare_domain(spec2, tok, 64, 6, 4, tmp_path / "w1", min_train_windows=2)
    assert dom.test.ids == clean.test.ids and dom.dev.ids == clean.dev.ids
    kept = dom.train_text.split("\n\n\n")
    assert planted[victims[0]] not in kept and planted[victims[1]] not in kept and planted[victims[2]] in kept
    assert dom.info["ngram_dropped"] == 2 and dom.info["documents_train"] == clean.info["documents_train"] - 2
    assert dom.info["ngram_dropped_chars"] == len(planted[victims[0]]) + len(planted[victims[1]])


def test_a_dev_document_that_repeats_test_text_is_skipped(tmp_path):
    tok = tiny_tokenizer()
    docs = _random_docs(50, seed=2)
    spec = parse_domain(f"a={_write(tmp_path / 'a.txt', docs)}")
    first = prepare_domain(spec, tok, 32, 6, 4, tmp_path / "w0", min_train_windows=2)
    test_text = " ".join(ngram_words(tok.decode(first.test.ids[0], skip_special_tokens=True))[:NGRAM])
    # every document that became a dev document now quotes the test window: none may be dev any more
    markers = {m for w in first.dev.ids for m in re.findall(r"\(doc [01]+\)", tok.decode(w))}
    dev_docs = {d for d in docs if d.split(" ", 2)[0] + " " + d.split(" ", 2)[1] in markers}
    changed = [d + " " + test_text if d in dev_docs else d for d in docs]
    again = prepare_domain(parse_domain(f"a={_write(tmp_path / 'b.txt', changed)}"), tok, 32, 6, 4, tmp_path / "w1",
                           min_train_windows=2)
    assert again.test.ids == first.test.ids
    assert again.info["dev_skipped"] >= len(dev_docs) >= 1
    test_grams = set()
    for w in again.test.ids:
        test_grams |= ngrams(tok.decode(w, skip_special_tokens=True))
    for w in again.dev.ids:
        assert not ngrams(tok.decode(w, skip_special_tokens=True)) & test_grams


def test_a_domain_whose_every_training_document_repeats_held_out_text_is_one_line_error(tmp_path):
    tok = tiny_tokenizer()
    same = " ".join(WORDS[:20])
    docs = [f"(doc {i}) {same} " + " ".join(random.Random(i).choice(WORDS) for _ in range(60)) for i in range(40)]
    with pytest.raises(ForgettingError, match="share a 13-word run with a test window") as err:
        prepare_domain(parse_domain(f"a={_write(tmp_path / 'a.txt', docs)}"), tok, 64, 6, 4, tmp_path / "w",
                       min_train_windows=2)
    assert "\n" not in str(err.value)


def _write(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n\n".join(docs), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------ probe items


COUNTRIES = {"FR": {"name": "France", "continent": "EU", "capital": "Paris", "currency": ["EUR"], "languages": ["fr"]},
             "DE": {"name": "Germany", "continent": "EU", "capital": "Berlin", "currency": ["EUR"],
                    "languages": ["de"]},
             "JP": {"name": "Japan", "continent": "AS", "capital": "Tokyo", "currency": ["JPY"], "languages": ["ja"]},
             "CH": {"name": "Switzerland", "continent": "EU", "capital": "Bern", "currency": ["CHF"],
                    "languages": ["de", "fr", "it"]},
             "BR": {"name": "Brazil", "continent": "SA", "capital": "Brasília", "currency": ["BRL"],
                    "languages": ["pt"]},
             "AQ": {"name": "Antarctica", "continent": "AN", "capital": "", "currency": [], "languages": []},
             "KE": {"name": "Kenya", "continent": "AF", "capital": "Nairobi", "currency": ["KES"], "languages": ["en"]}}
CONTINENTS = {"AF": "Africa", "AN": "Antarctica", "AS": "Asia", "EU": "Europe", "NA": "North America",
              "OC": "Oceania", "SA": "South America"}
LANGUAGES = {k: {"name": v} for k, v in {"fr": "French", "de": "German", "ja": "Japanese", "it": "Italian",
                                         "pt": "Portuguese", "en": "English"}.items()}
CURRENCIES = {k: {"name": v} for k, v in {"EUR": "Euro", "JPY": "Japanese Yen", "CHF": "Swiss Franc",
                                          "BRL": "Brazilian Real", "KES": "Kenyan Shilling"}.items()}


def test_probe_items_are_four_way_statements_with_the_gold_among_plausible_distractors():
    items = probes.country_items(COUNTRIES, CONTINENTS, LANGUAGES, CURRENCIES)
    by = {it["id"]: it for it in items}
    fr = by["capital:FR"]
    assert fr["prefix"] == "The capital of France is" and fr["choices"][fr["answer"]] == " Paris."
    assert len(fr["choices"]) == 4 and len(set(fr["choices"])) == 4
    assert set(fr["choices"]) <= {f" {c['capital']}." for c in COUNTRIES.values() if c["capital"]}
    assert "capital:AQ" not in by and "continent:AQ" not in by  # no capital; Antarctica is no answer
    assert all(" Antarctica." not in it["choices"] for it in items if it["probe"] == "continent")
    ch = by["language:CH"]  # every official language is kept out of the distractors
    assert ch["choices"][ch["answer"]] == " German." and not {" French.", " Italian."} & set(ch["choices"])
    de = by["currency:DE"]
    assert de["prefix"] == "The currency of Germany is the" and de["choices"][de["answer"]] == " Euro."
    assert items == probes.country_items(COUNTRIES, CONTINENTS, LANGUAGES, CURRENCIES)  # seeded
    assert {it["split"] for it in items} <= {"dev", "test"}
    assert all(it["split"] == probes.split_of(it["id"]) for it in items)
    share = np.mean([probes.split_of(f"x:{i}") == "dev" for i in range(3000)])
    assert 0.28 < share < 0.39


def test_elements_are_read_from_the_table_as_data_never_run():
    source = ("import os\nos.system('echo pwned')\n"
              "element_base: dict = {\n 0: ('neutron', 'n', [], []),\n 1: ('Hydrogen', 'H', [-1, 1], []),\n"
              " 2: ('Helium', 'He', [], []),\n 79: ('Gold', 'Au', [3], []),\n 80: ('Mercury', 'Hg', [], []),\n"
              " 26: ('Iron', 'Fe', [], [])}\n")
    table = probes.parse_element_base(source)
    items = probes.element_items(table)
    gold = next(it for it in items if it["id"] == "element:79")
    assert gold["prefix"] == "The chemical symbol of gold is" and gold["choices"][gold["answer"]] == " Au."
    assert "element:0" not in {it["id"] for it in items}
    with pytest.raises(probes.ProbeError, match="no element_base"):
        probes.parse_element_base("element_base = compute()\n")
    with pytest.raises(probes.ProbeError, match="no element_base"):
        probes.parse_element_base("element_base = {1: __import__('os').getcwd()}\n")


@pytest.mark.parametrize("line, match", [
    ({"probe": "x", "id": "x:1", "prefix": "p", "choices": [" a"], "answer": 0, "split": "dev"}, "2 to 16"),
    ({"probe": "x", "id": "x:1", "prefix": "p", "choices": [" a", " b"], "answer": 2, "split": "dev"}, "answer"),
    ({"probe": "x", "id": "x:1", "prefix": "p", "choices": [" a", " b"], "answer": 0, "split": "train"}, "split"),
    ({"probe": "x", "id": "x:1", "prefix": "p", "choices": [" a", 3], "answer": 0, "split": "dev"}, "2 to 16"),
])
def test_a_hostile_probe_file_is_a_one_line_error(tmp_path, line, match):
    path = tmp_path / "items.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(probes.ProbeError, match=match):
        probes.read_items(path)
    with pytest.raises(probes.ProbeError, match="fetch_domains.py --probes"):
        probes.read_items(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------ probe scoring


def test_probe_scoring_is_the_mean_log_probability_of_each_choice(tmp_path):
    from gainsurgery_lab.forgetting.probing import score_items
    from gainsurgery.training.modeling import load_causal_lm

    base = save_tiny_lm(tmp_path / "base", "llama", torch.float32)
    model, tok = load_causal_lm(base, "float32"), tiny_tokenizer()
    items = [{"prefix": "the court held that", "choices": [" the work.", " a right", " copies of the software.",
                                                           " def add(a, b):"], "answer": 2},
             {"prefix": "for i in", "choices": [" range(10):", " the court"], "answer": 0}]
    got = score_items(model, tok, items, batch_size=3)
    for item, scores, pred in zip(items, got["scores"], got["pred"]):
        prefix = [tok.bos_token_id] + tok(item["prefix"], add_special_tokens=False)["input_ids"]
        expect = []
        for choice in item["choices"]:
            cont = tok(choice, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prefix + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            expect.append(float(np.mean([logp[len(prefix) - 1 + t, c].item() for t, c in enumerate(cont)])))
        assert scores == pytest.approx(expect, abs=1e-4)
        assert pred == int(np.argmax(expect))
    assert got["correct"] == [p == it["answer"] for p, it in zip(got["pred"], items)]


# ------------------------------------------------------------------------------------ the runner


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A tiny experiment with two selection seeds at every lr, a third at the chosen one, and the probes."""
    from gainsurgery_lab.forgetting.config import ExperimentConfig
    from gainsurgery_lab.forgetting.runner import Experiment

    root = tmp_path_factory.mktemp("seeded")
    base = save_tiny_lm(root / "base", "llama", torch.bfloat16)
    files = {n: _write(root / f"{n}.txt", _random_docs(60, i)) for i, n in enumerate("abc")}
    items = probes.country_items(COUNTRIES, CONTINENTS, LANGUAGES, CURRENCIES)
    (root / "items.jsonl").write_text("".join(json.dumps(it) + "\n" for it in items))
    cfg = ExperimentConfig(
        base=str(base), out=str(root / "out"), sequence=[parse_domain(f"a={files['a']}"),
                                                         parse_domain(f"b={files['b']}")],
        extra_eval=[parse_domain(f"c={files['c']}")], front_methods=["gain-ffn", "lora-matched"],
        seed_methods=["gain-ffn", "lora-matched"], extra_methods=[], variants=[],
        grids={"gain-ffn": [-4, -3], "lora-matched": [-5, -4]}, max_extensions=0, seeds=3, select_seeds=2,
        steps=2, batch_size=2, seq_len=32, test_windows=6, dev_windows=4, yesno=0,
        probe_file=str(root / "items.jsonl"))
    exp = Experiment(cfg, echo=None)
    exp.execute()
    return exp


def test_every_lr_runs_with_the_selection_seeds_and_the_chosen_one_gets_the_third(seeded):
    exp = seeded
    base = exp.runs.base_scores()
    names = {p.name for p in (exp.out / "runs").iterdir()}
    for m, grid in (("gain-ffn", [-4, -3]), ("lora-matched", [-5, -4])):
        variant = "stack" if m == "gain-ffn" else "merge"
        for e in grid:
            assert {f"{m}__{variant}__lr{e}__s0", f"{m}__{variant}__lr{e}__s1"} <= names
        sel = exp.plan.selection(m, base)
        # the runner's choice is the rule applied to the two seeds' dev scores
        from gainsurgery_lab.forgetting.config import RunKey

        scores = {e: [exp.plan.dev_score(RunKey(m, variant, e, s), base) for s in (0, 1)] for e in grid}
        assert sel.chosen == choose(scores, 2).chosen and sel.scores == scores
        third = {n for n in names if n.startswith(f"{m}__") and n.endswith("__s2")}
        assert third == {f"{m}__{variant}__lr{sel.chosen}__s2"}
    log = (exp.out / "log.txt").read_text()
    assert "probes: base on every item" in log


def test_probes_score_the_base_on_every_item_and_the_chosen_runs_on_the_test_items(seeded):
    from gainsurgery_lab.forgetting import records

    exp = seeded
    base = records.probes_record(json.loads((exp.out / "base_probes.json").read_text()), "base")
    items = probes.read_items(exp.cfg.probe_file)
    assert base["ids"] == [it["id"] for it in items] and set(base["split"]) == {"dev", "test"}
    assert base["correct"] == [p == it["answer"] for p, it in zip(base["pred"], items)]
    probed = sorted(p.parent.name for p in (exp.out / "runs").glob("*/probes.json"))
    expect = sorted(f"{m}__{v}__lr{e}__s{s}" for m, v in (("gain-ffn", "stack"), ("lora-matched", "merge"))
                    for e in exp.plan.probed_lrs(m, exp.runs.base_scores()) for s in range(3))
    assert probed == expect
    rec = json.loads((exp.out / "runs" / probed[0] / "probes.json").read_text())
    assert set(rec["split"]) == {"test"} and rec["items"] == sum(it["split"] == "test" for it in items)


def test_report_shows_the_choice_and_the_probes_from_the_records(seeded, tmp_path):
    import shutil

    from gainsurgery_lab.forgetting.analysis import Results
    from gainsurgery_lab.forgetting.report import write_report
    from gainsurgery_lab.forgetting.stats import mcnemar_exact, wilson_interval

    out = tmp_path / "out"
    shutil.copytree(seeded.out, out)
    write_report(out, resamples=200)
    data = json.loads((out / "results.json").read_text())
    res = Results(out, resamples=200)
    for m in ("gain-ffn", "lora-matched"):
        assert data["selection"][m]["chosen"] == seeded.plan.chosen(m, seeded.runs.base_scores())
        assert data["chosen"][m] == res.chosen(m).name and res.chosen(m).seed == 0
    base = json.loads((out / "base_probes.json").read_text())
    info = data["probes_base"]
    for name, row in info.items():
        idx = [i for i, (p, s) in enumerate(zip(base["probe"], base["split"])) if p == name and s == "dev"]
        k = sum(base["pred"][i] == base["answer"][i] for i in idx)
        lo, _ = wilson_interval(k, len(idx))
        assert row["dev"]["accuracy"] == pytest.approx(k / len(idx)) and row["chance"] == pytest.approx(0.25)
        assert row["informative"] == (lo > 0.25)
    run = next(r for r in data["runs"] if r.get("probes"))
    rec = json.loads((out / "runs" / run["name"] / "probes.json").read_text())
    name = next(iter(info))
    mine = [p == a for p, a, pr in zip(rec["pred"], rec["answer"], rec["probe"]) if pr == name]
    by_id = {i: p == a for i, p, a in zip(base["ids"], base["pred"], base["answer"])}
    theirs = [by_id[i] for i, pr in zip(rec["ids"], rec["probe"]) if pr == name]
    got = run["probes"][name]
    assert got["accuracy"] == pytest.approx(np.mean(mine))
    assert got["kappa"] == pytest.approx((np.mean(mine) - 0.25) / 0.75)
    assert got["mcnemar"] == mcnemar_exact(mine, theirs)
    md = (out / "results.md").read_text()
    assert "## How each lr was chosen" in md and "## Knowledge probes" in md and "✓ chosen" in md


# ------------------------------------------------------------------------------------ the matched curve


def test_the_matched_curve_reads_both_seed_mean_fronts_at_the_same_in_domain_change(seeded, tmp_path):
    import shutil

    from gainsurgery_lab.forgetting.analysis import Results
    from gainsurgery_lab.forgetting.report import write_report
    from gainsurgery_lab.forgetting.curves import front_points, matched_curve
    from gainsurgery_lab.forgetting.stats import interpolate_at

    out = tmp_path / "out"
    shutil.copytree(seeded.out, out)
    res = Results(out, resamples=200)
    fa, fb = front_points(res, "gain-ffn"), front_points(res, "lora-matched")
    for f, m in ((fa, "gain-ffn"), (fb, "lora-matched")):
        for p in f:  # each point is the mean over every seed run at that lr
            runs = [r for r in res.runs if r.method == m and r.e == p.e and not r.failed]
            assert p.seeds == tuple(sorted(r.seed for r in runs)) and len(p.seeds) >= 2
            assert p.x.point == pytest.approx(np.mean([r.metrics["in_domain"].point for r in runs]))
    curve = matched_curve(res, "gain-ffn", "lora-matched", "earlier_vs_base", points=9)
    if len(fa) < 2 or len(fb) < 2:
        assert curve is None
        return
    if curve["range"] is None:  # the fronts do not overlap: said so, nothing read
        assert curve["segments"] == []
        return
    lo, hi = curve["range"]
    assert lo == pytest.approx(max(min(p.x.point for p in fa), min(p.x.point for p in fb)))
    assert hi == pytest.approx(min(max(p.x.point for p in fa), max(p.x.point for p in fb)))
    for x, d in zip(curve["x"], curve["diff"]):
        ya = interpolate_at([p.x.point for p in fa], [p.ys["earlier_vs_base"].point for p in fa], x)
        yb = interpolate_at([p.x.point for p in fb], [p.ys["earlier_vs_base"].point for p in fb], x)
        assert d["value"] == pytest.approx(ya - yb)
        assert d["lo"] <= d["value"] <= d["hi"]
    for s in curve["segments"]:
        inside = [d for x, d in zip(curve["x"], curve["diff"]) if s["from"] <= x <= s["to"]]
        if s["better"] == "gain-ffn":
            assert all(d["hi"] < 0 for d in inside)
        elif s["better"] == "lora-matched":
            assert all(d["lo"] > 0 for d in inside)
        else:
            assert all(d["lo"] <= 0 <= d["hi"] for d in inside)
    paths = write_report(out, resamples=200)
    assert (out / "matched.png") in paths
    assert "## Matched curves" in (out / "results.md").read_text()


def test_matched_curve_segments_name_who_is_better_where():
    from gainsurgery_lab.forgetting.curves import _segments

    xs = np.array([-20.0, -18.0, -16.0, -14.0])
    diffs = [{"value": -5, "lo": -7, "hi": -3}, {"value": -4, "lo": -6, "hi": -1},
             {"value": -1, "lo": -3, "hi": 1}, {"value": 3, "lo": 1, "hi": 5}]
    segs = _segments(xs, diffs, "a", "b")
    assert [(s["from"], s["to"], s["better"]) for s in segs] == [(-20, -18, "a"), (-16, -16, None), (-14, -14, "b")]
    assert segs[0]["diff_min"] == -5 and segs[0]["diff_max"] == -4


# ------------------------------------------------------------------------------------ the α-front


def test_the_alpha_front_scales_a_finished_run_and_alpha_one_is_the_run_itself(seeded, tmp_path):
    import dataclasses
    import shutil

    from gainsurgery_lab.forgetting.analysis import Results
    from gainsurgery_lab.forgetting.config import RunKey
    from gainsurgery_lab.forgetting.curves import alpha_fronts
    from gainsurgery_lab.forgetting.report import write_report
    from gainsurgery_lab.forgetting.runner import Experiment

    out = tmp_path / "out"
    shutil.copytree(seeded.out, out)
    cfg = dataclasses.replace(seeded.cfg, out=str(out), phases=["alpha"], alphas=[0.5, 1.0])
    exp = Experiment(cfg, echo=None)
    exp.execute()
    base = exp.runs.base_scores()
    for m, variant in (("gain-ffn", "stack"), ("lora-matched", "merge")):
        key = RunKey(m, variant, exp.plan.chosen(m, base), 0)
        stages = exp.runs.stages_done(key)
        for k, st in enumerate(stages, start=1):
            one = json.loads((out / "alpha" / key.name / "a1" / f"stage-{k}.json").read_text())
            half = json.loads((out / "alpha" / key.name / "a0.5" / f"stage-{k}.json").read_text())
            assert set(one["test_nll"]) == set(st["test_nll"]) and one["alpha"] == 1.0
            for d, v in st["test_nll"].items():
                # gains: s^1 is s, the same merged model; adapters: base + 1·delta, rounded once more
                assert one["test_nll"][d] == pytest.approx(v, rel=1e-9 if m == "gain-ffn" else 2e-3)
                assert half["test_nll"][d] != pytest.approx(v, rel=1e-6)
        assert not list((out / "alpha" / key.name).glob("*/merged-*"))  # scaled models are not kept
    res = Results(out, resamples=200)
    fronts = alpha_fronts(res)
    assert len(fronts) == 2
    for name, f in fronts.items():
        assert [row["alpha"] for row in f["rows"]] == [0.5, 1.0]
        run = next(r for r in res.runs if r.name == name)
        one = f["rows"][1]
        assert one["in_domain"]["value"] == pytest.approx(run.metrics["in_domain"].point, abs=0.5)
    write_report(out, resamples=200)
    assert "## The α-front" in (out / "results.md").read_text()
    scored = (out / "log.txt").read_text().count("alpha: ")
    assert scored == 2 * 2 * 2  # two runs, two α, two stages
    Experiment(cfg, echo=None).execute()  # resumable: nothing is scored twice
    assert (out / "log.txt").read_text().count("alpha: ") == scored


def test_alphas_are_checked():
    from gainsurgery_lab.forgetting.alpha import alpha_label, parse_alphas

    assert parse_alphas("0.25, 0.5,1") == [0.25, 0.5, 1.0] and alpha_label(0.5) == "a0.5" and alpha_label(1.0) == "a1"
    for bad in ("", "0", "-1", "nan", "0.5,0.5", "x", "17"):
        with pytest.raises(ForgettingError, match="--alphas"):
            parse_alphas(bad)


def test_run_exits_3_when_stop_after_cuts_it_and_0_when_complete(seeded, tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "forgetting.py"
    cfg = seeded.cfg
    args = [sys.executable, str(script), "run", "--out", str(tmp_path / "out"), "--base", cfg.base,
            "--domain", f"a={cfg.sequence[0].train}", "--domain", f"b={cfg.sequence[1].train}",
            "--methods", "gain-ffn", "--seed-methods", "gain-ffn", "--extra-methods", "", "--variants", "",
            "--grid", "gain-ffn=-4", "--seeds", "1", "--max-extensions", "0", "--steps", "1", "--batch-size", "2",
            "--seq-len", "32", "--test-windows", "6", "--dev-windows", "4", "--yesno", "0", "--no-probes"]
    cut = subprocess.run([*args, "--stop-after", "0"], capture_output=True, text=True, timeout=600)
    assert cut.returncode == 3, cut.stderr
    assert "rerun the same command to continue" in cut.stdout
    assert not list((tmp_path / "out").glob("runs/*/stage-1.json"))
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out" / "runs" / "gain-ffn__stack__lr-4__s0" / "stage-2.json").is_file()
