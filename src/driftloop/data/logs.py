"""Durable logs next to each model's table: inference log, feedback labels, drift events (Delta tables)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from driftloop.config import Spec
from driftloop.data import tables
from driftloop.settings import Settings


def uris(settings: Settings, spec: Spec) -> dict[str, str]:
    t = spec.dataset.table
    return {k: settings.table_uri(f"{t}_{k}") for k in ("inference", "feedback", "drift_events")}


def append(settings: Settings, spec: Spec, kind: str, df: pd.DataFrame) -> None:
    """Append rows to one of the logs: partitioned by day, with log-table properties set when it is created."""
    from driftloop.data.maintenance import DAY, log_properties

    tables.append(uris(settings, spec)[kind], df, {"source": "driftloop-monitor"}, want_version=False,
                  partition_by=[DAY], configuration=log_properties(spec.lifecycle.vacuum_grace_hours))


def _with_day(df: pd.DataFrame) -> pd.DataFrame:
    from driftloop.data.maintenance import DAY, day_of

    df[DAY] = day_of(df["ts"].to_numpy())
    return df


def inference_frame(spec: Spec, ids: list[str], ts: list[float], version: int, x: np.ndarray, pred: np.ndarray) -> pd.DataFrame:
    from driftloop.features import decode_matrix

    df = decode_matrix(x, spec.dataset)
    pred = np.asarray(pred)
    df.insert(0, "prediction", pred.astype(str) if pred.dtype.kind in "USO" else pred.astype(np.float64 if pred.dtype.kind == "f" else np.int64))
    df.insert(0, "model_version", np.full(len(ids), version, dtype=np.int64))
    df.insert(0, "ts", np.asarray(ts, dtype=np.float64))
    df.insert(0, "request_id", pd.Series(ids, dtype=object).astype(str))
    return _with_day(df)


def feedback_frame(rows: list[tuple[str, int | str | float, float]]) -> pd.DataFrame:
    labels = [r[1] for r in rows]
    labels = np.array(labels, dtype=object if isinstance(labels[0], str) else np.float64 if isinstance(labels[0], float) else np.int64)
    return _with_day(pd.DataFrame({"request_id": [r[0] for r in rows], "label": labels,
                                   "ts": np.array([r[2] for r in rows], dtype=np.float64)}))


def drift_events_frame(reports: list[dict]) -> pd.DataFrame:
    """Drift events (closed windows, online alarms) as rows of the drift_events log: one append for them all."""
    rows = []
    for report in reports:
        det = report["detectors"]
        drifted = sorted({f for d in det for f in d.get("drifted_features", [])})
        ps = [d["p_val"] for d in det if d.get("p_val") is not None]
        rows.append({
            "event_id": report["event_id"], "ts": float(report["ended_at"]), "started_at": float(report["started_at"]),
            "model_version": int(report["model_version"]), "window_index": int(report["index"]), "rows": int(report["rows"]),
            "is_drift": bool(report["is_drift"]), "min_p_val": float(min(ps)) if ps else float("nan"),
            "drifted_features": json.dumps(drifted), "detectors": json.dumps(det), "kind": report.get("kind", "window"),
            "trigger": report.get("trigger", ""),
        })
    return pd.DataFrame(rows).pipe(_with_day)


def read_or_empty(uri: str, columns: list[str] | None = None, filters: list | None = None) -> pd.DataFrame:
    if not tables.exists(uri):
        return pd.DataFrame(columns=columns or [])
    return tables.read(uri, columns=columns, filters=filters)


def lookup(uri: str, request_ids: list[str], columns: list[str], ts_from: float | None = None,
           ts_to: float | None = None) -> dict[str, tuple]:
    """The newest row of each of REQUEST_IDS as {id: (columns...)}: one read filtered by id and, when given, by
    time, so the scan skips files outside the window instead of reading the whole log."""
    filters: list = [("request_id", "in", list(request_ids))]
    if ts_from is not None:
        filters.append(("ts", ">=", float(ts_from)))
    if ts_to is not None:
        filters.append(("ts", "<=", float(ts_to)))
    df = read_or_empty(uri, ["request_id", "ts", *columns], filters=filters)
    if not len(df):
        return {}
    df = df.sort_values("ts", kind="stable").drop_duplicates("request_id", keep="last")
    return {str(r[0]): tuple(r[2:]) for r in df[["request_id", "ts", *columns]].itertuples(index=False)}


def labelled_rows(settings: Settings, spec: Spec, after_ts: float = 0.0) -> pd.DataFrame:
    """Served rows joined with their ground-truth labels given after `after_ts` (newest label per request wins).
    Incremental: only feedback past the watermark is read, and only the inference rows of those ids, bounded below by
    the issue time the ids carry, so the cost follows the new labels, not the age of the logs."""
    from driftloop.data.maintenance import DAY
    from driftloop.ids import issued_at_unverified

    u = uris(settings, spec)
    cols = ["request_id", "ts", "feedback_ts", "model_version", "prediction", *spec.dataset.features, spec.dataset.label]
    fb = read_or_empty(u["feedback"], ["request_id", "label", "ts"], filters=[("ts", ">", float(after_ts))] if after_ts else None)
    if fb.empty:
        return pd.DataFrame(columns=cols)
    fb = fb.sort_values("ts").drop_duplicates("request_id", keep="last")
    ids = fb["request_id"].tolist()
    filters: list = [("request_id", "in", ids)]
    issued = [t for t in map(issued_at_unverified, ids) if t is not None]
    if len(issued) == len(ids):
        filters.append(("ts", ">=", min(issued) - 60.0))
    inf = read_or_empty(u["inference"], filters=filters).drop(columns=[DAY], errors="ignore")
    joined = inf.merge(fb.rename(columns={"ts": "feedback_ts", "label": spec.dataset.label}), on="request_id")
    return joined.sort_values("feedback_ts").reset_index(drop=True)
