"""The new champion's drift reference describes the regime it was retrained for (no retrain storm)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from driftloop.drift.reference import pick_reference

F = ["a", "b"]


def served(n: int, t0: float, shift: float, prefix: str) -> pd.DataFrame:
    rng = np.random.default_rng(int(t0))
    x = rng.normal(shift, 1, (n, 2))
    return pd.DataFrame({"request_id": [f"{prefix}{i}" for i in range(n)], "ts": t0 + np.arange(n) * 0.01,
                         "a": x[:, 0], "b": x[:, 1]})


def test_reference_is_the_newest_rows_of_the_new_regime_that_were_not_trained_on():
    log = pd.concat([served(2000, 0, 0.0, "old"), served(1500, 100, 3.0, "new")])
    trained = {f"new{i}" for i in range(0, 1500, 2)}                     # half the new rows went into training
    ref = pick_reference("recent", log, F, trained, since=100, rows=600, min_rows=500)
    assert ref.x.shape == (600, 2) and "not trained on" in ref.source
    assert ref.x[:, 0].mean() > 2.5                                       # only the new regime
    kept = log[log["ts"] >= 100].iloc[1::2].tail(600)                     # the newest untrained rows, in order
    np.testing.assert_allclose(ref.x, kept[F].to_numpy(np.float32))


def test_too_few_recent_rows_or_table_mode_fall_back_to_the_training_table():
    log = served(300, 100, 3.0, "new")
    short = pick_reference("recent", log, F, set(), since=100, rows=1000, min_rows=500)
    assert short.x is None and "only 300 recent served rows" in short.source
    assert pick_reference("table", log, F, set(), None, 1000, 10).x is None
    empty = pick_reference("recent", pd.DataFrame(columns=["request_id", "ts", *F]), F, set(), None, 1000, 10)
    assert empty.x is None


def test_the_reference_starts_where_the_run_of_drifted_windows_began():
    from driftloop.drift.reference import onset

    w = [("a", 0.0, False, 1), ("b", 10.0, True, 1), ("c", 20.0, True, 1), ("d", 30.0, True, 1), ("e", 40.0, False, 1)]
    assert onset(w, "d") == 10.0                     # b, c, d drifted in a row: the drift began at b
    assert onset(w, "b") == 10.0
    assert onset([("x", 5.0, True, 0), ("y", 8.0, True, 1)], "y") == 8.0   # another version's windows do not count
    assert onset(w, "zz") is None
