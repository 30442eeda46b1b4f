"""The loop converges on a multi-phase stream, measured by `driftloop backtest` with the served app's own parts:
clean 1,000 -> noise:3 3,000 -> clean 1,000 -> blur:3 3,000, labels fed back, Ray Train retraining, gate, swap."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import write_spec

pytestmark = pytest.mark.slow


def test_digits_phases_retrain_once_per_shift_and_converge(settings, ray_cluster, tmp_path):
    from driftloop import registry
    from driftloop.backtest import render, run_backtest
    from driftloop.config import load_spec

    # the shipped spec and policy (two flagged windows of the last three), 8 epochs instead of 10
    spec = load_spec(write_spec(tmp_path / "bt.yaml", **{"training.epochs": 8}))
    champion = registry.champion_version(settings, "digits")
    out = run_backtest(spec, settings, "builtin:digits-phases", ["static", "driftloop"], out_dir=tmp_path / "bt",
                       show_progress=False)
    print(render(out))
    dl, static = out["strategies"]["driftloop"], out["strategies"]["static"]
    phases = dl["phases"]
    print(json.dumps(phases, indent=1))
    assert list(phases) == ["clean@0", "noise:3@1000", "clean@4000", "blur:3@5000"]
    assert phases["clean@0"]["retrains"] == 0, dl["retrain_log"]
    for name in ("noise:3@1000", "clean@4000", "blur:3@5000"):
        assert phases[name]["retrains"] <= 1, (name, dl["retrain_log"])          # at most one retrain per shift
    for name in ("noise:3@1000", "blur:3@5000"):
        p = phases[name]
        assert p["swap_row"] is not None, (name, dl["retrain_log"])
        assert p["windows_after_swap"] >= 2 and p["flagged_after_swap"] <= 0.1 * p["windows_after_swap"], (name, p)
        assert p["accuracy_after_swap"] >= 0.85, (name, p)
    assert dl["accuracy"] > static["accuracy"] and static["retrains"] == 0
    assert (tmp_path / "bt" / "backtest.png").stat().st_size > 10_000
    assert registry.champion_version(settings, "digits") == champion, "a backtest never touches the served champion"
