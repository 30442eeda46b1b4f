"""The loop on real streams (#11): `driftloop backtest` on the digits phases and on rainfall (static vs periodic:365
vs driftloop's policy). bench/live.py then replays the same rainfall stream live and compares the retrain counts."""

from __future__ import annotations

import time


def run() -> dict:
    from bench.common import ROOT, setup_home
    from driftloop.backtest import run_backtest
    from driftloop.config import load_spec
    from driftloop.settings import get_settings

    setup_home("backtest")
    s = get_settings().ensure()
    out: dict = {}
    t = time.perf_counter()
    out["digits_phases"] = _slim(run_backtest(load_spec(ROOT / "configs/digits.yaml"), s, "builtin:digits-phases",
                                              ["driftloop", "static"], show_progress=False))
    out["digits_phases"]["wall_s"] = round(time.perf_counter() - t, 1)
    print("backtest digits phases done", flush=True)
    t = time.perf_counter()
    rain_spec = load_spec(ROOT / "configs/rainfall.yaml")
    out["rainfall"] = _slim(run_backtest(rain_spec, s, "builtin:rainfall", ["driftloop", "static", "periodic:365"],
                                         show_progress=False))
    out["rainfall"]["wall_s"] = round(time.perf_counter() - t, 1)
    print("backtest rainfall done", flush=True)
    r = out["rainfall"]["strategies"]
    d, p, st = r["driftloop"], r["periodic:365"], r["static"]
    out["rainfall"]["target"] = {
        "accuracy_minus_periodic": round(d["accuracy"] - p["accuracy"], 4),
        "accuracy_ge_periodic_minus_0.005": d["accuracy"] >= p["accuracy"] - 0.005,
        "retrains_le_half_periodic": d["retrains"] <= p["retrains"] / 2,
        "above_static": d["accuracy"] > st["accuracy"]}
    return out  # the live replay of the same stream is its own section (bench/live.py)


def _slim(summary: dict) -> dict:
    """The summary without per-retrain logs and paths (they stay in the backtest's own JSON and MLflow run)."""
    keep = {k: v for k, v in summary.items() if k not in ("out_dir", "png", "mlflow_run")}
    keep["strategies"] = {n: {k: v for k, v in e.items() if k not in ("retrain_log", "block_accuracy")}
                          for n, e in summary["strategies"].items()}
    return keep


