"""Strict loading of typed configs from plain dicts (parsed YAML).

A config is a dataclass; :func:`from_dict` builds it from a mapping and rejects
unknown keys, wrong types and values outside a ``Literal`` with a
:class:`SpecError` that names the file, the key path and what is allowed.

A field whose spelling is not its type (a spec's ``search:`` grids) names its
own parser: ``field(metadata={"parse": f, "expects": "..."})``, where
``f(value, path)`` returns the typed value or raises a :class:`SpecError`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from trials.registry import did_you_mean


class SpecError(ValueError):
    """A sweep spec that cannot be run; the message says where and why."""

    def __init__(self, message: str, *, path: str = "", source: str = ""):
        # One line, always: the CLI prints it as one, and a test greps it as one.
        message = " ".join(str(message).split())
        self.path, self.source, self.reason = path, source, message
        where = ":".join(p for p in (source, path) if p)
        super().__init__(f"{where}: {message}" if where else message)


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin in (list, tuple):
        return f"a list of {_describe(get_args(tp)[0])}" if get_args(tp) else "a list"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number",
            str: "a string", Any: "anything"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise SpecError(f"expected {_describe(tp)}, got {value!r}", path=path)
        return from_dict(tp, value, path=path)
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise SpecError(f"{value!r} is not allowed; expected {_describe(tp)}", path=path)
    if origin in (Union, types.UnionType):
        for option in get_args(tp):
            try:
                return _convert(value, option, path)
            except SpecError:
                continue
        raise SpecError(f"expected {_describe(tp)}, got {value!r}", path=path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise SpecError(f"expected {_describe(tp)}, got {value!r}", path=path)
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise SpecError(f"expected a mapping, got {value!r}", path=path)
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is type(None):
        if value is None:
            return None
    elif isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise SpecError(f"expected {_describe(tp)}, got {value!r}", path=path)


def from_dict(cls: type, data: dict, *, path: str = "") -> Any:
    """Build dataclass ``cls`` from ``data``, strictly (see module docstring)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    _check_known(data, fields, path)
    kwargs = {}
    for name, f in fields.items():
        parse = f.metadata.get("parse") or (lambda value, at, tp=hints[name]: _convert(value, tp, at))
        if name in data:
            kwargs[name] = parse(data[name], _join(path, name))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            expects = f.metadata.get("expects") or _describe(hints[name])
            raise SpecError(f"missing required key; expected {expects}", path=_join(path, name))
    return _build(cls, kwargs, path, fields)


def from_flat(cls: type, data: Any, *, path: str = "") -> Any:
    """Build ``cls``, whose fields are part configs, from ONE flat mapping: each
    key goes to the part that declares it, so a YAML block stays flat while the
    code splits it by concern."""
    parts = typing.get_type_hints(cls)
    parts = {f.name: parts[f.name] for f in dataclasses.fields(cls)}
    owner = {f.name: name for name, part in parts.items() for f in dataclasses.fields(part)}
    if not isinstance(data, dict):
        raise SpecError(f"expected a mapping with keys {', '.join(owner)}, got {data!r}", path=path)
    _check_known(data, owner, path)
    kwargs = {name: from_dict(part, {k: v for k, v in data.items() if owner[k] == name}, path=path)
              for name, part in parts.items()}
    return _build(cls, kwargs, path, owner)


def _check_known(data: dict, allowed, path: str) -> None:
    for key in data:
        if key not in allowed:
            raise SpecError(f"unknown key {key!r}{did_you_mean(key, allowed)}; allowed keys: "
                            f"{', '.join(allowed)}", path=_join(path, str(key)))


def _build(cls: type, kwargs: dict, path: str, keys) -> Any:
    try:
        return cls(**kwargs)
    except SpecError as err:  # __post_init__ checks report paths relative to cls
        raise SpecError(err.reason, path=_join(path, err.path)) from None
    except ValueError as err:  # a config's own range check: "<field>=<value> is not ..."
        field = str(err).split("=", 1)[0]
        raise SpecError(str(err), path=_join(path, field if field in keys else "")) from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path and key else path or key


# --- value checks shared by the spec's sections --------------------------------------

DEVICE_FORMS = "cpu, cuda, cuda:N (e.g. cuda:0), mps or auto"
_DEVICE = re.compile(r"(cpu|cuda|cuda:\d+|mps|auto)")


def check_device(value: str, path: str) -> None:
    """A torch device name (or ``auto``); a ``${VAR}`` still unset is left to
    :func:`orchestrator.spec.check_runnable`, which names the variable."""
    if "${" not in value and not _DEVICE.fullmatch(value):
        raise SpecError(f"{value!r} is not a device; allowed: {DEVICE_FORMS}", path=path)


def check_min(value: float | None, minimum: float, path: str, *, strict: bool = False,
              hint: str = "") -> None:
    """``value >= minimum`` (``>`` when ``strict``); None passes (an optional value unset)."""
    if value is not None and not (value > minimum if strict else value >= minimum):
        raise SpecError(f"must be {'>' if strict else '>='} {minimum:g}, got {value!r}"
                        + (f" ({hint})" if hint else ""), path=path)


def check_finite(value: Any, path: str = "") -> None:
    """Every number in parsed YAML/JSON is finite: ``.inf``/``.nan`` pass most range
    checks (``inf >= 0``), and would reach a trial as a silent NaN loss."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"{value!r} is not a finite number; write a finite value", path=path)
    if isinstance(value, dict):
        for key, item in value.items():
            check_finite(item, _join(path, str(key)))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_finite(item, f"{path}[{i}]")
