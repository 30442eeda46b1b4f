"""Ingest: load a source, validate it against the spec, append it as one new table version."""

from __future__ import annotations

import uuid
from pathlib import Path

import pandas as pd

from driftloop.config import DatasetSpec
from driftloop.data import examples, tables
from driftloop.data.validation import ValidationFailed, coerce, validate_frame


class SourceError(ValueError):
    """A source that cannot be read."""


def load_source(source: str) -> pd.DataFrame:
    """A built-in example's reference part ('digits', 'builtin:rainfall') or a CSV/Parquet file."""
    name = source.removeprefix("builtin:")
    if name in ("digits", "rainfall"):
        return examples.builtin(name).reference
    path = Path(source)
    if not path.is_file():
        raise SourceError(f"{source}: not a built-in example (digits, rainfall) and no such file")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        if path.suffix.lower() in (".csv", ".txt"):
            return pd.read_csv(path)
    except Exception as err:
        raise SourceError(f"{source}: cannot read: {str(err).splitlines()[0]}") from None
    raise SourceError(f"{source}: unsupported file type {path.suffix!r} (use .csv or .parquet)")


def ingest_frame(df: pd.DataFrame, uri: str, ds: DatasetSpec, source: str, extra: dict[str, str] | None = None) -> int:
    """Validate then append; a failing batch raises ValidationFailed and appends nothing."""
    extra_cols = [ds.time_column] if ds.time_column else []
    report = validate_frame(df, ds.features, ds.label, ds.classes, ds.min_rows, ds.max_rows, extra_cols,
                            categorical=ds.categorical, impute=set(ds.imputed), regression=ds.regression)
    if not report.ok:
        raise ValidationFailed(report)
    keep = extra_cols + ds.features + [ds.label]
    batch = coerce(df[keep], ds.features, ds.label, ds.feature_dtype, ds.string_labels, ds.categorical, set(ds.imputed),
                   ds.regression)
    meta = {"batch_id": uuid.uuid4().hex, "source": source, "rows_appended": str(len(batch)), **(extra or {})}
    return tables.append(uri, batch, meta)


def ingest(source: str, uri: str, ds: DatasetSpec) -> int:
    """Ingest a source into the table at `uri`; return the new version."""
    return ingest_frame(load_source(source), uri, ds, source)
