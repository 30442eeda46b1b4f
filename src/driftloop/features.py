"""Feature values in and out of the model's input matrix.

Tables and requests hold features as the user has them: numbers, category names, nulls. The model, the detectors
and the logs in between work on one float32 matrix: a number stays a number, a category becomes its index in the
spec's `categories`, a value outside them becomes UNSEEN_CODE (under `unseen: other`), and a missing value NaN
(under `missing: impute`; the model fills it with the training statistic it carries).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from driftloop.config import DatasetSpec

UNSEEN_CODE = -1.0
UNSEEN = "<unseen>"  # what the inference log holds for a category that was not one of the spec's


def category_str(value: Any) -> str:
    """A category value as the spec lists it: True/False for a boolean, 3 for an integral number (a CSV column of
    codes with a gap reads as floats, 3.0), the text itself otherwise."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)) or (isinstance(value, (float, np.floating)) and float(value).is_integer()):
        return str(int(value))
    return str(value)


def category_strings(values: pd.Series) -> pd.Series:
    """category_str over a column, nulls kept as nulls (text columns as they are, at pandas' speed)."""
    if pd.api.types.is_string_dtype(values) or (values.dtype == object and values.map(type).eq(str).all()):
        return values.astype(str).where(values.notna())
    return values.map(category_str, na_action="ignore")


def fill_values(x: np.ndarray, cardinalities: list[int]) -> np.ndarray:
    """What a missing value becomes, per column of the matrix: the median of a number, the most frequent code of a
    category (unseen codes aside); 0 where a column has no value. The model and the detectors both fill with it."""
    x = np.asarray(x, dtype=np.float64)
    fill = np.zeros(x.shape[1])
    for j, k in enumerate(cardinalities):
        col = x[:, j][~np.isnan(x[:, j])]
        if k:
            col = col[col >= 0].astype(np.int64)
            fill[j] = np.bincount(col).argmax() if len(col) else 0.0
        elif len(col):
            fill[j] = np.median(col)
    return fill


def encode_frame(df: pd.DataFrame, ds: DatasetSpec) -> np.ndarray:
    """A validated frame's features as the model's float32 matrix."""
    if not ds.categorical:
        return df[ds.features].to_numpy(dtype=np.float32)
    out = np.empty((len(df), len(ds.features)), dtype=np.float32)
    for j, col in enumerate(ds.features):
        cat = ds.categorical.get(col)
        if cat is None:
            out[:, j] = df[col].to_numpy(dtype=np.float32)
            continue
        values = df[col]
        codes = pd.Categorical(category_strings(values), categories=cat.categories).codes
        col_out = codes.astype(np.float32)
        col_out[(codes < 0) & values.notna().to_numpy()] = UNSEEN_CODE
        col_out[values.isna().to_numpy()] = np.nan
        out[:, j] = col_out
    return out


def decode_matrix(x: np.ndarray, ds: DatasetSpec) -> pd.DataFrame:
    """The model's matrix as table columns: category names (UNSEEN for an unseen one) and nulls where values were
    missing; numbers as float64."""
    df = pd.DataFrame(np.asarray(x, dtype=np.float64), columns=ds.features)
    for col, cat in ds.categorical.items():
        codes = df[col].to_numpy()
        names = np.asarray([*cat.categories, UNSEEN], dtype=object)
        known = ~np.isnan(codes)
        idx = np.where(codes[known] >= 0, codes[known], len(cat.categories)).astype(np.int64)
        col_out = np.full(len(df), None, dtype=object)
        col_out[known] = names[idx]
        df[col] = pd.Series(col_out, dtype="string")
    return df


def input_digest(ds: DatasetSpec) -> str:
    """What a model's input matrix means: the features in order and each category list in order. A model is served
    only with a spec of the same digest (re-running `init` on newer data can reorder the categories)."""
    import hashlib
    import json

    doc = {"features": ds.features, "categorical": {c: v.categories for c, v in sorted(ds.categorical.items())}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def json_value(value: Any) -> Any:
    """A table cell as a request carries it: NaN/NA -> null, numpy scalars -> plain numbers and strings."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    return value.item() if hasattr(value, "item") else value


