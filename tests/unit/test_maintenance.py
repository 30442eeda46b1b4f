"""Months of running: the logs are partitioned by day, compacted, expired past the retention and vacuumed; reads of
labelled rows stay incremental; a crash in the middle of compaction loses and duplicates nothing. Real Delta tables
in a temporary folder, with the clock injected (90 days pass in a second)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from driftloop.config import load_spec, parse_spec
from driftloop.data import logs, maintenance, tables
from driftloop import ids as request_ids
from driftloop.settings import get_settings
from tests.conftest import ROOT, run_cli

DAY_S = 86400.0
T0 = 1_780_000_000.0  # a fixed "first day" of service: 2026-05-28


def _spec(**lifecycle):
    d = load_spec(ROOT / "configs/digits.yaml").model_dump(mode="json")
    d["name"] = d["dataset"]["table"] = "soak"
    d["lifecycle"].update({"vacuum_grace_hours": 0, **lifecycle})
    return parse_spec(d)


def _serve_day(s, spec, day: int, n: int, secret: bytes, label: bool = True) -> list[str]:
    """n rows served on day `day` (one id each) and labelled the same day, appended the way the monitor does."""
    t = T0 + day * DAY_S + np.arange(n) * 10.0
    rids = [request_ids.issue(secret, 1, 1, now=float(x)) for x in t]
    x = np.random.default_rng(day).random((n, spec.n_features))
    logs.append(s, spec, "inference", logs.inference_frame(spec, rids, list(t), 1, x, np.zeros(n, dtype=np.int64)))
    if label:
        logs.append(s, spec, "feedback", logs.feedback_frame([(r, 1, float(ts) + 5) for r, ts in zip(rids, t)]))
    return rids


def _event(s, spec, day: int) -> None:
    rep = {"event_id": f"e{day}", "ended_at": T0 + day * DAY_S, "started_at": T0 + day * DAY_S - 60, "model_version": 1,
           "index": day, "rows": 500, "is_drift": False, "detectors": [{"p_val": 0.5}]}
    logs.append(s, spec, "drift_events", logs.drift_events_frame([rep]))


@pytest.fixture(scope="module")
def _served_once(tmp_path_factory):
    """100 days of service, 3 small commits a day to each log (the monitor commits every few seconds)."""
    home = tmp_path_factory.mktemp("served") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DRIFTLOOP_HOME", str(home))
        mp.delenv("DRIFTLOOP_DATA_ROOT", raising=False)
        s, spec = get_settings().ensure(), _spec()
        secret = b"k" * 32
        by_day = {d: sum((_serve_day(s, spec, d, 4, secret) for _ in range(3)), []) for d in range(100)}
        for d in range(100):
            _event(s, spec, d)
    return home, by_day


@pytest.fixture
def served(home, _served_once):
    """A private copy of the 100 days for one test."""
    shutil.copytree(_served_once[0], home)
    return get_settings().ensure(), _spec(), _served_once[1]


def test_logs_are_partitioned_by_day_and_compaction_bounds_their_files(served):
    s, spec, by_day = served
    u = logs.uris(s, spec)
    before = {k: tables.read(u[k]).sort_values(["ts", *(["request_id"] if k != "drift_events" else [])]).reset_index(drop=True)
              for k in u}
    assert maintenance.file_counts(u["inference"])["active"] == 300  # one file per commit
    rep = maintenance.maintain(s, spec, now=T0 + 100 * DAY_S)       # nothing is past 90 days yet but day 0..9
    inf = rep["tables"]["inference"]
    assert inf["files_before"] == 300 and inf["stored_before"] == 300
    assert inf["files_after"] == 90 == inf["stored_after"], "one file per day kept, replaced files vacuumed (grace 0)"
    assert sorted(p.name for p in Path(u["inference"]).iterdir() if p.name.startswith("day="))[0] == "day=2026-06-07"
    for k in u:  # the rows inside the retention are all there, once, unchanged
        after = tables.read(u[k]).sort_values(["ts", *(["request_id"] if k != "drift_events" else [])]).reset_index(drop=True)
        kept = before[k][before[k]["ts"] >= T0 + 10 * DAY_S].reset_index(drop=True)
        pd.testing.assert_frame_equal(after[kept.columns], kept, check_dtype=False, check_categorical=False)


def test_after_91_days_older_rows_are_gone_from_tables_and_storage_and_time_travel_says_so(served):
    s, spec, by_day = served
    u = logs.uris(s, spec)
    old_version = tables.data_version(u["inference"]).version
    now = T0 + 130 * DAY_S  # day 39's rows are 91 days old, day 40's not quite 90
    rep = maintenance.maintain(s, spec, now=now)
    cutoff = now - 90 * DAY_S
    for k in u:
        left = tables.read(u[k])
        assert len(left) and left["ts"].min() >= cutoff, f"{k}: rows older than 90 days remain"
    inf = tables.read(u["inference"])
    assert set(inf["request_id"]) == set(sum((by_day[d] for d in range(40, 100)), [])), "nothing newer is lost"
    assert rep["tables"]["inference"]["rows_expired"] == 40 * 12
    first_kept = f"day={maintenance.day_of(cutoff)}"
    files = [p for p in Path(u["inference"]).rglob("*.parquet") if "_delta_log" not in p.parts]
    assert len(files) == 60 and all(p.parent.name >= first_kept for p in files), "expired days' files are gone from storage"
    assert min(p.name for p in Path(u["inference"]).glob("day=*")) == first_kept
    # time travel to a version whose files retention removed: one readable line, exit 2
    r = run_cli("data", "show", "soak_inference", "--version", str(old_version), env={"DRIFTLOOP_HOME": str(s.home)})
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "can no longer be read" in r.stderr and "oldest readable version" in r.stderr


def test_labelled_rows_read_only_past_the_watermark(served):
    s, spec, by_day = served
    everything = logs.labelled_rows(s, spec)
    assert len(everything) == 1200 and not everything["request_id"].duplicated().any()
    mark = T0 + 97 * DAY_S
    recent = logs.labelled_rows(s, spec, after_ts=mark)
    assert set(recent["request_id"]) == set(by_day[97] + by_day[98] + by_day[99])
    assert (recent["feedback_ts"] > mark).all() and "day" not in recent.columns
    assert list(recent["feedback_ts"]) == sorted(recent["feedback_ts"])
    # the rows joined are the served rows themselves
    inf = tables.read(logs.uris(s, spec)["inference"]).set_index("request_id")
    row = recent.iloc[0]
    assert np.allclose(inf.loc[row["request_id"], spec.dataset.features].to_numpy(float), row[spec.dataset.features].to_numpy(float))


def test_appends_during_maintenance_are_kept(served):
    """The monitor keeps committing while the scheduled pass compacts and expires: no row is lost."""
    s, spec, _ = served
    secret, added, stop = b"k" * 32, [], threading.Event()

    def serve_more():
        d = 100
        while not stop.is_set():
            added.extend(_serve_day(s, spec, d, 2, secret, label=False))
            d += 1

    t = threading.Thread(target=serve_more)
    t.start()
    try:
        maintenance.maintain(s, spec, now=T0 + 100 * DAY_S)
    finally:
        stop.set()
        t.join()
    inf = tables.read(logs.uris(s, spec)["inference"])
    assert added and set(added) <= set(inf["request_id"])
    assert not inf["request_id"].duplicated().any()


_COMPACT = """
import sys
from driftloop.data import maintenance
maintenance.compact(sys.argv[1])
"""


def test_a_crash_in_the_middle_of_compaction_loses_and_duplicates_nothing(home):
    s, spec = get_settings().ensure(), _spec()
    secret = b"k" * 32
    for d in range(3):
        for _ in range(60):
            _serve_day(s, spec, d, 40, secret, label=False)
    uri = logs.uris(s, spec)["inference"]
    before = tables.read(uri).sort_values("request_id").reset_index(drop=True)
    version = tables.data_version(uri).version
    files = set(Path(uri).rglob("*.parquet"))
    proc = subprocess.Popen([sys.executable, "-c", _COMPACT, uri], env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    killed_mid_write = False
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        if set(Path(uri).rglob("*.parquet")) - files:  # it has begun writing compacted files
            os.kill(proc.pid, signal.SIGKILL)
            killed_mid_write = True
            break
        time.sleep(0.002)
    proc.wait(30)
    if killed_mid_write:
        assert tables.data_version(uri).version == version, "killed before its commit: the table did not move"
    after = tables.read(uri).sort_values("request_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(after, before)
    rep = maintenance.maintain(s, spec, now=T0 + 3 * DAY_S)  # the next pass finishes the job
    assert rep["tables"]["inference"]["files_after"] == 3
    pd.testing.assert_frame_equal(tables.read(uri).sort_values("request_id").reset_index(drop=True), before)
    assert killed_mid_write, "the kill landed after compaction committed; the crash was not in the middle"


def test_stale_local_caches_are_removed_and_fresh_ones_kept(home):
    s, spec = get_settings().ensure(), _spec(local_cache_hours=24)
    old_trial = s.home / "ray_results" / "retrain-old" / "checkpoint_000001"
    orphan = s.home / "serving" / "soak-v3-abc123"
    fresh = s.home / "ray_results" / "retrain-now"
    for p in (old_trial, orphan, fresh):
        p.mkdir(parents=True)
        (p / "f").write_text("x")
    week_ago = time.time() - 7 * DAY_S
    for p in (old_trial / "f", old_trial, old_trial.parent, orphan / "f", orphan):
        os.utime(p, (week_ago, week_ago))
    assert sorted(maintenance.clean_local(s, spec, time.time(), dry_run=True)) == sorted([str(old_trial.parent), str(orphan)])
    assert old_trial.exists()
    maintenance.clean_local(s, spec, time.time())
    assert not old_trial.parent.exists() and not orphan.exists() and fresh.exists()


def test_gc_command_reports_and_refuses_in_one_line(served, tmp_path):
    import yaml

    s, spec, _ = served
    path = tmp_path / "soak.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    env = {"DRIFTLOOP_HOME": str(s.home)}
    dry = run_cli("gc", str(path), "--dry-run", env=env)
    assert dry.returncode == 0, dry.stderr
    assert "inference     300 files in use, 300 on storage" in dry.stdout and "would remove 0 folders" in dry.stdout
    assert maintenance.file_counts(logs.uris(s, spec)["inference"])["active"] == 300, "a dry run changes nothing"
    cutoff = time.time() - 90 * DAY_S  # gc runs on the real clock: the days served in 2026-05..09 past 90 days go
    kept = sum(1 for d in range(100) if T0 + d * DAY_S >= cutoff)
    real = run_cli("gc", str(path), env=env)
    assert real.returncode == 0, real.stderr
    line = f"inference     files 300 -> {kept} (on storage 300 -> {kept}), {1200 - 12 * kept} rows past 90 days deleted"
    assert line in real.stdout, real.stdout
    assert len(tables.read(logs.uris(s, spec)["feedback"])) == 12 * kept
    bad = run_cli("gc", "no-such-model", env=env)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "no such spec file" in bad.stderr, bad.stderr
