"""The package layout stays a layered graph: no import cycles among opd_exp's modules (module-level imports and
imports inside functions alike), and objectives never import models, rollout, train or Hydra."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "opd_exp"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """opd_exp modules that ``path`` imports (``from opd_exp.x import y`` counts y when y is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("opd_exp"):
            out |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known}
            out.add(node.module)
    return out & known


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    edges = {m: imports_of(p, known) - {m} for m, p in files.items()}
    # a package's __init__ importing its own modules is how packages expose them, not a cycle
    return {m: {d for d in deps if not (d.startswith(m + ".") and files[m].name == "__init__.py")}
            for m, deps in edges.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := visit(d)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycles():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_objectives_are_tensors_in_tensors_out():
    for path in (PACKAGE / "objectives").glob("*.py"):
        for dep in imports_of(path, set(graph())):
            assert not dep.startswith(("opd_exp.models", "opd_exp.rollout", "opd_exp.train", "opd_exp.tasks")), \
                f"{path.name} imports {dep}"
        assert "import hydra" not in path.read_text()
