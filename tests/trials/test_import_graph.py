"""The trials package imports without cycles, counting imports inside functions too.

A function-level import hides a cycle from Python's import machinery but not
from the reader; both count here. Parsed with ``ast``: nothing is imported.
"""

import ast
from pathlib import Path

TRIALS = Path(__file__).resolve().parents[2] / "trials"
MODULES = {path.stem for path in TRIALS.glob("*.py")} - {"__init__"}


def _imported_modules(node: ast.AST, modules=MODULES) -> set[str]:
    """trials.* modules named by one import statement (absolute or relative)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = "trials" if node.level else (node.module or "")
        base = f"{base}.{node.module}" if node.level and node.module else base
        # `from trials import x`: x may be a module; `from trials.x import y`: the module is x
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    else:
        return set()
    parts = (name.split(".") for name in names)
    return {p[1] for p in parts if len(p) >= 2 and p[0] == "trials" and p[1] in modules}


def import_graph() -> dict[str, set[str]]:
    """module -> the trials modules it imports anywhere in its source."""
    graph = {}
    for name in MODULES:
        tree = ast.parse((TRIALS / f"{name}.py").read_text())
        graph[name] = set().union(*(_imported_modules(n) for n in ast.walk(tree))) - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when the graph is acyclic (depth-first search)."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return []
        path.append(node)
        for successor in sorted(graph[node]):
            cycle = visit(successor)
            if cycle:
                return cycle
        done.add(path.pop())
        return []

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return []


def test_trials_has_no_import_cycle():
    graph = import_graph()
    assert {"config", "heads", "losses"} <= set(graph)
    assert find_cycle(graph) == [], " -> ".join(find_cycle(graph))


def test_the_checker_sees_function_level_and_relative_imports():
    source = ("def f():\n    from trials.b import x\n"
              "from . import c\nfrom .d import y\nimport trials.e as e\nfrom trials import registry\n")
    modules = {"b", "c", "d", "e"}
    found = set().union(*(_imported_modules(n, modules) for n in ast.walk(ast.parse(source))))
    assert found == modules
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) == []
