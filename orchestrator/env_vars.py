"""``${VAR}`` / ``${VAR:-default}`` in a spec's strings, from the environment.

Substitution happens before validation. A variable that is unset and has no
default stays in the value as written, so the spec's structure still validates
(``structure-sweep validate`` lists it); a sweep refuses to start on it
(:func:`orchestrator.spec.check_runnable`).
"""

from __future__ import annotations

import os
import re
from typing import Any

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_env(value: Any) -> Any:
    """``${VAR}`` / ``${VAR:-default}`` in every string of ``value``; an empty
    variable counts as unset."""
    if isinstance(value, str):
        return _VAR.sub(_lookup, value)
    if isinstance(value, list):
        return [substitute_env(v) for v in value]
    if isinstance(value, dict):
        return {k: substitute_env(v) for k, v in value.items()}
    return value


def _lookup(match: re.Match) -> str:
    name, default = match.group(1), match.group(2)
    if os.environ.get(name):
        return os.environ[name]
    return default if default is not None else match.group(0)


def unresolved_variables(value: Any, path: str = "") -> list[tuple[str, str]]:
    """(key path, variable) of every ``${VAR}`` left unsubstituted."""
    if isinstance(value, str):
        return [(path, m.group(1)) for m in _VAR.finditer(value)]
    if isinstance(value, list):
        return [u for i, v in enumerate(value) for u in unresolved_variables(v, f"{path}[{i}]")]
    if isinstance(value, dict):
        return [u for k, v in value.items()
                for u in unresolved_variables(v, f"{path}.{k}" if path else str(k))]
    return []
