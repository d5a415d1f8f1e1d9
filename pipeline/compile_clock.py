"""Seconds numba spends compiling, so that a stage timing its own work can leave them out.

The first run on a fresh clone (or a Kaggle notebook) compiles the fusion and metric kernels as they are first
called, and numba caches them on disk: a later run loads them. A time measured to predict another piece of work
-- ``ensemble.nested: auto`` estimates the nested tunings from the tuning's seconds -- would otherwise depend on
whether this was the first run (the demo's tuning: ~12 s on a fresh clone, ~1 s after).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from numba.core import event


class _CompileTimer(event.Listener):
    """Wall seconds inside numba's outermost ``numba:compile`` events (a compile that compiles a callee nests its
    event in the caller's: counted once). Loads from numba's disk cache raise no such event."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._depth: dict[int, int] = {}
        self._start: dict[int, float] = {}
        self._lock = threading.Lock()

    def on_start(self, ev: event.Event) -> None:
        with self._lock:
            t = threading.get_ident()
            self._depth[t] = self._depth.get(t, 0) + 1
            if self._depth[t] == 1:
                self._start[t] = time.perf_counter()

    def on_end(self, ev: event.Event) -> None:
        with self._lock:
            t = threading.get_ident()
            self._depth[t] -= 1
            if self._depth[t] == 0:
                self.seconds += time.perf_counter() - self._start.pop(t)


@contextmanager
def compile_clock() -> Iterator[Callable[[], float]]:
    """``with compile_clock() as compiling:`` -- ``compiling()`` is the seconds numba has spent compiling since the
    block began (every thread)."""
    timer = _CompileTimer()
    with event.install_listener("numba:compile", timer):
        yield lambda: timer.seconds
