"""The package layout keeps its shape: imports run one way, no file imports itself back.

Every import in gainsurgery/ and gainsurgery_lab/ (function-level ones too) is read
with ``ast``. A module may import only parts on its own layer or below (LAYERS,
from the bottom up), the core never imports the lab, and no files import each
other in a loop.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: From the bottom up; a part may import its own layer and those below it.
LAYERS = [
    {"errors", "lazy_exports", "reports"},
    {"io", "extras"},
    {"sources.spec"},  # the BASE grammar and the one repo-id pattern: hub.refs shares it
    {"gainfile", "architectures"},
    {"hub", "plots", "formats"},
    {"sources"},
    {"merge"},
    {"applying"},
    {"training"},
    {"interop", "corpora"},
    {"api"},
    {"demo", "gainsurgery_lab"},
    {"cli"},
]
RANK = {part: i for i, layer in enumerate(LAYERS) for part in layer}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in ("gainsurgery", "gainsurgery_lab") for p in (ROOT / pkg).rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Modules of ours that ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def part_of(module: str) -> str | None:
    if module.startswith("gainsurgery_lab"):
        return "gainsurgery_lab"
    parts = module.split(".")
    if len(parts) > 2 and ".".join(parts[1:3]) in RANK:  # a module with a floor of its own
        return ".".join(parts[1:3])
    return parts[1] if len(parts) > 1 else None  # None: the package root (version, lazy re-exports)


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(p, known) - {m} for m, p in mods.items()}


def test_every_part_has_a_layer():
    parts = {part_of(m) for m in modules()} - {None}
    assert parts <= set(RANK), f"add {sorted(parts - set(RANK))} to LAYERS"


def test_imports_run_down_only():
    wrong = []
    for module, targets in graph().items():
        src = part_of(module)
        for target in targets:
            dst = part_of(target)
            if src is None or dst is None:  # the root hands names on lazily; importing __version__ is fine
                continue
            if RANK[dst] > RANK[src] or (dst == "gainsurgery_lab" and src != "gainsurgery_lab"):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that run back up:\n" + "\n".join(sorted(wrong))


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_shared_names_have_one_home():
    """Literals that used to be copied between modules are defined once (in the core package)."""
    sources = {m: p.read_text(encoding="utf-8") for m, p in modules().items()}
    for literal, home in [('"gainsurgery.json"', "gainsurgery.merge.provenance"),
                          ('"embedded:"', "gainsurgery.sources.spec"),
                          ('"gain-ffn": 5e-3', "gainsurgery.training.config")]:
        holders = sorted(m for m, text in sources.items() if literal in text)
        assert holders == [home], (literal, holders)


#: The only function-level imports of our own modules, each with its reason (issue 20: a deferred
#: import is for a heavy optional dependency, never to dodge a layering problem). A new one fails
#: below until it is listed here with a reason; a listed one that disappears must leave the list too.
DEFERRED_OWN_IMPORTS = {
    # the gguf library (optional extra [gguf]) loads only when a GGUF is touched
    ("gainsurgery/api/checkpoints.py", "gainsurgery.sources.gguf"),
    ("gainsurgery/api/hub.py", "gainsurgery.applying.gguf_sink"),
    ("gainsurgery/applying/pipeline.py", "gainsurgery.applying.gguf_sink"),
    # matplotlib (optional) only for the plot
    ("gainsurgery/api/gains.py", "gainsurgery.plots"),
    # gainfile imports numpy: `gainsurgery --help` and a bad flag stay fast without it
    ("gainsurgery/cli/checkpoints.py", "gainsurgery.gainfile"),
    ("gainsurgery/cli/gains.py", "gainsurgery.gainfile"),
    # the demo pulls torch and transformers (extra [demo])
    ("gainsurgery/cli/training.py", "gainsurgery.demo"),
    # io.inputs imports io.secrets (messages are redacted): the one reverse use is deferred
    ("gainsurgery/io/secrets.py", "gainsurgery.io.inputs"),
    # the training loop pulls torch and accelerate: `from gainsurgery.training import TrainConfig` does not
    ("gainsurgery/training/__init__.py", "gainsurgery.training.loop"),
    # merge.provenance at import time would bring the Hub modules into every training run
    ("gainsurgery/training/loop.py", "gainsurgery.merge.provenance"),
}


def deferred_own_imports() -> set[tuple[str, str]]:
    """(file, module) of every import of gainsurgery or gainsurgery_lab inside a function."""
    found = set()
    for path in [*(ROOT / "gainsurgery").rglob("*.py"), *(ROOT / "gainsurgery_lab").rglob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom):
                    names = [("." * node.level) + (node.module or "")]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                for name in names:
                    if name.startswith(".") or name.split(".")[0] in ("gainsurgery", "gainsurgery_lab"):
                        found.add((path.relative_to(ROOT).as_posix(), name))
    return found


def test_function_level_imports_of_our_own_modules_are_the_listed_ones():
    found = deferred_own_imports()
    assert sorted(found - DEFERRED_OWN_IMPORTS) == [], "deferred imports of our own modules without a reason"
    assert sorted(DEFERRED_OWN_IMPORTS - found) == [], "listed deferred imports that are gone: drop them"
    assert len(found) == 10


def test_training_a_local_model_never_imports_the_hub_code():
    """Training, evaluation and the PEFT converters read a BASE through sources.local: no module of
    gainsurgery.hub is loaded for a local or embedded model (scripts/gpu_check.py checks the same on a GPU)."""
    import subprocess
    import sys

    code = ("import sys; import gainsurgery.training.loop, gainsurgery.training.modeling, gainsurgery.sources.local; "
            "from gainsurgery.sources import resolve_base, local_folder_of, base_model_name; "
            "print(sorted(m for m in sys.modules if m.startswith('gainsurgery.hub')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"
