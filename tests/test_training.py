"""Training and evaluation on tiny real models with a real tokenizer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from gainsurgery.io.checkpoint import open_checkpoint
from gainsurgery.training.data import adds_bos, pack, read_documents
from gainsurgery.gainfile import load
from models import TEXT_A, TEXT_B, load_model, save_tiny_lm, tiny_tokenizer, write_domain


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    base = save_tiny_lm(root / "base", "llama")
    a = write_domain(root, "legal", TEXT_A)
    b = write_domain(root, "code", TEXT_B)
    return base, a, b


def test_windows_start_with_bos_when_the_tokenizer_adds_it(lm):
    base, a, _ = lm
    tok = tiny_tokenizer(add_bos=True)
    w = pack(tok, read_documents(a), 32)
    assert adds_bos(tok) and w.bos == tok.bos_token_id
    assert all(ids[0] == tok.bos_token_id and len(ids) == 32 for ids in w.ids)
    assert sum(ids.count(tok.bos_token_id) for ids in w.ids) == len(w.ids)  # only at the start
    plain = tiny_tokenizer(add_bos=False)
    w2 = pack(plain, read_documents(a), 32)
    assert not adds_bos(plain) and w2.bos is None and all(ids[0] != plain.bos_token_id for ids in w2.ids)
    # Documents are separated by EOS, and the windows are a deterministic function of the text.
    assert any(plain.eos_token_id in ids for ids in w2.ids)
    assert pack(tok, read_documents(a), 32).ids == w.ids


def test_read_documents_formats(tmp_path):
    (tmp_path / "d.txt").write_text("one\n\n\ntwo\n\n\n\n\nthree")
    assert read_documents(tmp_path / "d.txt") == ["one", "two", "three"]
    (tmp_path / "d.jsonl").write_text('{"body": "x y"}\n\n{"body": "z"}\n')
    assert read_documents(tmp_path / "d.jsonl", "body") == ["x y", "z"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["p1", "p2"]}), tmp_path / "d.parquet")
    assert read_documents(tmp_path / "d.parquet") == ["p1", "p2"]
    from gainsurgery.training.data import DataError

    with pytest.raises(DataError, match="no string field 'text'"):
        read_documents(tmp_path / "d.jsonl")


def train_cli(cli, base, data, out, *extra):
    res = cli("train", base, "--data", data, "-o", out, "--steps", "12", "--batch-size", "4", "--seq-len", "32",
              "--lr", "0.05", "--no-progress", *extra)
    assert res.exit_code == 0, res.output + res.stderr
    return res


def test_train_gain_ffn_lowers_loss_and_saves_checkpoint_keys(lm, cli, tmp_path):
    base, a, _ = lm
    out = tmp_path / "g.safetensors"
    train_cli(cli, base, a, out, "--eval-data", a, "--eval-windows", "4")
    g = load(out)
    ckpt = open_checkpoint(base)
    assert set(g.vectors) <= set(ckpt.tensors)
    assert sorted(g.vectors) == sorted(k for k in ckpt.tensors if k.endswith(("o_proj.weight", "down_proj.weight")))
    assert g.num_parameters == 2 * (32 + 64)
    assert g.metadata["method"] == "gain-ffn" and g.metadata["side"] == "in"
    assert g.metadata["base_fingerprint"].startswith("sha256:")
    t = g.metadata["training"]
    assert t["steps"] == 12 and t["lr"] == 0.05 and t["bos_first"] is True and t["data_fingerprint"].startswith("sha256:")
    assert any(not np.allclose(v, 1.0) for v in g.vectors.values())
    log = [json.loads(line) for line in (tmp_path / "g.train.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    evals = [r for r in log if "eval_ppl/legal" in r]
    assert len(losses) == 12 and len(evals) == 2
    assert evals[-1]["eval_ppl/legal"] < evals[0]["eval_ppl/legal"]


def test_trained_gains_hooks_equal_apply_merged_logits(lm, cli, tmp_path):
    """Training-time hooks and the apply-merged checkpoint give the same logits."""
    base, a, _ = lm
    train_cli(cli, base, a, tmp_path / "g.safetensors")
    assert cli("apply", base, tmp_path / "g.safetensors", tmp_path / "m").exit_code == 0
    from gainsurgery.training.hooks import attach

    ids = torch.tensor([[1, 5, 9, 40, 33, 2, 64, 100]])
    hooked = load_model(base, "llama")
    attach(hooked, load(tmp_path / "g.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path / "m", "llama")(input_ids=ids).logits,
                                   hooked(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", ["gpt2", "gemma3_text"])
def test_train_other_architectures(model_type, cli, tmp_path):
    base = save_tiny_lm(tmp_path / "base", model_type)
    a = write_domain(tmp_path, "legal", TEXT_A)
    train_cli(cli, base, a, tmp_path / "g.safetensors", "--method", "gain")
    g = load(tmp_path / "g.safetensors")
    assert g.num_parameters == 2 * 32 and set(g.vectors) <= set(open_checkpoint(base).tensors)


def test_resume_starts_from_saved_gains(lm, cli, tmp_path):
    base, a, _ = lm
    train_cli(cli, base, a, tmp_path / "g1.safetensors")
    train_cli(cli, base, a, tmp_path / "g2.safetensors", "--resume", tmp_path / "g1.safetensors", "--lr", "1e-9")
    g1, g2 = load(tmp_path / "g1.safetensors"), load(tmp_path / "g2.safetensors")
    for k in g1.vectors:
        np.testing.assert_allclose(g2.vectors[k], g1.vectors[k], atol=1e-6)


def test_output_side_training(lm, cli, tmp_path):
    base, a, _ = lm
    train_cli(cli, base, a, tmp_path / "g.safetensors", "--side", "out")
    g = load(tmp_path / "g.safetensors")
    assert all(d == 0 for d in g.dims.values()) and g.num_parameters == 2 * (32 + 32)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_peft_baselines_train_and_eval(method, lm, cli, tmp_path):
    base, a, b = lm
    train_cli(cli, base, a, tmp_path / method, "--method", method, "--lr", "0.01")
    cfg = json.loads((tmp_path / method / "adapter_config.json").read_text())
    assert cfg["peft_type"] == method.upper()
    res = cli("eval", tmp_path / method, "--base", base, "--data", f"legal={a}", "--seq-len", "32",
              "--max-windows", "4", "--json", tmp_path / "e.json")
    assert res.exit_code == 0, res.stderr
    adapted = json.loads((tmp_path / "e.json").read_text())["domains"]["legal"]["ppl"]
    cli("eval", base, "--data", f"legal={a}", "--seq-len", "32", "--max-windows", "4", "--json", tmp_path / "b.json")
    assert adapted < json.loads((tmp_path / "b.json").read_text())["domains"]["legal"]["ppl"]


def test_eval_hooks_equal_merged_and_yesno(lm, cli, tmp_path):
    base, a, b = lm
    train_cli(cli, base, a, tmp_path / "g.safetensors")
    assert cli("apply", base, tmp_path / "g.safetensors", tmp_path / "m").exit_code == 0
    items = [{"passage": "the court held the licence.", "question": "did the court hold", "answer": "yes"},
             {"passage": "def add(a, b): return a + b", "question": "is it code", "answer": "no"}] * 3
    (tmp_path / "yn.jsonl").write_text("\n".join(json.dumps(i) for i in items))
    common = ["--data", f"legal={a}", "--data", f"code={b}", "--seq-len", "32", "--max-windows", "4",
              "--yesno", tmp_path / "yn.jsonl"]
    cli("eval", base, "--gain", tmp_path / "g.safetensors", *common, "--json", tmp_path / "hooks.json")
    cli("eval", tmp_path / "m", *common, "--json", tmp_path / "merged.json")
    cli("eval", base, *common, "--json", tmp_path / "base.json")
    hooks, merged, plain = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("hooks", "merged", "base"))
    for d in ("legal", "code"):
        assert hooks["domains"][d]["tokens"] == merged["domains"][d]["tokens"] == 4 * 31
        assert hooks["domains"][d]["ppl"] == pytest.approx(merged["domains"][d]["ppl"], rel=1e-4)
    assert hooks["domains"]["legal"]["ppl"] < plain["domains"]["legal"]["ppl"]
    assert hooks["yesno"]["items"] == 6 and hooks["yesno"] == merged["yesno"]
    # Accuracy is either all-or-nothing per repeated item pair here: a multiple of 1/6 that pairs agree on.
    assert round(hooks["yesno"]["accuracy"] * 6) in (0, 3, 6)


def test_train_bad_input(lm, cli, tmp_path):
    base, a, _ = lm
    (tmp_path / "empty.txt").write_text("\n\n")
    res = cli("train", base, "--data", tmp_path / "empty.txt", "-o", tmp_path / "g.safetensors")
    assert res.exit_code == 1 and res.stderr.startswith("error:") and "holds no text" in res.stderr
    res = cli("train", base, "--data", a, "-o", tmp_path / "g.safetensors", "--method", "lora",
              "--resume", a)
    assert res.exit_code == 1 and "--resume" in res.stderr
    assert not (tmp_path / "g.safetensors").exists()


def test_accelerate_two_processes_match_one(lm, tmp_path):
    """Two DDP processes on the CPU give the gains of one process at the same global batch.

    accelerate 1.x starts CPU processes itself only through MPI (`--cpu --num_processes 2`
    without mpirun runs one process), so the test uses its torch.distributed launcher with
    ACCELERATE_USE_CPU=1, which gives DistributedType.MULTI_CPU over gloo.
    """
    base, a, _ = lm
    common = ["train", str(base), "--data", str(a), "--steps", "6", "--batch-size", "4", "--seq-len", "32",
              "--lr", "0.05", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    one = subprocess.run([sys.executable, "-m", "gainsurgery.cli", *common, "-o", str(tmp_path / "one.safetensors")],
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    two = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "gainsurgery.cli", *common,
                          "-o", str(tmp_path / "two.safetensors")], capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    g1, g2 = load(tmp_path / "one.safetensors"), load(tmp_path / "two.safetensors")
    assert g2.metadata["training"]["processes"] == 2 and g1.metadata["training"]["processes"] == 1
    moved = max(float(np.abs(v - 1).max()) for v in g1.vectors.values())
    assert moved > 0.05
    for k in g1.vectors:
        np.testing.assert_allclose(g2.vectors[k], g1.vectors[k], atol=1e-4, rtol=0)


def test_bad_output_location_fails_before_training(lm, cli, tmp_path):
    base, a, _ = lm
    res = cli("train", base, "--data", a, "-o", tmp_path / "missing" / "g.safetensors")
    assert res.exit_code == 1 and "does not exist" in res.stderr
    res = cli("train", base, "--data", a, "-o", tmp_path)
    assert res.exit_code == 1 and "is an existing folder, but a file is written here" in res.stderr


def test_eval_names_come_from_the_domain_folder():
    from gainsurgery.training.loop import _eval_name

    assert _eval_name("/cache/domains/legal/validation.txt") == "legal"
    assert _eval_name("data/legal.txt") == "legal"
    assert _eval_name("validation.txt") == "validation"


def test_a_config_settles_into_the_plain_values_each_part_of_a_run_reads(lm, tmp_path):
    """Defaults are settled once (lr, warmup, log and checkpoint paths); --resume means a gain file to
    start from or a checkpoint to continue, never both; a run resumed inside its own checkpoint folder
    keeps that checkpoint out of the inputs the folder is kept apart from, and no other."""
    from gainsurgery.training import TrainConfig

    base, a, b = lm
    ck = tmp_path / "g.checkpoints"
    (ck / "step-00000004").mkdir(parents=True)
    cfg = TrainConfig(base=str(base), data=[str(a)], eval_data=[str(b)], output=str(tmp_path / "g.safetensors"),
                      steps=30, warmup=0.25, save_every=2, resume=str(ck / "step-00000004"))
    cfg.validate()
    out = cfg.output_plan()
    assert (out.log, out.checkpoints, out.folder) == (tmp_path / "g.train.jsonl", ck, False)
    assert out.inputs == (str(base), str(a), str(b), str(ck / "step-00000004"))
    assert out.checkpoint_inputs == (str(base), str(a), str(b))
    assert (cfg.learning_rate, cfg.warmup_steps()) == (5e-3, 8)  # round(0.25 * 30)
    model = cfg.model_plan()
    assert model.init_gains is None and cfg.resumes_checkpoint
    # A gain file to start from: no exemption, and no checkpoint folder without --save-every.
    (tmp_path / "start.safetensors").write_bytes(b"x")
    cfg = TrainConfig(base=str(base), data=[str(a)], output=str(tmp_path / "adapter"), method="lora", lr=1e-3,
                      log=str(tmp_path / "run.jsonl"), warmup=3)
    out = cfg.output_plan()
    assert (out.log, out.checkpoints, out.folder) == (tmp_path / "run.jsonl", None, True)
    assert (cfg.learning_rate, cfg.warmup_steps()) == (1e-3, 3)
    gain_cfg = TrainConfig(base=str(base), data=[str(a)], output=str(tmp_path / "h.safetensors"),
                           resume=str(tmp_path / "start.safetensors"), save_every=1)
    assert gain_cfg.model_plan().init_gains == str(tmp_path / "start.safetensors")
    assert gain_cfg.output_plan().checkpoint_inputs == gain_cfg.output_plan().inputs
