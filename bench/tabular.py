"""Detection on a user's own table: a categorical shift (one value's share grows) and a missing-rate shift (a column
goes missing more often), seen by the detectors `driftloop init` writes for such a table (KS on numbers with
chi-square on categories, via alibi-detect's TabularDrift, plus the chi-square test of the missing rate). No Ray, no
model: the feature detectors need none. A detection counts when the window is flagged by the detector made for it;
false alarms count windows that any of the two flags."""

from __future__ import annotations

import numpy as np
import pandas as pd

WINDOW = 500
STREAMS = 40
CLEAN_WINDOWS = 1000  # independent clean windows: a 1 % rate then has a 95 % upper bound under 2 %
REFERENCE = 1000
COLORS = ["red", "green", "blue", "white"]
CITIES = [f"city-{i}" for i in range(30)]
MISSING = 0.10  # the reference's missing rate of `x2`


def _spec():
    from driftloop.config import parse_spec

    return parse_spec({"name": "t", "dataset": {
        "source": "x.csv", "table": "t", "features": ["x1", "x2", "color", "city"], "label": "y", "classes": [0, 1],
        "categorical": {"color": {"categories": COLORS}, "city": {"categories": CITIES}},
        "missing": {"x2": "impute"}},
        "drift": {"window": WINDOW, "p_val": 0.01, "reference_rows": REFERENCE, "detectors": [{"kind": "ks"}]}})


def _rows(n: int, seed: int, color_share: float = 0.25, missing: float = MISSING) -> pd.DataFrame:
    """`color_share`: the share of "red" (the others share the rest evenly); `missing`: x2's missing rate."""
    rng = np.random.default_rng(seed)
    p = [color_share] + [(1 - color_share) / 3] * 3
    df = pd.DataFrame({"x1": rng.normal(size=n), "x2": rng.normal(size=n), "color": rng.choice(COLORS, n, p=p),
                       "city": rng.choice(CITIES, n)})
    df.loc[rng.random(n) < missing, "x2"] = np.nan
    return df


def run() -> dict:
    import tempfile

    from driftloop.drift.detectors import fit_detectors, load_detectors
    from driftloop.features import encode_frame

    spec = _spec()
    ds = spec.dataset
    x_ref = encode_frame(_rows(REFERENCE, seed=1), ds)
    p = np.full((max(REFERENCE, WINDOW), 2), 0.5, np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        fit_detectors(spec.drift, x_ref, p[:REFERENCE], ds.features, tmp, cardinalities=ds.cardinalities, imputed=ds.imputed)
        dets = {d.kind: d for d in load_detectors(tmp, 2)[0]}

    def flags(df: pd.DataFrame) -> dict[str, bool]:
        x = encode_frame(df, ds)
        return {k: bool(d.predict(x, p[:len(x)]).is_drift) for k, d in dets.items()}

    clean = [flags(_rows(WINDOW, seed=10_000 + w)) for w in range(CLEAN_WINDOWS)]
    out: dict = {"window": WINDOW, "streams": STREAMS, "reference_rows": REFERENCE, "detectors": sorted(dets),
                 "false_alarms": {"windows": CLEAN_WINDOWS, "flagged": sum(any(f.values()) for f in clean),
                                  **{k: sum(f[k] for f in clean) for k in dets}}, "cells": []}
    cells = [("categorical: share of one of 4 values", "ks", "color_share", 0.25, (0.30, 0.35, 0.45)),
             ("missing rate of one column", "missing", "missing", MISSING, (0.15, 0.20, 0.30))]
    for what, kind, arg, base, levels in cells:
        for level in levels:
            hit = sum(flags(_rows(WINDOW, seed=20_000 + s, **{arg: level}))[kind] for s in range(STREAMS))
            out["cells"].append({"shift": what, "detector": kind, "from": base, "to": level, "detected": hit,
                                 "streams": STREAMS})
            print(f"tabular {what} {base} -> {level}: {hit}/{STREAMS} in the first window ({kind})", flush=True)
    print(f"tabular false alarms: {out['false_alarms']['flagged']}/{CLEAN_WINDOWS}", flush=True)
    return out
