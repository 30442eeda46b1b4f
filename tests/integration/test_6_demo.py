"""`driftloop demo` as a newcomer runs it (its own local Ray, MLflow and tables): the loop closes, and its standard
output is driftloop's own: progress lines and the summary, no warning, no Ray/Serve/Tune/MLflow log line."""

from __future__ import annotations

import re

import pytest

from tests.conftest import run_cli
from tests.integration.conftest import kill_leftovers

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]

PROGRESS = re.compile(r"^\[\d\d:\d\d:\d\d\] \S")             # [HH:MM:SS] what driftloop is doing
SUMMARY = re.compile(r"^[a-z_][a-z_ ()]*[a-z)] {2,}\S")       # name    value


def test_demo_prints_only_its_own_lines_and_closes_the_loop(tmp_path):
    env = {"RAY_ADDRESS": "", "DRIFTLOOP_JOBS_ADDRESS": "", "MLFLOW_TRACKING_URI": "", "DRIFTLOOP_DATA_ROOT": "",
           "DRIFTLOOP_HOME": str(tmp_path / "home"), "RAY_AUTH_MODE": "disabled"}  # as `make demo` runs it
    try:
        r = run_cli("demo", "--quick", "--out", str(tmp_path / "out"), env=env, timeout=1200)
    finally:  # a demo that fails mid-retrain leaves its job's processes (their own session) behind
        kill_leftovers(tmp_path / "home", below=True)
    print(r.stdout)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    foreign = [ln for ln in lines if not (PROGRESS.match(ln) or SUMMARY.match(ln))]
    assert not foreign, f"lines on stdout that are not driftloop's own: {foreign[:10]}"
    assert not [ln for ln in lines if re.search(r"Warning|WARNING| INFO | DEBUG |\(raylet\)|[Tt]ensor[Bb]oard", ln)]
    assert (tmp_path / "out" / "demo.log").stat().st_size > 0, "the libraries' output went to the log"
    summary = dict(re.split(r" {2,}", ln, maxsplit=1) for ln in lines if SUMMARY.match(ln))
    assert summary["champion_after"] != summary["champion_before"], summary
    assert float(summary["accuracy_drifted_after"]) > float(summary["accuracy_drifted_before"]), summary
    assert summary["failed_requests"] == "0"
    # the loop's moments as clock times, not raw epoch seconds
    events = summary["events (local time)"]
    assert re.search(r"onset \d\d:\d\d:\d\d", events) and re.search(r"new champion \d\d:\d\d:\d\d \(\+\d+\.\d s\)", events), events
    assert not re.search(r"\d{10}\.\d", r.stdout), "an epoch timestamp in the output"
