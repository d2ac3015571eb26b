"""Training at scale on tiny real models: FSDP2 across CPU processes, gradient checkpointing,
mixed precision, streamed data and exact resume.

Multi-process tests launch the real CLI with ``torchrun`` (torch.distributed.run), two CPU
processes over gloo, as a user would.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gainsurgery.gainfile import load
from gainsurgery.training import TrainConfig, train
from gainsurgery.training.data import read_documents
from gainsurgery.training.streaming import StreamedBatches, block_documents, iter_documents, plan_blocks
from models import TEXT_A, TEXT_B, save_tiny_lm, tiny_tokenizer, write_domain

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
COMMON = ["--steps", "6", "--batch-size", "4", "--seq-len", "32", "--lr", "0.05", "--no-progress"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    base = save_tiny_lm(root / "base", "llama")
    return base, write_domain(root, "legal", TEXT_A, docs=24)


def free_port() -> int:
    """A port nobody listens on now (other test runs share this machine)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args, processes: int = 1, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _attempt in range(3):
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--master_port", str(free_port())] if processes > 1 else [sys.executable]
        res = subprocess.run([*launcher, "-m", "gainsurgery.cli", *map(str, args)], capture_output=True,
                             text=True, env=env, cwd=cwd)
        # the port was free when picked, but another test run may bind it before torchrun does:
        # only that race is retried, on a new port
        if processes == 1 or res.returncode == 0 or "address already in use" not in res.stderr.lower():
            break
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def first_row(log: Path) -> dict:
    return json.loads(log.read_text().splitlines()[0])


def max_diff(a, b) -> float:
    return max(float(np.abs(a.vectors[k] - b.vectors[k]).max()) for k in a.vectors)


def moved(g) -> float:
    return max(float(np.abs(v - 1).max()) for v in g.vectors.values())


def test_fsdp_two_processes_match_one_and_hold_half_the_parameters(lm, tmp_path):
    """FSDP2 over 2 CPU processes gives the gains of 1 process; each process holds half the base.

    Tolerance 1e-5 (measured: 2.4e-7): the two runs do the same float32 arithmetic but sum
    the batch's gradients in a different order (an all-reduce of two halves), which changes
    the last bits of Adam's steps; 1e-5 is 0.01% of how far the gains move (> 0.05).
    """
    base, data = lm
    run_cli("train", base, "--data", data, *COMMON, "-o", tmp_path / "one.safetensors")
    run_cli("train", base, "--data", data, *COMMON, "--fsdp", "-o", tmp_path / "two.safetensors", processes=2)
    one, two = load(tmp_path / "one.safetensors"), load(tmp_path / "two.safetensors")
    assert two.metadata["training"]["processes"] == 2 and two.metadata["training"]["fsdp"] is True
    assert sorted(one.vectors) == sorted(two.vectors) and all(v.dtype == np.float32 for v in two.vectors.values())
    assert moved(one) > 0.05
    assert max_diff(one, two) < 1e-5
    whole = first_row(tmp_path / "one.train.jsonl")["parameter_bytes"][0]
    per_rank = first_row(tmp_path / "two.train.jsonl")["parameter_bytes"]
    gains_bytes = 4 * one.num_parameters  # kept whole on every process
    assert len(per_rank) == 2
    for b in per_rank:  # half of the base (+ FSDP's padding of odd sizes), plus the whole gains
        assert 0.49 < (b - gains_bytes) / (whole - gains_bytes) < 0.52


def test_fsdp_lora_with_gradient_checkpointing_matches_one_process(lm, tmp_path):
    """LoRA under FSDP, launched by accelerate with the repo's CPU config file."""
    base, data = lm
    run_cli("train", base, "--data", data, *COMMON, "--method", "lora", "-o", tmp_path / "one")
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    res = subprocess.run([accelerate, "launch", "--config_file", str(CONFIGS / "cpu-2proc.yaml"), "--main_process_port",
                          str(free_port()), "-m", "gainsurgery.cli", "train", str(base), "--data",
                          str(data), *COMMON, "--method", "lora", "--fsdp", "--gradient-checkpointing", "-o",
                          str(tmp_path / "two")], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("trained lora") == 1  # one process reports
    assert json.loads((tmp_path / "two" / "gainsurgery_training.json").read_text())["processes"] == 2
    from safetensors.numpy import load_file

    one = load_file(tmp_path / "one" / "adapter_model.safetensors")
    two = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert sorted(one) == sorted(two) and len(one) == 28  # A and B of 7 linear layers x 2 layers
    assert max(float(np.abs(one[k]).max()) for k in one if "lora_B" in k) > 1e-3  # B left zero
    for k in one:
        np.testing.assert_allclose(two[k], one[k], atol=1e-4, rtol=0)


def test_shipped_accelerate_configs_say_what_the_docs_say():
    from accelerate.commands.config.config_args import load_config_from_file

    fsdp = load_config_from_file(str(CONFIGS / "fsdp.yaml"))
    assert fsdp.distributed_type.value == "FSDP" and fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_reshard_after_forward"] is True and fsdp.num_processes == 8
    ddp = load_config_from_file(str(CONFIGS / "ddp.yaml"))
    assert ddp.distributed_type.value == "MULTI_GPU" and str(ddp.mixed_precision) == "bf16"
    cpu = load_config_from_file(str(CONFIGS / "cpu-2proc.yaml"))
    assert cpu.use_cpu is True and cpu.num_processes == 2


def api_train(base, data, out, **kw):
    opts = dict(steps=6, batch_size=4, seq_len=32, lr=0.05, progress=False)
    opts.update(kw)
    return train(TrainConfig(base=str(base), data=[str(data)], output=str(out), **opts))


def test_gradient_checkpointing_gives_the_same_gains(lm, tmp_path):
    """Recomputing activations repeats the same float32 operations: equal to float32 rounding (1e-6)."""
    base, data = lm
    api_train(base, data, tmp_path / "plain.safetensors")
    api_train(base, data, tmp_path / "ckpt.safetensors", gradient_checkpointing=True)
    plain, ckpt = load(tmp_path / "plain.safetensors"), load(tmp_path / "ckpt.safetensors")
    assert moved(plain) > 0.05 and ckpt.metadata["training"]["gradient_checkpointing"] is True
    assert max_diff(plain, ckpt) < 1e-6


def test_bf16_weights_and_autocast_keep_gains_and_adam_in_float32(lm, tmp_path):
    """bf16 base + bf16 autocast: gains, Adam moments and the file stay float32; the loss falls;
    the gains agree with float32 training to 0.02.

    Why 0.02: bf16 keeps 8 significant bits, so every activation and gradient is off by up to
    ~0.4%; Adam normalises gradients, so that changes the *size* of a step slightly, rarely its
    sign. 0.02 is under half of one Adam step at lr 0.05 — a sign flip anywhere would exceed it.
    (Measured: 0.004.)
    """
    base, data = lm
    api_train(base, data, tmp_path / "fp32.safetensors", steps=12)
    res = api_train(base, data, tmp_path / "bf16.safetensors", steps=12, dtype="bfloat16", mixed_precision="bf16",
                    save_every=6, log=str(tmp_path / "bf16.jsonl"))
    fp32, bf16 = load(tmp_path / "fp32.safetensors"), load(tmp_path / "bf16.safetensors")
    assert all(v.dtype == np.float32 for v in bf16.vectors.values())
    assert bf16.metadata["training"]["mixed_precision"] == "bf16" and bf16.metadata["training"]["dtype"] == "bfloat16"
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "bf16.jsonl").read_text().splitlines()) if "loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) and res.final_loss == losses[-1]
    assert moved(fp32) > 0.05 and max_diff(fp32, bf16) < 0.02
    from safetensors import safe_open

    with safe_open(tmp_path / "bf16.checkpoints" / "step-00000006" / "state.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys() if k.startswith(("param/", "optim/"))}
    assert dtypes and set(dtypes.values()) == {"F32"}
    assert sum(k.endswith("/exp_avg_sq") for k in dtypes) == 4  # one moment per gain vector


def test_fp16_autocast_uses_loss_scaling_and_saves_float32(lm, tmp_path):
    base, data = lm
    res = api_train(base, data, tmp_path / "g.safetensors", mixed_precision="fp16", save_every=3)
    record = json.loads((tmp_path / "g.checkpoints" / "step-00000003" / "state.json").read_text())
    assert record["scaler"]["scale"] > 1 and record["settings"]["mixed_precision"] == "fp16"
    g = load(tmp_path / "g.safetensors")
    assert np.isfinite(res.final_loss) and moved(g) > 0.01
    assert all(v.dtype == np.float32 for v in g.vectors.values())


@pytest.mark.parametrize("method", ["gain-ffn", "lora"])
def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(method, lm, tmp_path):
    """6 steps vs 3 steps + resume for 3: bit-identical on one CPU process (same ops, same order)."""
    base, data = lm
    out = "g.safetensors" if method == "gain-ffn" else "adapter"
    full = api_train(base, data, tmp_path / f"full-{out}", method=method,
                     save_every=3, checkpoint_dir=str(tmp_path / "ck"), eval_data=[str(data)], eval_windows=2,
                     eval_every=2, log=str(tmp_path / "full.jsonl"))
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [".lock", "step-00000003"]
    resumed = api_train(base, data, tmp_path / f"resumed-{out}", method=method, resume=str(tmp_path / "ck"),
                        eval_data=[str(data)], eval_windows=2, eval_every=2, log=str(tmp_path / "resumed.jsonl"))
    assert resumed.resumed_from == 3 and resumed.steps == 6 and resumed.final_loss == full.final_loss
    assert resumed.eval == full.eval  # evaluations of steps 0 and 2 come from the checkpoint
    rows = [json.loads(line) for line in (tmp_path / "resumed.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [4, 5, 6]
    full_rows = map(json.loads, (tmp_path / "full.jsonl").read_text().splitlines())
    full_losses = [r["loss"] for r in full_rows if "loss" in r]
    assert [r["loss"] for r in rows if "loss" in r] == full_losses[3:]
    if method == "gain-ffn":
        a, b = load(tmp_path / f"full-{out}"), load(tmp_path / f"resumed-{out}")
        assert moved(a) > 0.05
        for k in a.vectors:
            assert np.array_equal(a.vectors[k], b.vectors[k]), k
    else:
        from safetensors.numpy import load_file

        a = load_file(tmp_path / f"full-{out}" / "adapter_model.safetensors")
        b = load_file(tmp_path / f"resumed-{out}" / "adapter_model.safetensors")
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_settings_in_one_line(lm, tmp_path, cli):
    base, data = lm
    api_train(base, data, tmp_path / "g.safetensors", save_every=3)
    res = cli("train", base, "--data", data, "--steps", "6", "--batch-size", "8", "--seq-len", "32", "--lr", "0.05",
              "-o", tmp_path / "h.safetensors", "--resume", tmp_path / "g.checkpoints")
    assert res.exit_code == 1 and res.stderr.startswith("error: --resume")
    assert "batch_size=4" in res.stderr and "batch_size=8" in res.stderr and "\n" == res.stderr[-1]
    assert res.stderr.count("\n") == 1 and not (tmp_path / "h.safetensors").exists()
    (tmp_path / "empty").mkdir()
    res = cli("train", base, "--data", data, *COMMON, "-o", tmp_path / "h.safetensors", "--resume", tmp_path / "empty")
    assert res.exit_code == 1 and "no training checkpoint" in res.stderr


def test_fsdp_streaming_resume_across_two_processes(lm, tmp_path):
    """Streamed blocks, 2 FSDP processes, killed-and-resumed at step 3 == uninterrupted (1e-6)."""
    base, data = lm
    stream = ["--streaming", "--stream-block-bytes", "1500", "--fsdp"]
    run_cli("train", base, "--data", data, *COMMON, *stream, "--save-every", "3", "--checkpoint-dir",
            tmp_path / "ck", "-o", tmp_path / "full.safetensors", processes=2)
    record = json.loads((tmp_path / "ck" / "step-00000003" / "state.json").read_text())
    positions = record["data"]["processes"]
    # 6 windows of 2 per process by step 3 (+ blocks left behind): each process's own place
    assert len(positions) == 2 and all(set(p) == {"epoch", "block", "window"} for p in positions)
    run_cli("train", base, "--data", data, *COMMON, *stream, "--resume", tmp_path / "ck",
            "-o", tmp_path / "resumed.safetensors", processes=2)
    a, b = load(tmp_path / "full.safetensors"), load(tmp_path / "resumed.safetensors")
    assert b.metadata["training"]["streaming"] is True and moved(a) > 0.05
    assert max_diff(a, b) < 1e-6


# --- streamed data -----------------------------------------------------------------------------


def odd_text(seed: int) -> str:
    """Documents separated by 2-5 empty lines, with single empty lines, spaces and CRLF inside."""
    rng = random.Random(seed)
    parts = []
    for i in range(40):
        lines = [f"doc {i} line {j} " + "é" * rng.randrange(3) for j in range(rng.randrange(1, 5))]
        if rng.random() < 0.3:
            lines.insert(1, "")  # one empty line inside a document
        if rng.random() < 0.2:
            lines.append("   ")  # a line of spaces is text, not a separator
        parts.append("\n".join(lines))
        parts.append("\n" * rng.randrange(3, 7))
    text = "".join(parts)
    return text.replace("\n", "\r\n") if seed % 2 else text


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("block_bytes", [1, 7, 64, 1000, 1 << 20])
def test_streamed_text_blocks_hold_exactly_the_documents_of_the_file(seed, block_bytes, tmp_path):
    path = tmp_path / "d.txt"
    path.write_bytes(("\n\n" + odd_text(seed)).encode("utf-8"))
    blocks = plan_blocks([path], block_bytes)
    assert blocks[0].start == 0 and blocks[-1].end == path.stat().st_size
    assert all(a.end == b.start for a, b in zip(blocks, blocks[1:]))
    streamed = [d for b in blocks for d in block_documents(b)]
    assert streamed == read_documents(path) and len(streamed) == 40


@pytest.mark.parametrize("block_bytes", [1, 50, 4096])
def test_streamed_jsonl_and_parquet_blocks(block_bytes, tmp_path):
    rows = [{"text": f"document {i} " * (i % 7 + 1), "n": i} for i in range(30)]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows[:15]) + "\n\n" + "\n".join(json.dumps(r) for r in rows[15:]))
    blocks = plan_blocks([path], block_bytes)
    assert [d for b in blocks for d in block_documents(b)] == read_documents(path)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [r["text"] for r in rows]}), tmp_path / "d.parquet", row_group_size=4)
    blocks = plan_blocks([tmp_path / "d.parquet"])
    assert len(blocks) == 8 and [b.start for b in blocks] == list(range(8))
    assert list(iter_documents(tmp_path / "d.parquet")) == read_documents(tmp_path / "d.parquet")
    assert [d for b in blocks for d in block_documents(b)] == [r["text"].strip() for r in rows]


def test_streamed_bad_data_is_one_line(tmp_path):
    from gainsurgery.errors import DataError

    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(DataError, match="at byte 15: no string field 'text'"):
        list(iter_documents(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.txt").write_bytes(b"fine\n\n\n\xff\xfe\n")
    with pytest.raises(DataError, match="not UTF-8"):
        list(iter_documents(tmp_path / "bad.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="hold no text"):
        plan_blocks([tmp_path / "empty.txt"])


def test_each_process_reads_only_its_blocks_and_resumes_in_place(tmp_path):
    path = write_domain(tmp_path, "code", TEXT_B, docs=30)
    tok = tiny_tokenizer()
    mk = lambda rank, world: StreamedBatches(tok, [str(path)], 16, 2, seed=3, rank=rank, world=world,  # noqa: E731
                                            block_bytes=2000)
    r0, r1 = mk(0, 2), mk(1, 2)
    n = len(r0.blocks)
    assert n >= 4 and sorted(r0._mine + r1._mine) == list(range(n)) and not set(r0._mine) & set(r1._mine)
    ahead = mk(0, 2)
    seen = [ahead.next() for _ in range(25)]  # crosses blocks and an epoch
    assert ahead.position()["epoch"] >= 1 or ahead.position()["block"] > 0
    again = mk(0, 2)
    for _ in range(10):
        again.next()
    saved = dict(again.position())
    fresh = mk(0, 2)
    fresh.restore(saved)
    for i in range(10, 25):
        assert np.array_equal(fresh.next().numpy(), seen[i].numpy())


def test_gpu_check_rehearses_end_to_end_on_cpu(tmp_path):
    """scripts/gpu_check.py, the script for a borrowed GPU machine, runs here on a 2-layer Gemma 3."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "out"), "--device", "cpu", "--model",
                          "synthetic-small", "--steps", "2", "--bench-steps", "1", "--batch-size", "4",
                          "--seq-len", "32", "--bench-seq-len", "32", "--workdir", str(tmp_path / "work")],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["ok"] and report["device"] == "cpu" and report["hub_modules_imported"] == []
    assert report["train"]["trainable"] == 2 * (64 + 128) and report["train"]["gradient_checkpointing"] is True
    for dtype in ("bfloat16", "float32"):
        check = report["logits"][dtype]
        assert check["gain_effect_max_abs"] > 0 and check["max_abs_diff_merged_vs_hooked"] < 0.1
    # float32 compute: only the merged weights' one rounding to bf16 separates the two
    assert report["logits"]["float32"]["max_abs_diff_merged_vs_hooked"] < 0.01
    rows = report["throughput"]["rows"]
    assert [(r["method"], r["gradient_checkpointing"]) for r in rows] == [
        (m, gc) for m in ("gain-ffn", "lora", "ia3") for gc in (False, True)]
    assert all(r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 for r in rows)
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "GAIN-FFN / LoRA step time" in table and "merged vs hooked (bfloat16 compute)" in table
    assert len(list((tmp_path / "out").iterdir())) <= 8  # what comes back from the GPU machine: 8 files at most


def test_hostile_and_careless_inputs_are_one_line(lm, tmp_path, cli, monkeypatch):
    base, data = lm
    # --fsdp without processes to shard across
    res = cli("train", base, "--data", data, *COMMON, "--fsdp", "-o", tmp_path / "g.safetensors")
    assert res.exit_code == 1 and "--fsdp shards the base across processes" in res.stderr
    # a checkpoint folder that is a file, or inside the base
    (tmp_path / "file").write_text("x")
    res = cli("train", base, "--data", data, *COMMON, "--save-every", "2", "--checkpoint-dir", tmp_path / "file",
              "-o", tmp_path / "g.safetensors")
    assert res.exit_code == 1 and res.stderr.startswith("error: --checkpoint-dir")
    res = cli("train", base, "--data", data, *COMMON, "--save-every", "2", "--checkpoint-dir", base / "ck",
              "-o", tmp_path / "g.safetensors")
    assert res.exit_code == 1 and "--checkpoint-dir" in res.stderr and not (base / "ck").exists()
    # a damaged checkpoint: state.json without its optimizer record, or not JSON at all
    api_train(base, data, tmp_path / "g.safetensors", save_every=3)
    step = tmp_path / "g.checkpoints" / "step-00000003"
    record = json.loads((step / "state.json").read_text())
    del record["optimizer"]
    (step / "state.json").write_text(json.dumps(record))
    res = cli("train", base, "--data", data, *COMMON, "-o", tmp_path / "h.safetensors", "--resume", step)
    assert res.exit_code == 1 and "the checkpoint is damaged" in res.stderr and res.stderr.count("\n") == 1
    (step / "state.json").write_text("[" * 100000)
    res = cli("train", base, "--data", data, *COMMON, "-o", tmp_path / "h.safetensors", "--resume", step)
    assert res.exit_code == 1 and "nested deeper" in res.stderr
    assert not (tmp_path / "h.safetensors").exists()
    # a block plan or a document too large to hold
    import gainsurgery.training.streaming as streaming

    monkeypatch.setattr(streaming, "MAX_BLOCKS", 10)
    with pytest.raises(streaming.DataError, match="raise --stream-block-bytes"):
        plan_blocks([data], 16)
    monkeypatch.setattr(streaming, "MAX_DOCUMENT_BYTES", 300)
    (tmp_path / "long.txt").write_text("short\n\n\n" + "a long line of text\n" * 30)
    with pytest.raises(streaming.DataError, match="document at byte 8 is longer than 300 bytes"):
        list(iter_documents(tmp_path / "long.txt"))
    monkeypatch.setattr(streaming, "MAX_LINE_BYTES", 50)
    (tmp_path / "wide.jsonl").write_text(json.dumps({"text": "x" * 100}) + "\n")
    with pytest.raises(streaming.DataError, match="a line longer than 50 bytes"):
        list(iter_documents(tmp_path / "wide.jsonl"))


def test_resume_after_a_kill_trims_the_log_and_clears_temporaries(lm, tmp_path):
    """A run killed after its step-3 checkpoint logged steps 4-5 (and half a line); the resumed
    run logs each step once, and a checkpoint folder half-written by the kill is removed."""
    base, data = lm
    log = tmp_path / "run.jsonl"
    api_train(base, data, tmp_path / "ref.safetensors", log=str(tmp_path / "ref.jsonl"))
    api_train(base, data, tmp_path / "g.safetensors", save_every=3, log=str(log))
    rows = log.read_text().splitlines()
    cut = [r for r in rows if json.loads(r).get("step", 0) <= 5]  # as if killed during step 6
    log.write_text("\n".join(cut) + '\n{"step": 6, "lo')
    (tmp_path / "g.checkpoints" / ".step-00000006.abc.tmp").mkdir()
    api_train(base, data, tmp_path / "g.safetensors", resume=str(tmp_path / "g.checkpoints"), save_every=3,
              log=str(log))
    steps = [json.loads(r)["step"] for r in log.read_text().splitlines() if '"loss"' in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    losses = [json.loads(r)["loss"] for r in log.read_text().splitlines() if '"loss"' in r]
    assert losses == [json.loads(r)["loss"] for r in (tmp_path / "ref.jsonl").read_text().splitlines() if '"loss"' in r]
    assert not list((tmp_path / "g.checkpoints").glob(".step-*.tmp"))


def test_a_run_killed_while_saving_a_checkpoint_leaves_nothing_half_made(lm, tmp_path, tmp_path_factory):
    """kill -9 with step 3's checkpoint half made (its claim and temp exist): no step folder appears, and
    the next run on the folder removes what the killed one left (proved by its claim)."""
    import signal

    from pausing import PausedRun

    base, data = lm
    ck = tmp_path / "g.checkpoints"
    args = ["train", base, "--data", data, *COMMON, "-o", tmp_path / "g.safetensors", "--save-every", "3",
            "--checkpoint-dir", ck]
    paused = PausedRun(args, "claim.temp-made", tmp_path_factory.mktemp("flags")).wait_paused()
    assert paused.kill() == -signal.SIGKILL
    left = sorted(p.name for p in ck.iterdir() if p.name.startswith(".step-00000003"))
    assert sorted(n.rsplit(".", 1)[-1] for n in left) == ["claim", "lock", "tmp"], left
    assert not list(ck.glob("step-*"))
    # A run that saves other steps: the folder's lock, not step 3's claim, is what cleans up.
    api_train(base, data, tmp_path / "g.safetensors", save_every=2, checkpoint_dir=str(ck))
    assert sorted(p.name for p in ck.iterdir()) == [".lock", "step-00000002", "step-00000004"]


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")  # no double close of its lock
def test_one_run_at_a_time_per_checkpoint_folder(lm, tmp_path):
    from gainsurgery.errors import TrainingError
    from gainsurgery.training.state import CheckpointLock

    base, data = lm
    held = CheckpointLock(tmp_path / "ck")
    try:
        with pytest.raises(TrainingError, match="another training run is writing checkpoints"):
            api_train(base, data, tmp_path / "g.safetensors", save_every=3, checkpoint_dir=str(tmp_path / "ck"))
    finally:
        held.release()
    api_train(base, data, tmp_path / "g.safetensors", save_every=3, checkpoint_dir=str(tmp_path / "ck"))
    assert (tmp_path / "ck" / "step-00000003" / "state.json").is_file()


def test_a_checkpoint_of_another_model_is_refused(lm, tmp_path, cli):
    """LoRA's checkpoint offered to a gain-ffn run with the same settings: named parameters differ."""
    base, data = lm
    api_train(base, data, tmp_path / "adapter", method="lora", save_every=3)
    step = tmp_path / "adapter.checkpoints" / "step-00000003"
    record = json.loads((step / "state.json").read_text())
    record["settings"]["method"] = "gain-ffn"  # a hand-edited record must still not load into the wrong model
    (step / "state.json").write_text(json.dumps(record))
    res = cli("train", base, "--data", data, *COMMON, "--method", "gain-ffn", "-o", tmp_path / "g.safetensors",
              "--resume", step)
    assert res.exit_code == 1 and "its trainable parameters are not this model's (28 saved, 4 here)" in res.stderr
    assert not (tmp_path / "g.safetensors").exists()


# --- trust boundaries of checkpoints, logs and outputs -------------------------------------------


def test_a_resumed_run_records_its_checkpoint_by_name_and_hash_never_by_path(lm, tmp_path):
    """--resume CHECKPOINT_DIR --save-every N continues in its own folder; the gain file names the
    checkpoint by its step folder, step and the sha256 of its state, never by where it lies."""
    import hashlib

    base, data = lm
    ck = tmp_path / "ck"
    api_train(base, data, tmp_path / "g.safetensors", save_every=3, checkpoint_dir=str(ck))
    state_sha = hashlib.sha256((ck / "step-00000003" / "state.safetensors").read_bytes()).hexdigest()
    res = api_train(base, data, tmp_path / "h.safetensors", save_every=3, checkpoint_dir=str(ck), resume=str(ck))
    assert res.resumed_from == 3
    meta = load(tmp_path / "h.safetensors").metadata
    assert meta["training"]["resume"] == {"checkpoint": "step-00000003", "step": 3, "state_sha256": state_sha}
    assert "checkpoint_dir" not in meta["training"] and meta["training"]["save_every"] == 3
    assert str(tmp_path) not in json.dumps(meta)


def test_a_checkpoint_folder_is_read_as_hostile_input(lm, tmp_path, cli):
    """Only real step-* folders inside the folder named count; their files must be regular files
    inside them (no link out, no FIFO); the safetensors header is held to its rules. One line each."""
    from gainsurgery.errors import TrainingError
    from gainsurgery.training import state

    base, data = lm
    api_train(base, data, tmp_path / "g.safetensors", save_every=3, checkpoint_dir=str(tmp_path / "ck"))
    ck, step = tmp_path / "ck", tmp_path / "ck" / "step-00000003"
    # a link to a checkpoint folder, named by the user, is followed like any path the user types
    (tmp_path / "link").symlink_to(ck, target_is_directory=True)
    assert state.find_checkpoint(tmp_path / "link") == tmp_path / "link" / "step-00000003"
    # ...but a step-* link inside it (to another run's checkpoint) is never taken for the latest
    elsewhere = tmp_path / "elsewhere" / "step-00000009"
    shutil.copytree(step, elsewhere)
    (ck / "step-00000009").symlink_to(elsewhere, target_is_directory=True)
    assert state.find_checkpoint(ck) == step
    # state.json linked out of its folder (a secret, kernel state) is refused before it is read
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"token": "hf_x"}))
    good = (step / "state.json").read_bytes()
    (step / "state.json").unlink()
    (step / "state.json").symlink_to(secret)
    with pytest.raises(TrainingError, match="outside"):
        state.load(step)
    (step / "state.json").unlink()
    (step / "state.json").symlink_to("/proc/self/environ")
    with pytest.raises(TrainingError, match="under /proc"):
        state.load(step)
    (step / "state.json").unlink()
    (step / "state.json").write_bytes(good)
    # a FIFO in place of the tensors: refused at once, never waited on
    tensors = (step / "state.safetensors").read_bytes()
    (step / "state.safetensors").unlink()
    os.mkfifo(step / "state.safetensors")
    res = cli("train", base, "--data", data, *COMMON, "-o", tmp_path / "h.safetensors", "--resume", step)
    assert res.exit_code == 1 and "is a FIFO" in res.stderr and res.stderr.count("\n") == 1
    # a header whose tensors leave a hole: safetensors' own rules, before any tensor byte is read
    (step / "state.safetensors").unlink()
    n = int.from_bytes(tensors[:8], "little")
    header = json.loads(tensors[8:8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["data_offsets"] = [header[first]["data_offsets"][0] + 4, header[first]["data_offsets"][1] + 4]
    raw = json.dumps(header).encode()
    (step / "state.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + tensors[8 + n:] + bytes(4))
    res = cli("train", base, "--data", data, *COMMON, "-o", tmp_path / "h.safetensors", "--resume", step)
    assert res.exit_code == 1 and "belong to no tensor" in res.stderr and res.stderr.count("\n") == 1
    assert not (tmp_path / "h.safetensors").exists()


def test_checkpoint_folder_output_and_log_are_kept_apart(lm, tmp_path, cli):
    """--checkpoint-dir is an output like -o: never -o, never around or inside -o or the log, never a
    link, never inside a checkpoint folder it resumes from; refused before any work, nothing made."""
    base, data = lm
    cases = [
        (["--checkpoint-dir", tmp_path / "g.safetensors", "-o", tmp_path / "g.safetensors"],
         "--checkpoint-dir {t}/g.safetensors is also -o"),
        (["--method", "lora", "--checkpoint-dir", tmp_path / "ad" / "ck", "-o", tmp_path / "ad", "--overwrite"],
         "--checkpoint-dir {t}/ad/ck lies inside -o {t}/ad"),
        (["--checkpoint-dir", tmp_path / "ck", "--log", tmp_path / "ck" / "run.jsonl", "-o", tmp_path / "g.safetensors"],
         "the training log {t}/ck/run.jsonl lies inside --checkpoint-dir {t}/ck"),
    ]
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real", target_is_directory=True)
    cases.append((["--checkpoint-dir", tmp_path / "linked", "-o", tmp_path / "g.safetensors"],
                  "--checkpoint-dir {t}/linked is a symbolic link"))
    for args, message in cases:
        res = cli("train", base, "--data", data, *COMMON, "--save-every", "2", *args)
        assert res.exit_code == 1 and message.format(t=tmp_path) in res.stderr and res.stderr.count("\n") == 1, args
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linked", "real"] and not any((tmp_path / "real").iterdir())
    # resuming another run's checkpoint folder while writing checkpoints inside it
    api_train(base, data, tmp_path / "g.safetensors", save_every=3, checkpoint_dir=str(tmp_path / "ck"))
    res = cli("train", base, "--data", data, *COMMON, "--save-every", "2", "--resume", tmp_path / "ck",
              "--checkpoint-dir", tmp_path / "ck" / "more", "-o", tmp_path / "h.safetensors")
    assert res.exit_code == 1 and f"lies inside the input {tmp_path}/ck" in res.stderr
    assert not (tmp_path / "ck" / "more").exists() and not (tmp_path / "h.safetensors").exists()


def test_two_runs_into_one_output_or_log_the_second_fails_at_once(lm, tmp_path, cli):
    """A run holds -o (gain file or folder), its log and its checkpoint folder for its whole life."""
    from gainsurgery.io.claims import claim_folder
    from gainsurgery.io.locks import lock_output

    base, data = lm
    (tmp_path / "g.safetensors").write_bytes(b"the first run's result")
    (tmp_path / "g.train.jsonl").write_text('{"step": 1}\n')
    with lock_output(tmp_path / "g.safetensors", what="-o"):  # another run, training into it
        res = cli("train", base, "--data", data, *COMMON, "-o", tmp_path / "g.safetensors")
    assert res.exit_code == 1 and "being written by another gainsurgery run" in res.stderr
    # its log was not truncated, its result not replaced
    assert (tmp_path / "g.train.jsonl").read_text() == '{"step": 1}\n'
    assert (tmp_path / "g.safetensors").read_bytes() == b"the first run's result"
    with lock_output(tmp_path / "shared.jsonl", what="the training log"):
        res = cli("train", base, "--data", data, *COMMON, "--log", tmp_path / "shared.jsonl",
                  "-o", tmp_path / "h.safetensors")
    assert res.exit_code == 1 and "the training log" in res.stderr and "another gainsurgery run" in res.stderr
    with claim_folder(tmp_path / "ad", what="-o"):
        res = cli("train", base, "--data", data, *COMMON, "--method", "lora", "-o", tmp_path / "ad")
    assert res.exit_code == 1 and "another gainsurgery run" in res.stderr
    assert not (tmp_path / "h.safetensors").exists() and not (tmp_path / "ad").exists()
    # and once the other run is gone, the lock files went with it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.safetensors", "g.train.jsonl"]


def test_when_the_main_process_cannot_claim_its_outputs_every_process_stops_in_one_line(lm, tmp_path):
    """2 processes, -o held by another run: rank 0 fails to claim it and tells rank 1, which stops with
    the same message instead of dying in the next collective on a closed connection."""
    from gainsurgery.io.locks import lock_output

    base, data = lm
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with lock_output(tmp_path / "g.safetensors", what="-o"):
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                              "--master_port", str(free_port()), "-m", "gainsurgery.cli", "train", str(base),
                              "--data", str(data), *COMMON, "-o", str(tmp_path / "g.safetensors")],
                             capture_output=True, text=True, env=env)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 2, res.stderr[-3000:]
    assert lines.count(f"error: -o {tmp_path}/g.safetensors is being written by another gainsurgery run "
                       "(it holds .g.safetensors.gainsurgery.lock); wait for it to finish or choose another -o") == 1
    assert any(line.startswith("error: stopped: the main process failed: -o ") for line in lines)
    assert "Connection closed by peer" not in res.stderr and "[rank1]" not in res.stderr
    assert not (tmp_path / "g.safetensors").exists() and not (tmp_path / "g.train.jsonl").exists()
