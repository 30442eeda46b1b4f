"""`driftloop backtest` refuses a stream it cannot replay honestly: one line, exit 2, nothing registered."""

from __future__ import annotations

import pytest

from driftloop.backtest import BacktestError, parse_strategies
from driftloop.data import examples
from tests.conftest import run_cli


def test_strategies_parse_and_always_include_driftloop():
    assert parse_strategies("static,periodic:365") == ["static", "periodic:365", "driftloop"]
    assert parse_strategies("driftloop") == ["driftloop"]
    for bad in ("weekly", "periodic:0", "periodic:x"):
        with pytest.raises(BacktestError, match="unknown strategy"):
            parse_strategies(bad)


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    d = tmp_path_factory.mktemp("streams")
    df = examples.builtin("rainfall").frame.iloc[:3000].copy()
    back = df.copy()
    back.loc[1500, "day"] = 5
    back.to_csv(d / "unordered.csv", index=False)
    df.drop(columns=["rain"]).to_csv(d / "nolabel.csv", index=False)
    df.iloc[:500].to_csv(d / "short.csv", index=False)
    df.to_csv(d / "ok.csv", index=False)
    return d


@pytest.mark.parametrize("args, expected", [
    (["--stream", "unordered.csv"], "time column 'day' goes back in time at row 1500"),
    (["--stream", "nolabel.csv"], "no label column 'rain'"),
    (["--stream", "ok.csv", "--compare", "static,weekly"], "unknown strategy 'weekly'"),
    (["--stream", "short.csv"], "fewer than one drift window (365)"),
    (["--stream", "missing.csv"], "no such file"),
])
def test_bad_backtest_input_is_one_line_and_exit_2(streams, home, args, expected):
    args = [a if not a.endswith(".csv") else str(streams / a) for a in args]
    r = run_cli("backtest", "configs/rainfall.yaml", *args, env={"RAY_ADDRESS": ""})
    assert r.returncode == 2, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], r.stderr
    assert not (home / "mlflow.db").exists(), "nothing may be registered for a refused backtest"
