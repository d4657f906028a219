"""The collector's pace: relaxed while a backlog is caught up, Python's own once live (worker/heap.py)."""

from __future__ import annotations

import gc

import pytest

from stream_jobs.worker.heap import CollectorPace


@pytest.fixture(autouse=True)
def _restore_thresholds():
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_catching_up_raises_the_young_threshold_and_live_puts_back_what_was_there():
    gc.set_threshold(900, 11, 12)  # whatever the process had: not necessarily Python's 700
    pace = CollectorPace(50_000)
    pace.follow(catching_up=False)
    assert gc.get_threshold() == (900, 11, 12)  # live from the start: nothing to change
    pace.follow(catching_up=True)
    assert gc.get_threshold() == (50_000, 11, 12)
    pace.follow(catching_up=True)  # batch after batch of backlog
    assert gc.get_threshold() == (50_000, 11, 12)
    pace.follow(catching_up=False)
    assert gc.get_threshold() == (900, 11, 12)


def test_going_live_leaves_no_young_objects_for_the_first_live_record_to_collect():
    pace = CollectorPace(50_000)
    pace.follow(catching_up=True)
    backlog = [[i] for i in range(20_000)]  # young containers, fewer than the relaxed threshold
    assert gc.get_count()[0] >= 20_000
    frozen = gc.get_freeze_count()
    pace.follow(catching_up=False)
    assert gc.get_count()[0] < 700 and gc.get_freeze_count() >= frozen + 20_000
    gc.unfreeze()
    del backlog


def test_thresholds_set_while_live_are_the_ones_restored():
    pace = CollectorPace(20_000)
    gc.set_threshold(1000, 10, 10)
    pace.follow(catching_up=True)
    pace.follow(catching_up=False)
    assert gc.get_threshold() == (1000, 10, 10)


def test_zero_leaves_pythons_collector_alone():
    gc.set_threshold(700, 10, 10)
    pace = CollectorPace(0)
    pace.follow(catching_up=True)
    assert gc.get_threshold() == (700, 10, 10)
