"""A plain-text dataset summary: what ``python -m pipeline.data check`` prints, reusable by the folds stage."""
from __future__ import annotations

import numpy as np

from pipeline.data.table import AnnotationTable, RepairReport

_PERCENTILES = (0, 5, 50, 95, 100)


def _n(value: int) -> str:
    return f"{value:,}"


def _dist(values: np.ndarray, fmt: str = "{:.0f}") -> str:
    """min / p5 / median / p95 / max of ``values``."""
    if len(values) == 0:
        return "-"
    q = np.percentile(values, _PERCENTILES)
    return " / ".join(fmt.format(v) for v in q)


def _table(rows: list[tuple], header: tuple) -> list[str]:
    cells = [tuple(map(str, header))] + [tuple(map(str, r)) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return ["  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in cells]


def summarize_repairs(report: RepairReport, max_lines: int = 50) -> list[str]:
    if not report.repairs:
        return ["repairs: none"]
    lines = [f"repairs: {_n(len(report.repairs))}"]
    lines += [f"  {kind:<24} {_n(count)}" for kind, count in sorted(report.counts().items())]
    lines.append("repair list:" if len(report.repairs) <= max_lines else f"repair list (first {max_lines}):")
    lines += [f"  {r.kind}: {r.file} {r.row}: {r.detail}" for r in report.repairs[:max_lines]]
    if len(report.repairs) > max_lines:
        lines.append(f"  ... and {_n(len(report.repairs) - max_lines)} more")
    return lines


def summarize(table: AnnotationTable, title: str = "dataset", max_repairs: int = 50) -> str:
    """Images, boxes per class and per source, image sizes, boxes per image, box sizes, then every repair."""
    images, boxes = table.images, table.boxes
    per_image = boxes.groupby("image_id").size().reindex(images.image_id, fill_value=0)
    n_empty = int((per_image == 0).sum())
    lines = [
        f"{title}: {_n(len(images))} images ({_n(n_empty)} empty), {_n(len(boxes))} boxes, "
        f"{len(table.classes)} classes"
    ]

    counts = boxes.groupby("label").image_id.agg(["size", "nunique"])
    rows = [(f"{i} {name}", _n(int(counts["size"].get(i, 0))), _n(int(counts["nunique"].get(i, 0))))
            for i, name in enumerate(table.classes)]
    lines += ["classes:"] + _table(rows, ("class", "boxes", "images"))

    src = images.assign(n=per_image.to_numpy()).groupby("source", sort=True).n.agg(["size", "sum"])
    rows = [(s or '""', _n(int(r["size"])), _n(int(r["sum"]))) for s, r in src.iterrows()]
    lines += ["sources:"] + _table(rows, ("source", "images", "boxes"))
    n_groups = images.group[images.group != ""].nunique()
    if n_groups:
        lines.append(f"groups: {_n(n_groups)} ({_n(int((images.group == '').sum()))} images without a group)")
    if "annotator" in boxes.columns and len(boxes):  # the csv reader's annotator_column, kept as given
        per_annotator = boxes.groupby("annotator").size().sort_values(ascending=False)
        shown = ", ".join(f"{a or chr(34) * 2} {_n(int(n))}" for a, n in per_annotator.head(10).items())
        more = f", ... {_n(len(per_annotator) - 10)} more" if len(per_annotator) > 10 else ""
        lines.append(f"annotators: {_n(len(per_annotator))} (boxes: {shown}{more})")

    common = images.groupby(["width", "height"]).size().sort_values(ascending=False).head(5)
    lines += [
        "image size (min / p5 / median / p95 / max):",
        f"  width   {_dist(images.width.to_numpy())}",
        f"  height  {_dist(images.height.to_numpy())}",
        "  most common: " + ", ".join(f"{w}x{h} ({_n(int(c))})" for (w, h), c in common.items()),
        f"boxes per image (min / p5 / median / p95 / max): {_dist(per_image.to_numpy())}, "
        f"mean {per_image.mean():.1f}" if len(images) else "boxes per image: -",
    ]

    if len(boxes):
        bw = (boxes.x2 - boxes.x1).to_numpy()
        bh = (boxes.y2 - boxes.y1).to_numpy()
        size = images.set_index("image_id").loc[boxes.image_id]
        rel = np.sqrt(bw * bh / (size.width.to_numpy() * size.height.to_numpy()))
        lines += [
            "box size (min / p5 / median / p95 / max):",
            f"  width px        {_dist(bw, '{:.1f}')}",
            f"  height px       {_dist(bh, '{:.1f}')}",
            f"  sqrt(area) / sqrt(image area)  {_dist(rel, '{:.3f}')}",
            f"  aspect h/w      {_dist(bh / bw, '{:.2f}')}",
            f"  boxes under 8 px on a side: {_n(int(((bw < 8) | (bh < 8)).sum()))}",
        ]
    lines += summarize_repairs(table.report, max_repairs)
    return "\n".join(lines)


__all__ = ["summarize", "summarize_repairs"]
