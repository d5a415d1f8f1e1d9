"""One model's TTA views fused per fold: the views of an image are the sets WBF fuses."""
from __future__ import annotations

import pandas as pd

from pipeline.fusion.table import fuse_predictions
from pipeline.layout import empty_predictions, normalise_predictions


def fuse_views(preds: pd.DataFrame, sizes: pd.DataFrame, views: list[str], model_name: str, *, iou_thr: float,
               skip_box_thr: float, conf_type: str) -> pd.DataFrame:
    """``preds`` (one model, any folds, the ``tta`` column naming the view) fused fold by fold with WBF."""
    out = []
    for fold, part in preds.groupby("fold"):
        fused = fuse_predictions(part, sizes, group_col="tta", sets=views, iou_thr=iou_thr,
                                 skip_box_thr=skip_box_thr, conf_type=conf_type, model_name=model_name)
        out.append(fused.assign(fold=fold))
    return normalise_predictions(pd.concat(out, ignore_index=True)) if out else empty_predictions()
