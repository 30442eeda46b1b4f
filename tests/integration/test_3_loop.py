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


# Jobs here fail at once, for real: the spec names a table that was never ingested, so the job has no data
# (nothing in driftloop knows it is under test). Tests about the retraining path then train nothing.
NO_DATA = {"dataset.table": "never-ingested"}


def retrain_jobs(dashboard: str, model: str) -> list:
    from ray.job_submission import JobSubmissionClient

    return [j for j in JobSubmissionClient(dashboard).list_jobs()
            if (j.submission_id or "").startswith(f"driftloop-retrain-{model}-")]


def test_twenty_simultaneous_triggers_make_one_job(settings, ray_cluster, tmp_path):
    from driftloop.config import load_spec
    from driftloop.drift.policy import Trigger
    from driftloop.jobs import JobTracker

    spec = load_spec(write_spec(tmp_path / "s.yaml", name="digitsburst", **NO_DATA))
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
    from driftloop.jobs import JobTracker

    spec = load_spec(write_spec(tmp_path / "f.yaml", **{"retraining.max_retries": 1, "retraining.backoff_s": 0.5}, **NO_DATA))
    champion = registry.champion_version(settings, "digits")
    tracker = JobTracker(spec, settings)  # its generation comes from the Jobs API: ids apart from other tests'
    out = tracker.submit(Trigger("test failure", time.time(), champion), None)
    assert out["submitted"], out
    base = out["job"]["submission_id"]
    assert base.startswith(f"driftloop-retrain-digits-v{champion}-g")
    job = wait_for(lambda: (j := tracker.tick()) and j.get("final") and j, 240, every=1, what="job to end")
    assert job["status"] == "FAILED" and job["attempt"] == 1 and job["base_id"] == base  # retried once, per policy
    ids = {j.submission_id for j in retrain_jobs(ray_cluster["dashboard"], "digits")}
    assert {base, f"{base}-r1"} <= ids
    assert registry.champion_version(settings, "digits") == champion
    st = run_cli("status", "digits")
    assert st.returncode == 0 and "FAILED" in st.stdout and f"{base}-r1" in st.stdout, st.stdout + st.stderr


def test_drift_triggers_one_job_that_promotes_and_swaps(settings, trained, serve_url, ray_cluster, tmp_path):
    """The whole loop, smaller: drifted labelled traffic -> policy -> one Ray job -> promoted -> new version answers."""
    from ray import serve

    from driftloop import registry
    from driftloop.replay import replay_async
    from driftloop.serving.app import build

    spec_path = write_spec(tmp_path / "loop.yaml", **{
        "training.epochs": 8, "retraining.min_labelled_rows": 300, "retraining.cooldown_s": 0,
        "retraining.policy": {"k": 2, "m": 2, "online_alarm": True}})
    champion = registry.champion_version(settings, "digits")
    before = {j.submission_id for j in retrain_jobs(ray_cluster["dashboard"], "digits")}
    serve.run(build({"spec": str(spec_path)}), name="loop", route_prefix="/loop")
    app = f"{serve_url}/loop"
    pool = examples.builtin("digits").pool
    t0 = time.monotonic()
    try:
        seed, new_version = 300, None
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:  # drifted labelled traffic until the monitor has submitted a job ...
            chunk = examples.digits_stream(pool, 250, onset=0, kind="noise", severity=3, seed=seed)
            seed += 1
            r = asyncio.run(replay_async(serve_url, "loop", chunk, F, "digit", rps=0, labels=True, concurrency=8, batch=10))
            assert r.failed == 0
            job = httpx.get(f"{app}/drift", timeout=30).json()["retraining"]["current"]
            if job and job["submission_id"] not in before:
                break
        t_job = time.monotonic()
        # ... then quiet, so the job has the CPUs (2 here), until the new version answers
        new_version = wait_for(lambda: (v := httpx.get(f"{app}/healthz", timeout=30).json()["model_version"]) != champion and v,
                               max(30.0, deadline - time.monotonic()), every=1, what="the new champion to answer")
        t_swap = time.monotonic()
        st = httpx.get(f"{app}/drift", timeout=30).json()
        assert new_version is not None, st["retraining"]
        jobs = [j for j in retrain_jobs(ray_cluster["dashboard"], "digits") if j.submission_id not in before]
        assert len(jobs) == 1 and jobs[0].submission_id.startswith(f"driftloop-retrain-digits-v{champion}-g")
        assert registry.champion_version(settings, "digits") == new_version
        tags = registry.version_tags(settings, "digits", new_version)
        assert tags["gate.decision"] == "promoted"
        assert tags["lineage.job_id"] == jobs[0].submission_id and tags["lineage.drift_event"]
        assert float(tags["gate.challenger_score"]) > float(tags["gate.champion_score"])
        assert tags["lineage.cause"] == f"drift event {tags['lineage.drift_event']}"
        assert tags["reference.source"].endswith("not trained on"), tags["reference.source"]  # the new regime's rows
        status = run_cli("status", "digits")
        assert tags["lineage.drift_event"] in status.stdout and jobs[0].submission_id in status.stdout

        # The loop converges: the same drifted regime, now served by the new champion, looks like its reference.
        wait_for(lambda: httpx.get(f"{app}/drift", timeout=30).json()["model_version"] == new_version, 60,
                 what="the monitor to swap detectors")
        after = examples.digits_stream(pool, 2250, onset=0, kind="noise", severity=3, seed=seed + 100)
        r = asyncio.run(replay_async(serve_url, "loop", after, F, "digit", rps=0, labels=True, concurrency=8, batch=10))
        assert r.failed == 0 and set(r.versions) == {new_version}
        assert r.accuracy >= 0.85, r.summary()
        st = wait_for(lambda: (s := httpx.get(f"{app}/drift", timeout=30).json()) and s["samples"] >= 2250 and s, 60,
                      what="the monitor to see the rows")
        on_new = [w for w in st["recent"] if w["model_version"] == new_version]
        flagged = [w["index"] for w in on_new if w["is_drift"]]
        print(f"after the swap: {len(flagged)} of {len(on_new)} windows on v{new_version} flagged; accuracy {r.accuracy:.3f}; "
              f"seconds: traffic until the job {t_job - t0:.0f}, job until the swap {t_swap - t_job:.0f}, "
              f"the new regime's {len(after)} rows {time.monotonic() - t_swap:.0f}")
        assert len(on_new) >= 4 and len(flagged) <= 1, on_new
        later = {j.submission_id for j in retrain_jobs(ray_cluster["dashboard"], "digits")} - before
        assert later == {jobs[0].submission_id}, f"a retrain storm: {sorted(later)}"
        assert st["policy"]["windows_since_swap"] >= 4 and st["policy"]["swapped_at"] is not None

        # The live page in a real browser, after drift -> retrain -> swap: it shows the drift event, the job and
        # the new champion, and asks nothing of any host but the app's own.
        from urllib.parse import urlparse

        from tests.conftest import ROOT
        from tests.integration.browser import open_page

        event, job_id = tags["lineage.drift_event"], jobs[0].submission_id
        shot = ROOT / "test-output" / "ui-after-swap.png"

        def shows_the_loop(page):
            assert f"v{new_version}" == page.text("#champion").strip(), page.text("#champion")
            assert job_id in page.text("#jobs"), page.text("#jobs")
            assert event in page.text("#lineage") and job_id in page.text("#lineage"), page.text("#lineage")
            assert event in page.text("#history"), page.text("#history")
            assert page.js("document.querySelectorAll('#detectors svg').length") >= 1, "no detector chart"

        requested = open_page(f"{app}/ui", tmp_path / "chromium", f"document.body.innerText.includes({job_id!r}) && "
                              f"document.querySelector('#lineage').innerText.includes({event!r})", shows_the_loop, shot)
        print(f"the page asked for {len(requested)} URL(s): {sorted(set(requested))}; screenshot {shot}")
        assert requested and all(urlparse(u).hostname == "127.0.0.1" for u in requested), requested
        assert shot.stat().st_size > 10_000
    finally:
        serve.delete("loop")


def test_new_data_is_a_trigger_too(settings, trained, serve_url, ray_cluster, tmp_path):
    """`retraining.policy.new_data`: a batch below the minimum starts nothing; one that crosses it starts exactly one
    retraining job, whose model version names the data version that caused it."""
    from ray import serve

    from driftloop import registry
    from driftloop.data import tables
    from driftloop.serving.app import build

    spec_path = write_spec(tmp_path / "nd.yaml", **{
        "training.epochs": 3, "retraining.min_labelled_rows": 0, "retraining.cooldown_s": 0,
        "retraining.policy": {"k": 3, "m": 3, "online_alarm": False, "new_data": {"min_rows": 300}}})
    before = {j.submission_id for j in retrain_jobs(ray_cluster["dashboard"], "digits")}
    serve.run(build({"spec": str(spec_path)}), name="newdata", route_prefix="/newdata")
    uri = settings.table_uri("digits")
    pool = examples.builtin("digits").pool
    try:
        small = tmp_path / "small.csv"
        pool.iloc[:120].to_csv(small, index=False)
        ing = run_cli("data", "ingest", str(small), "--table", "digits", "--spec", str(spec_path))
        assert ing.returncode == 0, ing.stderr
        time.sleep(6)  # more than one new-data check (DRIFTLOOP_NEW_DATA_CHECK_S: 2 s here)
        assert {j.submission_id for j in retrain_jobs(ray_cluster["dashboard"], "digits")} == before, "120 < 300 rows"
        big = tmp_path / "big.csv"
        pool.iloc[120:320].to_csv(big, index=False)
        ing = run_cli("data", "ingest", str(big), "--table", "digits", "--spec", str(spec_path))
        assert ing.returncode == 0, ing.stderr
        crossed = tables.data_version(uri).version
        jobs = wait_for(lambda: [j for j in retrain_jobs(ray_cluster["dashboard"], "digits") if j.submission_id not in before],
                        60, what="a retraining job for the new data")
        ended = wait_for(lambda: (v := [m for m in registry.list_versions(settings, "digits") if m["job_id"] == jobs[0].submission_id])
                         and v[0], 300, every=2, what="the job's model version")
        tags = registry.version_tags(settings, "digits", ended["version"])
        assert tags["lineage.cause"] == f"data version {crossed}" and tags["lineage.drift_event"] == ""
        assert int(tags["data.version"]) >= crossed
        time.sleep(6)  # further checks find nothing new: the same rows never trigger twice
        after = {j.submission_id for j in retrain_jobs(ray_cluster["dashboard"], "digits")} - before
        assert after == {jobs[0].submission_id}, sorted(after)
    finally:
        serve.delete("newdata")


# --- the retraining path: the Jobs API is the record, and a dead path is loud and retried until it works -------


class NoAgentDashboard:
    """A real HTTP front for the session's dashboard. While `broken`, it answers every job submission the way Ray
    2.60 does when the head's dashboard agent never bound its port (HTTP 500 "No available agent to submit job",
    seen when a Ray that had just stopped still held 52365); the version check, listing and job info pass through."""

    NO_AGENT = b"No available agent to submit job, please try again later."

    def __init__(self, upstream: str):
        import socket
        import threading
        from urllib.parse import urlparse

        self.upstream = urlparse(upstream)
        self.broken = True
        self.submissions_refused = 0
        self.server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.server.close()

    def _accept(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        import socket

        with conn:
            request = self._read_request(conn)
            if self.broken and request.startswith(b"POST /api/jobs/ "):
                self.submissions_refused += 1
                conn.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n%s" % (len(self.NO_AGENT), self.NO_AGENT))
                return
            head, _, body = request.partition(b"\r\n\r\n")
            lines = [ln for ln in head.split(b"\r\n") if not ln.lower().startswith(b"connection:")]
            with socket.create_connection((self.upstream.hostname, self.upstream.port), timeout=30) as up:
                up.sendall(b"\r\n".join(lines + [b"Connection: close"]) + b"\r\n\r\n" + body)
                while chunk := up.recv(65536):
                    conn.sendall(chunk)

    @staticmethod
    def _read_request(conn) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next((int(ln.split(b":", 1)[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")), 0)
        while len(body) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body


def refused_url() -> str:
    """An address where nothing listens: connection refused."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"




def test_a_trigger_during_retry_backoff_joins_the_sequence_not_the_failed_job(settings, ray_cluster, tmp_path):
    """Regression (defect 1): "already exists" counted as success, so a trigger arriving while a failed attempt
    waited for its retry inherited the failed job. Now it joins the sequence: no job of its own, no restart of
    the retry count, and the retry runs once."""
    from driftloop.config import load_spec
    from driftloop.drift.policy import Trigger
    from driftloop.jobs import JobTracker

    spec = load_spec(write_spec(tmp_path / "j.yaml", name="digitsjoin",
                                **{"retraining.max_retries": 1, "retraining.backoff_s": 8}, **NO_DATA))
    first = JobTracker(spec, settings)
    out = first.submit(Trigger("first", time.time(), 3))
    assert out["submitted"] and out["job"]["submission_id"] == "driftloop-retrain-digitsjoin-v3-g0"
    wait_for(lambda: (j := first.tick()) and j["status"] == "FAILED", 120, every=0.5, what="attempt 0 to fail")
    second = JobTracker(spec, settings).submit(Trigger("second, during the backoff", time.time(), 3))
    print("second trigger:", second["why"])
    assert not second["submitted"] and "retry backoff" in second["why"]
    assert second["job"]["base_id"] == "driftloop-retrain-digitsjoin-v3-g0" and second["job"]["next_retry_at"]
    job = wait_for(lambda: (j := first.tick()) and j["final"] and j, 120, every=0.5, what="the retry to end")
    assert job["status"] == "FAILED" and job["attempt"] == 1
    ids = sorted(j.submission_id for j in retrain_jobs(ray_cluster["dashboard"], "digitsjoin"))
    assert ids == ["driftloop-retrain-digitsjoin-v3-g0", "driftloop-retrain-digitsjoin-v3-g0-r1"]
    meta = next(j.metadata for j in retrain_jobs(ray_cluster["dashboard"], "digitsjoin") if j.submission_id.endswith("-r1"))
    assert meta["reason"] == "first" and meta["attempt"] == "1" and meta["model"] == "digitsjoin"


def test_the_jobs_api_is_the_record_not_a_local_file(settings, ray_cluster, tmp_path):
    """Regression (defect 2): a corrupt state file reset the generation to 0 (a new trigger mapped onto an old
    job, nothing retrained), and a stale RUNNING in it swallowed the first trigger after a restart. Trackers
    now derive both from the Jobs API: a fresh one (a restarted monitor, the CLI) sees what another submitted."""
    from ray.job_submission import JobSubmissionClient

    from driftloop.config import load_spec
    from driftloop.drift.policy import Trigger
    from driftloop.jobs import JobTracker, RetrainPathDown

    spec = load_spec(write_spec(tmp_path / "g.yaml", name="digitsgen", **{"retraining.max_retries": 0}, **NO_DATA))
    (settings.state_dir / "retrain-digitsgen.json").write_text('{"generation": 0, "current": {"status": "RUNN')
    out = JobTracker(spec, settings).submit(Trigger("before the restart", time.time(), 3))
    sid = out["job"]["submission_id"]
    assert out["submitted"] and sid == "driftloop-retrain-digitsgen-v3-g0"
    # that tracker is gone without ever looking at its job again (its process died); the job ends meanwhile
    c = JobSubmissionClient(ray_cluster["dashboard"])
    wait_for(lambda: c.get_job_status(sid).is_terminal(), 120, what="the job to end")
    restarted = JobTracker(spec, settings)
    again = restarted.submit(Trigger("after the restart", time.time(), 3))
    assert again["submitted"] and again["job"]["submission_id"] == "driftloop-retrain-digitsgen-v3-g1", again
    assert restarted.status()["history"][-1]["submission_id"] == sid
    wait_for(lambda: (j := restarted.tick()) and j["final"], 120, what="the second job to end")
    assert sorted(j.submission_id for j in retrain_jobs(ray_cluster["dashboard"], "digitsgen")) == \
        ["driftloop-retrain-digitsgen-v3-g0", "driftloop-retrain-digitsgen-v3-g1"]
    # a Jobs API that cannot be listed is an error, never "no jobs" (which would restart at generation 0)
    down = JobTracker(spec, settings, address=refused_url())
    refused = down.submit(Trigger("while the API is down", time.time(), 3))
    assert not refused["submitted"] and refused["job"] is None and "Ray Jobs API at" in refused["error"]
    with pytest.raises(RetrainPathDown):
        down.tick()


def test_a_dead_jobs_api_is_loud_and_retried_until_it_works(settings, trained, ray_cluster, tmp_path):
    """Regression (defect 3): the Jobs API answered every submission with HTTP 500 "No available agent", three
    attempts failed within ~65 s, the trigger was marked final, and nothing said so. Now a refused submission
    is an error with a time and a count, the CLI exits 1 saying why, and the trigger is taken once the API works."""
    from driftloop.config import load_spec
    from driftloop.drift.policy import Trigger
    from driftloop.jobs import JobTracker

    spec_path = write_spec(tmp_path / "dead.yaml", name="digitsdead", **{"retraining.max_retries": 0}, **NO_DATA)
    spec = load_spec(spec_path)
    dash = NoAgentDashboard(ray_cluster["dashboard"])
    try:
        tracker = JobTracker(spec, settings, address=dash.url)
        trig = Trigger("while the agent is gone", time.time(), 3)
        outs = [tracker.submit(trig) for _ in range(4)]  # more than the old code's 3 attempts: never given up
        assert all(not o["submitted"] and "No available agent" in o["error"] for o in outs), outs[-1]
        st = tracker.status()
        assert st["attempts"] == 4 and st["since"] and "No available agent" in st["error"] and st["submit_failures"] == 4
        assert retrain_jobs(ray_cluster["dashboard"], "digitsdead") == []
        cli = run_cli("retrain", str(spec_path), "--no-wait", env={"DRIFTLOOP_JOBS_ADDRESS": dash.url})
        print("retrain --no-wait:", cli.returncode, cli.stderr.strip())
        assert cli.returncode == 1 and "No available agent" in cli.stderr and len(cli.stderr.strip().splitlines()) == 1
        cli = run_cli("status", "digits", env={"DRIFTLOOP_JOBS_ADDRESS": refused_url()})
        print("status, Jobs API unreachable:", cli.returncode, cli.stderr.strip())
        assert cli.returncode == 1 and "retraining path is failing" in cli.stderr and "FAILING since" in cli.stdout
        dash.broken = False  # the agent is back: the same trigger is taken, exactly once
        out = tracker.submit(trig)
        assert out["submitted"] and tracker.status()["error"] is None
        assert tracker.submit(trig)["why"] == "this trigger already has a job"
        wait_for(lambda: (j := tracker.tick()) and j["final"], 120, what="the job to end")
    finally:
        dash.close()
    assert [j.submission_id for j in retrain_jobs(ray_cluster["dashboard"], "digitsdead")] == [out["job"]["submission_id"]]


def test_the_monitor_counts_shows_and_outlasts_a_dead_retraining_path(settings, trained, serve_url, ray_cluster, tmp_path):
    """Regression (defect 3), in the served app: refused submissions count in Prometheus, `/drift` shows the error,
    `driftloop status --url` exits 1, and the monitor keeps the trigger and retries it until the API takes it."""
    import ray
    from ray import serve

    from driftloop.config import load_spec
    from driftloop.serving.app import DriftMonitor, Predictor

    spec = load_spec(write_spec(tmp_path / "mon.yaml", **{"retraining.max_retries": 0,
                                                           "retraining.min_labelled_rows": 10**9, **NO_DATA}))
    d = spec.model_dump(mode="json")
    dash = NoAgentDashboard(ray_cluster["dashboard"])
    before = {j.submission_id for j in retrain_jobs(ray_cluster["dashboard"], "digits")}
    opts = {"num_cpus": 0.1, "runtime_env": {"env_vars": {"DRIFTLOOP_JOBS_ADDRESS": dash.url}}}
    serve.run(Predictor.bind(DriftMonitor.options(ray_actor_options=opts).bind(d), d), name="deadpath", route_prefix="/digits")
    drift = f"{serve_url}/digits/drift"
    try:
        out = serve.get_deployment_handle("DriftMonitor", app_name="deadpath").trigger.remote("test").result()
        assert not out["submitted"] and "No available agent" in out["error"], out
        st = wait_for(lambda: (r := httpx.get(drift, timeout=30).json()["retraining"]) and r["attempts"] >= 2 and r,
                      60, what="the monitor to retry")
        print("/drift retraining while the path is dead:", {k: st[k] for k in ("error", "since", "attempts")})
        assert "No available agent" in st["error"] and st["since"]
        # the Jobs API is the record: `current` may show a job an earlier app ran for this model, never a new one
        assert st["current"] is None or st["current"]["submission_id"] in before, st["current"]
        cli = run_cli("status", "digits", "--url", serve_url)
        print("status --url:", cli.returncode, cli.stderr.strip())
        assert cli.returncode == 1 and "live drift monitor reports" in cli.stderr and "No available agent" in cli.stderr
        port = ray.nodes()[0]["MetricsExportPort"]
        line = wait_for(lambda: next((ln for ln in _metrics(port).splitlines() if ln.startswith("ray_driftloop_retrain_submit_failures")
                                      and 'model="digits"' in ln and float(ln.rsplit(" ", 1)[1]) >= 2), None),
                        90, every=2, what="the submit-failure counter at 2 or more")
        print("metric:", line.split("{")[0], line.rsplit(" ", 1)[1])
        dash.broken = False
        st = wait_for(lambda: (r := httpx.get(drift, timeout=30).json()["retraining"]) and r["error"] is None
                      and r["current"] and r, 90, what="the kept trigger to be taken")
        new = [j.submission_id for j in retrain_jobs(ray_cluster["dashboard"], "digits") if j.submission_id not in before]
        assert new == [st["current"]["submission_id"]], new
        wait_for(lambda: httpx.get(drift, timeout=30).json()["retraining"]["current"]["final"], 120, what="the job to end")
    finally:
        serve.delete("deadpath")
        dash.close()


def _metrics(port) -> str:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return ""


def test_a_fresh_local_ray_takes_jobs_while_the_fixed_agent_port_is_held(settings, tmp_path):
    """Regression (defect 4): back-to-back commands each starting a local Ray collided on the dashboard agent's
    fixed port 52365; the second Ray's Jobs API then refused every job. `ensure_ray` now lets the agent bind any
    free port: with 52365 held, a fresh local Ray still runs a job."""
    import os
    import socket
    import subprocess
    import sys

    from tests.conftest import ROOT

    try:
        holder = socket.create_server(("127.0.0.1", 52365))  # held by us, or already by a running Ray: either way held
    except OSError:
        holder = None
    script = (
        "import time\n"
        "from ray.job_submission import JobSubmissionClient\n"
        "from driftloop.cluster import dashboard_url, ensure_ray\n"
        "from driftloop.settings import get_settings\n"
        "ensure_ray(get_settings())\n"
        "c = JobSubmissionClient(dashboard_url())\n"
        "sid = c.submit_job(entrypoint='true')\n"
        "end = time.time() + 90\n"
        "while not c.get_job_status(sid).is_terminal() and time.time() < end:\n"
        "    time.sleep(0.5)\n"
        "print('JOB', c.get_job_status(sid).value)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DRIFTLOOP_JOBS_ADDRESS")}
    env.update(DRIFTLOOP_HOME=str(tmp_path / "home"), RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION="0.02")
    try:
        r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    finally:
        if holder is not None:
            holder.close()
    assert "JOB SUCCEEDED" in r.stdout, (r.stdout + r.stderr)[-3000:]


def test_a_head_check_refuses_a_jobs_api_that_takes_no_job(ray_cluster):
    """Defect 4: `driftloop serve` (and `retrain`) check that the head's Jobs API runs a job before they return."""
    from ray.job_submission import JobSubmissionClient

    from driftloop.errors import LoopError
    from driftloop.jobs import check_accepts_jobs
    from driftloop.serving.deploy import check_jobs_api

    seconds = check_accepts_jobs(ray_cluster["dashboard"])
    print(f"a trivial job took {seconds:.1f} s")
    probes = [j for j in JobSubmissionClient(ray_cluster["dashboard"]).list_jobs() if (j.submission_id or "").startswith("driftloop-probe-")]
    assert probes == [], "a probe is not part of the record"
    dash = NoAgentDashboard(ray_cluster["dashboard"])
    try:
        with pytest.raises(LoopError, match="No available agent") as err:
            check_jobs_api(dash.url, timeout_s=5)
    finally:
        dash.close()
    print("head check:", err.value)
    assert len(str(err.value).splitlines()) == 1 and dash.submissions_refused >= 2
