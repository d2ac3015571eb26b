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
