"""Production rows get a value for the spec's time column, so a retraining job can append them to a table that
has one (rainfall's `day`): before, every live rainfall retrain failed validation ("missing column(s): day")."""

from __future__ import annotations

import numpy as np
import pandas as pd

from driftloop.config import load_spec
from driftloop.data import examples, tables
from driftloop.data.ingest import ingest_frame
from driftloop.retrain import with_time_column
from tests.conftest import ROOT


def production_rows(spec, n: int, t0: float) -> pd.DataFrame:
    pool = examples.builtin("rainfall").pool.head(n)
    rows = pool[spec.dataset.features + [spec.dataset.label]].copy()
    rows.insert(0, "ts", t0 + np.arange(n)[::-1] * 10.0)  # served newest first: order must follow the serving time
    rows.insert(0, "request_id", [f"r{i}" for i in range(n)])
    return rows


def test_a_numeric_time_column_continues_after_the_table_in_serving_order(tmp_path):
    spec = load_spec(ROOT / "configs/rainfall.yaml")
    uri = str(tmp_path / "rain")
    ingest_frame(examples.builtin("rainfall").reference, uri, spec.dataset, "builtin:rainfall")
    rows = with_time_column(production_rows(spec, 20, 1.8e9), uri, spec)
    last = int(tables.read(uri, columns=["day"])["day"].max())
    assert sorted(rows["day"]) == list(range(last + 1, last + 21))
    assert list(rows.sort_values("ts")["day"]) == list(range(last + 1, last + 21))
    v = ingest_frame(rows, uri, spec.dataset, "production:test")  # the check that failed before
    assert v == 1 and int(tables.read(uri, columns=["day"])["day"].max()) == last + 20


def test_a_datetime_time_column_gets_the_serving_time(tmp_path):
    spec = load_spec(ROOT / "configs/rainfall.yaml")
    uri = str(tmp_path / "rain")
    ref = examples.builtin("rainfall").reference.copy()
    ref["day"] = pd.Timestamp("1990-01-01") + pd.to_timedelta(ref["day"], unit="D")
    ingest_frame(ref, uri, spec.dataset, "dated")
    rows = with_time_column(production_rows(spec, 12, 1.8e9), uri, spec)
    assert list(rows["day"]) == list(pd.to_datetime(rows["ts"], unit="s"))
    assert ingest_frame(rows, uri, spec.dataset, "production:test") == 1
