"""CoQA yes/no items from the BIG-bench 1.0.0 source archive (an evaluation set).

``fetch_yesno`` extracts the yes/no questions of CoQA into ``<cache>/yesno/coqa_yesno.jsonl``
(the BIG-bench canary asks that they never be used for training). The archive is no longer
served by PyPI (bigbench 1.0.0 answers 403 since 2026-12); a cache made before stays usable,
and the knowledge probes of :mod:`gainsurgery_lab.probes` replace it in the experiment.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gainsurgery.corpora.download import find_one, pip_download, unpack
from gainsurgery.errors import DomainError
from gainsurgery.io import jsonsafe
from gainsurgery.io.cache import cache_root, exclusive_lock
from gainsurgery.io.hashing import sha256_file
from gainsurgery.io.atomic import write_file as write_text


BIGBENCH_SPEC = "bigbench==1.0.0"
COQA_DIR = "bigbench/benchmark_tasks/coqa_conversational_question_answering/"
YESNO_FILE = "coqa_yesno.jsonl"


def default_yesno_out() -> Path:
    """Default yes/no folder: ``<cache>/yesno``."""
    return cache_root() / "yesno"


def _yesno_norm(answer: str) -> str:
    return re.sub(r"[^a-z ]", "", answer.lower()).strip()


def coqa_yesno_items(data: dict) -> list[dict]:
    """CoQA task JSON → items whose gold answer is plainly "yes" or "no".

    CoQA questions are conversational ("does he do silly things?"), so each
    item carries the earlier turns of its conversation in ``history``.
    ``unanimous`` is True when every additional annotator gave the same
    yes/no answer for that turn.
    """
    items = []
    for story in data["data"]:
        questions = {q["turn_id"]: q["input_text"] for q in story["questions"]}
        extra = [
            {a["turn_id"]: a["input_text"] for a in answers}
            for answers in story.get("additional_answers", {}).values()
        ]
        history: list[dict] = []
        for answer in story["answers"]:
            turn = answer["turn_id"]
            question = questions.get(turn, "").strip()
            label = _yesno_norm(answer["input_text"])
            if label in ("yes", "no") and question:
                others = [_yesno_norm(alt[turn]) for alt in extra if turn in alt]
                items.append({
                    "passage": story["story"].strip(),
                    "question": question,
                    "answer": label,
                    "history": list(history),
                    "unanimous": all(o == label for o in others),
                    "story_id": story["id"],
                    "turn_id": turn,
                    "source": story.get("source", ""),
                })
            history.append({"question": question, "answer": answer["input_text"].strip()})
    return items


def fetch_yesno(out: Path | None = None, *, force: bool = False,
                log: Callable[[str], None] | None = None) -> dict:
    """Extract CoQA yes/no items into ``<out>/coqa_yesno.jsonl`` (once).

    The 358 MB BIG-bench source archive is downloaded to a temporary folder,
    only the CoQA task folder is kept (``<out>/bigbench-coqa/``), and the
    archive is deleted. Returns the yes/no manifest (counts, sha256).
    """
    say = log or (lambda _msg: None)
    out = Path(out or default_yesno_out())
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    target = out / YESNO_FILE
    with exclusive_lock(out / ".lock"):
        if not force and manifest_path.is_file() and target.is_file():
            manifest = jsonsafe.load(manifest_path, error=DomainError)
            if manifest.get("sha256") == sha256_file(target):
                say("yesno: cached")
                return manifest
        started = time.monotonic()
        task_dir = out / "bigbench-coqa"
        task_json = task_dir / "coqa.test.json"
        download_bytes = 0
        if force or not task_json.is_file():
            say(f"yesno: downloading {BIGBENCH_SPEC} source archive (~358 MB, once)")
            with tempfile.TemporaryDirectory(prefix="gainsurgery-bigbench-") as tmp:
                archive = pip_download(BIGBENCH_SPEC, Path(tmp) / "dl", sdist=True)
                download_bytes = archive.stat().st_size
                root = unpack(archive, Path(tmp) / "x", lambda n: COQA_DIR in n)
                found = find_one(root, "*/" + COQA_DIR + "coqa.test.json").parent
                shutil.rmtree(task_dir, ignore_errors=True)
                shutil.copytree(found, task_dir)
        data = jsonsafe.load(task_json, error=DomainError, max_bytes=512 << 20)
        items = coqa_yesno_items(data)
        write_text(target, "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
        manifest = {
            "source": f"PyPI {BIGBENCH_SPEC} sdist: {COQA_DIR}coqa.test.json",
            "canary": data.get("canary", ""),
            "stories": len(data["data"]),
            "items": len(items),
            "yes": sum(it["answer"] == "yes" for it in items),
            "no": sum(it["answer"] == "no" for it in items),
            "unanimous": sum(it["unanimous"] for it in items),
            "download_bytes": download_bytes,
            "seconds": round(time.monotonic() - started, 1),
            "file": YESNO_FILE,
            "sha256": sha256_file(target),
        }
        write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
        say(f"yesno: {manifest['items']} items ({manifest['yes']} yes, {manifest['no']} no, "
            f"{manifest['unanimous']} unanimous) from {manifest['stories']} stories")
        return manifest


def load_yesno(out: Path | None = None, unanimous_only: bool = False) -> list[dict]:
    """The CoQA yes/no items written by :func:`fetch_yesno`."""
    path = Path(out or default_yesno_out()) / YESNO_FILE
    if not path.is_file():
        raise DomainError("yes/no items not fetched yet; run: python scripts/fetch_domains.py --yesno")
    items = [jsonsafe.expect_object(row, where=f"{path}:{n}", error=DomainError)
             for n, row in jsonsafe.iter_jsonl(path, error=DomainError)]
    return [it for it in items if it.get("unanimous")] if unanimous_only else items
