"""The prediction table: one row per box, in original-image pixel coordinates.

Columns: ``image_id`` (str), ``x1, y1, x2, y2`` (float, original-image pixels), ``score`` (float in [0, 1]),
``label`` (int, index into the dataset's classes), ``model`` (str, the member name), ``fold`` (int; -1 for a
fused row that mixes folds), ``tta`` (str: the view name, e.g. "none", "hflip", "rot90_1", or "wbf" for fused rows).
Written as parquet, atomically. Images with no predicted boxes have no rows: the set of predicted images is known
from the annotation table / folds file, never from this table.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.io import atomic_write

PREDICTION_COLUMNS = ["image_id", "x1", "y1", "x2", "y2", "score", "label", "model", "fold", "tta"]
_DTYPES = {
    "image_id": str,
    "x1": np.float64,
    "y1": np.float64,
    "x2": np.float64,
    "y2": np.float64,
    "score": np.float64,
    "label": np.int64,
    "model": str,
    "fold": np.int64,
    "tta": str,
}


def empty_predictions() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="float64") for c in PREDICTION_COLUMNS}).astype(_DTYPES)


def normalise_predictions(df: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in PREDICTION_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"prediction table lacks columns {missing}")
    if len(df) == 0:
        return empty_predictions()
    return df[PREDICTION_COLUMNS].astype(_DTYPES).reset_index(drop=True)


def write_predictions(df: pd.DataFrame, path: str | Path) -> Path:
    df = normalise_predictions(df)
    with atomic_write(path, "wb") as f:
        df.to_parquet(f, index=False)
    return Path(path)


def read_predictions(path: str | Path) -> pd.DataFrame:
    return normalise_predictions(pd.read_parquet(path))
