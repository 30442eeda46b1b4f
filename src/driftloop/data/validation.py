"""Data validation before anything is appended: a failing batch appends nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd


class ValidationFailed(ValueError):
    """A batch failed validation; str() is one readable line naming the first problem."""

    def __init__(self, report: "Report"):
        self.report = report
        super().__init__(report.summary())


@dataclass
class Report:
    rows: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        if self.ok:
            return f"ok: {self.rows} rows"
        more = f" (+{len(self.problems) - 1} more)" if len(self.problems) > 1 else ""
        return f"invalid batch of {self.rows} rows: {self.problems[0]}{more}"


def category_strings(values: pd.Series) -> pd.Series:
    from driftloop.features import category_strings as strings

    return strings(values)


def validate_frame(
    df: pd.DataFrame,
    features: list[str],
    label: str | None,
    classes: list[int] | None,
    min_rows: int = 1,
    max_rows: int = 5_000_000,
    extra_columns: list[str] | None = None,
    categorical: dict[str, Any] | None = None,
    impute: set[str] | frozenset[str] = frozenset(),
    regression: bool = False,
) -> Report:
    """Check schema, dtypes, label domain, finiteness and row-count bounds; collect every problem. A `categorical`
    feature (name -> CategoricalSpec) holds names, within its categories unless unseen ones are allowed; a feature
    in `impute` may be missing (null). A `regression` label is any finite number."""
    categorical = categorical or {}
    rep = Report(rows=len(df))
    expected = list(features) + ([label] if label else []) + list(extra_columns or [])
    missing = [c for c in expected if c not in df.columns]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        rep.problems.append(f"missing column(s): {shown}")
    if not (min_rows <= len(df) <= max_rows):
        rep.problems.append(f"row count {len(df)} outside [{min_rows}, {max_rows}]")
    for col in features:
        if col not in df.columns:
            continue
        s = df[col]
        nulls = s.isna().to_numpy()
        if nulls.any() and col not in impute:
            rep.problems.append(f"feature {col!r} has {int(nulls.sum())} missing value(s), first at row "
                                f"{int(np.argmax(nulls))} (the spec's `missing` policy for it is refuse)")
            continue
        cat = categorical.get(col)
        if cat is not None:
            outside = sorted(set(category_strings(s[~nulls]).unique()) - set(cat.categories))
            if outside and cat.unseen == "refuse":
                rep.problems.append(f"feature {col!r} has value(s) outside its categories {cat.categories[:10]}: {outside[:5]}")
            continue
        if s[~nulls].size and not (pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)):
            rep.problems.append(f"feature {col!r} is not numeric (dtype {s.dtype})")
            continue
        bad = np.isinf(s.to_numpy(dtype=np.float64))
        if bad.any():
            rep.problems.append(f"feature {col!r} has {int(bad.sum())} inf value(s), first at row {int(np.argmax(bad))}")
    if label and label in df.columns:
        s = df[label]
        if s.isna().any():
            rep.problems.append(f"label {label!r} has {int(s.isna().sum())} missing value(s)")
        elif regression:
            if not pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
                rep.problems.append(f"label {label!r} is not a number (dtype {s.dtype}): a regression label is a number")
            elif not np.isfinite(s.to_numpy(dtype=np.float64)).all():
                rep.problems.append(f"label {label!r} has {int((~np.isfinite(s.to_numpy(dtype=np.float64))).sum())} inf value(s)")
        elif classes and isinstance(classes[0], str):  # string classes: the values as they are
            outside = sorted({str(v) for v in s.unique()} - set(classes))
            if outside:
                rep.problems.append(f"label {label!r} has value(s) outside {classes}: {outside[:5]}")
        elif not pd.api.types.is_integer_dtype(s) and not (
            pd.api.types.is_float_dtype(s) and np.all(np.mod(s.to_numpy(), 1) == 0)
        ):
            rep.problems.append(f"label {label!r} is not integer (dtype {s.dtype})")
        elif classes is not None:
            outside = sorted(set(s.astype(np.int64).unique()) - set(classes))
            if outside:
                rep.problems.append(f"label {label!r} has value(s) outside {classes}: {outside[:5]}")
    return rep


def coerce(df: pd.DataFrame, features: list[str], label: str | None, feature_dtype: str = "float",
           string_labels: bool = False, categorical: Any = (), impute: Any = (), regression: bool = False) -> pd.DataFrame:
    """Cast a validated batch to the table's dtypes (numbers float64, or int64 where none may be missing;
    categorical features strings, missing values null; the label int64 or string, or float64 for regression)."""
    out = df.copy()
    for col in features:
        if col in categorical:
            out[col] = category_strings(out[col]).astype("string")
        else:
            out[col] = out[col].astype(np.int64 if feature_dtype == "int" and col not in impute else np.float64)
    if label and label in out.columns:
        out[label] = out[label].astype(str if string_labels else np.float64 if regression else np.int64)
    return out
