"""The grid run's task queue (a Tune searcher) and the Tune storage clean-up, without a cluster."""

from __future__ import annotations

from ray.tune.search import Searcher

from orchestrator.tune_runner import remove_in_background
from orchestrator.tune_search import TaskQueue


def test_the_task_queue_hands_out_every_task_once_in_order_then_finishes():
    queue = TaskQueue(3)
    got = [queue.suggest(f"trial_{i}") for i in range(5)]
    assert got == [{"task": 0}, {"task": 1}, {"task": 2}, Searcher.FINISHED, Searcher.FINISHED]


def test_the_task_queue_saves_and_restores_its_place(tmp_path):
    queue = TaskQueue(4)
    queue.suggest("a")
    queue.save(str(tmp_path / "queue.json"))
    again = TaskQueue(0)
    again.restore(str(tmp_path / "queue.json"))
    assert again.suggest("b") == {"task": 1} and again.get_state() == {"n": 4, "next": 2}


def test_tune_storage_is_removed_in_the_background(tmp_path):
    storage = tmp_path / "tune"
    for i in range(20):  # a directory per Tune trial, as Tune leaves them
        (storage / f"trial_{i}").mkdir(parents=True)
        (storage / f"trial_{i}" / "params.json").write_text("{}")
    remove_in_background(str(storage)).join()
    assert not storage.exists() and tmp_path.exists()
