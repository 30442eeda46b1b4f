"""scikit-learn's own tables through the bring-your-own-data path, as a user would, each command its own process,
with no YAML or code written beyond what `driftloop init` produced: init -> data ingest -> sweep -> serve -> replay
of a shifted stream with labels -> drift -> retraining job -> swap -> status. Wine is multiclass (three integer
classes); diabetes is regression (a disease-progression score from 25 to 346: init sees a quantity, the sweep and
the gate use RMSE, feedback takes numbers, KS tests the predictions, /drift reports the rolling error). Breast
cancer, binary with text columns and gaps, is test_7_byod. Both models run side by side on one head, as one team's
two models would: swept at once, served as two applications, replayed at once, each retrained on its own, all
through the production ingress the README documents (Ray's HAProxy via driftloop-haproxy, set when the head starts).

Diabetes: 300 rows are the history the model learns from; production is the rows it never saw, resampled, read by
a recalibrated clinic: body-mass index, blood pressure and the s5 serum reading all read high, so the champion
over-predicts. The test starts a local head of its own (`ray start`, private RAY_TMPDIR), as the BYOD test does;
ports 8265 and 8000 must be free."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import psutil
import pytest
from deltalake import DeltaTable

from driftloop.serving.haproxy import haproxy_env

from tests.integration.conftest import kill_leftovers, wait_for
from tests.integration.test_0_newcomer import DASHBOARD_PORT, ports_free, stop_head
from tests.integration.test_7_byod import start_user_head, user_folder

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]

SHIFTED = ["bmi", "bp", "s5"]


def _tables(folder: Path) -> dict[str, tuple[int, set[str]]]:
    """Each model's history file and production file; returns each model's production rows and the columns whose
    drift the monitor must name."""
    import sklearn.datasets as ds

    df = ds.load_diabetes(as_frame=True).frame
    order = np.random.default_rng(0).permutation(len(df))
    df.iloc[order[:300]].to_csv(folder / "diabetes.csv", index=False)
    prod = df.iloc[order[300:]].sample(n=500, replace=True, random_state=1).reset_index(drop=True)
    prod[SHIFTED] = prod[SHIFTED] + 2.0 * df[SHIFTED].std()
    prod.to_csv(folder / "diabetes_production.csv", index=False)

    # wine (178 rows, 13 features, three integer classes): 120 rows of history, 400 production rows from the other
    # 58, resampled, with the colour intensity, proline and flavanoid readings shifted
    df = ds.load_wine(as_frame=True).frame.rename(columns=lambda c: c.replace("/", "_"))
    order = np.random.default_rng(0).permutation(len(df))
    df.iloc[order[:120]].to_csv(folder / "wine.csv", index=False)
    prod = df.iloc[order[120:]].sample(n=400, replace=True, random_state=1).reset_index(drop=True)
    moved = ["color_intensity", "proline", "flavanoids"]
    prod[moved] = prod[moved] + 2.0 * df[moved].std()
    prod.to_csv(folder / "wine_production.csv", index=False)
    return {"wine": (400, {"color_intensity", "proline"}), "diabetes": (500, {"bmi", "prediction"})}


def test_wine_and_diabetes_side_by_side_init_ingest_sweep_serve_drift_retrain_swap(tmp_path):
    """Two models of one user on one head, as a team runs them: both swept at once, the second `driftloop serve`
    keeps the first application running, both streams replayed at once, each retrained and swapped on its own."""
    if not ports_free(DASHBOARD_PORT, 8000, 8404, 9101):
        pytest.skip(f"ports {DASHBOARD_PORT}, 8000 and HAProxy's 8404 and 9101 must be free (no other Ray head or Serve here)")
    work = tmp_path / "project"
    work.mkdir()
    streams = _tables(work)
    raytmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env, cli = user_folder(work, raytmp)
    both = ThreadPoolExecutor(2)

    for name in streams:
        made = cli("init", f"{name}.csv", "--label", "target")
        assert made.returncode == 0 and ("regression of" in made.stdout) == (name == "diabetes"), made.stdout + made.stderr
        assert cli("data", "ingest", f"{name}.csv", "--table", name).returncode == 0
    started, home = time.time(), work / ".driftloop"
    head = start_user_head({**env, **haproxy_env()}, raytmp, tmp_path / "head.log")  # the README's production ingress
    try:
        assert [r.returncode for r in both.map(lambda n: cli("sweep", f"configs/{n}.yaml"), streams)] == [0, 0]
        assert cli("serve", "serve_configs/wine.yaml").returncode == 0
        second = cli("serve", "serve_configs/diabetes.yaml")
        assert second.returncode == 0 and "kept running: wine" in second.stdout, second.stdout
        listening = _listening(_haproxies(started, home))  # HAProxy answers :8000; stats and metrics on loopback
        assert "127.0.0.1:8000" in listening and all(a.startswith("127.0.0.1:") for a in listening), listening
        for name in streams:
            _first_answers(cli, work, name)
        # each model's own production rows, in file order, each label arriving 20 rows late; both streams at once
        sent = dict(zip(streams, both.map(lambda n: cli("replay", n, "--from", f"{n}_production.csv", "--labels",
                                                         "--label-delay", "20", "--rps", "40"), streams)))
        for name, (rows, shifted) in streams.items():
            assert sent[name].returncode == 0
            before = json.loads(sent[name].stdout.strip().splitlines()[-1])
            assert before["ok"] == rows and before["labelled"] == rows, before
            _swapped_and_better(cli, work, name, rows, shifted, before)
    finally:
        both.shutdown()
        stop_head(head)
        for p in _haproxies(started, home):  # an HAProxy whose manager actor was killed with its node outlives it
            try:
                p.kill()
            except psutil.Error:
                pass
        kill_leftovers(home)
        shutil.rmtree(raytmp, ignore_errors=True)


def _haproxies(since: float, home: Path) -> list:
    """This test's HAProxy processes: started since SINCE, under this user folder's DRIFTLOOP_HOME."""
    found = []
    for p in psutil.process_iter(["name", "create_time"]):
        try:
            if p.info["name"] == "haproxy" and p.info["create_time"] >= since and p.environ().get("DRIFTLOOP_HOME") == str(home):
                found.append(p)
        except psutil.Error:
            pass
    return found


def _listening(procs: list) -> set[str]:
    found = set()
    for p in procs:
        try:
            found |= {f"{c.laddr.ip}:{c.laddr.port}" for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            pass
    return found


def _first_answers(cli, work: Path, name: str) -> None:
    """v1 answers in the task's shape; a label of the wrong kind is refused with a line that says why."""
    url = f"http://127.0.0.1:8000/{name}"
    assert httpx.get(f"{url}/healthz", timeout=30).json()["model_version"] == 1
    listing = cli("models", name)
    assert listing.returncode == 0 and ("test_rmse" if name == "diabetes" else "test_acc") in listing.stdout
    assert "first version" in listing.stdout
    row = pd.read_csv(work / f"{name}.csv").drop(columns="target").iloc[0].to_dict()
    answer = httpx.post(f"{url}/predict", json={"rows": [row, row]}, timeout=30).json()
    first = answer["predictions"][0]
    if name == "diabetes":  # a number in the label's range, no probabilities; a label that is not a number is refused
        assert isinstance(first["prediction"], float) and 25 <= first["prediction"] <= 346 and "probabilities" not in first
        wrong = httpx.post(f"{url}/feedback", json={"request_id": first["id"], "label": "high"}, timeout=30)
        assert wrong.status_code == 422 and "label: must be a number, got string" in wrong.json()["error"], wrong.text
    else:
        assert first["prediction"] in (0, 1, 2) and len(first["probabilities"]) == 3, answer
        wrong = httpx.post(f"{url}/feedback", json={"request_id": first["id"], "label": 3}, timeout=30)
        assert wrong.status_code == 422 and "[0, 1, 2]" in wrong.json()["error"], wrong.text


def _swapped_and_better(cli, work: Path, name: str, rows: int, shifted: set[str], before: dict) -> None:
    """Drift -> retraining job -> swap: the new champion does better on the shifted rows, the events name the
    shifted columns, the gate said why on the task's metric, and `status` tells the story."""
    regression = name == "diabetes"
    url = f"http://127.0.0.1:8000/{name}"
    swapped = wait_for(lambda: (h := httpx.get(f"{url}/healthz", timeout=30).json())["model_version"] > 1 and h,
                       480, every=2, what=f"a retrained {name} champion serving")
    drift = wait_for(lambda: (d := httpx.get(f"{url}/drift", timeout=30).json())["retraining"]["current"]
                     and d["retraining"]["current"]["status"] == "SUCCEEDED" and d, 120, every=2,
                     what=f"the {name} retraining job to be seen SUCCEEDED")
    rolling = "rolling_error" if regression else "rolling_accuracy"
    assert set(drift) & {"rolling_error", "rolling_accuracy"} == {rolling} and drift[rolling]["1"]["labelled"] > 0, drift
    # the new champion on the shifted rows it was retrained for: better than the old one was
    again = cli("replay", name, "--from", f"{name}_production.csv", "--start", str(rows - 100), "--rps", "40", "--labels")
    after = json.loads(again.stdout.strip().splitlines()[-1])
    print(name, "before the swap", before, "after", after, "on", swapped)
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
