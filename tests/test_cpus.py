"""pipeline.cpus: the CPUs a process may use and the split of per-image work over them."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from pipeline.cpus import alongside, available_cpus, item_ranges, on_ranges


def test_available_cpus_is_at_least_one():
    assert available_cpus() >= 1


@pytest.mark.parametrize("threads", [0, 1, 2, 3, 8])
def test_on_ranges_covers_every_item_once_in_ranges_of_equal_rows(threads):
    rng = np.random.default_rng(threads)
    counts = rng.integers(0, 50, 200)
    counts[:5] = 0  # empty items at the start
    offsets = np.r_[0, np.cumsum(counts)]
    calls, lock = [], threading.Lock()

    def work(lo: int, hi: int) -> None:
        with lock:
            calls.append((lo, hi, threading.get_ident()))

    on_ranges(work, offsets, threads)
    ranges = sorted((lo, hi) for lo, hi, _ in calls)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(counts)
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:]))  # consecutive, none empty
    assert len(ranges) == max(1, threads)
    if threads >= 2:
        rows = [offsets[hi] - offsets[lo] for lo, hi in ranges]
        assert max(rows) - min(rows) <= 2 * counts.max()  # equal shares, to an item's rows
        assert all(ident != threading.get_ident() for _, _, ident in calls)  # on the pool, not the caller


def test_on_ranges_with_one_item_runs_it_once():
    calls = []
    on_ranges(lambda lo, hi: calls.append((lo, hi)), np.array([0, 10]), 4)
    assert calls == [(0, 1)]


def test_item_ranges_never_more_than_asked_nor_empty():
    offsets = np.r_[0, np.cumsum([0, 0, 7, 1, 0, 30, 2])]
    for n in range(1, 12):
        ranges = item_ranges(offsets, n)
        assert 1 <= len(ranges) <= n and ranges[0][0] == 0 and ranges[-1][1] == 7
        assert all(lo < hi for lo, hi in ranges) and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert item_ranges(np.array([0]), 4) == []  # no items


@pytest.mark.parametrize("threads", [0, 1, 2])
def test_alongside_runs_both_and_returns_the_side_result(threads):
    # with two threads or more the side job runs on another thread while the work runs here (both at once: each
    # waits for the other to start); with fewer, one after the other on this thread
    here = threading.get_ident()
    seen, both_started = {}, threading.Barrier(2, timeout=10)

    def side():
        seen["side"] = threading.get_ident()
        if threads >= 2:
            both_started.wait()
        return 42

    def work():
        seen["work"] = threading.get_ident()
        if threads >= 2:
            both_started.wait()

    assert alongside(side, work, threads) == 42
    assert seen["work"] == here and (seen["side"] != here) == (threads >= 2)


def test_alongside_raises_the_side_error():
    def side():
        raise ValueError("side failed")

    with pytest.raises(ValueError, match="side failed"):
        alongside(side, lambda: None, 2)
