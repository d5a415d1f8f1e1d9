"""``label_conf_xyxy`` (VinBigData, SIIM style): ``image_id,PredictionString`` with ``label conf x1 y1 x2 y2``
groups in original-image pixels. ``label`` is the 0-based class index by default (VinBigData's class ids);
``label_style="name"`` writes the class name instead (SIIM's "opacity").
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pipeline.formats.base import (
    SCORE_DECIMALS,
    EncodeOptions,
    LabelStyle,
    ParsedBox,
    format_number,
    parse_number,
    register_format,
)
from pipeline.formats.prediction_string import PredictionStringFormat, parse_label


class LabelConfXyxyFormat(PredictionStringFormat):
    name = "label_conf_xyxy"
    group_length = 6
    group_layout = "label conf x1 y1 x2 y2"

    def encode_group(self, box: Any, options: EncodeOptions) -> str:
        label = options.classes[box.label] if options.label_style == "name" else str(int(box.label))
        return " ".join([label, format_number(box.score, SCORE_DECIMALS)]
                        + [format_number(v, options.coord_decimals) for v in (box.x1, box.y1, box.x2, box.y2)])

    def parse_group(self, tokens: list[str], where: str, image_id: str, classes: Sequence[str] | None,
                    label_style: LabelStyle) -> ParsedBox:
        label = parse_label(tokens[0], where, classes, label_style)
        conf, x1, y1, x2, y2 = (parse_number(t, where) for t in tokens[1:])
        return ParsedBox(where, image_id, label, conf, x1, y1, x2, y2)


LABEL_CONF_XYXY = register_format(LabelConfXyxyFormat())
