"""Fuzzing training inputs: checkpoints to resume from, data and yes/no files, PEFT adapters.

``train --resume FOLDER`` reads a checkpoint someone may have damaged or planted;
``--data``/``--eval-data`` and yes/no files are JSON lines or text; ``import-peft``
reads ``adapter_config.json`` and ``adapter_model.safetensors``. Any of them must
give a result or a one-line error (see tests/fuzzing.py). A checkpoint is mutated
from a real one (``state.save`` of a small model and its AdamW) and resumed into a
fresh model, optimizer, schedule and batch order: what resumes must train a step.

CI runs a bounded number of examples; ``GAINSURGERY_FUZZ_EXAMPLES=N`` runs N per test.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from fuzzing import (
    corrupted,
    failed,
    fuzz_settings,
    header_for,
    json_text,
    outcome,
    safetensors_file,
    write,
)
from gainsurgery.errors import DataError, GainFileError, TrainingError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gainsurgery.training import state  # noqa: E402
from gainsurgery.training.data import MemoryBatches, Windows, read_documents  # noqa: E402
from gainsurgery.training.evaluation import read_yesno  # noqa: E402
from gainsurgery.training.streaming import iter_documents  # noqa: E402

BATCH, STEPS = 2, 6


def _setup(seed: int = 0):
    """A small model, its AdamW, a warmup schedule and a batch order, as train() builds them."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    named = [(n, p) for n, p in model.named_parameters()]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=0.01, weight_decay=0.0)
    scheduler = transformers.get_constant_schedule_with_warmup(optimizer, 2)
    batches = MemoryBatches(Windows([[i, i + 1, i + 2] for i in range(8)], 3, None), BATCH, seed=seed)
    return model, named, optimizer, scheduler, batches


def _train_step(model, optimizer, scheduler, batches) -> float:
    x = batches.next().float()
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    return float(loss.detach())


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real checkpoint after 2 steps: the seed every example mutates."""
    model, named, optimizer, scheduler, batches = _setup()
    loss = [_train_step(model, optimizer, scheduler, batches) for _ in range(2)][-1]
    record = {"settings": {"method": "gain", "steps": STEPS}, "scheduler": scheduler.state_dict(), "scaler": None,
              "data": batches.position(), "last_loss": loss, "seconds": 1.5, "evals": [{"step": 0, "ppl": 3.0}]}
    return state.save(tmp_path_factory.mktemp("fuzz-ckpt"), 2, named, optimizer, record)


PARTS = ["none", "json", "json", "json", "tensors", "tensors", "bytes"]


@fuzz_settings(80)
@given(data=st.data())
def test_checkpoint_resumes_or_one_line_and_what_resumes_trains(data, checkpoint):
    part = data.draw(st.sampled_from(PARTS), label="part")
    work = Path(tempfile.mkdtemp(prefix="gainsurgery-fuzz-ckpt-")) / checkpoint.name
    try:
        shutil.copytree(checkpoint, work)
        if part == "json":
            seed = json.loads((checkpoint / "state.json").read_text())
            write(work / "state.json", data.draw(json_text(seed, 3, keys=list(seed) + ["consumed", "processes"]),
                                                 label="state.json"))
        elif part in ("tensors", "bytes"):
            raw = (checkpoint / "state.safetensors").read_bytes()
            if part == "bytes":
                new = data.draw(corrupted(raw), label="bytes")
            else:
                n = int.from_bytes(raw[:8], "little")
                header = json.loads(raw[8:8 + n])
                new = data.draw(safetensors_file(header, raw[8 + n:], 3, keys=["dtype", "shape", "data_offsets"]),
                                label="state.safetensors")
            write(work / "state.safetensors", new)
        loaded = outcome(state.load, work)
        if failed(loaded):
            assert isinstance(loaded, TrainingError), loaded
            return
        record, tensors, _sha = loaded
        model, named, optimizer, scheduler, batches = _setup(seed=1)
        got = outcome(state.resume, record, tensors, named, optimizer, scheduler, None, batches, rank=0,
                      streaming=False, steps=STEPS, max_windows=STEPS * BATCH, folder=work)
        if failed(got):
            assert isinstance(got, TrainingError), got
            return
        # What resumes, trains on: a step runs and keeps the numbers finite (or the data ran out cleanly).
        step, evals, last_loss, seconds = got
        assert type(step) is int and step >= 0 and all(isinstance(e, dict) for e in evals)
        loss = outcome(_train_step, model, optimizer, scheduler, batches)
        assert np.isfinite(loss)
    finally:
        shutil.rmtree(work.parent, ignore_errors=True)


# --------------------------------------------------------------------------- data files


@fuzz_settings(80)
@given(lines=st.lists(json_text({"text": "a document", "meta": {"n": 1}}, 2, keys=["text"]), max_size=5),
       sep=st.sampled_from([b"\n", b"\r\n"]), suffix=st.sampled_from([".jsonl", ".txt", ".json"]))
@example(lines=[b'{"text": "a"}', b"\xff\xfe"], sep=b"\n", suffix=".txt")
# Regression: a lone carriage return ended a line for the whole-file reader, not for the streamed one:
# the same file gave in-memory and streamed training different documents.
@example(lines=[b'{"text":"a document"}', b'\r"text":"x"}', b"", b"", b"b\r\r", b"c"], sep=b"\n", suffix=".txt")
def test_data_file_gives_documents_or_one_line(lines, sep, suffix):
    work = Path(tempfile.mkdtemp(prefix="gainsurgery-fuzz-data-"))
    try:
        path = work / f"data{suffix}"
        write(path, sep.join(lines))
        whole = outcome(read_documents, path)
        streamed = outcome(lambda: list(iter_documents(path)))
        for got in (whole, streamed):
            if failed(got):
                assert isinstance(got, DataError), got
            else:
                assert all(isinstance(d, str) and d.strip() for d in got)
        if not failed(whole) and not failed(streamed):
            assert whole == streamed  # the streamed reader finds the same documents
    finally:
        shutil.rmtree(work, ignore_errors=True)


@fuzz_settings(60)
@given(lines=st.lists(json_text({"passage": "p", "question": "q?", "answer": "yes"}, 2,
                                keys=["passage", "question", "answer"]), max_size=4))
def test_yesno_file_gives_items_or_one_line(lines):
    work = Path(tempfile.mkdtemp(prefix="gainsurgery-fuzz-yesno-"))
    try:
        write(work / "yesno.jsonl", b"\n".join(lines))
        got = outcome(read_yesno, work / "yesno.jsonl")
        if failed(got):
            assert isinstance(got, DataError), got
        else:
            assert got and all(item["answer"] in ("yes", "no") and item["question"] for item in got)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- PEFT adapters


ADAPTER_CONFIG = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": "org/base",
                  "target_modules": ["o_proj", "down_proj"], "feedforward_modules": ["down_proj"],
                  "modules_to_save": None, "inference_mode": True, "init_ia3_weights": True}
ADAPTER_KEYS = ["peft_type", "target_modules", "feedforward_modules", "modules_to_save", "fan_in_fan_out"]
IA3 = "base_model.model.model.layers.0.self_attn.o_proj.ia3_l"


@fuzz_settings(80)
@given(data=st.data())
@example(data=None)
def test_adapter_reads_or_one_line(data):
    from gainsurgery.interop.peft import read_adapter

    work = Path(tempfile.mkdtemp(prefix="gainsurgery-fuzz-adapter-"))
    try:
        header, body = header_for([(IA3, "F32", [1, 4], np.full(4, 1.5, "<f4").tobytes()),
                                   ("base_model.model.model.layers.0.mlp.down_proj.ia3_l", "F32", [6, 1],
                                    np.full(6, 0.5, "<f4").tobytes())], {"format": "pt"})
        if data is None:  # the regex PEFT compiles: one that does not is one line
            config = json.dumps({**ADAPTER_CONFIG, "feedforward_modules": "(unclosed"}).encode()
            weights = None
        else:
            part = data.draw(st.sampled_from(["none", "config", "weights"]), label="part")
            config = data.draw(json_text(ADAPTER_CONFIG, 3, keys=ADAPTER_KEYS), label="config") \
                if part == "config" else json.dumps(ADAPTER_CONFIG).encode()
            weights = data.draw(safetensors_file(header, body, 3), label="weights") if part == "weights" else None
        write(work / "adapter_config.json", config)
        if weights is None:
            from fuzzing import safetensors_bytes
            weights = safetensors_bytes(header, body)
        write(work / "adapter_model.safetensors", weights)
        got = outcome(read_adapter, work)
        if failed(got):
            assert isinstance(got, GainFileError), got
        else:
            cfg, tensors = got
            assert isinstance(cfg, dict) and tensors
            assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in tensors.values())
    finally:
        shutil.rmtree(work, ignore_errors=True)


def test_a_bare_json_value_is_not_a_checkpoint(tmp_path):
    """state.json holding a bare array, number, string or null is one line."""
    for text in ("[]", "3", '"x"', "null"):
        (tmp_path / "state.json").write_text(text)
        (tmp_path / "state.safetensors").write_bytes(b"")
        with pytest.raises(TrainingError, match="not a gainsurgery.train-state/1 checkpoint"):
            state.load(tmp_path)


def _edited(checkpoint: Path, tmp: Path, edit) -> Path:
    work = tmp / checkpoint.name
    shutil.copytree(checkpoint, work)
    record = json.loads((work / "state.json").read_text())
    edit(record)
    (work / "state.json").write_text(json.dumps(record))
    return work


def _set(path: str, value):
    def edit(record):
        *head, last = path.split(".")
        target = record
        for p in head:
            target = target[int(p)] if isinstance(target, list) else target[p]
        target[last] = value
    return edit


@pytest.mark.parametrize("edit,why", [
    # windows consumed far past the run: the batch order was built up to it (unbounded memory, a hang)
    (_set("data.consumed", 10**15), "data"),
    (_set("data.consumed", -2), "data"),
    # LambdaLR.load_state_dict sets every key as an attribute: "step" would shadow the method
    (_set("scheduler.step", 5), "scheduler"),
    (_set("scheduler.last_epoch", "3"), "scheduler"),
    (_set("scheduler.last_epoch", 10**400), "scheduler"),  # float() of it was an OverflowError traceback
    # a learning rate that is a string loaded fine and failed at the first step
    (_set("optimizer.param_groups.0.lr", "0.1"), "optimizer.param_groups"),
    (_set("optimizer.param_groups.0.params", ["0.weight"]), "optimizer.param_groups"),
    (_set("optimizer.scalars", {"0.weight": {"step": "x"}}), "optimizer.scalars"),
    (_set("last_loss", 10**400), "last_loss"),
    (_set("evals", [1]), "evals"),
    (_set("step", 10**9), "step"),
    # Adam with beta2 > 1 takes the root of a negative number at the first step (a RuntimeError mid-run)
    (_set("optimizer.param_groups.0.betas", [0.9, 1.5]), "optimizer.param_groups"),
    (_set("optimizer.param_groups.0.eps", 0.0), "optimizer.param_groups"),
    (_set("optimizer.param_groups.0.lr", -1.0), "optimizer.param_groups"),
])
def test_a_damaged_checkpoint_is_refused_before_the_run_uses_it(checkpoint, tmp_path, edit, why):
    """Regressions: each of these loaded, then crashed or misbehaved later (outside any error handling)."""
    work = _edited(checkpoint, tmp_path, edit)
    record, tensors, _ = state.load(work)
    model, named, optimizer, scheduler, batches = _setup(seed=1)
    with pytest.raises(TrainingError, match=f"the checkpoint is damaged .*{why.split('.')[0]}"):
        state.resume(record, tensors, named, optimizer, scheduler, None, batches, rank=0, streaming=False,
                     steps=STEPS, max_windows=STEPS * BATCH, folder=work)


@pytest.mark.parametrize("tensor,value", [("optim/0.weight/exp_avg_sq", -1.0), ("optim/0.weight/exp_avg", float("nan")),
                                          ("param/1.bias", float("inf"))])
def test_a_checkpoint_holding_numbers_adam_never_makes_is_refused(checkpoint, tmp_path, tensor, value):
    """Regression (fuzz): a negative second moment made the first step a complex-number RuntimeError; NaN
    weights trained for the whole run before the output refused them."""
    from safetensors.torch import save_file

    work = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, work)
    record, tensors, _ = state.load(work)
    tensors = {k: v.clone() for k, v in tensors.items()}
    tensors[tensor].fill_(value)
    save_file(tensors, str(work / "state.safetensors"), metadata={"format": state.FORMAT})
    record, tensors, _ = state.load(work)
    model, named, optimizer, scheduler, batches = _setup(seed=1)
    with pytest.raises(TrainingError, match="the checkpoint is damaged"):
        state.resume(record, tensors, named, optimizer, scheduler, None, batches, rank=0, streaming=False,
                     steps=STEPS, max_windows=STEPS * BATCH, folder=work)


def test_an_untouched_checkpoint_resumes_exactly(checkpoint):
    """The seed resumes: same parameters, the step and data position it recorded."""
    record, tensors, _ = state.load(checkpoint)
    model, named, optimizer, scheduler, batches = _setup(seed=1)
    step, evals, last_loss, seconds = state.resume(record, tensors, named, optimizer, scheduler, None, batches,
                                                   rank=0, streaming=False, steps=STEPS, max_windows=STEPS * BATCH,
                                                   folder=checkpoint)
    assert (step, batches.consumed, seconds, evals) == (2, 2 * BATCH, 1.5, [{"step": 0, "ppl": 3.0}])
    assert all(torch.equal(p, tensors[f"param/{n}"]) for n, p in named)


@pytest.mark.parametrize("pattern,refused", [
    ("(a*)*b", "a repetition inside a repetition"),  # 2**len(name) steps: a hostile adapter hung import-peft
    ("(.*x)+y", "a repetition inside a repetition"),
    (".*.*.*.*.*.*.*.*z", "8 repetitions"),  # len(name)**8 steps
    (r".*\.(down_proj|mlp\.c_proj)$", None),
    (r"(.*\.)?(q|v)_proj", None),
])
def test_a_feedforward_regex_that_backtracks_without_end_is_refused(tmp_path, pattern, refused):
    """Regression (reading the code while fuzzing): PEFT's feedforward_modules regex is matched against every
    module name; Python's re backtracks, so a pattern with nested or many repetitions hangs the import."""
    from fuzzing import safetensors_bytes
    from gainsurgery.interop.peft import read_adapter

    header, body = header_for([(IA3, "F32", [1, 4], np.full(4, 1.5, "<f4").tobytes())], {"format": "pt"})
    write(tmp_path / "adapter_model.safetensors", safetensors_bytes(header, body))
    write(tmp_path / "adapter_config.json", json.dumps({**ADAPTER_CONFIG, "feedforward_modules": pattern}).encode())
    if refused is None:
        assert read_adapter(tmp_path)[0]["feedforward_modules"] == pattern
    else:
        with pytest.raises(GainFileError, match=refused):
            read_adapter(tmp_path)
