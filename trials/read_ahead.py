"""Read-ahead: load the next items in a background thread while the current one is used.

A token trial trains on batches gathered from a :class:`trials.tokens.TokenSource`;
when the source reads memory-mapped shards from disk, :func:`read_ahead` keeps
the next ``depth`` batches loading while the device trains on the current
one. The items (which rows to gather) are decided before any loading starts,
by the caller, so the order and the RNG use are those of a plain loop: read
ahead or not, a trial computes the same numbers.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")

DEPTH = 2  # batches in flight: one loading while one waits, enough to hide a disk read


def read_ahead(load: Callable[[Item], Loaded], items: Iterable[Item], depth: int = DEPTH) -> Iterator[Loaded]:
    """``load(item)`` for each item, in order, with up to ``depth`` loads running ahead in
    one background thread; ``depth=0`` loads in the caller's thread (no thread at all).

    An exception raised by ``load`` is raised here, at its item. Stopping early
    (``break``, or closing the generator) cancels the loads not yet started.
    """
    if depth < 0:
        raise ValueError(f"depth={depth!r} is not supported; allowed values: an integer >= 0")
    if depth == 0:
        yield from map(load, items)
        return
    remaining = iter(items)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as pool:
        pending = deque(pool.submit(load, item) for _, item in zip(range(depth), remaining))
        try:
            while pending:
                loaded = pending.popleft().result()
                for item in remaining:  # refill before handing the current item over
                    pending.append(pool.submit(load, item))
                    break
                yield loaded
        finally:
            for future in pending:
                future.cancel()
