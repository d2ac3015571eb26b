"""The forgetting experiment under hostile or careless use (a red-team pass, replayed).

Each test is one attack on ``scripts/forgetting.py`` or its library: bad settings, a
folder that is not ours, links planted in or out of folders, damaged records, two
runs at once, data changed under a resumed experiment. Every one must end in a
one-line error (no traceback) with nothing of the user's touched, or be harmless.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gainsurgery.io import jsonsafe
from gainsurgery_lab.forgetting import records
from gainsurgery_lab.forgetting.data import ForgettingError, _cut_long, parse_domain
from gainsurgery_lab.forgetting.config import ExperimentConfig
from gainsurgery_lab.forgetting.runner import Experiment
from models import TEXT_A, TEXT_B, save_tiny_lm

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "forgetting.py"


def _docs(text: str, n: int, seed: int = 0) -> str:
    """``n`` documents, random draws of ``text``'s words (no two share a 13-word run: see data.NGRAM)."""
    rng = random.Random(seed)
    words = text.split()
    docs = []
    for i in range(n):
        body, size = [], rng.randint(200, 700)
        while sum(len(w) + 1 for w in body) < size:
            body.append(rng.choice(words))
        docs.append(f"(doc {i:b}) " + " ".join(body))
    return "\n\n\n".join(docs)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny base and three domain files (a, b to train, c only scored)."""
    root = tmp_path_factory.mktemp("hostile-forgetting")
    base = save_tiny_lm(root / "base", "llama", torch.bfloat16)
    files = {}
    for i, (name, text) in enumerate([("a", TEXT_A), ("b", TEXT_B), ("c", TEXT_A[::-1])]):
        files[name] = root / f"{name}.txt"
        files[name].write_text(_docs(text, 40, i), encoding="utf-8")
    return {"root": root, "base": base, "files": files}


def _cfg(world, out: Path, **kw) -> ExperimentConfig:
    f = world["files"]
    settings = dict(base=str(world["base"]), out=str(out), sequence=[parse_domain(f"a={f['a']}"),
                                                                      parse_domain(f"b={f['b']}")],
                    extra_eval=[parse_domain(f"c={f['c']}")], front_methods=["gain-ffn"], seed_methods=[],
                    extra_methods=[], variants=[], grids={"gain-ffn": [-4]}, max_extensions=0, seeds=1, steps=1,
                    batch_size=2, seq_len=32, test_windows=4, dev_windows=2, yesno=0, phases=["fronts"])
    settings.update(kw)
    return ExperimentConfig(**settings)


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


def _one_line_error(proc: subprocess.CompletedProcess, match: str) -> None:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    err = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line
           and not line.startswith("  warnings.warn")]
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert match in err[0], err[0]


@pytest.fixture(scope="module")
def finished(world, tmp_path_factory):
    """A finished (tiny) experiment folder, copied by the tests that damage it."""
    out = tmp_path_factory.mktemp("finished") / "out"
    Experiment(_cfg(world, out), echo=None).execute()
    return out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    return dst


# ------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_stop_after_must_be_a_finite_number_and_nothing_is_written(world, tmp_path, value):
    out = tmp_path / "o"
    proc = _cli("run", "--out", str(out), "--base", str(world["base"]), "--domain", f"a={world['files']['a']}",
                "--steps", "1", "--batch-size", "2", "--seq-len", "32", "--test-windows", "4", "--dev-windows", "2",
                "--yesno", "0", "--stop-after", value, "--dry-run")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("grids, match", [({"gain-ffn": [10 ** 6]}, "exponents must lie in -40..0"),
                                          ({"gain-ffn": [-1000]}, "exponents must lie in -40..0"),
                                          ({"gain-ffn": [2]}, "exponents must lie in -40..0"),
                                          ({"gain-ffn": [-4, -4]}, "lists an exponent twice")])
def test_grid_exponents_are_bounded_and_distinct(world, tmp_path, grids, match):
    with pytest.raises(ForgettingError, match=match):
        _cfg(world, tmp_path / "o", grids=grids).validate()


@pytest.mark.parametrize("field, value, match", [("steps", 10 ** 18, "--steps must be an integer from 1 to"),
                                                 ("seeds", 10 ** 9, "--seeds must be"),
                                                 ("max_extensions", 10 ** 6, "--max-extensions must be"),
                                                 ("base", "", "--base is empty")])
def test_settings_out_of_range_are_refused(world, tmp_path, field, value, match):
    with pytest.raises(ForgettingError, match=match):
        _cfg(world, tmp_path / "o", **{field: value}).validate()


def test_a_window_longer_than_the_model_is_refused_before_anything_is_written(world, tmp_path):
    exp = Experiment(_cfg(world, tmp_path / "o", seq_len=4096, test_windows=1, dev_windows=1), echo=None)
    with pytest.raises(ForgettingError, match="longer than the base model's"):
        exp.prepare(write=False)
    assert not (tmp_path / "o").exists()


def test_a_missing_yes_no_file_is_found_before_training(world, tmp_path):
    exp = Experiment(_cfg(world, tmp_path / "o", yesno=5, yesno_file=str(tmp_path / "nope.jsonl")), echo=None)
    with pytest.raises(ForgettingError, match="yes/no"):
        exp.execute()
    assert not (tmp_path / "o" / "experiment.json").exists() and not (tmp_path / "o" / "base.json").exists()


# -------------------------------------------------------------------------------------- domains


@pytest.mark.parametrize("arg, match", [(".=x", "domain name '.'"), ("..=x", "domain name '..'"),
                                        ("-x=y", "domain name '-x'"), ("a/b=x", "domain name 'a/b'")])
def test_domain_names_are_plain(arg, match):
    with pytest.raises(ForgettingError, match=match):
        parse_domain(arg)


def test_a_link_out_of_a_domain_folder_is_refused_and_a_named_link_is_followed(world, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text(_docs(TEXT_A, 30), encoding="utf-8")
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.txt").symlink_to(secret)
    with pytest.raises(ForgettingError, match="train.txt"):
        parse_domain(f"a={folder}")
    named = tmp_path / "named.txt"
    named.symlink_to(secret)
    assert parse_domain(f"a={named}").train == named  # the user chose this link


def test_a_fifo_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(ForgettingError, match="is not a regular file"):
        parse_domain(f"a={fifo}")


def test_held_out_text_never_reaches_training(world, tmp_path):
    f = world["files"]
    with pytest.raises(ForgettingError, match="are the same file"):
        parse_domain(f"a={f['a']},{f['a']}")
    with pytest.raises(ForgettingError, match="read the same file"):
        _cfg(world, tmp_path / "o", sequence=[parse_domain(f"a={f['a']}"), parse_domain(f"b={f['a']}")]).validate()
    # a validation file whose documents also sit in the training file: those are dropped from training
    valid = tmp_path / "valid.txt"
    valid.write_text(f["a"].read_text(encoding="utf-8"), encoding="utf-8")
    exp = Experiment(_cfg(world, tmp_path / "o", sequence=[parse_domain(f"a={f['a']},{valid}"),
                                                            parse_domain(f"b={f['b']}")]), echo=None)
    exp.prepare(write=False)
    dom = exp.domains["a"]
    import re

    held = {m for w in dom.test.ids + dom.dev.ids for m in re.findall(r"\(doc \d+\)", exp.tokenizer.decode(w))}
    assert held and dom.info["duplicates_dropped"] == len(held)
    assert not any(m in dom.train_text for m in held) and dom.train_documents == 40 - len(held)


def test_a_very_long_document_is_cut_at_lines():
    doc = ("x" * 999 + "\n") * 2500  # 2.5 M characters, one "document"
    pieces = _cut_long([doc, "short"])
    assert len(pieces) == 4 and pieces[-1] == "short"
    assert all(len(p) <= 1_000_000 for p in pieces) and sum(len(p) for p in pieces[:-1]) >= len(doc) - 2500
    assert _cut_long(["y" * 2_500_000]) == ["y" * 1_000_000] * 2 + ["y" * 500_000]  # no line: a hard cut


# --------------------------------------------------------------------------------- the folder


def test_a_folder_that_is_not_ours_is_never_written(world, tmp_path):
    out = tmp_path / "project"
    (out / "data" / "a").mkdir(parents=True)
    notes = out / "data" / "a" / "train.txt"
    notes.write_text("MY PRECIOUS NOTES", encoding="utf-8")
    with pytest.raises(ForgettingError, match="not empty and holds no experiment.json"):
        Experiment(_cfg(world, out), echo=None)
    assert notes.read_text(encoding="utf-8") == "MY PRECIOUS NOTES" and sorted(os.listdir(out)) == ["data"]


def test_a_failed_or_dry_run_leaves_nothing_and_the_corrected_command_works(world, tmp_path):
    out = tmp_path / "o"
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n", encoding="utf-8")
    bad = _cfg(world, out, sequence=[parse_domain(f"a={world['files']['a']}"), parse_domain(f"b={empty}")])
    with pytest.raises(ForgettingError, match="holds no text"):
        Experiment(bad, echo=None).execute()
    Experiment(_cfg(world, out, steps=2), echo=None).prepare(write=False)  # a dry run
    assert not out.exists() or not any(p.name != ".experiment.lock" for p in out.iterdir())
    Experiment(_cfg(world, out), echo=None).prepare()  # other settings than the dry run: still fine
    assert (out / "experiment.json").is_file()


def test_resume_names_what_differs_and_refuses_changed_data(world, tmp_path):
    out = tmp_path / "o"
    Experiment(_cfg(world, out), echo=None).prepare()
    with pytest.raises(ForgettingError, match=r"steps: 3 here, 1 in the folder"):
        Experiment(_cfg(world, out, steps=3), echo=None)
    Experiment(_cfg(world, out, base=str(world["base"]) + "/"), echo=None)  # the same folder, spelled otherwise
    # another file of the same name, or the same file edited: refused, naming the domain
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    other = moved / "a.txt"
    other.write_text(_docs(TEXT_B, 40, 7), encoding="utf-8")
    changed = _cfg(world, out, sequence=[parse_domain(f"a={other}"), parse_domain(f"b={world['files']['b']}")])
    with pytest.raises(ForgettingError, match="domain a: its files changed"):
        Experiment(changed, echo=None)


def test_two_plain_runs_never_share_a_folder_but_workers_do(world, tmp_path):
    from gainsurgery.io.locks import hold_lock

    out = tmp_path / "o"
    cfg = _cfg(world, out)
    Experiment(cfg, echo=None).prepare()
    with hold_lock(out / ".experiment.lock", what="test", error=ForgettingError):
        with pytest.raises(ForgettingError, match="in use by another process"):
            Experiment(cfg, echo=None).execute()
    assert not (out / "base.json").exists()  # the second run did nothing
    with hold_lock(out / ".experiment.lock", shared=True, what="test", error=ForgettingError):
        with pytest.raises(ForgettingError, match="in use by another process"):
            Experiment(cfg, echo=None).execute()  # a plain run while workers hold it
        exp = Experiment(cfg, echo=None)
        exp.execute(worker=(0, 1))  # a worker shares the folder with other workers
    key = exp.plan.static_keys()[0]
    assert exp.runs.is_finished(key)
    # a run another worker holds is skipped, not run twice
    from gainsurgery_lab.forgetting.config import RunKey

    other = RunKey("gain-ffn", "stack", -3, 0)
    exp.runs.run_dir(other).mkdir(parents=True)
    with hold_lock(exp.runs.run_dir(other) / ".run.lock", what="test", error=ForgettingError):
        assert exp.runs.run(other) == [] and not (exp.runs.run_dir(other) / "stage-1.json").exists()


def test_planted_links_in_the_run_folder_are_never_written_through(world, tmp_path):
    out = tmp_path / "o"
    cfg = _cfg(world, out, front_methods=["lora-matched"], grids={"lora-matched": [-4]})
    exp = Experiment(cfg, echo=None)
    exp.prepare()
    victim = tmp_path / "victim"
    victim.mkdir()
    run = exp.runs.run_dir(exp.plan.static_keys()[0])
    run.mkdir(parents=True)
    (run / ".merged-1.tmp").symlink_to(victim)  # the temp name an older version used
    (run / "merged-1").symlink_to(victim)
    exp.execute()
    assert os.listdir(victim) == []
    assert exp.runs.is_finished(exp.plan.static_keys()[0])


# ------------------------------------------------------------------------------ damaged records


def _damage(out: Path, rel: str, value) -> None:
    p = out / rel
    p.unlink()
    p.write_text(value if isinstance(value, str) else json.dumps(value), encoding="utf-8")


@pytest.mark.parametrize("rel, value, match", [
    ("experiment.json", [], "expected object"),
    ("experiment.json", {}, "signature: missing"),
    ("base.json", [1], "expected object"),
    ("base.json", {"test_nll": {}, "dev_nll": {}}, "domain 'a' missing"),
    ("base.json", {"test_nll": {"a": ["x"] * 4, "b": [1.0] * 4, "c": [1.0] * 4}, "dev_nll": {}}, "expected number"),
    ("base.json", {"test_nll": {"a": [1.0], "b": [1.0] * 4, "c": [1.0] * 4}, "dev_nll": {}}, "1 values for 4"),
    ("data/a/windows.json", {"info": {}}, "name: missing"),
    ("runs/gain-ffn__stack__lr-4__s0/run.json", [], "expected object"),
    ("runs/gain-ffn__stack__lr-4__s0/run.json", {"method": "evil"}, "method 'evil' is not one of"),
    ("runs/gain-ffn__stack__lr-4__s0/run.json",
     {"method": "gain-ffn", "variant": "stack", "lr_exponent": 10 ** 6, "seed": 0, "lr": 1.0}, "above the maximum"),
    ("runs/gain-ffn__stack__lr-4__s0/run.json",
     {"method": "gain-ffn", "variant": "stack", "lr_exponent": -3, "seed": 0, "lr": 1.0}, "but lies in runs/"),
    ("runs/gain-ffn__stack__lr-4__s0/stage-1.json", "\"hello\"", "expected object"),
    ("runs/gain-ffn__stack__lr-4__s0/stage-1.json", {"stage": 1, "domain": "a"}, "test_nll"),
    ("runs/gain-ffn__stack__lr-4__s0/stage-1.json", {"stage": 1, "domain": "a", "failed": " "}, "empty reason"),
])
def test_damaged_records_are_one_line_errors(finished, tmp_path, rel, value, match):
    from gainsurgery_lab.forgetting.analysis import Results

    out = _copy(finished, tmp_path / "out")
    _damage(out, rel, value)
    with pytest.raises(ForgettingError, match=match) as err:
        Results(out, resamples=50)
    assert "\n" not in str(err.value)


def test_report_cli_on_a_damaged_folder_and_links_out(finished, tmp_path):
    out = _copy(finished, tmp_path / "out")
    _damage(out, "base.json", {"test_nll": []})
    _one_line_error(_cli("report", "--out", str(out)), "base.json")
    out2 = _copy(finished, tmp_path / "out2")
    outside = tmp_path / "windows.json"
    outside.write_bytes((out2 / "data" / "a" / "windows.json").read_bytes())
    (out2 / "data" / "a" / "windows.json").unlink()
    (out2 / "data" / "a" / "windows.json").symlink_to(outside)  # a link out of the experiment folder
    _one_line_error(_cli("report", "--out", str(out2)), "windows.json")
    _one_line_error(_cli("report", "--out", str(tmp_path / "missing")), "not a folder")


def test_report_is_strict_json_and_written_whole_or_not_at_all(finished, tmp_path):
    from gainsurgery_lab.forgetting.report import write_report

    out = _copy(finished, tmp_path / "out")
    write_report(out, resamples=50)
    data = jsonsafe.load(out / "results.json", max_bytes=records.MAX_RECORD_BYTES)  # NaN would be refused
    assert data["runs"] and json.loads((out / "experiment.json").read_text())["config"].get("deadline") is None
    before = (out / "results.json").read_bytes()
    (out / "results.md").unlink()
    (out / "results.md").symlink_to(tmp_path / "elsewhere.md")
    with pytest.raises(ForgettingError):
        write_report(out, resamples=60)
    assert (out / "results.json").read_bytes() == before and not (tmp_path / "elsewhere.md").exists()


def _edit(out: Path, rel: str, fn) -> None:
    obj = json.loads((out / rel).read_text())
    fn(obj)
    _damage(out, rel, obj)


@pytest.mark.parametrize("rel, fn, match", [
    ("base.json", lambda o: o.__setitem__("dev_nll", {}), "dev_nll: domain 'a' missing"),
    ("base.json", lambda o: o["test_nll"]["a"].__setitem__(0, 1e6), "is above"),
    ("experiment.json", lambda o: o["config"].pop("seq_len"), "config.seq_len: missing"),
])
def test_records_that_parse_but_lie_are_refused(finished, tmp_path, rel, fn, match):
    from gainsurgery_lab.forgetting.analysis import Results

    out = _copy(finished, tmp_path / "out")
    _edit(out, rel, fn)
    with pytest.raises(ForgettingError, match=match):
        Results(out, resamples=50)


def test_optional_fields_may_be_null_or_missing(finished, tmp_path):
    from gainsurgery_lab.forgetting.report import write_report

    out = _copy(finished, tmp_path / "out")
    run = "runs/gain-ffn__stack__lr-4__s0"

    def stage2(o):
        o["cpu_seconds"] = None
        o["peak_rss_mib"] = None
        o.pop("gains")
    _edit(out, f"{run}/stage-2.json", stage2)
    _edit(out, "base.json", lambda o: o.pop("seconds"))
    write_report(out, resamples=50)
    row = json.loads((out / "results.json").read_text())["runs"][0]
    assert row["max_abs_s_minus_1"][1] is None and row["max_abs_s_minus_1"][0] > 0


def test_a_packed_folder_resumes_only_if_its_data_split_the_same(world, finished, tmp_path):
    out = _copy(finished, tmp_path / "out")
    for d in "abc":
        (out / "data" / d / "train.txt").unlink()  # what a tarball of results leaves out
    before = (out / "data" / "a" / "windows.json").read_bytes()
    Experiment(_cfg(world, out), echo=None).execute()  # rebuilt from the same files: resumes, nothing rerun
    assert (out / "data" / "a" / "windows.json").read_bytes() == before
    assert (out / "data" / "a" / "train.txt").is_file()
    (out / "data" / "a" / "train.txt").unlink()
    exp = json.loads((out / "experiment.json").read_text())
    exp.pop("sources")  # as folders made before sources were recorded
    _damage(out, "experiment.json", exp)
    other = tmp_path / "a.txt"
    other.write_text(_docs(TEXT_B, 40, 5), encoding="utf-8")
    changed = _cfg(world, out, sequence=[parse_domain(f"a={other}"), parse_domain(f"b={world['files']['b']}")])
    with pytest.raises(ForgettingError, match="was split from other data"):
        Experiment(changed, echo=None).execute()


def test_a_folder_made_ours_by_another_run_meanwhile_keeps_its_split(world, tmp_path):
    out = tmp_path / "o"
    late = Experiment(_cfg(world, out), echo=None)  # checked the folder while it was still new
    Experiment(_cfg(world, out), echo=None).prepare()  # another run makes it an experiment folder
    frozen = out / "data" / "a" / "windows.json"
    stat0 = frozen.stat()
    late.execute()  # re-checks under the lock and uses the frozen split instead of writing its own
    assert frozen.stat().st_ino == stat0.st_ino and frozen.stat().st_mtime_ns == stat0.st_mtime_ns


def test_parallel_workers_share_a_folder_and_a_plain_run_waits_its_turn(world, tmp_path):
    """The flow of scripts/gpu_session.sh, as real processes: base, two workers, then a plain run."""
    from gainsurgery.io.locks import hold_lock

    out = tmp_path / "o"
    f = world["files"]
    common = ["--out", str(out), "--base", str(world["base"]), "--domain", f"a={f['a']}", "--domain", f"b={f['b']}",
              "--methods", "gain-ffn", "--grid", "gain-ffn=-6,-5,-4,-3", "--max-extensions", "0", "--steps", "8",
              "--batch-size", "2", "--seq-len", "32", "--test-windows", "4", "--dev-windows", "2", "--seeds", "1",
              "--yesno", "0", "--extra-methods", "", "--variants", ""]
    assert _cli("run", *common, "--phases", "none").returncode == 0
    workers = [subprocess.Popen([sys.executable, str(SCRIPT), "run", *common, "--phases", "fronts", "--worker",
                                 f"{i}/2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(2)]
    results = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], results
    log = (out / "log.txt").read_text()
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == [f"gain-ffn__stack__lr{e}__s0" for e in (-3, -4, -5, -6)]
    for name in runs:  # each sequence trained by exactly one process
        assert log.count(f"{name}: stage 1/2 (a) done") == 1 and log.count(f"{name}: stage 2/2 (b) done") == 1
    # while a worker holds the folder (shared), a plain run is refused at once; held here, so that
    # the refusal does not depend on how fast the workers are on a busy machine
    with hold_lock(out / ".experiment.lock", shared=True, what="a worker", error=ForgettingError):
        _one_line_error(_cli("run", *common, "--phases", "fronts"), "in use by another process")
    assert _cli("run", *common, "--phases", "fronts").returncode == 0  # afterwards, a plain run finishes the rest
