"""Bring your own data, as a user would, each command its own process in the user's own folder, with no YAML or code
written beyond what `driftloop init` produced: a table file -> init -> data ingest -> sweep -> serve -> replay of a
shifted stream of the user's own rows with labels (delayed) -> drift -> retraining job -> swap -> status. Two models
of one user on one head, as one team's two models run: swept at once, served as two applications (the second
`driftloop serve` keeps the first running), replayed at once, each retrained and swapped on its own, all through the
production ingress the README documents (Ray's HAProxy via driftloop-haproxy, set when the head starts).

Cancer, a classifier: scikit-learn's breast-cancer table (569 rows, 30 numeric features, labels "benign"/"malignant"
as strings), with two text columns added (the scanner, 3 makes; the referring clinic, 24 of them, so one is one-hot
coded and one embedded) and values missing from two columns (a number and the scanner): 400 rows are the history the
model learns from; production is the rows it never saw, resampled, with the size features shifted upwards (another
scanner calibration, which the champion misreads), most rows from one scanner make, and the smoothness reading
missing three times as often.

Diabetes, a regression (a disease-progression score from 25 to 346: init sees a quantity, the sweep and the gate use
RMSE, feedback takes numbers, KS tests the predictions, /drift reports the rolling error): 300 rows are the history;
production is the rows it never saw, resampled, read by a recalibrated clinic: body-mass index, blood pressure and
the s5 serum reading all read high, so the champion over-predicts.

A local head of its own (`ray start`, private RAY_TMPDIR), as in the newcomer test; ports 8265 and 8000 (and
HAProxy's 8404 and 9101) must be free."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import httpx
import numpy as np
import pandas as pd
import psutil
import pytest
import yaml
from deltalake import DeltaTable

from driftloop.features import json_value
from driftloop.serving.haproxy import haproxy_env

from tests.integration.conftest import answers_200, kill_leftovers, wait_for
from tests.integration.test_0_newcomer import DASHBOARD_PORT, ports_free, start_head, stop_head

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]

MAKES = ["acme", "globex", "initech"]
SHIFTED = ["bmi", "bp", "s5"]


def _tables(folder: Path) -> None:
    import sklearn.datasets as ds

    df = ds.load_breast_cancer(as_frame=True).frame.rename(columns=lambda c: c.replace(" ", "_"))
    df["diagnosis"] = np.where(df.pop("target") == 1, "benign", "malignant")  # class names, as a hospital writes them
    rng = np.random.default_rng(0)
    df["scanner"] = rng.choice(MAKES, len(df)).astype(object)
    df["clinic"] = rng.choice([f"clinic-{i:02d}" for i in range(24)], len(df))
    order = rng.permutation(len(df))
    hist = df.iloc[order[:400]].copy()
    hist.loc[rng.random(len(hist)) < 0.10, "mean_smoothness"] = np.nan
    hist.loc[rng.random(len(hist)) < 0.05, "scanner"] = None
    hist.to_csv(folder / "cancer.csv", index=False)
    prod = df.iloc[order[400:]].sample(n=700, replace=True, random_state=1).reset_index(drop=True)
    size = [c for c in df.columns if c.endswith(("radius", "perimeter", "area", "texture"))]
    prod[size] = prod[size] + 2.5 * df[size].std()  # every size reading reads high: benign ones look malignant
    prod["scanner"] = np.where(rng.random(len(prod)) < 0.8, MAKES[0], prod["scanner"])
    prod.loc[rng.random(len(prod)) < 0.30, "mean_smoothness"] = np.nan
    prod.to_csv(folder / "production.csv", index=False)

    df = ds.load_diabetes(as_frame=True).frame
    order = np.random.default_rng(0).permutation(len(df))
    df.iloc[order[:300]].to_csv(folder / "diabetes.csv", index=False)
    prod = df.iloc[order[300:]].sample(n=500, replace=True, random_state=1).reset_index(drop=True)
    prod[SHIFTED] = prod[SHIFTED] + 2.0 * df[SHIFTED].std()
    prod.to_csv(folder / "diabetes_production.csv", index=False)


# each model: its label, its production file and rows, how many rows late its labels arrive, where the second
# replay starts, and the drifted features the monitor must name (a category mix and a missing rate; y-hat)
MODELS = {"cancer": {"label": "diagnosis", "file": "production.csv", "rows": 700, "delay": 30, "again": 500,
                     "drifted": {"scanner", "mean_smoothness (missing)"}},
          "diabetes": {"label": "target", "file": "diabetes_production.csv", "rows": 500, "delay": 20, "again": 400,
                       "drifted": {"bmi", "prediction"}}}


def user_folder(work: Path, raytmp: Path) -> tuple[dict[str, str], Callable[..., subprocess.CompletedProcess]]:
    """The environment of a user's own folder (its own home, the embedded defaults, a private RAY_TMPDIR) and
    `cli(*args)`, which runs `driftloop ARGS` there as its own process and prints what it said."""
    env = {**os.environ, "RAY_ADDRESS": "", "DRIFTLOOP_JOBS_ADDRESS": "", "MLFLOW_TRACKING_URI": "",
           "DRIFTLOOP_DATA_ROOT": "", "RAY_TMPDIR": str(raytmp), "DRIFTLOOP_HOME": str(work / ".driftloop"),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    exe = str(Path(sys.executable).with_name("driftloop"))

    def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        t0 = time.monotonic()
        r = subprocess.run([exe, *args], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        print(f"$ driftloop {' '.join(args)} -> {r.returncode} in {time.monotonic() - t0:.1f} s\n{r.stdout[-1500:]}{r.stderr[-1500:] if r.returncode else ''}")
        return r

    return env, cli


def start_user_head(env: dict[str, str], raytmp: Path, log: Path):
    """`ray start` a local head for the user's folder and wait until its dashboard answers."""
    head = start_head(env, log, cpus=3)
    wait_for(lambda: (raytmp / "ray" / "ray_current_cluster").exists() and answers_200(f"http://127.0.0.1:{DASHBOARD_PORT}/api/version"),
             120, what="the local head")
    return head


def test_two_own_tables_side_by_side_init_ingest_sweep_serve_drift_retrain_swap(tmp_path):
    if not ports_free(DASHBOARD_PORT, 8000, 8404, 9101):
        pytest.skip(f"ports {DASHBOARD_PORT}, 8000 and HAProxy's 8404 and 9101 must be free (no other Ray head or Serve here)")
    work = tmp_path / "project"
    work.mkdir()
    _tables(work)
    raytmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env, cli = user_folder(work, raytmp)
    both = ThreadPoolExecutor(2)

    for name, m in MODELS.items():
        made = cli("init", f"{name}.csv", "--label", m["label"])
        assert made.returncode == 0 and ("regression of" in made.stdout) == (name == "diabetes"), made.stdout + made.stderr
        assert cli("data", "ingest", f"{name}.csv", "--table", name).returncode == 0
    written = yaml.safe_load((work / "configs" / "cancer.yaml").read_text())["dataset"]
    assert written["categorical"]["scanner"]["categories"] == sorted(MAKES, key=lambda m: -int(
        (pd.read_csv(work / "cancer.csv")["scanner"] == m).sum())) and len(written["categorical"]["clinic"]["categories"]) == 24
    assert written["missing"] == {"mean_smoothness": "impute", "scanner": "impute"}, written
    started, home = time.time(), work / ".driftloop"
    head = start_user_head({**env, **haproxy_env()}, raytmp, tmp_path / "head.log")  # the README's production ingress
    try:
        assert [r.returncode for r in both.map(lambda n: cli("sweep", f"configs/{n}.yaml"), MODELS)] == [0, 0]
        assert cli("serve", "serve_configs/cancer.yaml").returncode == 0
        second = cli("serve", "serve_configs/diabetes.yaml")
        assert second.returncode == 0 and "kept running: cancer" in second.stdout, second.stdout
        listening = _listening(_haproxies(started, home))  # HAProxy answers :8000; stats and metrics on loopback
        assert "127.0.0.1:8000" in listening and all(a.startswith("127.0.0.1:") for a in listening), listening
        _cancer_answers(cli, work)
        _diabetes_answers(cli, work)
        # each model's own production rows, in file order, each label arriving some rows late; both streams at once,
        # in 5-row requests (single rows cost ~15 ms of CPU each, which the retraining jobs then lack on 2 cores)
        sent = dict(zip(MODELS, both.map(lambda n: cli("replay", n, "--from", MODELS[n]["file"], "--labels", "--batch", "5",
                                                        "--label-delay", str(MODELS[n]["delay"]), "--rps", "40"), MODELS)))
        for name, m in MODELS.items():
            assert sent[name].returncode == 0
            before = json.loads(sent[name].stdout.strip().splitlines()[-1])
            assert before["ok"] == m["rows"] and before["labelled"] == m["rows"], before
            if name == "cancer":
                assert before["accuracy"] < 0.75, f"the shift should hurt the champion: {before}"
            _swapped_and_better(cli, work, name, m, before)
        served = DeltaTable(str(home / "tables" / "cancer_inference")).to_pandas()
        assert "umbrella-corp" not in set(served["scanner"].dropna()) and "<unseen>" in set(served["scanner"].dropna())
        assert served["mean_smoothness"].isna().mean() > 0.2  # nulls are logged as nulls, not as a fill value
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


def _first_version_listed(cli, name: str, metric: str) -> None:
    listing = cli("models", name)
    assert listing.returncode == 0 and metric in listing.stdout and "first version" in listing.stdout, listing.stdout


def _cancer_answers(cli, work: Path) -> None:
    """v1 answers with the file's own class names; a row takes category names and, where the spec imputes, null; a
    make the model never saw is no category (unseen: other); what is wrong is refused with a line that says why."""
    url = "http://127.0.0.1:8000/cancer"
    assert httpx.get(f"{url}/healthz", timeout=30).json()["model_version"] == 1
    _first_version_listed(cli, "cancer", "test_acc")
    row = {k: json_value(v) for k, v in pd.read_csv(work / "production.csv").drop(columns="diagnosis").iloc[0].items()}
    row.update(mean_smoothness=None, scanner="umbrella-corp")
    answer = httpx.post(f"{url}/predict", json={"row": row}, timeout=30).json()
    assert answer["predictions"][0]["prediction"] in ("benign", "malignant"), answer
    refused = httpx.post(f"{url}/predict", json={"row": {**row, "mean_radius": None}}, timeout=30)
    assert refused.status_code == 422 and "mean_radius" in refused.json()["error"], refused.text
    refused = httpx.post(f"{url}/predict", json={"row": {**row, "clinic": 7}}, timeout=30)
    assert refused.status_code == 422 and "row.clinic: must be a string, one of ['clinic-" in refused.json()["error"]
    assert "(24 in all)]" in refused.json()["error"], refused.text
    wrong = httpx.post(f"{url}/feedback", json={"request_id": answer["request_id"], "label": "benig"}, timeout=30)
    assert wrong.status_code == 422 and "['benign', 'malignant']" in wrong.json()["error"], wrong.text


def _diabetes_answers(cli, work: Path) -> None:
    """v1 answers a number in the label's range, no probabilities; a label that is not a number is refused."""
    url = "http://127.0.0.1:8000/diabetes"
    assert httpx.get(f"{url}/healthz", timeout=30).json()["model_version"] == 1
    _first_version_listed(cli, "diabetes", "test_rmse")
    row = pd.read_csv(work / "diabetes.csv").drop(columns="target").iloc[0].to_dict()
    first = httpx.post(f"{url}/predict", json={"rows": [row, row]}, timeout=30).json()["predictions"][0]
    assert isinstance(first["prediction"], float) and 25 <= first["prediction"] <= 346 and "probabilities" not in first
    wrong = httpx.post(f"{url}/feedback", json={"request_id": first["id"], "label": "high"}, timeout=30)
    assert wrong.status_code == 422 and "label: must be a number, got string" in wrong.json()["error"], wrong.text


def _swapped_and_better(cli, work: Path, name: str, m: dict, before: dict) -> None:
    """Drift -> retraining job -> swap: the new champion does better on the shifted rows, the events name the
    drifted columns, the gate said why on the task's metric, and `status` tells the story."""
    regression = name == "diabetes"
    url = f"http://127.0.0.1:8000/{name}"
    swapped = wait_for(lambda: (h := httpx.get(f"{url}/healthz", timeout=30).json())["model_version"] > 1 and h,
                       480, every=2, what=f"a retrained {name} champion serving")
    drift = wait_for(lambda: (d := httpx.get(f"{url}/drift", timeout=30).json())["retraining"]["current"]
                     and d["retraining"]["current"]["status"] == "SUCCEEDED" and d, 120, every=2,
                     what=f"the {name} retraining job to be seen SUCCEEDED")
    print(name, "retraining job:", drift["retraining"]["current"]["submission_id"])
    rolling = "rolling_error" if regression else "rolling_accuracy"
    assert set(drift) & {"rolling_error", "rolling_accuracy"} == {rolling} and drift[rolling]["1"]["labelled"] > 0, drift
    # the new champion on the shifted rows it was retrained for: better than the old one was
    again = cli("replay", name, "--from", m["file"], "--start", str(m["again"]), "--rps", "40", "--labels")
    after = json.loads(again.stdout.strip().splitlines()[-1])
    print(name, "before the swap", before, "after", after, "on", swapped)
    if regression:
        assert "accuracy" not in before and after["mae"] < 0.8 * before["mae"], (before, after)
    else:
        assert after["accuracy"] > before["accuracy"] + 0.1, (before, after)
    # drift was seen where it was made (for regression, also in the predictions the shift moved: KS on y-hat)
    events = DeltaTable(str(work / ".driftloop" / "tables" / f"{name}_drift_events")).to_pandas()
    flagged = set().union(*(json.loads(f) for f in events.loc[events["is_drift"], "drifted_features"]))
    assert m["drifted"] <= flagged, flagged
    gate = next(r for r in json.loads(cli("models", name, "--json").stdout) if r["version"] == swapped["model_version"])
    assert gate["decision"] == "promoted" and f"on {'rmse' if regression else 'accuracy'}" in gate["reason"], gate
    st = cli("status", name, "--url", url)
    v = swapped["model_version"]
    assert st.returncode == 0 and f"model {name}: champion version {v}" in st.stdout, st.stdout
    assert "SUCCEEDED" in st.stdout and f"live: serving v{v}" in st.stdout and f"{rolling.replace('_', ' ')} {{" in st.stdout
