"""Reference vectors of the official code (shared/reference/reference_vectors.json).

``reference_vectors`` is the whole JSON. A test that takes an argument named
``<section>_ref_case`` (``structure_reg_ref_case``, ``clip_loss_ref_case``, ...)
runs once per stored case of that JSON section, so a fuller file (with the
held-back cases) is checked the same way without editing the tests.
"""

import copy
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


# A sweep small enough for a test: 3 x 3 layers, a few hundred synthetic pairs.
TINY = {
    "name": "tiny",
    "encoders": {"image": {"name": "synthetic:image", "batch_size": 256,
                           "options": {"layers": 3, "planted_layer": 1}},
                 "text": {"name": "synthetic:text", "batch_size": 256,
                          "options": {"layers": 3, "planted_layer": 2}}},
    "data": {"train": {"dataset": "synthetic", "split": "train", "options": {"size": 600}},
             "val": {"dataset": "synthetic", "split": "val", "options": {"size": 200}},
             "zero_shot": [{"dataset": "synthetic", "split": "test", "name": "classes",
                            "options": {"size": 200}}],
             "retrieval": [{"dataset": "synthetic", "split": "test", "name": "captions",
                            "options": {"size": 100, "captions_per_image": 2}}]},
    "similarity": {"k": 5, "n_samples": 400},
    "training": {"out_dim": 16, "epochs": 5, "batch_size": 256, "lr": 0.003, "patience": 3,
                 "warmup_steps": 10},
    "search": [{"name": "grid", "layers": "all", "structure_lambda": 0, "n_train": 300},
               {"name": "scaling", "layers": ["similar", "last"], "structure_lambda": [0, 10],
                "n_train": [150, 600]}],
    "tune": {"max_concurrent_trials": 2},
}


@pytest.fixture
def tiny():
    """A fresh copy of the tiny sweep spec (a dict, as parsed from YAML)."""
    return copy.deepcopy(TINY)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster on 127.0.0.1 for the tests that drive sweeps in-process."""
    import ray

    from orchestrator.cluster import QUIET_ENV

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()
