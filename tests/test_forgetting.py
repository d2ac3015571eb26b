"""Sequential-adaptation experiment on a tiny model: matrix, metrics, resume, outputs."""

from __future__ import annotations

import json
import math

import pytest

from gainsurgery_lab import forgetting as fg
from models import TEXT_A, TEXT_B, save_tiny_lm, write_domain

TEXT_C = ("the patient was given a dose of the drug and the fever went down within two days. ") * 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("forgetting")
    base = save_tiny_lm(root / "base", "llama")
    doms = []
    for name, text in (("legal", TEXT_A), ("code", TEXT_B), ("medical", TEXT_C)):
        d = root / name
        d.mkdir()
        doms.append(fg.Domain(name, str(write_domain(d, "train", text, docs=12)),
                              str(write_domain(d, "validation", text[300:] + text[:300], docs=6))))
    return root, base, doms


def _cfg(root, base, doms, out="run", **kw):
    return fg.ForgettingConfig(base=str(base), out=str(root / out), domains=doms[:2], eval_domains=doms,
                               methods=["gain-ffn", "lora"], steps=2, seq_len=16, batch_size=2, eval_windows=3,
                               lrs={"gain-ffn": 1e-2, "lora": 1e-3}, **kw)


def test_sequence_matrix_metrics_resume_outputs(setup):
    from gainsurgery.training.data import pack, read_documents
    from gainsurgery.training.evaluation import perplexity
    from gainsurgery.training.modeling import load_causal_lm, load_tokenizer

    root, base, doms = setup
    exp = fg.Experiment(_cfg(root, base, doms), echo=None)
    r = exp.run()
    assert exp.trained_now == 4  # 2 methods × 2 stages
    assert r["sequence"] == ["legal", "code"] and r["columns"] == ["legal", "code", "medical"]

    # base row == a direct perplexity() of the base on the same windows
    tok, model = load_tokenizer(base), load_causal_lm(base)
    direct = [perplexity(model, pack(tok, read_documents(d.validation), 16, 3))["ppl"] for d in doms]
    assert r["base_ppl"] == pytest.approx(direct, rel=1e-9)

    for m in ("gain-ffn", "lora"):
        v = r["methods"][m]
        assert len(v["ppl"]) == 2 and all(len(row) == 3 for row in v["ppl"])  # stages × eval domains
        assert all(math.isfinite(x) for row in v["ppl"] for x in row)
        assert v["trainable_parameters"] > 0 and v["seconds_per_step"] > 0
        # recompute metrics by hand from the matrix
        P, B = v["ppl"], r["base_ppl"]
        st = v["metrics"]["stages"]
        assert st[0]["in_domain_vs_base"] == pytest.approx(100 * (P[0][0] / B[0] - 1))
        assert st[1]["in_domain_vs_base"] == pytest.approx(100 * (P[1][1] / B[1] - 1))
        assert st[0]["earlier_vs_base"] is None and st[0]["earlier_vs_own_stage"] is None
        assert st[1]["earlier_vs_base"] == pytest.approx(100 * (P[1][0] / B[0] - 1))
        assert st[1]["earlier_vs_own_stage"] == pytest.approx(100 * (P[1][0] / P[0][0] - 1))
        assert st[1]["untrained_vs_base"] == pytest.approx(100 * (P[1][2] / B[2] - 1))
        fin = v["metrics"]["final"]
        assert fin["vs_base"]["medical"] == pytest.approx(100 * (P[1][2] / B[2] - 1))
        assert fin["mean_trained_vs_base"] == pytest.approx(50 * (P[1][0] / B[0] + P[1][1] / B[1] - 2))
        # only the latest merged folder is kept; artifacts stay
        mdir = root / "run" / m
        assert not (mdir / "merged-1").exists() and (mdir / "merged-2" / "config.json").is_file()
        assert (mdir / ("stage1-legal.safetensors" if m == "gain-ffn" else "stage1-legal")).exists()
    # LoRA merged folders keep the tokenizer
    load_tokenizer(root / "run" / "lora" / "merged-2")
    # GAIN stage 2 = base with stack(g1, g2): the merged row matches hooks-free recomputation
    row = exp.eval_row(root / "run" / "gain-ffn" / "merged-2")
    assert row == pytest.approx(r["methods"]["gain-ffn"]["ppl"][1], rel=1e-9)

    out = root / "run"
    for name in ("results.json", "results.md", "heatmap-gain-ffn.png", "heatmap-lora.png", "earlier-domains.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert json.loads((out / "results.json").read_text())["methods"]["lora"]["ppl"] == r["methods"]["lora"]["ppl"]
    assert "| gain-ffn |" in (out / "results.md").read_text()

    # resume: nothing is trained again, same numbers
    exp2 = fg.Experiment(_cfg(root, base, doms), echo=None)
    r2 = exp2.run()
    assert exp2.trained_now == 0 and r2["trained_this_run"] == 0
    assert r2["methods"]["gain-ffn"]["ppl"] == r["methods"]["gain-ffn"]["ppl"]
    assert "done, skipped" in (out / "log.txt").read_text()

    # a longer sequence resumes after the finished stages: only stage 3 is trained (merged-2 rebuilt if missing)
    import shutil

    shutil.rmtree(out / "gain-ffn" / "merged-2")
    cfg3 = _cfg(root, base, doms)
    cfg3.domains = doms
    cfg3.methods = ["gain-ffn"]
    exp3 = fg.Experiment(cfg3, echo=None)
    r3 = exp3.run()
    assert exp3.trained_now == 1
    assert len(r3["methods"]["gain-ffn"]["ppl"]) == 3
    assert r3["methods"]["gain-ffn"]["ppl"][:2] == r["methods"]["gain-ffn"]["ppl"]


def test_sweep_and_changed_settings(setup):
    root, base, doms = setup
    cfg = _cfg(root, base, doms, out="sweep", sweep=True, sweep_steps=1,
               sweep_lrs={"gain-ffn": [1e-3, 1e-2], "lora": [1e-4]})
    cfg.lrs = {}
    cfg.domains = doms[:1]
    cfg.methods = ["gain-ffn"]
    r = fg.Experiment(cfg, echo=None).run()
    runs = r["sweep"]["gain-ffn"]["runs"]
    assert len(runs) == 2
    best = min(runs.values(), key=lambda x: x["ppl"])["lr"]
    assert r["methods"]["gain-ffn"]["lr"] == best and r["methods"]["gain-ffn"]["lr_source"] == "sweep"
    cfg.lrs = {"gain-ffn": 0.5}
    with pytest.raises(fg.ForgettingError, match="other settings"):
        fg.Experiment(cfg, echo=None).run()


def test_compute_metrics_by_hand():
    base = [10.0, 20.0, 40.0]
    rows = [[8.0, 22.0, 44.0], [9.0, 18.0, 40.0]]
    m = fg.compute_metrics(base, rows, ["a", "b", "c"], ["a", "b"])
    s = m["stages"]
    assert s[0]["in_domain_vs_base"] == pytest.approx(-20.0)
    assert s[0]["untrained_vs_base"] == pytest.approx((10.0 + 10.0) / 2)
    assert s[1]["in_domain_vs_base"] == pytest.approx(-10.0)
    assert s[1]["earlier_vs_base"] == pytest.approx(-10.0)
    assert s[1]["earlier_vs_own_stage"] == pytest.approx(12.5)
    assert m["final"]["vs_base"] == pytest.approx({"a": -10.0, "b": -10.0, "c": 0.0})
    assert m["final"]["mean_untrained_vs_base"] == pytest.approx(0.0)
    assert m["final"]["mean_in_domain_vs_base"] == pytest.approx(-15.0)
