"""Which rows become a champion's drift reference.

A detector says "this traffic differs from the reference". After a drift-triggered retrain, the new
champion is meant to serve the *new* regime, so its reference must describe that regime: otherwise the
traffic it was retrained for keeps looking drifted and the policy retrains again and again (a retrain
storm). The reference is therefore the newest served rows, from the triggering window's start on, that
the challenger did not train on; it falls back to the held-out splits of the training table when fewer
than one window of such rows exists (a first sweep, a manual retrain on a quiet app) or when the spec
asks for `retraining.reference: table`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Reference:
    """The rows a champion's detectors are fitted on, and a line saying where they came from."""

    x: np.ndarray | None  # None: use the training table's held-out splits, for the reason in `source`
    source: str


def pick_reference(
    mode: str, served: pd.DataFrame, features: list[str], trained_ids: set[str], since: float | None,
    rows: int, min_rows: int, encode: Callable[[pd.DataFrame], np.ndarray] | None = None,
) -> Reference:
    """The newest `rows` served rows at or after `since` that are not in the training set, or the table's splits."""
    if mode == "table":
        return Reference(None, "retraining.reference is table")
    recent = served if since is None else served[served["ts"] >= since]
    if trained_ids and len(recent):
        recent = recent[~recent["request_id"].isin(trained_ids)]
    recent = recent.sort_values("ts").tail(rows)
    if len(recent) < min_rows:
        return Reference(None, f"only {len(recent)} recent served rows, fewer than one window of {min_rows}")
    start = "" if since is None else f" since {_when(since)}"
    x = encode(recent) if encode else recent[features].to_numpy(np.float32)
    return Reference(x, f"{len(recent)} newest served rows{start} not trained on")


def onset(windows: list[tuple[str, float, bool, int]], event_id: str) -> float | None:
    """The start of the run of drifted windows that ends at the triggering one: (event id, start, is_drift,
    model version) in time order. The triggering window alone may hold too few rows the challenger did not
    train on (most of them are labelled and trained on)."""
    at = next((i for i, w in enumerate(windows) if w[0] == event_id), None)
    if at is None:
        return None
    start, version = windows[at][1], windows[at][3]
    for _eid, began, drifted, v in reversed(windows[:at]):
        if not drifted or v != version:
            break
        start = began
    return start


def _when(t: float) -> str:
    """A wall-clock time as UTC; a backtest's row clock (seconds from 0) as t=N."""
    return pd.Timestamp(t, unit="s").strftime("%Y-%m-%dT%H:%M:%SZ") if t > 1e8 else f"t={t:g}"
