import time

import numba

from pipeline.compile_clock import compile_clock


def test_counts_numba_compiles_once_each_and_not_calls_of_compiled_functions():
    @numba.njit
    def inner(x):
        return x * 2.0

    @numba.njit
    def outer(x):  # compiling it compiles inner too: one interval, not two
        return inner(x) + 1.0

    with compile_clock() as compiling:
        start = time.perf_counter()
        assert outer(1.0) == 3.0
        wall = time.perf_counter() - start
        compiled = compiling()
        assert 0.0 < compiled <= wall  # nested compiles counted once: never more than the block's wall time
        for _ in range(1000):
            outer(2.0)
        assert compiling() == compiled  # calls of a compiled function add nothing
        inner(1)  # a new signature compiles again
        assert compiling() > compiled
    with compile_clock() as compiling:
        outer(3.0)
    assert compiling() == 0.0  # nothing compiled in this block


def test_compiles_in_other_threads_are_counted():
    import threading

    @numba.njit
    def f(x):
        return x + 1

    with compile_clock() as compiling:
        worker = threading.Thread(target=f, args=(1,))
        worker.start()
        worker.join()
        assert compiling() > 0.0
