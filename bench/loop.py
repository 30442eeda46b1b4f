"""The loop: seconds from drift onset to the new champion answering, by stage, and drifted accuracy before/after.
Runs `driftloop demo --as-shipped` (configs/digits.yaml unchanged, every drifted row paced: the target's cell) and
`driftloop demo --quick` (the demo's overrides, beside it) and reads each retraining job's stage timings from MLflow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run() -> dict:
    """The quick cell's figures at the top level (as before); the shipped config's under "shipped"."""
    return _cell("--quick") | {"shipped": _cell("--as-shipped")}


def _cell(flag: str) -> dict:
    from bench.common import ROOT, setup_home

    home = setup_home("loop" + flag.replace("--", "-"))
    out = home / "demo-out"
    env = {**os.environ, "DRIFTLOOP_HOME": str(home)}
    r = subprocess.run([str(Path(sys.executable).with_name("driftloop")), "demo", "--json", flag, "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    from mlflow import MlflowClient

    c = MlflowClient(f"sqlite:///{home / 'demo' / 'mlflow.db'}")
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()], "tags.`driftloop.kind` = 'retrain'")
    stages = {k.removeprefix("stage."): v for k, v in runs[0].data.metrics.items() if k.startswith("stage.")} if runs else {}
    return {"summary": {k: v for k, v in summary.items() if k != "events_at"}, "job_stages_s": stages,
            "onset_to_swap_by_stage_s": _by_stage(summary.get("events_at") or {}, stages, runs[0] if runs else None)}


def _by_stage(ev: dict, stages: dict, run) -> dict:
    """Onset -> swap, split: detection (the first drifted window closes), waiting for the label minimum,
    job start (submission until the job's data build begins), data build, training, register + gate, swap
    (job end until the new version answers). The job's own stages come from its MLflow run."""
    need = ("onset", "detected", "job submitted", "new champion")
    if run is None or any(ev.get(k) is None for k in need):
        return {}
    run_start, run_end = run.info.start_time / 1000, run.info.end_time / 1000
    data = stages.get("data_build_s", 0.0)
    out = {"detection": ev["detected"] - ev["onset"], "waiting for labelled rows": ev["job submitted"] - ev["detected"],
           "job start": run_start - data - ev["job submitted"], "data build": data,
           "training": stages.get("training_s", 0.0), "register + gate": stages.get("register_and_gate_s", 0.0)}
    out["other (job bookkeeping)"] = run_end - run_start - out["training"] - out["register + gate"]
    out["swap (job end -> new version answering)"] = ev["new champion"] - run_end
    out["total onset -> swap"] = ev["new champion"] - ev["onset"]
    return {k: round(v, 1) for k, v in out.items()}
