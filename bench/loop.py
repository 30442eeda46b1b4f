"""The loop: seconds from drift onset to the new champion answering, by stage, and drifted accuracy before/after.
Runs `driftloop demo` (quick sweep) and reads the retraining job's stage timings from MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run() -> dict:
    from bench.common import ROOT, setup_home

    home = setup_home("loop")
    out = home / "demo-out"
    env = {**os.environ, "DRIFTLOOP_HOME": str(home)}
    r = subprocess.run([str(Path(sys.executable).with_name("driftloop")), "demo", "--json", "--quick", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{home / 'demo' / 'mlflow.db'}")
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()], "tags.`driftloop.kind` = 'retrain'")
    stages = {k.removeprefix("stage."): v for k, v in runs[0].data.metrics.items() if k.startswith("stage.")} if runs else {}
    return {"summary": summary, "job_stages_s": stages}
