"""Option checks shared by trials modules; plain Python, no torch (``trials.config`` uses them)."""

from __future__ import annotations

import numbers


def check_choice(name: str, value: object, allowed: tuple) -> None:
    """ValueError naming ``name`` and the allowed values unless ``value`` is one of them."""
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {', '.join(map(repr, allowed))}")


def check_int(name: str, value: object, minimum: int | None = None, *,
              optional: bool = False) -> None:
    """ValueError unless ``value`` is an int >= ``minimum`` (any int when None; or None when ``optional``)."""
    if optional and value is None:
        return
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or (minimum is not None and value < minimum)):
        allowed = "an integer" + (f" >= {minimum}" if minimum is not None else "")
        allowed += " or None" if optional else ""
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {allowed}")


def check_number(name: str, value: object, minimum: float, *, strict: bool = False,
                 optional: bool = False) -> None:
    """ValueError unless ``value`` is a real number >= ``minimum`` (> when ``strict``; None when ``optional``)."""
    if optional and value is None:
        return
    ok = (not isinstance(value, bool) and isinstance(value, numbers.Real)
          and (value > minimum if strict else value >= minimum))  # False for NaN
    if not ok:
        allowed = f"a number {'>' if strict else '>='} {minimum:g}" + (" or None" if optional else "")
        raise ValueError(f"{name}={value!r} is not supported; allowed values: {allowed}")
