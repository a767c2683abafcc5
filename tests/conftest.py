"""Reference vectors of the official code (shared/reference/reference_vectors.json).

``reference_vectors`` is the whole JSON. A test that takes an argument named
``<section>_ref_case`` (``structure_reg_ref_case``, ``clip_loss_ref_case``, ...)
runs once per stored case of that JSON section, so a fuller file (with the
held-back cases) is checked the same way without editing the tests.
"""

import functools
import json
import os
from pathlib import Path

import pytest

_DEFAULT = Path(__file__).parents[1].parent / "shared/reference/reference_vectors.json"
# A copy kept in the repo, so a clone without shared/ still checks every case.
_VENDORED = Path(__file__).parent / "data" / "reference_vectors.json"
_SUFFIX = "_ref_case"


@functools.lru_cache(maxsize=1)
def _load():
    """The JSON from $STRUCTURE_SWEEP_REFERENCE, else shared/, else the repo's copy."""
    env = os.environ.get("STRUCTURE_SWEEP_REFERENCE")
    for path in (Path(env) if env else None, _DEFAULT, _VENDORED):
        if path is not None and path.is_file():
            return json.loads(path.read_text())
    return None


@pytest.fixture(scope="session")
def reference_vectors():
    data = _load()
    if data is None:
        pytest.fail(f"reference vectors not found at $STRUCTURE_SWEEP_REFERENCE, {_DEFAULT} "
                    f"or {_VENDORED}")
    return data


def pytest_generate_tests(metafunc):
    for arg in metafunc.fixturenames:
        if arg.endswith(_SUFFIX):
            section = (_load() or {}).get(arg[: -len(_SUFFIX)], [])
            cases = section.get("cases", []) if isinstance(section, dict) else section
            ids = [str(c.get("name", i)) for i, c in enumerate(cases)]
            metafunc.parametrize(arg, cases, ids=ids)
