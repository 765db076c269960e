"""The tree reads as the data flow (docs/ARCHITECTURE.md): no stage imports a later stage, short functions and modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "imtune"

# Rank of each top-level part of the package; a module may import only parts of equal or lower rank.
# Foundation modules (errors, config, io_utils, statistics, the model loader) serve every stage. `hf` (imtune's
# weights in HF Trainer / TRL) is an integration layer on top of training, beside evaluation; only cli uses it.
RANK = {
    "errors": 0, "inputs": 0, "ranges": 0, "statistics": 0, "io_utils": 0, "gguf": 0, "hub": 0, "config": 1,
    "models": 1, "records": 2, "masking": 3, "training": 4, "evaluation": 5, "hf": 5, "analysis": 6, "cli": 7,
    "__init__": 8,
}
# config validates objective names with the pure parser of masking.objectives (which imports only errors).
ALLOWED = {("config", "masking.objectives")}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _modules():
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        yield path, ".".join(p for p in rel.parts if p != "__init__") or "imtune"


def _imports(tree: ast.AST) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("imtune"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names if node.module == "imtune")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("imtune"))
    return found


def test_every_part_has_a_rank():
    parts = {_part(mod) for _, mod in _modules()}
    assert parts <= set(RANK), parts - set(RANK)


def test_no_stage_imports_a_later_stage():
    bad = []
    for path, mod in _modules():
        src = _part(mod)
        for dep in _imports(ast.parse(path.read_text())):
            target = ".".join(dep.split(".")[1:3])
            if dep == "imtune" or (src, target) in ALLOWED:
                continue
            if RANK[_part(dep)] > RANK[src]:
                bad.append(f"{mod} imports {dep}")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_modules():
    graph = {mod: {d for d in _imports(ast.parse(p.read_text()))} for p, mod in _modules()}
    names = set(graph)
    graph = {m: {d if d in names else d.rsplit(".", 1)[0] for d in deps} & names - {m} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for d in graph[m]:
            if state.get(d) == 1:
                pytest.fail("import cycle: " + " -> ".join([*stack, m, d]))
            if d not in state:
                visit(d, [*stack, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_functions_at_most_80_lines_and_modules_at_most_450():
    long_functions, long_modules = [], []
    for path, mod in _modules():
        text = path.read_text()
        if len(text.splitlines()) > 450:
            long_modules.append(f"{mod} ({len(text.splitlines())} lines)")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 80:
                long_functions.append(f"{mod}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long_functions and not long_modules, long_functions + long_modules
