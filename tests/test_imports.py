"""The module graph of `cl/` has no circle: every `import` counts, at module level or inside a
function (a lazy import still ties the two modules together)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The `cl` modules a file imports (`from cl.x import y` counts cl.x.y when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import submodule` imports the submodule; `from pkg import name`, the package
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        found |= {n for n in names if n in modules}
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in (ROOT / "cl").rglob("*.py")}
    return {m: imports_of(p, set(files)) - {m} for m, p in files.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_cl_package_has_no_import_circle():
    edges = graph()
    assert len(edges) > 30 and "cl.runtime" in edges["cl.engine"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # the walk finds one
    cycle = find_cycle(edges)
    assert cycle is None, " -> ".join(cycle)


def test_scenarios_hand_over_plain_data_and_cl_never_probes_a_strategy():
    """Scenarios build streams from cl.stream alone (the model's tokenizer aside): no scorer, no engine, no
    method. And the engine and evaluation reach a strategy only through its declared methods."""
    modules = {module_name(p) for p in (ROOT / "cl").rglob("*.py")}
    for path in (ROOT / "scenarios").glob("*.py"):
        used = imports_of(path, modules)
        assert used <= {"cl.stream", "cl.errors", "cl.models.causal_lm"}, f"{path.name} imports {sorted(used)}"
    probes = []
    for path in (ROOT / "cl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("getattr", "hasattr", "setattr"):
                target = ast.unparse(node.args[0])
                if "strategy" in target:
                    probes.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
    assert not probes, probes


def test_the_loop_stays_readable():
    """engine.train reads top to bottom in at most 120 lines, every other function in cl/ in at most 80."""
    lengths = {}
    for path in (ROOT / "cl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{module_name(path)}.{node.name}:{node.lineno}"] = node.end_lineno - node.lineno + 1
    train = [n for n in lengths if n.startswith("cl.engine.train:")]
    assert len(train) == 1 and lengths[train[0]] <= 120, lengths[train[0]]
    long = {n: k for n, k in lengths.items() if k > 80 and n not in train}
    assert not long, long
