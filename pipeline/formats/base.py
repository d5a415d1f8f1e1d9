"""What a submission format is, and the registry that lists them.

A format is one :class:`SubmissionFormat` object: its name (``submission.format`` in the config), file suffix,
default coordinate precision, how it encodes a prediction table as text, how it parses text back into boxes with
file line numbers, and its own checks. :func:`register_format` adds one to :data:`FORMATS`; the generic writer,
reader and validator (:mod:`pipeline.formats.files`) only ever go through this interface.

This module must not import :mod:`pipeline.config`: the config derives its ``submission.format`` choices from
:func:`format_names`.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

LabelStyle = Literal["index", "name"]
SCORE_DECIMALS = 4  # confidences are written with 4 decimals in every format
BOX_TOLERANCE = 1.0  # px a box may pass the image edge in validation (rounding, a clamp at S on resize)


class SubmissionError(ValueError):
    """A submission that must not be uploaded; the message names the file, the first bad row and its image id."""


@dataclass(frozen=True)
class ParsedBox:
    """One parsed box, in x1, y1, x2, y2 form whatever the format."""

    where: str  # "line 3 (image_id 'a1'), group 2 ('0.9 1 2 3 4')": how a user finds it in the file
    image_id: str
    label: int  # 0-based class index
    score: float
    x1: float
    y1: float
    x2: float
    y2: float


@dataclass(frozen=True)
class ParsedRow:
    """One record of a submission file: a CSV row (all boxes of one image) or a JSON entry (one box)."""

    line: int  # the file line where the record starts (the header is line 1)
    where: str  # the record as an error message names it: "sub.csv: line 3 (image_id 'img1')"
    image_id: str
    boxes: list[ParsedBox]


@dataclass(frozen=True)
class Sample:
    """What a sample submission fixes: the image ids a file must cover, in order. Formats subclass it for the
    layout they take from the sample as well (a CSV header, typed COCO ids)."""

    path: Path
    ids: list[str]


@dataclass(frozen=True)
class EncodeOptions:
    """How to write the numbers and labels of one file."""

    coord_decimals: int
    classes: Sequence[str]
    label_style: LabelStyle = "index"


class SubmissionFormat(ABC):
    """One submission format: its facts (class attributes) and the three things only it knows how to do."""

    name: str  # the config's ``submission.format`` value
    suffix: str  # file suffix, with the dot: ".csv"
    coord_decimals: int  # default decimals of box coordinates (``submission.coord_decimals`` overrides)
    has_labels: bool = True  # False: the format has no label field, every box is class 0
    one_row_per_image: bool = True  # every expected image has exactly one record (False: zero or more)

    @abstractmethod
    def encode(self, table: pd.DataFrame, image_ids: Sequence[str], options: EncodeOptions,
               sample: Sample | None) -> str:
        """The file's text. ``table``: a checked prediction table, corners already rounded to the written precision,
        rows by descending score (ties in table order); ``image_ids``: every test image, in file order."""

    @abstractmethod
    def parse(self, text: str, *, name: str, sample: Sample | None, classes: Sequence[str] | None,
              label_style: LabelStyle) -> Iterator[ParsedRow]:
        """The records of ``text`` (the file ``name``), in file order; SubmissionError at the first record whose
        structure is wrong. Value checks shared by all formats (confidence, area, bounds) are not made here."""

    @abstractmethod
    def read_sample(self, path: Path) -> Sample:
        """The sample submission at ``path``; SubmissionError when it is not one for this format."""

    def parse_own_layout(self, text: str, *, name: str, classes: Sequence[str] | None,
                         label_style: LabelStyle) -> Iterator[ParsedRow]:
        """Like :meth:`parse` for reading a file back without its sample: formats whose layout a sample can change
        (a CSV header) accept the file's own here."""
        return self.parse(text, name=name, sample=None, classes=classes, label_style=label_style)

    def check_labels(self, table: pd.DataFrame) -> None:
        """Refuse a prediction table this format cannot write (before the generic label range check)."""

    def check_label(self, box: ParsedBox, n_classes: int) -> None:
        """SubmissionError when a parsed box's label is not one of ``n_classes`` classes."""
        if not 0 <= box.label < n_classes:
            raise SubmissionError(f"{box.where}: label {box.label} is outside 0..{n_classes - 1}")


FORMATS: dict[str, SubmissionFormat] = {}


def register_format(fmt: SubmissionFormat) -> SubmissionFormat:
    """Add ``fmt`` to :data:`FORMATS` under its name (a format module's last line) and return it."""
    missing = [fact for fact in ("name", "suffix", "coord_decimals") if not hasattr(fmt, fact)]
    if missing:
        raise TypeError(f"{type(fmt).__name__} does not say its {', '.join(missing)}")
    if fmt.name in FORMATS:
        raise ValueError(f"submission format {fmt.name!r} is already registered ({type(FORMATS[fmt.name]).__name__})")
    if not fmt.suffix.startswith("."):
        raise ValueError(f"submission format {fmt.name!r}: suffix {fmt.suffix!r} must start with '.'")
    FORMATS[fmt.name] = fmt
    return fmt


def format_names() -> tuple[str, ...]:
    """The registered format names, in registration order: what ``submission.format`` may be."""
    return tuple(FORMATS)


def get_format(name: str) -> SubmissionFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown submission format {name!r}; known: {', '.join(FORMATS)}") from None


# ------------------------------------------------------------------------------- helpers every format uses


def format_number(value: float, decimals: int) -> str:
    return f"{value + 0.0:.{decimals}f}"  # + 0.0 turns -0.0 into 0.0


def parse_number(token: str, where: str) -> float:
    """A finite float, as the scorers' parsers read it; SubmissionError naming ``where`` otherwise."""
    try:
        if "_" in token:  # Python's float() takes "1_000"; the scorers' parsers do not
            raise ValueError(token)
        value = float(token)
    except ValueError:
        raise SubmissionError(f"{where}: {token!r} is not a number") from None
    if not math.isfinite(value):
        raise SubmissionError(f"{where}: {token!r} is not a finite number")
    return value


def read_text(path: Path, name: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SubmissionError(f"{name}: not UTF-8 text (byte {exc.start})") from None
