"""``gwd`` (Global Wheat Detection): ``image_id,PredictionString`` with ``conf x y w h`` groups; ``x, y`` the
top-left corner and ``w, h`` the size in original-image pixels. One class, no label field.

Corners are rounded first and ``w = round(x2) - round(x1)``, so each corner moves at most half a unit.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from pipeline.formats.base import (
    SCORE_DECIMALS,
    EncodeOptions,
    LabelStyle,
    ParsedBox,
    SubmissionError,
    format_number,
    parse_number,
    register_format,
)
from pipeline.formats.prediction_string import PredictionStringFormat


class GwdFormat(PredictionStringFormat):
    name = "gwd"
    has_labels = False
    group_length = 5
    group_layout = "conf x y w h"

    def encode_group(self, box: Any, options: EncodeOptions) -> str:
        w, h = box.x2 - box.x1, box.y2 - box.y1
        return " ".join([format_number(box.score, SCORE_DECIMALS)]
                        + [format_number(v, options.coord_decimals) for v in (box.x1, box.y1, w, h)])

    def parse_group(self, tokens: list[str], where: str, image_id: str, classes: Sequence[str] | None,
                    label_style: LabelStyle) -> ParsedBox:
        conf, x, y, w, h = (parse_number(t, where) for t in tokens)
        return ParsedBox(where, image_id, 0, conf, x, y, x + w, y + h)

    def check_labels(self, table: pd.DataFrame) -> None:
        labels = table.label.to_numpy()
        if (labels != 0).any():
            raise SubmissionError(f"the gwd format has no label field, but {(labels != 0).sum()} boxes have "
                                  "label != 0")

    def check_label(self, box: ParsedBox, n_classes: int) -> None:
        pass  # no label field: every parsed box is class 0


GWD = register_format(GwdFormat())
