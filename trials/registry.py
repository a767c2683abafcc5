"""One registry mechanism for everything looked up by name.

Encoders, datasets, heads, similarity metrics and presets each keep one
:class:`Registry`; adding an entry is one decorated function (as timm's
``register_model``) and a duplicate name is an error, never a silent
override. Unknown names get the closest match and the full list.
"""

from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


def did_you_mean(word: Any, choices) -> str:
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class UnknownName(ValueError):
    """A name that no one registered; the message lists the registered names."""


class Registry(Generic[T]):
    """Name -> entry, with per-entry metadata (e.g. ``closed_form=True`` for a head)."""

    def __init__(self, kind: str, error: type[ValueError] = UnknownName):
        self.kind, self.error = kind, error
        self._entries: dict[str, T] = {}
        self._meta: dict[str, dict] = {}

    def register(self, name: str, entry: T | None = None, **meta) -> Callable[[T], T] | T:
        """``@registry.register("name")`` on a function/class, or ``register(name, entry)``."""
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name], self._meta[name] = obj, dict(meta)
            return obj
        return add if entry is None else add(entry)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise self.error(f"unknown {self.kind} {name!r}{did_you_mean(name, self._entries)}; "
                             f"registered: {', '.join(self.names())}")
        return self._entries[name]

    def meta(self, name: str) -> dict:
        self.get(name)
        return self._meta[name]

    def names(self, **where) -> list[str]:
        """Sorted names, optionally only those whose metadata matches ``where``."""
        return sorted(n for n in self._entries
                      if all(self._meta[n].get(k) == v for k, v in where.items()))

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
