"""Tables to packed arrays: the one place that turns an annotation or prediction table into per-image box groups.

Every metric and :mod:`pipeline.report` score from the same layout (:class:`Packed`), built here:

- :func:`resolve_image_ids`: the scored images (default: every image of the annotation table, in table order),
  with the errors for duplicate or unknown ids;
- :func:`pack_boxes`: keep the rows of scored images, group them by image, descending score inside an image
  (stable: equal scores keep row order);
- :func:`pack_ground_truth` / :func:`pack_predictions`: the two tables, with the prediction table's checks
  (required columns, NaN, labels inside the class list);
- :func:`scoring_at_least` (a packing's rows above a score threshold), :func:`descending_order` (every row by
  descending score, the radix sort the metrics' accumulations share) and :func:`by_class` (that order, class by
  class).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numba
import numpy as np
import pandas as pd

from pipeline.cpus import available_cpus, on_ranges
from pipeline.fusion.primitives import RADIX_HIST_SIZE, float_sort_keys, radix_argsort_top

# Digests of the package files compiled into this module's cached functions (numba's cache cannot see changes to
# them); see pipeline.fusion.wbf_kernel.COMPILED_AGAINST.
COMPILED_AGAINST = {"fusion/primitives.py": "5a867f87f2eb7faf"}

if TYPE_CHECKING:  # type only: importing pipeline.data at runtime would pull in pipeline.config (an import cycle)
    from pipeline.data.table import AnnotationTable

BOX_COLUMNS: tuple[str, ...] = ("x1", "y1", "x2", "y2")
_BOX = list(BOX_COLUMNS)


@dataclass(frozen=True)
class Packed:
    """Boxes of the scored images, grouped by image index (image ``i`` owns rows ``offsets[i]:offsets[i+1]``)."""

    boxes: np.ndarray  # (N, 4) float64
    scores: np.ndarray  # (N,) float64 (ones for ground truth)
    labels: np.ndarray  # (N,) int64
    image: np.ndarray  # (N,) int64, non-decreasing
    offsets: np.ndarray  # (n_images + 1,) int64


def scoring_at_least(packed: Packed, threshold: float) -> Packed:
    """The rows of ``packed`` scoring ``>= threshold``, still grouped by image (each image's order kept)."""
    keep = packed.scores >= threshold
    image = packed.image[keep]
    n_images = len(packed.offsets) - 1
    offsets = np.zeros(n_images + 1, np.int64)
    np.cumsum(np.bincount(image, minlength=n_images), out=offsets[1:])
    return Packed(packed.boxes[keep], packed.scores[keep], packed.labels[keep], image, offsets)


def group_by_image(image: np.ndarray, scores: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Row order grouping rows by image index (0..n_images-1), descending score inside an image, stable (equal
    scores keep row order); and the ``(n_images + 1,)`` offsets. Same order as ``np.lexsort((-scores, image))``
    for scores without NaN (every caller refuses NaN scores). The images are sorted on this process's CPUs."""
    order, offsets = _count_by_image(image, n_images)
    _on_threads(lambda lo, hi: _sort_images(order, scores, offsets, lo, hi), offsets)
    return order, offsets


PARALLEL_MIN_ROWS = 50_000  # rows per thread at least (fewer: one thread does it all)


def _on_threads(work: Callable[[int, int], None], offsets: np.ndarray) -> None:
    """``work(lo, hi)`` over ranges of images of about equal row counts on this process's CPUs, at least
    ``PARALLEL_MIN_ROWS`` rows a thread."""
    on_ranges(work, offsets, min(available_cpus(), int(offsets[-1]) // PARALLEL_MIN_ROWS, len(offsets) - 1))


@numba.njit(cache=True)
def _count_by_image(image: np.ndarray, n_images: int) -> tuple[np.ndarray, np.ndarray]:
    """Row order grouping rows by image index, row order inside an image (a counting sort), and the offsets."""
    offsets = np.zeros(n_images + 1, dtype=np.int64)
    for i in image:
        offsets[i + 1] += 1
    offsets = np.cumsum(offsets)
    pos = offsets[:-1].copy()
    order = np.empty(image.shape[0], dtype=np.int64)
    for r in range(image.shape[0]):
        order[pos[image[r]]] = r
        pos[image[r]] += 1
    return order, offsets


@numba.njit(cache=True, nogil=True)
def _sort_images(order: np.ndarray, scores: np.ndarray, offsets: np.ndarray, lo: int, hi: int) -> None:
    """Images ``lo..hi-1`` of ``order``: descending score inside each, stable -- each image's keys radix-sorted
    (~4x a merge sort on soft-NMS's ~1,000 rows an image, which come in selection order, not by score)."""
    most = 1
    for i in range(lo, hi):
        most = max(most, offsets[i + 1] - offsets[i])
    negated, keys, idx = np.empty(most), np.empty(most, np.int64), np.empty(most, np.int64)
    ka, kb, ib = np.empty(most, np.int64), np.empty(most, np.int64), np.empty(most, np.int64)
    hist = np.empty(RADIX_HIST_SIZE, np.int64)
    for i in range(lo, hi):
        a, b = offsets[i], offsets[i + 1]
        if b - a > 1 and not _descending(order, scores, a, b):  # fused rows come sorted: no sort needed
            n = b - a
            for r in range(n):
                negated[r] = -scores[order[a + r]]
            float_sort_keys(negated, n, keys)
            radix_argsort_top(keys, n, idx, ka, kb, ib, hist)  # ascending -score, stable: equal scores keep order
            for r in range(n):
                ka[r] = order[a + idx[r]]
            for r in range(n):
                order[a + r] = ka[r]


@numba.njit(cache=True, nogil=True)
def _descending(order: np.ndarray, scores: np.ndarray, a: int, b: int) -> bool:
    """Whether ``scores[order[a:b]]`` never increases (a stable sort would then leave the rows as they are)."""
    for r in range(a + 1, b):
        if scores[order[r]] > scores[order[r - 1]]:
            return False
    return True


@numba.njit(cache=True, nogil=True)
def _gather_rows(order: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, image: np.ndarray,
                 r0: int, r1: int, out_boxes: np.ndarray, out_scores: np.ndarray, out_labels: np.ndarray,
                 out_image: np.ndarray) -> None:
    """Rows ``r0..r1-1`` of the packed arrays: row ``order[r]`` of the inputs."""
    for r in range(r0, r1):
        k = order[r]
        for c in range(4):
            out_boxes[r, c] = boxes[k, c]
        out_scores[r] = scores[k]
        out_labels[r] = labels[k]
        out_image[r] = image[k]


@numba.njit(cache=True, nogil=True)
def descending_order(scores: np.ndarray) -> np.ndarray:
    """``np.argsort(-scores, kind="stable")`` (no NaN): a radix sort, ~3x numpy's on millions of scores."""
    n = scores.shape[0]
    keys = np.empty(n, np.int64)
    float_sort_keys(-scores, n, keys)
    order = np.empty(n, np.int64)
    radix_argsort_top(keys, n, order, np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, np.int64),
                      np.empty(RADIX_HIST_SIZE, np.int64))
    return order


@numba.njit(cache=True, nogil=True)
def by_class(order: np.ndarray, labels: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, start)``: the rows of ``order`` grouped by class, each class's in ``order``'s order -- class ``k``'s
    are ``rows[start[k]:start[k + 1]]`` (a counting sort: stable)."""
    start = np.zeros(n_classes + 1, np.int64)
    for d in range(labels.shape[0]):
        start[labels[d] + 1] += 1
    for k in range(n_classes):
        start[k + 1] += start[k]
    rows = np.empty(order.shape[0], np.int64)
    fill = start[:-1].copy()
    for d in order:
        rows[fill[labels[d]]] = d
        fill[labels[d]] += 1
    return rows, start


def resolve_image_ids(gt: AnnotationTable, image_ids: Sequence[str] | None) -> pd.Index:
    """The scored image ids as strings: ``image_ids`` (checked against ``gt``), or every image of ``gt``."""
    known = pd.Index(gt.images.image_id.astype(str))
    if known.has_duplicates:
        raise ValueError(f"duplicate image ids in the annotation table: {sorted(set(known[known.duplicated()]))[:5]}")
    if image_ids is None:
        return known
    ids = pd.Index([str(i) for i in image_ids])
    if ids.has_duplicates:
        raise ValueError(f"duplicate image ids in image_ids: {sorted(set(ids[ids.duplicated()]))[:5]}")
    unknown = ids.difference(known)
    if len(unknown):
        raise ValueError(f"image_ids not in the annotation table: {sorted(unknown)[:5]}")
    return ids


def pack_boxes(index: pd.Index, image_id: pd.Series, boxes: np.ndarray, scores: np.ndarray,
               labels: np.ndarray) -> Packed:
    """Keep rows of images in ``index``; order by image, then descending score (stable: ties keep row order)."""
    return pack_positions(image_positions(index, image_id), boxes, scores, labels, len(index))


def pack_positions(image: np.ndarray, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray,
                   n_images: int) -> Packed:
    """:func:`pack_boxes` for rows whose image is already a position in the scored index (-1: not scored)."""
    offsets = _offsets_if_packed(image, scores, n_images)
    if len(offsets):  # a fusion's rows come grouped and sorted already: no copies
        return Packed(box_rows(boxes), scores, labels, image, offsets)
    keep = image >= 0
    if not keep.all():
        image, boxes, scores, labels = image[keep], boxes[keep], scores[keep], labels[keep]
    order, offsets = group_by_image(image, scores, n_images)
    if _is_identity(order):
        return Packed(box_rows(boxes), scores, labels, image, offsets)
    out = Packed(np.empty((len(order), 4)), np.empty(len(order)), np.empty(len(order), np.int64),
                 np.empty(len(order), np.int64), offsets)
    _on_threads(lambda lo, hi: _gather_rows(order, boxes, scores, labels, image, offsets[lo], offsets[hi], out.boxes,
                                            out.scores, out.labels, out.image), offsets)
    return out


def box_rows(boxes: np.ndarray) -> np.ndarray:
    """``boxes`` as ``(N, 4)`` float64, not copied when already so in either memory order: a fusion's rows come as
    the transpose of its ``(4, N)`` coordinate rows, and a copy of that (~100 MB for a GWD-sized OOF fusion, fresh
    pages each time) cost the OOF tuner as much as the metric itself. The metrics' kernels read either order."""
    if (boxes.dtype == np.float64 and boxes.ndim == 2 and boxes.shape[1] == 4
            and (boxes.flags.c_contiguous or boxes.flags.f_contiguous)):
        return boxes
    return np.ascontiguousarray(boxes, dtype=np.float64).reshape(-1, 4)


def image_positions(index: pd.Index, image_id: pd.Series) -> np.ndarray:
    """Each row's position in ``index`` (int64, -1 when absent), ids compared as strings. The column is factorised
    first (arrow's dictionary encoding for pandas' str columns), so only its distinct ids are looked up."""
    codes, uniques = pd.factorize(image_id, use_na_sentinel=False)  # NaN is a value: "nan" as astype(str) makes it
    where = index.get_indexer(pd.Index(uniques).astype(str)).astype(np.int64)
    return where[codes] if len(codes) else np.zeros(0, np.int64)


@numba.njit(cache=True)
def _offsets_if_packed(image: np.ndarray, scores: np.ndarray, n_images: int) -> np.ndarray:
    """The ``(n_images + 1,)`` offsets when the rows are already packed -- every image in ``0..n_images-1``, images
    non-decreasing, scores never increasing inside an image (what :func:`group_by_image` would leave as it is) --
    else an empty array. One pass, no row order built."""
    n = image.shape[0]
    offsets = np.zeros(n_images + 1, dtype=np.int64)
    for r in range(n):
        i = image[r]
        if i < 0 or i >= n_images:
            return offsets[:0]
        if r > 0 and (i < image[r - 1] or (i == image[r - 1] and scores[r] > scores[r - 1])):
            return offsets[:0]
        offsets[i + 1] += 1
    for i in range(n_images):
        offsets[i + 1] += offsets[i]
    return offsets


@numba.njit(cache=True)
def _is_identity(order: np.ndarray) -> bool:
    for i in range(order.shape[0]):
        if order[i] != i:
            return False
    return True


def pack_ground_truth(gt: AnnotationTable, index: pd.Index) -> Packed:
    """The ground-truth boxes of the images in ``index`` (scores are ones: table order is kept inside an image)."""
    b = gt.boxes
    return pack_boxes(index, b.image_id, b[_BOX].to_numpy(np.float64), np.ones(len(b)), b.label.to_numpy(np.int64))


def pack_predictions(preds: pd.DataFrame, index: pd.Index, n_classes: int, class_aware: bool) -> Packed:
    """The predictions of the images in ``index``. Needs ``image_id, x1, y1, x2, y2, score`` (+ ``label`` when
    ``class_aware``; labels are zeros otherwise); other columns are ignored."""
    need = ["image_id", *_BOX, "score"] + (["label"] if class_aware else [])
    missing = [c for c in need if c not in preds.columns]
    if missing:
        raise ValueError(f"prediction table lacks columns {missing}")
    boxes = preds[_BOX].to_numpy(np.float64)
    scores = preds["score"].to_numpy(np.float64)
    labels = preds["label"].to_numpy(np.int64) if class_aware else np.zeros(len(preds), dtype=np.int64)
    return checked_predictions(pack_boxes(index, preds["image_id"], boxes, scores, labels), n_classes, class_aware)


def pack_indexed(index: pd.Index, image_ids: pd.Index, image: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                 labels: np.ndarray | None, n_classes: int) -> Packed:
    """:func:`pack_predictions` for predictions given as arrays, each row's image a position in ``image_ids``
    (a fusion's output, scored without building a table); ``labels`` None: class-agnostic (zeros)."""
    where = index.get_indexer(pd.Index(image_ids).astype(str)).astype(np.int64)
    if len(where) == len(index) and (where == np.arange(len(where))).all():
        position = np.asarray(image, dtype=np.int64)  # the same images in the same order: no gather
    else:
        position = where[image] if len(image) else np.zeros(0, np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    class_aware = labels is not None
    # class-agnostic: one shared zero for every row (a zeros array of millions of rows cost ~10 ms a scoring)
    labels = np.asarray(labels, dtype=np.int64) if class_aware else np.broadcast_to(np.int64(0), len(scores))
    packed = pack_positions(position, np.asarray(boxes, dtype=np.float64), scores, labels, len(index))
    return checked_predictions(packed, n_classes, class_aware)


@numba.njit(cache=True)
def _has_nan(boxes: np.ndarray, scores: np.ndarray) -> bool:
    """Whether any coordinate or score is NaN (no temporary arrays: a fused OOF table has millions of rows)."""
    nan = False
    for r in range(scores.shape[0]):  # ``x != x``: NaN alone is unequal to itself; no branch per element
        nan |= scores[r] != scores[r]
    for c in range(4):  # column by column: a fusion's boxes come column-major (see box_rows)
        for r in range(boxes.shape[0]):
            nan |= boxes[r, c] != boxes[r, c]
    return nan


def checked_predictions(packed: Packed, n_classes: int, class_aware: bool) -> Packed:
    """``packed``, or ``ValueError`` for NaN coordinates or scores, or labels outside ``0..n_classes-1``."""
    if _has_nan(packed.boxes, packed.scores):
        raise ValueError("prediction table has NaN coordinates or scores")
    if class_aware and len(packed.labels) and (packed.labels.min() < 0 or packed.labels.max() >= n_classes):
        raise ValueError(f"prediction labels outside the class list (0..{n_classes - 1})")
    return packed


__all__ = ["BOX_COLUMNS", "Packed", "box_rows", "by_class", "checked_predictions", "descending_order", "group_by_image",
           "image_positions", "pack_boxes", "pack_ground_truth", "pack_indexed", "pack_positions", "pack_predictions",
           "resolve_image_ids", "scoring_at_least"]
