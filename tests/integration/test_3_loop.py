"""The closed loop on real Ray: drift -> exactly one retraining job -> gate -> promotion -> swap."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from driftloop.data import examples
from tests.conftest import run_cli
from tests.integration.conftest import wait_for, write_spec

pytestmark = pytest.mark.slow
F = examples.DIGITS_FEATURES


def retrain_jobs(dashboard: str, model: str) -> list:
    from ray.job_submission import JobSubmissionClient

    return [j for j in JobSubmissionClient(dashboard).list_jobs()
            if (j.submission_id or "").startswith(f"driftloop-retrain-{model}-")]


def test_twenty_simultaneous_triggers_make_one_job(settings, trained, ray_cluster, tmp_path):
    from driftloop.config import load_spec
    from driftloop.drift.policy import Trigger
    from driftloop.retrain import JobTracker

    from driftloop.retrain import FAIL_MARKER

    spec = load_spec(write_spec(tmp_path / "s.yaml", name="digitsburst"))
    (settings.state_dir / FAIL_MARKER.format(name="digitsburst")).write_text("the job itself is not under test")
    # 20 monitors (separate trackers, no shared memory) fire at once for the same champion
    def fire(i):
        return JobTracker(spec, settings).submit(Trigger(f"burst {i}", time.time(), 7), f"event-{i}")

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(fire, range(20)))
    ids = {r["job"]["submission_id"] for r in results}
    assert ids == {"driftloop-retrain-digitsburst-v7-g0"}
    assert len(retrain_jobs(ray_cluster["dashboard"], "digitsburst")) == 1


def test_failed_retraining_is_retried_and_leaves_the_champion(settings, trained, ray_cluster, tmp_path):
    from driftloop import registry
    from driftloop.config import load_spec
    from driftloop.drift.policy import Trigger
    from driftloop.retrain import FAIL_MARKER, JobTracker

    spec = load_spec(write_spec(tmp_path / "f.yaml", **{"retraining.max_retries": 1, "retraining.backoff_s": 0.5}))
    champion = registry.champion_version(settings, "digits")
    marker = settings.state_dir / FAIL_MARKER.format(name="digits")
    marker.write_text("injected by test")
    try:
        tracker = JobTracker(spec, settings)
        tracker.state["generation"] = 100  # ids of its own, apart from the end-to-end test's
        out = tracker.submit(Trigger("test failure", time.time(), champion), None)
        assert out["submitted"]
        job = wait_for(lambda: (j := tracker.tick()) and j.get("final") and j, 240, every=1, what="job to end")
    finally:
        marker.unlink()
    assert job["status"] == "FAILED" and job["attempt"] == 1  # retried once, per policy
    ids = {j.submission_id for j in retrain_jobs(ray_cluster["dashboard"], "digits")}
    assert {"driftloop-retrain-digits-v%d-g100" % champion, "driftloop-retrain-digits-v%d-g100-r1" % champion} <= ids
    assert registry.champion_version(settings, "digits") == champion
    st = run_cli("status", "digits")
    assert st.returncode == 0 and "FAILED" in st.stdout and "driftloop-retrain-digits-v%d-g100-r1" % champion in st.stdout
    tracker.path.unlink()  # leave no job history behind for the end-to-end test


def test_drift_triggers_one_job_that_promotes_and_swaps(settings, trained, serve_url, ray_cluster, tmp_path):
    """The whole loop, smaller: drifted labelled traffic -> policy -> one Ray job -> promoted -> new version answers."""
    from ray import serve

    from driftloop import registry
    from driftloop.replay import replay_async
    from driftloop.serving.app import build

    spec_path = write_spec(tmp_path / "loop.yaml", **{
        "training.epochs": 8, "retraining.min_labelled_rows": 300, "retraining.cooldown_s": 0,
        "retraining.policy": {"k": 1, "m": 1, "online_alarm": True}})
    champion = registry.champion_version(settings, "digits")
    before = {j.submission_id for j in retrain_jobs(ray_cluster["dashboard"], "digits")}
    serve.run(build({"spec": str(spec_path)}), name="loop", route_prefix="/loop")
    app = f"{serve_url}/loop"
    pool = examples.builtin("digits").pool
    try:
        seed, new_version = 300, None
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            chunk = examples.digits_stream(pool, 250, onset=0, kind="noise", severity=3, seed=seed)
            seed += 1
            r = asyncio.run(replay_async(serve_url, "loop", chunk, F, "digit", rps=0, labels=True, concurrency=8))
            assert r.failed == 0
            if any(v != champion for v in r.versions):
                new_version = max(r.versions)
                break
        st = httpx.get(f"{app}/drift", timeout=30).json()
        assert new_version is not None, st["retraining"]
        jobs = [j for j in retrain_jobs(ray_cluster["dashboard"], "digits") if j.submission_id not in before]
        assert len(jobs) == 1 and jobs[0].submission_id.startswith(f"driftloop-retrain-digits-v{champion}-g")
        assert registry.champion_version(settings, "digits") == new_version
        tags = registry.version_tags(settings, "digits", new_version)
        assert tags["gate.decision"] == "promoted"
        assert tags["lineage.job_id"] == jobs[0].submission_id and tags["lineage.drift_event"]
        assert float(tags["gate.challenger_score"]) > float(tags["gate.champion_score"])
        status = run_cli("status", "digits")
        assert tags["lineage.drift_event"] in status.stdout and jobs[0].submission_id in status.stdout
    finally:
        serve.delete("loop")
