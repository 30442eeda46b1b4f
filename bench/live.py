"""The rainfall stream replayed live over HTTP through the served app with labels (#11), its retraining jobs counted
and compared with the backtest's retrains (results["backtest"], from the same run or the last one).

The backtest retrains instantly in stream time; a live retraining job takes about a minute. So the live replay goes
one block (one drift window of rows, with their labels) at a time and, after each block, waits until no retraining
job is in progress and every replica serves the registry's champion: the live loop then sees the stream as the
backtest does, and any difference in retrains is the loop's own.
"""

from __future__ import annotations

import asyncio
import time


def run(results: dict) -> dict:
    from bench.common import ROOT, setup_home
    from driftloop.config import load_spec

    bt = ((results.get("backtest") or {}).get("rainfall") or {}).get("strategies", {}).get("driftloop")
    if not bt:
        return {"error": "no rainfall backtest in these results to compare with (run the backtest section first)"}
    setup_home("live")
    out = _live(load_spec(ROOT / "configs/rainfall.yaml"), bt["retrains"])
    out["backtest_started"] = results.get("started")
    return out


def _live(spec, backtest_retrains: int) -> dict:
    """Serve rainfall, replay the 30 later years block by block with labels, count the retraining jobs."""
    from ray import serve

    from bench.common import free_port
    from driftloop import registry
    from driftloop.cluster import ensure_ray
    from driftloop.config import parse_spec
    from driftloop.data import examples
    from driftloop.data.ingest import ingest
    from driftloop.jobs import JobsView
    from driftloop.replay import replay_async
    from driftloop.serving.app import DriftMonitor, Predictor
    from driftloop.settings import get_settings
    from driftloop.sweep import run_sweep

    s = get_settings().ensure()
    d = spec.model_dump(mode="json")
    d["name"] = d["dataset"]["table"] = "rainfall-live"
    d["sweep"].update(trials=1, concurrency=1)
    # the backtest's clock is one day per row, so its 600 s cooldown lasts less than a row; live, a block takes
    # seconds of wall time: the same "no cooldown to speak of" is 1 s here
    d["retraining"]["cooldown_s"] = 1
    lspec = parse_spec(d)
    ingest("rainfall", s.table_uri(lspec.dataset.table), lspec.dataset)
    t0 = time.perf_counter()
    ensure_ray(s, join_running=False)
    run_sweep(lspec, s, verbose=0)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
    serve.run(Predictor.bind(DriftMonitor.bind(d), d), name="rainlive", route_prefix="/rainlive")
    url = f"http://127.0.0.1:{port}"
    pool = examples.builtin("rainfall").pool
    window = lspec.drift.window
    sent = 0
    try:
        for start in range(0, len(pool), window):
            block = pool.iloc[start:start + window]
            rep = asyncio.run(replay_async(url, "rainlive", block, lspec.dataset.features, lspec.dataset.label, rps=200,
                                           labels=True, concurrency=16))
            sent += rep.sent
            _settle(url, s, lspec.name, sent)
        views = JobsView(lspec.name).refresh()
        retrains = len(views)
        promoted = sum(1 for q in views if q.latest.status == "SUCCEEDED")
        champion = registry.champion_version(s, lspec.name)
    finally:
        serve.delete("rainlive")
    return {"rows": sent, "retrain_jobs": retrains, "succeeded": promoted, "final_champion": champion,
            "backtest_retrains": backtest_retrains, "difference": retrains - backtest_retrains,
            "within_1": abs(retrains - backtest_retrains) <= 1, "wall_s": round(time.perf_counter() - t0, 1)}


def _settle(url: str, settings, name: str, labelled: int, timeout_s: float = 600) -> None:
    """Wait until the monitor has every label sent so far, no retraining job is in progress, and every replica
    serves the registry's champion."""
    import httpx

    from driftloop import registry

    def busy(st: dict) -> bool:
        job = (st.get("retraining") or {}).get("current")
        return st["feedback"] < labelled or bool(st["state"]["pending_submit"]) or bool(job and not job["final"])

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not busy(httpx.get(f"{url}/rainlive/drift", timeout=30).json()):
            time.sleep(2.5)  # a trigger from the last labels reaches the Jobs API within a poll
            st = httpx.get(f"{url}/rainlive/drift", timeout=30).json()
            champion = registry.champion_version(settings, name)
            served = {httpx.get(f"{url}/rainlive/healthz", timeout=30).json()["model_version"] for _ in range(6)}
            if not busy(st) and served == {champion} and st["model_version"] == champion:
                return
        time.sleep(1.0)
    raise TimeoutError(f"the live loop did not settle within {timeout_s:.0f} s after {labelled} labelled rows")

