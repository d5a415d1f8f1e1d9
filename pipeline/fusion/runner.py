"""Running a rule's compiled kernel over the images of a packed table: output slots, threads, input repairs.

Every kernel has the same contract: it fuses a range of images ``lo..hi-1`` of a
:class:`~pipeline.fusion.packing.PackedTable`, writes image ``k``'s fused rows (normalised, in the rule's output
order) to the slots ``row_offs[k] : row_offs[k] + count[k]``, and counts input repairs in a ``stats`` row
(:mod:`pipeline.fusion.rows`). :func:`run_kernel` allocates the slots, splits the images over threads (the
kernels release the GIL) and reports the repairs once per call.
"""
from __future__ import annotations

import contextlib
import mmap
import sys
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from pipeline.cpus import item_ranges
from pipeline.fusion.packing import PackedTable, compact_column, compact_rows, compact_rows_by_score, take_rows
from pipeline.fusion.rows import N_STATS, STAT_CLIPPED, STAT_NON_FINITE, STAT_SWAPPED, STAT_ZERO_AREA


SMALL_PAGES_MIN = 1 << 22  # bytes: arrays from here on are advised against huge pages (fresh_array)


class KernelOutput(NamedTuple):
    """Output slots of a kernel call: image ``k``'s ``count[k]`` rows start at ``row_offs[k]``."""

    boxes: np.ndarray  # float64 (n, 4), normalised
    score: np.ndarray  # float64 (n,)
    label: np.ndarray  # int64 (n,)
    count: np.ndarray  # int64 per image
    # float64 (n,), soft-NMS: each row's score when it was selected, the value compared with ``thresh``
    # (run_kernel(selection=True)); None for the other rules
    selection: np.ndarray | None = None

    def slots(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(boxes, score, label, count)``: the arguments every kernel writes."""
        return self.boxes, self.score, self.label, self.count


# work(lo, hi, out, stats_row, cached): fuse images lo..hi-1 into ``out``; ``cached``: the call may use this
# thread's cached scratch (the single-threaded path), else it allocates its own.
Work = Callable[[int, int, KernelOutput, np.ndarray, bool], None]


def run_kernel(packed: PackedTable, work: Work, threads: int, rule: str, reuse: bool = False,
               selection: bool = False, levels: int = 1) -> KernelOutput:
    """``work`` over every image of ``packed``, on ``threads`` threads when there are enough images; warns once
    per kind of input repair; ``ValueError`` for non-finite boxes or scores. ``reuse``: write into this thread's
    cached output arrays (no allocation, no page faults: the drop-ins' single images, and the OOF tuner's many
    fusions of one table, where fresh slots of hundreds of MB cost page faults and, with transparent huge pages,
    stalls of up to 0.3 s; the caller copies the rows it returns before the next call). ``selection``: the
    output has a ``selection`` column for the kernel to write. ``levels``: room for that many outputs of every
    image, one after the other (a kernel fusing at several parameter values at once: :func:`level_output`)."""
    n_img = len(packed.width)
    n, n_counts = int(packed.row_offs[-1]) * levels, n_img * levels
    if reuse:
        out = thread_output(n, n_counts)
        if not selection:
            out = out._replace(selection=None)
    else:
        out = KernelOutput(fresh_array((n, 4), np.float64), fresh_array(n, np.float64), fresh_array(n, np.int64),
                           np.zeros(n_counts, np.int64), fresh_array(n, np.float64) if selection else None)
    if threads <= 1 or n_img < 4 * threads:
        stats = np.zeros(N_STATS, np.int64)
        work(0, n_img, out, stats, True)
    else:
        ranges = image_ranges(packed.row_offs, threads)
        all_stats = np.zeros((len(ranges), N_STATS), np.int64)
        with ThreadPoolExecutor(max_workers=threads) as ex:
            list(ex.map(lambda k: work(ranges[k][0], ranges[k][1], out, all_stats[k], False), range(len(ranges))))
        stats = all_stats.sum(axis=0)
    check_repairs(stats, rule)
    return out


def fresh_array(shape: int | tuple[int, ...], dtype: type) -> np.ndarray:
    """``np.empty(shape, dtype)`` whose memory the OS backs in small pages, each when it is first written: the
    kernels' output slots (of which a rule writes a third or less) and the dense rows copied out of them. numpy asks
    for transparent huge pages above 4 MB, and where the system grants them on request (``madvise``, Ubuntu's
    default) a first write faults in and zeroes 2 MB, after a compaction when memory is fragmented: a whole-table
    gaussian soft-NMS of 12 M rows (672 MB of slots) then spent 0.7-2.4 s of system time a call on this project's
    2-core machine, against 0.2-0.3 s in small pages (benchmarks/README.md). ``np.empty`` where the platform has
    no such advice, and for small arrays."""
    count = int(np.prod(shape))
    n_bytes = count * np.dtype(dtype).itemsize
    if n_bytes < SMALL_PAGES_MIN or not hasattr(mmap, "MADV_NOHUGEPAGE"):
        return np.empty(shape, dtype)
    buffer = mmap.mmap(-1, n_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # zero pages until written
    with contextlib.suppress(OSError):  # a kernel without transparent huge pages refuses the advice: none to avoid
        buffer.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buffer, dtype, count).reshape(shape)  # the array keeps the mapping alive


def level_output(out: KernelOutput, level: int, packed: PackedTable) -> KernelOutput:
    """Output ``level`` of a :func:`run_kernel` call with several (``levels``) on ``packed``: its slots and counts,
    as the output of a call with one (a level's slots start at ``level * n``, its counts at ``level * n_img``)."""
    n, n_img = int(packed.row_offs[-1]), len(packed.width)
    return KernelOutput(out.boxes[level * n:(level + 1) * n], out.score[level * n:(level + 1) * n],
                        out.label[level * n:(level + 1) * n], out.count[level * n_img:(level + 1) * n_img],
                        None if out.selection is None else out.selection[level * n:(level + 1) * n])


_THREAD_LOCAL = threading.local()


def thread_output(n: int, n_img: int) -> KernelOutput:
    """This thread's cached output slots for ``n`` rows and ``n_img`` images (grown by half, never shrunk), with a
    ``selection`` column."""
    cached: KernelOutput | None = getattr(_THREAD_LOCAL, "output", None)
    if cached is None or len(cached.score) < n or len(cached.count) < n_img:
        cap = max(n, int(len(cached.score) * 1.5) if cached is not None else 0, 1)
        cap_img = max(n_img, len(cached.count) if cached is not None else 0, 1)
        cached = KernelOutput(fresh_array((cap, 4), np.float64), fresh_array(cap, np.float64),  # only the slots
                              fresh_array(cap, np.int64), np.empty(cap_img, np.int64),  # written are ever backed
                              fresh_array(cap, np.float64))
        _THREAD_LOCAL.output = cached
    cached.count[:n_img] = 0
    return KernelOutput(cached.boxes, cached.score, cached.label, cached.count[:n_img], cached.selection)


def release_thread_output() -> None:
    """Let go of this thread's cached output slots (:func:`thread_output`) and dense-row buffers
    (:class:`RowsPool`), e.g. once a tuner is done with a large table."""
    _THREAD_LOCAL.output = None
    _THREAD_LOCAL.rows = None


class RowsPool:
    """Buffers for the dense rows of one caller's many fusions (:func:`dense_rows` with ``reuse``: the OOF tuner's),
    a buffer handed out again once nothing but the pool refers to it. Every view of a buffer holds a reference to
    it (numpy's ``base``), so its reference count says whether rows cut from it are still held anywhere -- the test
    ``ndarray.resize`` makes. Fresh rows of millions of boxes cost page faults, on a virtual machine 2-4 times their
    copy (benchmarks/README.md, *tuning_speed.py*)."""

    def __init__(self) -> None:
        self.buffers: list[np.ndarray] = []

    def rows(self, m: int, selection: bool) -> DenseRows:
        """``m`` dense rows (uninitialised), each column a contiguous view of one free buffer."""
        b = self._free(8 * m)
        return DenseRows(b[:m].view(np.int64), b[m:6 * m].reshape(5, m), b[6 * m:7 * m].view(np.int64),
                         b[7 * m:8 * m] if selection else None)

    def _free(self, size: int) -> np.ndarray:
        free = [k for k in range(len(self.buffers)) if _unreferenced(self.buffers, k)]
        fits = [k for k in free if len(self.buffers[k]) >= size]
        if fits:
            return self.buffers[fits[0]]
        self.buffers = [b for k, b in enumerate(self.buffers) if k not in free]  # too small: let them go
        self.buffers.append(np.empty(max(size, 1)))
        return self.buffers[-1]


def _unreferenced(buffers: list[np.ndarray], k: int) -> bool:
    """Whether ``buffers[k]`` has no reference but the list's (and ``getrefcount``'s argument)."""
    return sys.getrefcount(buffers[k]) == 2


def thread_rows_pool() -> RowsPool:
    """This thread's :class:`RowsPool` (:func:`release_thread_output` lets it go)."""
    pool: RowsPool | None = getattr(_THREAD_LOCAL, "rows", None)
    if pool is None:
        pool = _THREAD_LOCAL.rows = RowsPool()
    return pool


def image_ranges(row_offs: np.ndarray, threads: int) -> list[tuple[int, int]]:
    """Image ranges of roughly equal row counts, several per thread for balance."""
    return item_ranges(row_offs, 8 * threads)


def largest_image(packed: PackedTable, lo: int, hi: int) -> int:
    """Most rows of an image in ``lo..hi-1`` (at least 1): the scratch size of a kernel call."""
    return max(int(np.diff(packed.row_offs[lo:hi + 1]).max(initial=1)), 1)


def check_repairs(stats: np.ndarray, rule: str, stacklevel: int = 4) -> None:
    """``ValueError`` for non-finite boxes or scores, else one warning per kind of input repair, with counts (the
    library warns or prints once per box); ``stacklevel`` as the caller would give ``warnings.warn``."""
    if stats[STAT_NON_FINITE]:
        raise ValueError("boxes and scores must be finite")
    stacklevel += 1
    swapped, clipped, zero = int(stats[STAT_SWAPPED]), int(stats[STAT_CLIPPED]), int(stats[STAT_ZERO_AREA])
    if swapped:
        warnings.warn(f"{rule}: {swapped} box coordinate pair(s) with x2 < x1 or y2 < y1 were swapped.",
                      stacklevel=stacklevel)
    if clipped:
        warnings.warn(f"{rule}: {clipped} box coordinate(s) outside [0, 1] were clipped. Check that you normalise "
                      "boxes to the [0, 1] range.", stacklevel=stacklevel)
    if zero:
        warnings.warn(f"{rule}: {zero} zero-area box(es) skipped.", stacklevel=stacklevel)


class DenseRows(NamedTuple):
    """Fused rows of all images, dense, in pixels: row ``r`` belongs to image ``image[r]`` (ascending)."""

    image: np.ndarray  # int64 (m,)
    values: np.ndarray  # float64 (5, m): x1, y1, x2, y2, score
    label: np.ndarray  # int64 (m,)
    selection: np.ndarray | None = None  # float64 (m,): KernelOutput.selection, when the rule has it

    def take(self, keep: np.ndarray) -> DenseRows:
        """The rows where boolean ``keep`` is true, in order: one compiled pass (numpy's boolean indexing of the 2-D
        ``values`` took 52 ms for 3.9 M rows, and the OOF tuner takes rows on most steps)."""
        n = int(np.count_nonzero(keep))
        image, values, label = np.empty(n, np.int64), np.empty((len(self.values), n)), np.empty(n, np.int64)
        take_rows(keep, self.image, self.values, self.label, image, values, label)
        return DenseRows(image, values, label, None if self.selection is None else self.selection[keep])


def dense_rows(packed: PackedTable, out: KernelOutput, threads: int, by_score: bool = False,
               reuse: bool = False) -> DenseRows:
    """``out`` compacted to dense pixel columns (:func:`~pipeline.fusion.packing.compact_rows`), image ranges
    on ``threads`` threads; ``by_score``: each image's rows by descending score, stable
    (:func:`~pipeline.fusion.packing.compact_rows_by_score`); ``reuse``: into a buffer of this thread's
    :class:`RowsPool` that no rows use any more."""
    dst = np.zeros(len(out.count) + 1, np.int64)
    np.cumsum(out.count, out=dst[1:])
    m = int(dst[-1])
    if reuse:
        rows = thread_rows_pool().rows(m, out.selection is not None)
    else:
        rows = DenseRows(fresh_array(m, np.int64), fresh_array((5, m), np.float64), fresh_array(m, np.int64),
                         None if out.selection is None else fresh_array(m, np.float64))

    def work(lo: int, hi: int) -> None:
        if by_score:
            no_column = np.empty(0)
            compact_rows_by_score(lo, hi, packed.row_offs, out.count, dst, out.boxes, out.score, out.label,
                                  no_column if out.selection is None else out.selection, packed.width,
                                  packed.height, *rows[:3], no_column if rows.selection is None else rows.selection)
            return
        compact_rows(lo, hi, packed.row_offs, out.count, dst, out.boxes, out.score, out.label, packed.width,
                     packed.height, *rows[:3])
        if out.selection is not None:
            compact_column(lo, hi, packed.row_offs, out.count, dst, out.selection, rows.selection)

    n_img = len(out.count)
    if threads <= 1 or n_img < 4 * threads:
        work(0, n_img)
    else:
        ranges = image_ranges(dst, threads)
        with ThreadPoolExecutor(max_workers=threads) as ex:
            list(ex.map(lambda r: work(*r), ranges))
    return rows
