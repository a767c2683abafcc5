"""trials.read_ahead: the background loading a streamed token trial reads through."""

import threading

import pytest

from trials.read_ahead import read_ahead


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_yields_every_load_in_order(depth):
    assert list(read_ahead(lambda x: x * x, range(10), depth)) == [x * x for x in range(10)]
    assert list(read_ahead(lambda x: x, [], depth)) == []


def test_loads_run_in_a_background_thread_and_run_ahead():
    loaded, consumer = [], threading.current_thread()
    started = threading.Event()

    def load(item):
        loaded.append((item, threading.current_thread() is consumer))
        if item == 2:
            started.set()
        return item

    stream = read_ahead(load, range(5), depth=2)
    assert next(stream) == 0
    # while item 0 is in use, items 1 and 2 are loading or loaded: wait for item 2's load to start
    assert started.wait(timeout=30)
    assert [item for item, _ in loaded][:3] == [0, 1, 2]
    assert list(stream) == [1, 2, 3, 4]
    assert not any(in_consumer for _, in_consumer in loaded)


def test_a_load_error_is_raised_at_its_item():
    def load(item):
        if item == 3:
            raise KeyError(item)
        return item

    seen = []
    with pytest.raises(KeyError):
        for item in read_ahead(load, range(6), depth=2):
            seen.append(item)
    assert seen == [0, 1, 2]


def test_stopping_early_loads_at_most_depth_more_items():
    loaded = []
    for item in read_ahead(loaded.append, range(100), depth=2):
        break
    assert len(loaded) <= 1 + 2 + 1  # the current item, depth ahead, and the one refilled


def test_negative_depth_is_refused():
    with pytest.raises(ValueError, match="depth"):
        list(read_ahead(str, range(3), depth=-1))
