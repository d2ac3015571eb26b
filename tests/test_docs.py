"""The examples in docs/api.md run as written, in order, in an empty folder."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
SKIP = "# not run by tests/test_docs.py"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_api_examples_run(tmp_path, monkeypatch, capsys):
    blocks = [b for b in python_blocks(DOC.read_text(encoding="utf-8")) if not b.startswith(SKIP)]
    assert len(blocks) >= 5
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_api"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/api.md[block {i}]", "exec"), namespace)  # noqa: S102 - our own docs
    out = capsys.readouterr().out
    assert "llama 4 192" in out and "merged 4 True" in out and "True 4" in out
    assert "merged checkpoint" in out
    assert (tmp_path / "merged" / "gainsurgery.json").is_file()


# ------------------------------------------------------------------ shell blocks a stranger can run

ROOT = Path(__file__).resolve().parents[1]
SHELL_LANGS = {"bash", "sh", "shell", "console"}
#: Folders of this repository a command may name (a script to run, a config to read).
REPO_DIRS = {"scripts", "configs", "docs", "tests", "gainsurgery", "gainsurgery_lab", ".ci"}
#: Places that exist only on one machine: a command naming one cannot run from a fresh clone.
MACHINE_PATHS = re.compile(r"(?<![\w.~$/-])/(?:work|root|home|Users|opt|mnt)/[^\s'\"`)]*")
FILE_SUFFIXES = (".py", ".sh", ".toml", ".cfg", ".ini", ".yaml", ".yml")


def doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def shell_blocks(text: str) -> list[str]:
    """Every fenced block tagged as a shell language."""
    blocks = re.findall(r"^```([\w-]*)[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
    return [body for lang, body in blocks if lang.lower() in SHELL_LANGS]


def named_repo_files(block: str) -> list[str]:
    """Words of a shell block that name a file of this repository: a path starting at one
    of its folders (``scripts/x.py``, ``./scripts/x.sh``) or a bare script (``x.sh``)."""
    names = []
    for line in block.splitlines():
        line = line.split(" #", 1)[0]
        if line.lstrip().startswith("#"):
            continue
        for word in re.split(r"[\s=;&|()<>]+", line):
            word = word.strip("'\"`,")
            word = word[2:] if word.startswith("./") else word
            if not word or word.startswith(("-", "$", "~", "/", "http:", "https:")) or "*" in word:
                continue
            head = word.split("/", 1)[0]
            if (head in REPO_DIRS and "/" in word) or ("/" not in word and word.endswith(".sh")):
                names.append(word)
    return names


def test_shell_blocks_name_only_files_of_the_repo():
    """Every script, config or doc a shell block of README.md or docs/ names is in the
    repository, and no block carries a path that exists only on one machine."""
    missing, machine = [], []
    blocks = 0
    for doc in doc_files():
        for block in shell_blocks(doc.read_text(encoding="utf-8")):
            blocks += 1
            rel = doc.relative_to(ROOT)
            missing += [f"{rel}: {name}" for name in named_repo_files(block) if not (ROOT / name).exists()]
            machine += [f"{rel}: {m}" for m in MACHINE_PATHS.findall(block)]
    assert blocks >= 10  # the parser still finds the docs' commands
    assert not missing, "docs name files that are not in the repository:\n" + "\n".join(missing)
    assert not machine, "docs carry paths of one machine:\n" + "\n".join(machine)


def test_shell_block_checker_catches_what_it_is_for():
    block = ("/work/tools/quiet.sh python scripts/bench_apply.py --workdir /tmp/b\n"
             "bash ./scripts/nope.sh && python scripts/forgetting.py run  # see docs/x.md\n"
             "quiet.sh gainsurgery apply base/ g.safetensors out/ --json > /tmp/r.json\n")
    assert named_repo_files(block) == ["scripts/bench_apply.py", "scripts/nope.sh", "scripts/forgetting.py",
                                       "quiet.sh"]
    assert MACHINE_PATHS.findall(block) == ["/work/tools/quiet.sh"]
    assert shell_blocks("```bash\nls scripts/a.py\n```\n```python\nimport x\n```\n") == ["ls scripts/a.py\n"]
