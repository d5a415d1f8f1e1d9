"""A prediction table as the packed arrays every fusion kernel reads, and the fused rows they return.

:func:`pack_table` describes a prediction table (:mod:`pipeline.layout`, original-image pixels) without copying
its rows: the table's own columns (zero-copy views) plus *segments* -- maximal runs of consecutive rows with the
same image and set -- sorted by image (ids sorted), then set, then table order. A kernel fusing image ``k`` walks
its segments ``seg_offs[k] : seg_offs[k + 1]`` and divides each row's coordinates by the image's width and
height as it reads them.

Why segments. Fusion tables are written member by member, image by image, so consecutive rows share their image
and set: 12 M rows of 3,000 images x 40 sets are 120 k segments. Finding the runs costs one vectorised
comparison of neighbouring values per column (arrow's, for the string columns), and only the segments' first
values are factorised and sorted -- factorising 12 M image-id strings was most of the old packing time, and the
gathered normalised copy of every row most of the rest. A shuffled table degrades gracefully (one segment per
row, the same work as before).

:func:`pack_lists` packs one image given in the reference library's list format (the drop-ins' path); kernels
then see width = height = 1 (``x / 1.0 == x`` exactly). :func:`compact_rows` maps the kernels' per-image output
slots back to dense pixel columns (:func:`compact_rows_by_score`: each image's rows by descending score, as a
scorer packs them).
"""
from __future__ import annotations

import functools
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numba
import numpy as np
import pandas as pd

from pipeline.cpus import available_cpus
from pipeline.fusion.primitives import NJIT_OPTIONS, RADIX_HIST_SIZE, float_sort_keys, radix_argsort_top

# Digests of the package files compiled into this module's cached functions (numba's cache cannot see changes to
# them); see pipeline.fusion.wbf_kernel.COMPILED_AGAINST.
COMPILED_AGAINST = {"primitives.py": "5a867f87f2eb7faf"}


PARALLEL_COLUMNS_MIN = 1_000_000  # rows from which the columns' neighbour comparisons run on threads of their own


class PackedTable(NamedTuple):
    """A prediction table described for fusion (see the module docstring); row arrays are the table's own."""

    image_ids: pd.Index  # str, sorted: image k
    width: np.ndarray  # float64 per image, pixels
    height: np.ndarray  # float64 per image, pixels
    row_offs: np.ndarray  # int64 (n_images + 1): image k owns output slots row_offs[k] : row_offs[k + 1]
    seg_offs: np.ndarray  # int64 (n_images + 1): image k's segments are seg_offs[k] : seg_offs[k + 1]
    seg_start: np.ndarray  # int64 per segment: its first row in the table
    seg_len: np.ndarray  # int64 per segment: its number of rows
    seg_set: np.ndarray  # int64 per segment: its set; within an image ascending, then in table order
    x1: np.ndarray  # float64 (n,) per table row, pixels (read-only views of the table's columns)
    y1: np.ndarray
    x2: np.ndarray
    y2: np.ndarray
    score: np.ndarray  # float64 (n,)
    label: np.ndarray  # int64 (n,)
    set_keys: list[Any]  # the sets: one entry of the library's boxes_list each (scalars, or tuples for several columns)
    weights: np.ndarray  # float64, one per set

    @property
    def kernel_rows(self) -> tuple[np.ndarray, ...]:
        """The arguments every kernel takes to read images, in order: segments, row columns, image sizes."""
        return (self.seg_offs, self.seg_start, self.seg_len, self.seg_set, self.x1, self.y1, self.x2, self.y2,
                self.score, self.label, self.width, self.height)

    def image_rows(self, k: int) -> np.ndarray:
        """Table rows of image ``k`` in packed order (set, then table order)."""
        s, e = self.seg_offs[k], self.seg_offs[k + 1]
        if s == e:
            return np.zeros(0, np.int64)
        return np.concatenate([np.arange(a, a + n) for a, n in zip(self.seg_start[s:e], self.seg_len[s:e])])

    def image_sets(self, k: int) -> np.ndarray:
        """Set of each row of :meth:`image_rows`."""
        s, e = self.seg_offs[k], self.seg_offs[k + 1]
        return np.repeat(self.seg_set[s:e], self.seg_len[s:e])

    def normalised_boxes(self, k: int) -> np.ndarray:
        """Image ``k``'s boxes divided by its (width, height), (n, 4), packed order: what the library is given."""
        rows = self.image_rows(k)
        w, h = self.width[k], self.height[k]
        return np.stack([self.x1[rows] / w, self.y1[rows] / h, self.x2[rows] / w, self.y2[rows] / h], axis=1)


class FusedRows(NamedTuple):
    """Fused boxes of all images: row ``r`` belongs to image ``image[r]``; rows grouped by image, ascending."""

    image: np.ndarray  # int64 (m,): image position in PackedTable.image_ids
    boxes: np.ndarray  # float64 (m, 4), normalised
    score: np.ndarray  # float64 (m,)
    label: np.ndarray  # int64 (m,)


def readonly_f64(values: Any) -> np.ndarray:
    """A contiguous, read-only float64 array (a view where possible): every kernel sees one array type, so numba
    compiles each kernel once (a table's columns arrive read-only, a drop-in's copies are made so)."""
    a = np.ascontiguousarray(values, dtype=np.float64).view()  # a view: the caller's array stays writeable
    a.flags.writeable = False
    return a


def readonly_i64(values: Any) -> np.ndarray:
    """A contiguous, read-only int64 array (see :func:`readonly_f64`)."""
    a = np.ascontiguousarray(values, dtype=np.int64).view()
    a.flags.writeable = False
    return a


def pack_table(preds: pd.DataFrame, image_sizes: Mapping[str, tuple[int, int]] | pd.DataFrame,
               group_col: str | Sequence[str], weights: Mapping[Any, float] | None,
               sets: Sequence[Any] | None, leave_out: Collection[Any] = ()) -> PackedTable | None:
    """``preds`` packed (see :class:`PackedTable`), or ``None`` when there is nothing to fuse (no rows or no sets).

    ``leave_out``: sets whose rows are left out, as if ``preds`` had none (with several group columns a set's first
    value, e.g. a member name, leaves out all of its sets); they are dropped from ``sets`` too. Dropping their
    segments costs nothing next to filtering the table's rows (which copies every column).

    ``ValueError`` for missing columns, missing values, images without a size or unknown set keys; ``KeyError``
    for a set without a weight. Non-finite boxes are reported by the kernels, which read every row anyway.
    """
    cols = [group_col] if isinstance(group_col, str) else list(group_col)
    missing = [c for c in ["image_id", "x1", "y1", "x2", "y2", "score", "label", *cols] if c not in preds.columns]
    if missing:
        raise ValueError(f"prediction table lacks columns {missing}")
    starts = _segment_starts({c: preds[c] for c in ["image_id", *cols]})
    seg_len = np.diff(np.append(starts, len(preds)))
    set_codes, keys = _set_codes(preds, cols, sets, starts)
    if leave_out:
        set_codes, keys = _leave_out(set_codes, keys, set(leave_out), multi=len(cols) > 1)
        kept = set_codes >= 0
        starts, seg_len, set_codes = starts[kept], seg_len[kept], set_codes[kept]
    w = _set_weights(keys, weights, multi=len(cols) > 1)
    if len(starts) == 0 or len(keys) == 0:
        return None
    img_codes, uniq_ids = pd.factorize(_take_rows(preds["image_id"], starts), sort=True)
    if (img_codes < 0).any():
        raise ValueError("image_id has missing values")
    image_ids = pd.Index(uniq_ids).astype(str)
    width, height = _image_size_arrays(image_sizes, np.asarray(image_ids, dtype=object))
    order, seg_offs, row_offs = _order_segments(img_codes.astype(np.int64), set_codes, seg_len, len(image_ids),
                                                len(keys))
    x1, y1, x2, y2, score = (readonly_f64(preds[c].to_numpy(np.float64)) for c in ("x1", "y1", "x2", "y2", "score"))
    label = preds["label"].to_numpy()
    if label.dtype.kind == "f" and not np.isfinite(label).all():
        raise ValueError("label has missing or non-finite values")
    return PackedTable(image_ids, width, height, row_offs, seg_offs, readonly_i64(starts[order]),
                       readonly_i64(seg_len[order]), readonly_i64(set_codes[order]), x1, y1, x2, y2, score,
                       readonly_i64(label), keys, w)


def pack_lists(boxes: np.ndarray, score: np.ndarray, label: np.ndarray, lens: np.ndarray,
               n_sets: int) -> PackedTable:
    """One image in the library's list format, concatenated: ``boxes`` (n, 4) normalised, per-set counts
    ``lens``; width = height = 1, one segment per non-empty set."""
    lens = np.asarray(lens, np.int64)
    starts = np.cumsum(lens) - lens
    nonempty = np.flatnonzero(lens > 0)
    bt = readonly_f64(np.asarray(boxes, np.float64).reshape(-1, 4).T)  # (4, n): each coordinate contiguous
    one = readonly_f64(np.ones(1))
    return PackedTable(_one_image_id(), one, one, np.array([0, int(lens.sum())], np.int64),
                       np.array([0, len(nonempty)], np.int64), readonly_i64(starts[nonempty]),
                       readonly_i64(lens[nonempty]), readonly_i64(nonempty), bt[0], bt[1], bt[2], bt[3],
                       readonly_f64(score), readonly_i64(label), list(range(n_sets)), np.ones(n_sets))


@functools.cache
def _one_image_id() -> pd.Index:
    """The image id of :func:`pack_lists`' single image (built once: a pandas Index costs ~100 us)."""
    return pd.Index(["0"])


def _image_size_arrays(image_sizes: Mapping[str, tuple[int, int]] | pd.DataFrame,
                       image_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(width, height) per image id, float64; ``ValueError`` for a missing image or a non-positive size."""
    if isinstance(image_sizes, pd.DataFrame):
        missing_cols = {"image_id", "width", "height"} - set(image_sizes.columns)
        if missing_cols:
            raise ValueError(f"image_sizes table lacks columns {sorted(missing_cols)}")
        sizes = image_sizes.assign(image_id=image_sizes["image_id"].astype(str)).drop_duplicates("image_id")
        sizes = sizes.set_index("image_id")
        idx = sizes.index.get_indexer(image_ids)
        if (idx < 0).any():
            raise ValueError(f"image_sizes lacks {int((idx < 0).sum())} image(s), "
                             f"e.g. {image_ids[idx < 0][:3].tolist()}")
        w = sizes["width"].to_numpy(np.float64)[idx]
        h = sizes["height"].to_numpy(np.float64)[idx]
    else:
        w = np.empty(len(image_ids))
        h = np.empty(len(image_ids))
        missing = []
        for k, iid in enumerate(image_ids):
            try:
                ww, hh = image_sizes[iid]
            except KeyError:
                missing.append(iid)
                continue
            w[k] = ww
            h[k] = hh
        if missing:
            raise ValueError(f"image_sizes lacks {len(missing)} image(s), e.g. {missing[:3]}")
    if not ((w > 0).all() and (h > 0).all() and np.isfinite(w).all() and np.isfinite(h).all()):
        raise ValueError("image widths and heights must be positive and finite")
    return readonly_f64(w), readonly_f64(h)


def _missing_message(name: str, image_col: str = "image_id") -> str:
    return f"{name} has missing values" if name == image_col else f"group column {name!r} has missing values"


def _differs_from_previous(col: pd.Series, name: str) -> np.ndarray:
    """``out[i]``: row ``i + 1`` of ``col`` differs from row ``i``. ``ValueError`` for missing values in an arrow
    column; elsewhere a missing value differs from everything (NaN != NaN; None starts a run), so it starts a
    segment and is found by the check on the segments' first values."""
    values = col.array
    if hasattr(values, "__arrow_array__"):  # arrow-backed (pandas' default str dtype): arrow's own comparison
        import pyarrow.compute as pc

        chunked = values.__arrow_array__()
        if chunked.null_count:
            raise ValueError(_missing_message(name))
        n = len(chunked)
        return pc.not_equal(chunked.slice(1), chunked.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    if isinstance(col.dtype, pd.CategoricalDtype):
        codes = col.cat.codes.to_numpy()
        return (codes[1:] != codes[:-1]) | (codes[1:] < 0)
    a = col.to_numpy()
    return ~(a[1:] == a[:-1])


def _segment_starts(columns: dict[str, pd.Series]) -> np.ndarray:
    """First rows (int64, ascending, starting at 0) of the maximal runs of rows on which every column is constant."""
    n = len(next(iter(columns.values())))
    if n == 0:
        return np.zeros(0, np.int64)
    change = np.empty(n, bool)
    change[0] = True
    change[1:] = False
    threads = min(available_cpus(), len(columns)) if n >= PARALLEL_COLUMNS_MIN else 1
    if threads > 1:  # arrow's comparisons release the GIL: the columns side by side (two 12 M-row string columns:
        with ThreadPoolExecutor(max_workers=threads) as pool:  # ~105 ms one after the other, ~55-75 ms so)
            differs = list(pool.map(lambda item: _differs_from_previous(item[1], item[0]), columns.items()))
    else:
        differs = [_differs_from_previous(col, name) for name, col in columns.items()]
    for differ in differs:
        change[1:] |= differ
    return np.flatnonzero(change).astype(np.int64)


def _take_rows(col: pd.Series, rows: np.ndarray) -> pd.Series:
    """``col.take(rows)`` without combining an arrow column's chunks first (that would copy every row)."""
    values = col.array
    if not hasattr(values, "__arrow_array__"):
        return col.take(rows)
    import pyarrow as pa

    chunked = values.__arrow_array__()
    if not isinstance(chunked, pa.ChunkedArray):
        return pd.Series(pd.array(chunked.take(pa.array(rows)), dtype=col.dtype), name=col.name)
    bounds = np.cumsum([0] + [len(c) for c in chunked.chunks])
    which = np.searchsorted(bounds, rows, side="right") - 1
    parts = []
    for k in np.unique(which):
        sel = rows[which == k]
        parts.append(chunked.chunk(int(k)).take(pa.array(sel - bounds[k])))
    taken = pa.chunked_array(parts, type=chunked.type) if parts else chunked.slice(0, 0)
    return pd.Series(pd.array(taken, dtype=col.dtype), name=col.name)


def _set_codes(preds: pd.DataFrame, cols: list[str], sets: Sequence[Any] | None,
               starts: np.ndarray) -> tuple[np.ndarray, list[Any]]:
    """Segment -> set index, and the ordered list of set keys (scalars for one column, tuples for several)."""
    codes = np.zeros(len(starts), np.int64)
    uniques = []
    for c in cols:  # mixed-radix code over the per-column factorisations (sorted: lexicographic set order)
        cc, uu = pd.factorize(_take_rows(preds[c], starts), sort=True)
        if (cc < 0).any():
            raise ValueError(_missing_message(c))
        codes = codes * max(len(uu), 1) + cc
        uniques.append(uu.tolist())
    codes, combos = pd.factorize(codes, sort=True)
    combos = np.asarray(combos, np.int64)
    found = []
    for combo in combos.tolist():
        parts = []
        for uu in reversed(uniques):
            combo, r = divmod(combo, len(uu))
            parts.append(uu[r])
        found.append(parts[0] if len(cols) == 1 else tuple(reversed(parts)))
    if sets is None:
        return codes.astype(np.int64), found
    keys = [k for k in sets] if len(cols) == 1 else [tuple(k) for k in sets]
    position = {}
    for i, k in enumerate(keys):
        if k in position:
            raise ValueError(f"sets contains {k!r} twice")
        position[k] = i
    bad = [k for k in found if k not in position]
    if bad:
        raise ValueError(f"the table has set keys that are not in `sets`: {bad[:3]}")
    remap = np.array([position[k] for k in found], np.int64)
    return remap[codes], keys


def _leave_out(codes: np.ndarray, keys: list[Any], leave_out: set, multi: bool) -> tuple[np.ndarray, list[Any]]:
    """Set codes renumbered over the keys not left out (-1 for a segment of a left-out set), and those keys."""
    gone = np.array([k in leave_out or (multi and k[0] in leave_out) for k in keys], bool)
    renumber = np.where(gone, -1, np.cumsum(~gone) - 1)
    return renumber[codes] if len(codes) else codes, [k for k, g in zip(keys, gone) if not g]


def without_sets(packed: PackedTable, leave_out: Collection[Any], weights: Mapping[Any, float] | None,
                 multi: bool) -> PackedTable | None:
    """What :func:`pack_table` gives with ``leave_out`` and ``weights``, from the same table packed without leaving
    anything out (field for field: the segments of the sets left out dropped, the others' renumbered, images left
    with no segment dropped), without reading the table's columns again. ``multi``: packed on several group
    columns (a set key's first value may then name a set, or carry a weight). The OOF tuner packs once and tries
    subsets of the members: each :func:`pack_table` compared and factorised the table's string ids anew."""
    codes, keys = _leave_out(packed.seg_set, packed.set_keys, set(leave_out), multi)
    kept = codes >= 0
    if not keys or not kept.any():
        return None
    seg_image = np.repeat(np.arange(len(packed.image_ids)), np.diff(packed.seg_offs))[kept]
    seg_len = packed.seg_len[kept]
    images = np.flatnonzero(np.bincount(seg_image, minlength=len(packed.image_ids)))  # ascending: still sorted
    local = np.searchsorted(images, seg_image)
    seg_offs = np.zeros(len(images) + 1, np.int64)
    row_offs = np.zeros(len(images) + 1, np.int64)
    np.cumsum(np.bincount(local, minlength=len(images)), out=seg_offs[1:])
    np.cumsum(np.bincount(local, weights=seg_len, minlength=len(images)).astype(np.int64), out=row_offs[1:])
    return packed._replace(image_ids=packed.image_ids[images], width=readonly_f64(packed.width[images]),
                           height=readonly_f64(packed.height[images]), row_offs=row_offs, seg_offs=seg_offs,
                           seg_start=readonly_i64(packed.seg_start[kept]), seg_len=readonly_i64(seg_len),
                           seg_set=readonly_i64(codes[kept]), set_keys=keys, weights=_set_weights(keys, weights,
                                                                                                 multi))


def with_weights(packed: PackedTable, weights: Mapping[Any, float] | None, multi: bool) -> PackedTable:
    """``packed`` with other set weights (the rows and segments shared, not copied): what :func:`pack_table` would
    give for ``weights``. ``multi``: the table was packed on several group columns (a set key's first value may then
    carry the weight). The OOF tuner packs once and tries many weights."""
    return packed._replace(weights=_set_weights(packed.set_keys, weights, multi))


def _set_weights(keys: list[Any], weights: Mapping[Any, float] | None, multi: bool) -> np.ndarray:
    """One weight per set key; with several group columns a key's first value (the model) may carry it."""
    if weights is None:
        return np.ones(len(keys))
    out = np.empty(len(keys))
    for k, key in enumerate(keys):
        if key in weights:
            out[k] = weights[key]
        elif multi and key[0] in weights:
            out[k] = weights[key[0]]
        else:
            raise KeyError(f"no weight for set {key!r}")
    return out


@numba.njit(**NJIT_OPTIONS)
def _order_segments(img_codes: np.ndarray, set_codes: np.ndarray, seg_len: np.ndarray, n_img: int,
                    n_sets: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Segments ordered by (image, set, table order) with two stable counting sorts; returns (order, segment
    offsets per image, row offsets per image)."""
    n = img_codes.shape[0]
    cnt = np.zeros(n_sets + 1, np.int64)
    tmp = np.empty(n, np.int64)
    for i in range(n):
        cnt[set_codes[i] + 1] += 1
    for k in range(n_sets):
        cnt[k + 1] += cnt[k]
    for i in range(n):
        k = set_codes[i]
        tmp[cnt[k]] = i
        cnt[k] += 1
    seg_offs = np.zeros(n_img + 1, np.int64)
    row_offs = np.zeros(n_img + 1, np.int64)
    for i in range(n):
        seg_offs[img_codes[i] + 1] += 1
        row_offs[img_codes[i] + 1] += seg_len[i]
    for k in range(n_img):
        seg_offs[k + 1] += seg_offs[k]
        row_offs[k + 1] += row_offs[k]
    pos = seg_offs[:n_img].copy()
    order = np.empty(n, np.int64)
    for r in range(n):
        i = tmp[r]
        k = img_codes[i]
        order[pos[k]] = i
        pos[k] += 1
    return order, seg_offs, row_offs


@numba.njit(**NJIT_OPTIONS)
def compact_rows(img_lo: int, img_hi: int, row_offs: np.ndarray, count: np.ndarray, dst_offs: np.ndarray,
                 out_box: np.ndarray, out_score: np.ndarray, out_label: np.ndarray, width: np.ndarray,
                 height: np.ndarray, image: np.ndarray, values: np.ndarray, label: np.ndarray) -> None:
    """Images ``img_lo..img_hi-1`` of the kernels' output (image ``k``: ``count[k]`` rows from slot
    ``row_offs[k]``, normalised) into dense columns from row ``dst_offs[k]``, in pixels: ``image``, ``values``
    (rows x1, y1, x2, y2, score: one block, which becomes the table's float columns without a copy), ``label``."""
    for k in range(img_lo, img_hi):
        o = dst_offs[k]
        for r in range(row_offs[k], row_offs[k] + count[k]):
            _write_row(o, k, r, width[k], height[k], out_box, out_score, out_label, image, values, label)
            o += 1


@numba.njit(inline="always", **NJIT_OPTIONS)
def _write_row(o: int, k: int, r: int, w: float, h: float, out_box: np.ndarray, out_score: np.ndarray,
               out_label: np.ndarray, image: np.ndarray, values: np.ndarray, label: np.ndarray) -> None:
    """Dense row ``o`` := output slot ``r`` of image ``k`` (``w`` x ``h`` px), in pixels."""
    image[o] = k
    values[0, o] = out_box[r, 0] * w
    values[1, o] = out_box[r, 1] * h
    values[2, o] = out_box[r, 2] * w
    values[3, o] = out_box[r, 3] * h
    values[4, o] = out_score[r]
    label[o] = out_label[r]


@numba.njit(**NJIT_OPTIONS)
def compact_rows_by_score(img_lo: int, img_hi: int, row_offs: np.ndarray, count: np.ndarray, dst_offs: np.ndarray,
                          out_box: np.ndarray, out_score: np.ndarray, out_label: np.ndarray, out_selection: np.ndarray,
                          width: np.ndarray, height: np.ndarray, image: np.ndarray, values: np.ndarray,
                          label: np.ndarray, selection: np.ndarray) -> None:
    """:func:`compact_rows` (and :func:`compact_column` of ``out_selection`` into ``selection``, unless that is
    empty) with each image's rows by descending score, stable (equal scores keep the rule's order): the order a
    scorer packs rows in (:func:`pipeline.metrics.packing.group_by_image`), so that it takes them as they come.
    For rules whose output is not sorted by score (soft-NMS: selection order; NMS: label by label); the OOF tuner
    scores every fusion, and sorting here, where the rows are copied anyway, saves the scorer's own sort and copy."""
    most = 1
    for k in range(img_lo, img_hi):
        most = max(most, count[k])
    negated, keys, idx = np.empty(most), np.empty(most, np.int64), np.empty(most, np.int64)
    ka, kb, ib = np.empty(most, np.int64), np.empty(most, np.int64), np.empty(most, np.int64)
    hist = np.empty(RADIX_HIST_SIZE, np.int64)
    with_selection = selection.shape[0] > 0
    for k in range(img_lo, img_hi):
        r0 = row_offs[k]
        n = count[k]
        descending = True  # (NMS of one label: its rows come by score, and are copied as they are)
        for r in range(r0 + 1, r0 + n):
            descending = descending and out_score[r] <= out_score[r - 1]
        if not descending:
            for t in range(n):
                negated[t] = -out_score[r0 + t]
            float_sort_keys(negated, n, keys)
            radix_argsort_top(keys, n, idx, ka, kb, ib, hist)  # ascending -score, stable
        o = dst_offs[k]
        for t in range(n):
            r = r0 + t if descending else r0 + idx[t]
            _write_row(o, k, r, width[k], height[k], out_box, out_score, out_label, image, values, label)
            if with_selection:
                selection[o] = out_selection[r]
            o += 1


@numba.njit(**NJIT_OPTIONS)
def take_rows(keep: np.ndarray, image: np.ndarray, values: np.ndarray, label: np.ndarray, out_image: np.ndarray,
              out_values: np.ndarray, out_label: np.ndarray) -> None:
    """Dense rows where ``keep`` is true, in order, into the ``out_`` arrays (sized to fit). The tuner keeps the
    rows above a threshold: within an image a prefix of its rows, so the branch is well predicted."""
    o = 0
    for r in range(keep.shape[0]):
        if keep[r]:
            out_image[o] = image[r]
            for c in range(values.shape[0]):
                out_values[c, o] = values[c, r]
            out_label[o] = label[r]
            o += 1


@numba.njit(**NJIT_OPTIONS)
def compact_column(img_lo: int, img_hi: int, row_offs: np.ndarray, count: np.ndarray, dst_offs: np.ndarray,
                   src: np.ndarray, dst: np.ndarray) -> None:
    """One more per-row column of the kernels' output compacted as :func:`compact_rows` compacts the rows."""
    for k in range(img_lo, img_hi):
        o = dst_offs[k]
        for r in range(row_offs[k], row_offs[k] + count[k]):
            dst[o] = src[r]
            o += 1
