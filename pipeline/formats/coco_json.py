"""``coco_json``: a COCO results list ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...]``, one
entry per line, by image (``image_ids`` order) then descending confidence; ``category_id`` = class index + 1 (COCO
ids start at 1). Coordinates have 2 decimals by default. An image without boxes has no entry (COCO results have
no empty images), and an image may have any number of entries.

Image ids: the sample's own values (int or str) when a sample (a COCO JSON with ``images``) is given; otherwise an
id that is a plain decimal integer (``"17"``) is written as the number 17, matching the COCO reader's
``str(images[i].id)``, and any other id as a string. Against a sample, the validator checks the type too: pycocotools
matches ids by value and type, so ``"1"`` for the sample's ``1`` would be an image it does not know. Errors name the
line where an entry starts.
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.formats.base import (
    SCORE_DECIMALS,
    EncodeOptions,
    LabelStyle,
    ParsedBox,
    ParsedRow,
    Sample,
    SubmissionError,
    SubmissionFormat,
    read_text,
    register_format,
)

ENTRY_KEYS = {"image_id", "category_id", "bbox", "score"}


@dataclass(frozen=True)
class CocoSample(Sample):
    typed_ids: dict[str, Any]  # str(id) -> the id as the sample writes it (int or str)


def _typed_id(image_id: str, typed_ids: Mapping[str, Any] | None) -> Any:
    if typed_ids is not None and image_id in typed_ids:  # an id the sample lacks fails validation
        return typed_ids[image_id]
    try:
        return int(image_id) if str(int(image_id)) == image_id else image_id
    except ValueError:
        return image_id


def json_list_entries(text: str, name: str) -> Iterator[tuple[int, Any]]:
    """(line where it starts, value) for each element of a top-level JSON list."""
    decoder, pos, line = json.JSONDecoder(), 0, 1

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def advance(to: int) -> None:
        nonlocal pos, line
        line += text.count("\n", pos, to)
        pos = to

    def fail(i: int, what: str) -> SubmissionError:
        advance(i)
        return SubmissionError(f"{name}: line {line}: {what}")

    i = skip(0)
    if i == len(text) or text[i] != "[":
        raise fail(i, "a COCO results file must be a JSON list of detections")
    i = skip(i + 1)
    if i < len(text) and text[i] == "]":
        i = skip(i + 1)
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as exc:
                raise fail(exc.pos, f"invalid JSON: {exc.msg}") from None
            except RecursionError:
                raise fail(i, "invalid JSON: nested too deeply") from None
            advance(i)
            yield line, value
            i = skip(end)
            if i < len(text) and text[i] == ",":
                i = skip(i + 1)
            elif i < len(text) and text[i] == "]":
                i = skip(i + 1)
                break
            else:
                raise fail(i, "expected ',' or ']' after a list entry")
    if i != len(text):
        raise fail(i, "unexpected text after the JSON list")


def _is_id(value: Any) -> bool:
    return isinstance(value, (int, str)) and not isinstance(value, bool)


def _type_name(value: Any, article: bool = False) -> str:
    if isinstance(value, int):
        return "an integer" if article else "integer"
    return "a string" if article else "string"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class CocoJsonFormat(SubmissionFormat):
    name = "coco_json"
    suffix = ".json"
    coord_decimals = 2
    one_row_per_image = False

    def encode(self, table: pd.DataFrame, image_ids: Sequence[str], options: EncodeOptions,
               sample: Sample | None) -> str:
        typed_ids = sample.typed_ids if isinstance(sample, CocoSample) else None
        decimals = options.coord_decimals
        rank = {i: k for k, i in enumerate(image_ids)}
        table = table.assign(_rank=table.image_id.map(rank)).sort_values("_rank", kind="stable")
        entries = [
            json.dumps({
                "image_id": _typed_id(r.image_id, typed_ids),
                "category_id": int(r.label) + 1,
                "bbox": [round(r.x1, decimals), round(r.y1, decimals),
                         round(r.x2 - r.x1, decimals), round(r.y2 - r.y1, decimals)],
                "score": round(float(r.score), SCORE_DECIMALS),
            }, allow_nan=False)
            for r in table.itertuples()
        ]
        return "[\n" + ",\n".join(entries) + "\n]\n" if entries else "[]\n"

    def read_sample(self, path: Path) -> CocoSample:
        """A COCO JSON's ``images``: the ids a results file may use, each an integer or a string, none twice (``1``
        and ``"1"`` included: no results file could tell them apart)."""
        try:
            data = json.loads(read_text(path, str(path)))
            ids = [img["id"] for img in data["images"]]
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as exc:
            raise SubmissionError(f"{path}: a coco_json sample must be a COCO JSON with images[].id ({exc})") from None
        typed_ids: dict[str, Any] = {}
        for i, image_id in enumerate(ids):
            if not _is_id(image_id):
                raise SubmissionError(f"{path}: images[{i}].id {image_id!r} is neither an integer nor a string")
            if str(image_id) in typed_ids:
                raise SubmissionError(f"{path}: images[{i}].id {image_id!r} repeats the id "
                                      f"{typed_ids[str(image_id)]!r} of an earlier image")
            typed_ids[str(image_id)] = image_id
        return CocoSample(path, list(typed_ids), typed_ids)

    def parse(self, text: str, *, name: str, sample: Sample | None, classes: Sequence[str] | None,
              label_style: LabelStyle) -> Iterator[ParsedRow]:
        for n, (line, entry) in enumerate(json_list_entries(text, name)):
            row = f"{name}: line {line} (entry {n + 1})"
            if not isinstance(entry, dict) or set(entry) != ENTRY_KEYS:
                found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
                raise SubmissionError(f"{row}: an entry must have exactly the keys {sorted(ENTRY_KEYS)}, found {found}")
            image_id = entry["image_id"]
            if not _is_id(image_id):
                raise SubmissionError(f"{row}: image_id {image_id!r} is neither an integer nor a string")
            where = f"{name}: line {line} (entry {n + 1}, image_id {str(image_id)!r})"
            if isinstance(sample, CocoSample) and str(image_id) in sample.typed_ids:
                expected = sample.typed_ids[str(image_id)]
                if type(expected) is not type(image_id):
                    raise SubmissionError(
                        f"{where}: image_id {image_id!r} is {_type_name(image_id, article=True)} where the sample "
                        f"{sample.path} has the {_type_name(expected)} {expected!r} (COCO tools match ids by type "
                        "too)")
            category, bbox, score = entry["category_id"], entry["bbox"], entry["score"]
            if not isinstance(category, int) or isinstance(category, bool):
                raise SubmissionError(f"{where}: category_id {category!r} is not an integer")
            if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
                raise SubmissionError(f"{where}: bbox must be 4 numbers [x, y, w, h], found {bbox!r}")
            if not _is_number(score) or not all(math.isfinite(v) for v in [*bbox, score]):
                raise SubmissionError(f"{where}: bbox and score must be finite numbers, found {bbox!r}, {score!r}")
            x, y, w, h = (float(v) for v in bbox)
            box = ParsedBox(where, str(image_id), category - 1, float(score), x, y, x + w, y + h)
            yield ParsedRow(line, where, str(image_id), [box])

    def check_label(self, box: ParsedBox, n_classes: int) -> None:
        if not 0 <= box.label < n_classes:
            raise SubmissionError(f"{box.where}: category_id {box.label + 1} is outside 1..{n_classes}")


COCO_JSON = register_format(CocoJsonFormat())
