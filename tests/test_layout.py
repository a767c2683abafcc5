"""House rules of the layout (DESIGN.md), checked on the source with ``ast``.

Who may import whom is data (:data:`IMPORT_RULES`, the same table as the
README's "Development" section); every import counts, at module level or
inside a function. Size limits keep files and functions readable.
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGES = ("orchestrator", "trials", "dashboards")
TOP_MODULES = ("torchvision_repair",)  # top-level modules of the distribution
STDLIB = frozenset(sys.stdlib_module_names)

# Importer (a package, or one module that is an exception to its package's rule)
# -> rule on the top-level names it imports. "only": nothing else besides the
# standard library; "never": these are banned. The most specific entry applies.
IMPORT_RULES = {
    "trials": {"only": {"trials", "torch", "numpy"}},
    "torchvision_repair": {"only": {"torch"}},  # runs at every interpreter start
    "orchestrator": {"never": {"dashboards"}},
    "orchestrator.cli": {"never": set()},  # the entry point: runs sweeps and writes reports
    "dashboards": {"never": {"ray"}},
}
MAX_FILE_LINES = 400
MAX_P90_FUNCTION_LINES = 30
MAX_JSON_HASHERS = 2  # keys.content_key is the one home of content keys


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def source_files() -> tuple[Path, ...]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    return tuple(files + [ROOT / f"{m}.py" for m in TOP_MODULES])


@lru_cache(maxsize=None)
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of import nodes under ``if TYPE_CHECKING:`` (never run)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skipped


def imports(path: Path) -> list[str]:
    """Full dotted names of everything ``path`` imports, anywhere in the file
    (``from a import b`` gives ``a.b``; relative imports resolved)."""
    tree, package = parse(path), module_name(path)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    skipped, names = _type_checking_only(tree), []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names += [f"{base}.{a.name}" for a in node.names]
    return names


def test_import_rules():
    broken = []
    for path in source_files():
        rule = IMPORT_RULES[_known(module_name(path), set(IMPORT_RULES))]
        tops = {name.split(".")[0] for name in imports(path)}
        if "only" in rule:
            bad = tops - rule["only"] - STDLIB
        else:
            bad = tops & rule.get("never", set())
        broken += [f"{path.relative_to(ROOT)} imports {sorted(bad)}"] if bad else []
    assert not broken, "\n".join(broken)


@lru_cache(maxsize=None)
def _fresh_interpreter(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120,
                         capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


PROJECT_OR_RAY = "lambda names: sorted(m for m in names if m.split('.')[0] in ('ray', 'orchestrator'))"
IMPORT_TRIALS = f"""
import importlib, json, pkgutil, sys
pick = {PROJECT_OR_RAY}
at_start = set(sys.modules)  # what the environment's startup hooks (.pth files) loaded
import trials, trials.trial
for m in pkgutil.iter_modules(trials.__path__):
    importlib.import_module('trials.' + m.name)
print(json.dumps({{"startup": pick(at_start), "trials": pick(set(sys.modules) - at_start)}}))
"""


def test_importing_trials_loads_neither_ray_nor_orchestrator():
    loaded = _fresh_interpreter(IMPORT_TRIALS)["trials"]
    assert not loaded, f"import trials.trial (and every trials module) loads {loaded}"


def test_interpreter_startup_loads_neither_ray_nor_orchestrator():
    loaded = _fresh_interpreter(IMPORT_TRIALS)["startup"]
    assert not loaded, (f"a .pth hook of this environment loads {loaded} at every start: an install "
                        "from before torchvision_repair.py left the project; reinstall (make setup)")


def _known(name: str, modules: set[str]) -> str | None:
    """The most specific module of ``modules`` that ``name`` is in (``a.b.C`` -> ``a.b``)."""
    parts = name.split(".")
    return next((m for i in range(len(parts), 0, -1) if (m := ".".join(parts[:i])) in modules), None)


def module_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = {module_name(p) for p in source_files()}
    graph = {}
    for path in source_files():
        edges = {_known(name, modules) for name in imports(path)}
        graph[module_name(path)] = edges - {None, module_name(path)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(module_graph())
    assert not found, "import cycles (function-level imports count):\n" + "\n".join(map(", ".join, found))


def test_no_long_source_files():
    files = [*source_files(), *sorted((ROOT / "benchmarks").glob("*.py"))]
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in files}
    long = {name: n for name, n in sizes.items() if n > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def functions(path: Path) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(parse(path)) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _own_nodes(func: ast.AST):
    """Nodes of ``func``'s body, not of functions defined inside it."""
    for child in ast.iter_child_nodes(func):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield child
            yield from _own_nodes(child)


def _hashes_json(func: ast.AST) -> bool:
    """Calls json.dumps and uses hashlib (the modules are never imported under other names here)."""
    dotted = {ast.unparse(n) for n in _own_nodes(func) if isinstance(n, (ast.Attribute, ast.Name))}
    return "json.dumps" in dotted and any(d == "hashlib" or d.startswith("hashlib.") for d in dotted)


def test_few_functions_hash_json_into_keys():
    hashers = [f"{module_name(p)}.{f.name}" for p in source_files() for f in functions(p) if _hashes_json(f)]
    assert len(hashers) <= MAX_JSON_HASHERS, f"use orchestrator.keys.content_key, not {hashers}"


def test_function_length_p90():
    in_packages = [p for p in source_files() if module_name(p).split(".")[0] in PACKAGES]
    lengths = sorted(f.end_lineno - f.lineno + 1 for p in in_packages for f in functions(p))
    p90 = lengths[math.ceil(0.9 * len(lengths)) - 1]
    assert p90 <= MAX_P90_FUNCTION_LINES, f"90% of {len(lengths)} functions are ≤ {p90} lines"


def test_test_modules_have_unique_names():
    """pytest imports test files by basename (no packages under tests/): two files of one
    name in different folders stop the whole collection."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in set(names) if names.count(n) > 1)
