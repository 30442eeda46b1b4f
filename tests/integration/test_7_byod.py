"""Bring your own data, as a user would, each command its own process in the user's own folder, with no YAML or code
written beyond what `driftloop init` produced: a table file -> init -> data ingest -> sweep -> serve -> replay of a
shifted stream of the user's own rows with labels (delayed) -> drift -> retraining job -> swap -> status.

scikit-learn's breast-cancer table (569 rows, 30 numeric features, labels "benign"/"malignant" as strings), with two
text columns added (the scanner, 3 makes; the referring clinic, 24 of them, so one is one-hot coded and one embedded)
and values missing from two columns (a number and the scanner): 400 rows are the history the model learns from;
production is the rows it never saw, resampled, with the size features shifted upwards (another scanner calibration,
which the champion misreads), most rows from one scanner make, and the smoothness reading missing three times as
often. A local head of its own (`ray start`, private RAY_TMPDIR), as
in the newcomer test; the generated Serve config's port (8000) must be free."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from deltalake import DeltaTable

from driftloop.features import json_value

from tests.integration.conftest import answers_200, kill_leftovers, wait_for
from tests.integration.test_0_newcomer import DASHBOARD_PORT, ports_free, start_head, stop_head

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]


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


MAKES = ["acme", "globex", "initech"]


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


def test_own_table_init_ingest_sweep_serve_drift_retrain_swap(tmp_path):
    if not ports_free(DASHBOARD_PORT, 8000):
        pytest.skip(f"ports {DASHBOARD_PORT} and 8000 must be free (no other Ray head or Serve here)")
    work = tmp_path / "project"
    work.mkdir()
    _tables(work)
    raytmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    env, cli = user_folder(work, raytmp)
    made = cli("init", "cancer.csv", "--label", "diagnosis")
    assert made.returncode == 0
    written = yaml.safe_load((work / "configs" / "cancer.yaml").read_text())["dataset"]
    assert written["categorical"]["scanner"]["categories"] == sorted(MAKES, key=lambda m: -int(
        (pd.read_csv(work / "cancer.csv")["scanner"] == m).sum())) and len(written["categorical"]["clinic"]["categories"]) == 24
    assert written["missing"] == {"mean_smoothness": "impute", "scanner": "impute"}, written
    assert cli("data", "ingest", "cancer.csv", "--table", "cancer").returncode == 0
    head = start_user_head(env, raytmp, tmp_path / "head.log")
    try:
        assert cli("sweep", "configs/cancer.yaml").returncode == 0
        assert cli("serve", "serve_configs/cancer.yaml").returncode == 0
        url = "http://127.0.0.1:8000/cancer"
        assert httpx.get(f"{url}/healthz", timeout=30).json()["model_version"] == 1
        # the answers and the labels are the file's own class names; a row takes category names and, where the
        # spec imputes, null; a make the model never saw is no category (unseen: other)
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
        # the user's own production rows, in file order, labels arriving 30 rows late
        sent = cli("replay", "cancer", "--from", "production.csv", "--labels", "--label-delay", "30", "--rps", "40")
        assert sent.returncode == 0
        summary = json.loads(sent.stdout.strip().splitlines()[-1])
        assert summary["ok"] == 700 and summary["labelled"] == 700, summary
        assert summary["accuracy"] < 0.75, f"the shift should hurt the champion: {summary}"
        swapped = wait_for(lambda: (h := httpx.get(f"{url}/healthz", timeout=30).json())["model_version"] > 1 and h,
                           420, every=2, what="a retrained champion serving")
        job = wait_for(lambda: (c := httpx.get(f"{url}/drift", timeout=30).json()["retraining"]["current"])
                       and c["status"] == "SUCCEEDED" and c, 120, every=2, what="the retraining job to be seen SUCCEEDED")
        print("retraining job:", job["submission_id"], job["status"])
        # the new champion on the shifted rows it was retrained for: better than the old one was
        again = cli("replay", "cancer", "--from", "production.csv", "--start", "500", "--rps", "40", "--labels")
        after = json.loads(again.stdout.strip().splitlines()[-1])
        print("accuracy before the swap", summary["accuracy"], "after", after["accuracy"], "on", swapped)
        assert after["accuracy"] > summary["accuracy"] + 0.1, (summary, after)
        # the drift was seen where it was made: the scanner mix (chi-square) and the missing rate of smoothness
        events = DeltaTable(str(work / ".driftloop" / "tables" / "cancer_drift_events")).to_pandas()
        flagged = set().union(*(json.loads(f) for f in events.loc[events["is_drift"], "drifted_features"]))
        assert {"scanner", "mean_smoothness (missing)"} <= flagged, flagged
        served = DeltaTable(str(work / ".driftloop" / "tables" / "cancer_inference")).to_pandas()
        assert "umbrella-corp" not in set(served["scanner"].dropna()) and "<unseen>" in set(served["scanner"].dropna())
        assert served["mean_smoothness"].isna().mean() > 0.2  # nulls are logged as nulls, not as a fill value
        st = cli("status", "cancer", "--url", url)
        assert st.returncode == 0 and f"model cancer: champion version {swapped['model_version']}" in st.stdout, st.stdout
        assert "SUCCEEDED" in st.stdout and f"live: serving v{swapped['model_version']}" in st.stdout
    finally:
        stop_head(head)
        kill_leftovers(work / ".driftloop")
        shutil.rmtree(raytmp, ignore_errors=True)

