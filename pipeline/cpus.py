"""How many CPUs this process may use: the thread count of the compiled kernels (fusion, metrics), and the split of
their work into ranges of images, one per thread."""
from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np

T = TypeVar("T")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, e.g. a Slurm or taskset limit)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def item_ranges(offsets: np.ndarray, n_ranges: int) -> list[tuple[int, int]]:
    """At most ``n_ranges`` consecutive, non-empty ranges ``(lo, hi)`` of the ``len(offsets) - 1`` items (images),
    each holding about an equal share of their ``offsets[-1]`` rows."""
    n_items = len(offsets) - 1
    if n_items == 0:
        return []
    cuts = np.searchsorted(offsets, np.linspace(0, offsets[-1], min(max(n_ranges, 1), n_items) + 1)[1:-1]).tolist()
    bounds = sorted({0, n_items, *[min(max(c, 1), n_items - 1) for c in cuts]})
    return list(zip(bounds[:-1], bounds[1:]))


def on_ranges(work: Callable[[int, int], None], offsets: np.ndarray, threads: int) -> None:
    """``work(lo, hi)`` over :func:`item_ranges`, one range per thread (the compiled work releases the GIL); once
    over every item when ``threads < 2``."""
    if threads < 2:
        work(0, len(offsets) - 1)
        return
    ranges = item_ranges(offsets, threads)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda r: work(r[0], r[1]), ranges))


def alongside(side: Callable[[], T], work: Callable[[], None], threads: int) -> T:
    """``work()`` here while ``side()`` runs on a thread of its own (both compiled, releasing the GIL), when
    ``threads >= 2``; else one after the other. Returns ``side()``'s result."""
    if threads < 2:
        work()
        return side()
    with ThreadPoolExecutor(max_workers=1) as pool:
        result = pool.submit(side)
        work()
        return result.result()
