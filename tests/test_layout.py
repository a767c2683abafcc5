"""House rules of the layout (DESIGN.md): trials/ is pure PyTorch."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_trials_imports_neither_ray_nor_orchestrator():
    files = sorted((ROOT / "trials").rglob("*.py"))
    assert files
    for path in files:
        bad = imported_modules(path) & {"ray", "orchestrator", "dashboards"}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_importing_every_trials_module_loads_no_ray():
    code = ("import sys, pkgutil, importlib, trials\n"
            "for m in pkgutil.iter_modules(trials.__path__):\n"
            "    importlib.import_module('trials.' + m.name)\n"
            "shim = {'orchestrator', 'orchestrator._torchvision_shim'}  # the .pth hook\n"
            "loaded = {m for m in sys.modules if m.split('.')[0] in ('ray', 'orchestrator')}\n"
            "assert loaded <= shim, loaded - shim\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
