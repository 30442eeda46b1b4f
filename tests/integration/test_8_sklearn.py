"""scikit-learn's own tables through the bring-your-own-data path, as a user would, each command its own process,
with no YAML or code written beyond what `driftloop init` produced: init -> data ingest -> sweep -> serve -> replay
of a shifted stream with labels -> drift -> retraining job -> swap -> status. Wine is multiclass (three integer
classes); diabetes is regression (a disease-progression score from 25 to 346: init sees a quantity, the sweep and
the gate use RMSE, feedback takes numbers, KS tests the predictions, /drift reports the rolling error). Breast
cancer, binary with text columns and gaps, is test_7_byod.

Diabetes: 300 rows are the history the model learns from; production is the rows it never saw, resampled, read by
a recalibrated clinic: body-mass index, blood pressure and the s5 serum reading all read high, so the champion
over-predicts. Each test starts a local head of its own (`ray start`, private RAY_TMPDIR), as in the BYOD test;
ports 8265 and 8000 must be free."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from deltalake import DeltaTable

from tests.integration.conftest import wait_for
from tests.integration.test_0_newcomer import DASHBOARD_PORT, _free, stop_head
from tests.integration.test_7_byod import _kill_leftovers, start_user_head, user_folder

pytestmark = pytest.mark.slow

SHIFTED = ["bmi", "bp", "s5"]


def _tables(folder: Path) -> None:
    import sklearn.datasets as ds

    df = ds.load_diabetes(as_frame=True).frame
    order = np.random.default_rng(0).permutation(len(df))
    df.iloc[order[:300]].to_csv(folder / "diabetes.csv", index=False)
    prod = df.iloc[order[300:]].sample(n=500, replace=True, random_state=1).reset_index(drop=True)
    prod[SHIFTED] = prod[SHIFTED] + 2.0 * df[SHIFTED].std()
    prod.to_csv(folder / "production.csv", index=False)


def test_wine_multiclass_init_ingest_sweep_serve_drift_retrain_swap(tmp_path):
    """scikit-learn's wine table (178 rows, 13 features, three integer classes): 120 rows of history, 400 production
    rows from the other 58, resampled, with the colour intensity, proline and flavanoid readings shifted: the shapes
    of a multiclass file, through the same commands."""
    import sklearn.datasets as ds

    work = tmp_path / "project"
    work.mkdir()
    df = ds.load_wine(as_frame=True).frame.rename(columns=lambda c: c.replace("/", "_"))
    order = np.random.default_rng(0).permutation(len(df))
    df.iloc[order[:120]].to_csv(work / "wine.csv", index=False)
    prod = df.iloc[order[120:]].sample(n=400, replace=True, random_state=1).reset_index(drop=True)
    moved = ["color_intensity", "proline", "flavanoids"]
    prod[moved] = prod[moved] + 2.0 * df[moved].std()
    prod.to_csv(work / "production.csv", index=False)
    _loop(tmp_path, work, "wine", "target", 400, {"color_intensity", "proline"})


def test_regression_init_ingest_sweep_serve_drift_retrain_swap(tmp_path):
    work = tmp_path / "project"
    work.mkdir()
    _tables(work)
    _loop(tmp_path, work, "diabetes", "target", 500, {"bmi", "prediction"})


def _loop(tmp_path: Path, work: Path, name: str, label: str, rows: int, shifted: set[str]) -> None:
    """init -> ingest -> sweep -> serve -> replay with labels -> drift -> retraining job -> swap -> status, each
    command its own process in the user's folder; a regression is told by what init wrote."""
    if not _free(DASHBOARD_PORT) or not _free(8000):
        pytest.skip(f"ports {DASHBOARD_PORT} and 8000 must be free (no other Ray head or Serve here)")
    raytmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env, cli = user_folder(work, raytmp)

    made = cli("init", f"{name}.csv", "--label", label)
    regression = "regression of" in made.stdout
    assert made.returncode == 0 and regression == (name == "diabetes"), made.stdout + made.stderr
    assert cli("data", "ingest", f"{name}.csv", "--table", name).returncode == 0
    head = start_user_head(env, raytmp, tmp_path / "head.log")
    try:
        assert cli("sweep", f"configs/{name}.yaml").returncode == 0
        listing = cli("models", name)
        score = "test_rmse" if regression else "test_acc"
        assert listing.returncode == 0 and score in listing.stdout and "first version" in listing.stdout
        assert cli("serve", f"serve_configs/{name}.yaml").returncode == 0
        url = f"http://127.0.0.1:8000/{name}"
        assert httpx.get(f"{url}/healthz", timeout=30).json()["model_version"] == 1
        row = pd.read_csv(work / f"{name}.csv").drop(columns=label).iloc[0].to_dict()
        answer = httpx.post(f"{url}/predict", json={"rows": [row, row]}, timeout=30).json()
        first = answer["predictions"][0]
        if regression:  # a number in the label's range, no probabilities; a label that is not a number is refused
            assert isinstance(first["prediction"], float) and 25 <= first["prediction"] <= 346 and "probabilities" not in first
            wrong = httpx.post(f"{url}/feedback", json={"request_id": first["id"], "label": "high"}, timeout=30)
            assert wrong.status_code == 422 and "label: must be a number, got string" in wrong.json()["error"], wrong.text
        else:
            assert first["prediction"] in (0, 1, 2) and len(first["probabilities"]) == 3, answer
            wrong = httpx.post(f"{url}/feedback", json={"request_id": first["id"], "label": 3}, timeout=30)
            assert wrong.status_code == 422 and "[0, 1, 2]" in wrong.json()["error"], wrong.text
        # the user's own production rows, in file order, each label arriving 20 rows late
        sent = cli("replay", name, "--from", "production.csv", "--labels", "--label-delay", "20", "--rps", "40")
        assert sent.returncode == 0
        before = json.loads(sent.stdout.strip().splitlines()[-1])
        assert before["ok"] == rows and before["labelled"] == rows, before
        swapped = wait_for(lambda: (h := httpx.get(f"{url}/healthz", timeout=30).json())["model_version"] > 1 and h,
                           420, every=2, what="a retrained champion serving")
        drift = wait_for(lambda: (d := httpx.get(f"{url}/drift", timeout=30).json())["retraining"]["current"]
                         and d["retraining"]["current"]["status"] == "SUCCEEDED" and d, 120, every=2,
                         what="the retraining job to be seen SUCCEEDED")
        rolling = "rolling_error" if regression else "rolling_accuracy"
        assert set(drift) & {"rolling_error", "rolling_accuracy"} == {rolling} and drift[rolling]["1"]["labelled"] > 0, drift
        # the new champion on the shifted rows it was retrained for: better than the old one was
        again = cli("replay", name, "--from", "production.csv", "--start", str(rows - 100), "--rps", "40", "--labels")
        after = json.loads(again.stdout.strip().splitlines()[-1])
        print("before the swap", before, "after", after, "on", swapped)
        if regression:
            assert "accuracy" not in before and after["mae"] < 0.8 * before["mae"], (before, after)
        else:
            assert after["accuracy"] > before["accuracy"] + 0.1, (before, after)
        # drift was seen in the shifted inputs (and, for regression, in the predictions they moved: KS on y-hat)
        events = DeltaTable(str(work / ".driftloop" / "tables" / f"{name}_drift_events")).to_pandas()
        flagged = set().union(*(json.loads(f) for f in events.loc[events["is_drift"], "drifted_features"]))
        assert shifted <= flagged, flagged
        gate = next(r for r in json.loads(cli("models", name, "--json").stdout) if r["version"] == swapped["model_version"])
        assert gate["decision"] == "promoted" and f"on {'rmse' if regression else 'accuracy'}" in gate["reason"], gate
        st = cli("status", name, "--url", url)
        assert st.returncode == 0 and f"model {name}: champion version {swapped['model_version']}" in st.stdout, st.stdout
        assert "SUCCEEDED" in st.stdout and f"{rolling.replace('_', ' ')} {{" in st.stdout
    finally:
        stop_head(head)
        _kill_leftovers(work / ".driftloop")
        shutil.rmtree(raytmp, ignore_errors=True)
