"""The CSV layout most Kaggle detection competitions share: ``image_id,PredictionString``, one row per test image,
the string a space-separated run of fixed-length groups, one group per box.

A format of this family (:mod:`~pipeline.formats.gwd`, :mod:`~pipeline.formats.label_conf_xyxy`) says only how
one group is written and read; rows, header, quoting and the sample submission are handled here. Rows follow
``image_ids`` order, an image without boxes gets an empty string, and the header is the sample submission's when
one is given (e.g. SIIM's ``id``).
"""
from __future__ import annotations

import csv
import io
import re
from abc import abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.formats.base import (
    EncodeOptions,
    LabelStyle,
    ParsedBox,
    ParsedRow,
    Sample,
    SubmissionError,
    SubmissionFormat,
    read_text,
)

CSV_HEADER = ["image_id", "PredictionString"]


@dataclass(frozen=True)
class CsvSample(Sample):
    header: list[str]


def csv_records(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line where the record starts, fields) for each CSV record of ``text``."""
    reader = csv.reader(io.StringIO(text, newline=""))
    start = 1
    for fields in reader:
        yield start, fields
        start = reader.line_num + 1  # a quoted field may span lines: report where the record starts


def parse_label(token: str, where: str, classes: Sequence[str] | None, label_style: LabelStyle) -> int:
    """A label token as a 0-based class index: an integer, or with ``label_style="name"`` a name of ``classes``."""
    if label_style == "name":
        if classes is None or token not in classes:
            raise SubmissionError(f"{where}: label {token!r} is not a class name ({list(classes or [])})")
        return list(classes).index(token)
    if not re.fullmatch(r"[+-]?\d+", token):
        raise SubmissionError(f"{where}: label {token!r} is not an integer class index")
    return int(token)


class PredictionStringFormat(SubmissionFormat):
    """``image_id,PredictionString`` CSV; a subclass defines the group: its length, layout and encoding."""

    suffix = ".csv"
    coord_decimals = 0  # whole pixels: GWD and VinBigData ground truths are whole pixels, every scorer parses them
    group_length: int  # values per box
    group_layout: str  # the group's fields as error messages name them: "conf x y w h"

    @abstractmethod
    def encode_group(self, box: Any, options: EncodeOptions) -> str:
        """One box (a row of the prediction table: image_id, x1, y1, x2, y2, score, label) as a group."""

    @abstractmethod
    def parse_group(self, tokens: list[str], where: str, image_id: str, classes: Sequence[str] | None,
                    label_style: LabelStyle) -> ParsedBox:
        """``group_length`` tokens back as a box; SubmissionError naming ``where`` when they do not parse."""

    def encode(self, table: pd.DataFrame, image_ids: Sequence[str], options: EncodeOptions,
               sample: Sample | None) -> str:
        header = sample.header if isinstance(sample, CsvSample) else CSV_HEADER
        strings = {i: " ".join(self.encode_group(box, options) for box in g.itertuples())
                   for i, g in table.groupby("image_id", sort=False)}
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([i, strings.get(i, "")] for i in image_ids)
        return buffer.getvalue()

    def read_sample(self, path: Path) -> CsvSample:
        """The sample's header and ids; an id listed twice is an error (a file cannot have both rows)."""
        rows = list(csv_records(read_text(path, str(path))))
        if not rows or len(rows[0][1]) != 2:
            raise SubmissionError(f"{path}: sample submission must have a 2-column header (id, PredictionString)")
        seen: set[str] = set()
        for line, fields in rows[1:]:
            if fields and fields[0] in seen:
                raise SubmissionError(f"{path}: line {line}: the sample submission repeats image_id {fields[0]!r}")
            if fields:
                seen.add(fields[0])
        return CsvSample(path, [fields[0] for _, fields in rows[1:] if fields], rows[0][1])

    def parse(self, text: str, *, name: str, sample: Sample | None, classes: Sequence[str] | None,
              label_style: LabelStyle) -> Iterator[ParsedRow]:
        header = sample.header if isinstance(sample, CsvSample) else CSV_HEADER
        return self._rows(text, name, header, classes, label_style)

    def parse_own_layout(self, text: str, *, name: str, classes: Sequence[str] | None,
                         label_style: LabelStyle) -> Iterator[ParsedRow]:
        # the file's own header when it has the right shape (e.g. SIIM's "id,PredictionString")
        first = next(csv_records(text), None)
        header = first[1] if first and len(first[1]) == 2 and first[1][1] == "PredictionString" else CSV_HEADER
        return self._rows(text, name, header, classes, label_style)

    def _rows(self, text: str, name: str, header: list[str], classes: Sequence[str] | None,
              label_style: LabelStyle) -> Iterator[ParsedRow]:
        records = csv_records(text)
        first = next(records, None)
        if first is None or first[1] != header:
            found = ",".join(first[1]) if first else "an empty file"
            raise SubmissionError(f"{name}: line 1: header must be exactly {','.join(header)!r}, found {found!r}")
        size = self.group_length
        for line, fields in records:
            if len(fields) != 2:
                row = f"{name}: line {line}" + (f" (image_id {fields[0]!r})" if fields else "")
                raise SubmissionError(f"{row}: expected 2 fields ({','.join(header)}), got {len(fields)}: "
                                      f"{','.join(fields)!r}")
            image_id, tokens = fields[0], fields[1].split()
            row = f"{name}: line {line} (image_id {image_id!r})"
            if len(tokens) % size:
                raise SubmissionError(f"{row}: {len(tokens)} values is not a whole number of {size}-value groups "
                                      f"({self.group_layout})")
            boxes = []
            for g in range(len(tokens) // size):
                group = tokens[g * size:(g + 1) * size]
                where = f"{row}, group {g + 1} ({' '.join(group)!r})"
                boxes.append(self.parse_group(group, where, image_id, classes, label_style))
            yield ParsedRow(line, row, image_id, boxes)
