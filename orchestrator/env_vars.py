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


def substitute_env(value: Any, env: dict | None = None) -> Any:
    """``${VAR}`` / ``${VAR:-default}`` in every string of ``value``, from ``env``."""
    env = os.environ if env is None else env
    if isinstance(value, str):
        def repl(m):
            name, default = m.group(1), m.group(2)
            if env.get(name):
                return env[name]
            return default if default is not None else m.group(0)
        return _VAR.sub(repl, value)
    if isinstance(value, list):
        return [substitute_env(v, env) for v in value]
    if isinstance(value, dict):
        return {k: substitute_env(v, env) for k, v in value.items()}
    return value


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
