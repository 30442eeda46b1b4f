"""The retraining-job bookkeeping that needs no Ray: ids, metadata, sequences, plans, backoff, environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from ray.job_submission import JobDetails, JobStatus, JobType

from driftloop import job_sequences, jobs
from driftloop.drift.policy import Trigger
from driftloop.settings import Settings

from tests.conftest import free_port

T0 = 1_800_000_000.0


def job(sid: str, status: str, meta: dict | None, start: float, end: float | None = None, message: str = "") -> JobDetails:
    """A Jobs API record as `list_jobs()` returns it (Ray's own pydantic model)."""
    return JobDetails(type=JobType.SUBMISSION, submission_id=sid, status=JobStatus(status), entrypoint="python -m x",
                      metadata=meta, start_time=int(start * 1000), end_time=int(end * 1000) if end else None,
                      message=message or None)


def meta(trig: Trigger, generation: int, attempt: int = 0, max_retries: int = 2, backoff: float = 10.0) -> dict:
    m = jobs.trigger_metadata("digits", trig, generation, None, max_retries, backoff, trig.at)
    return {**m, "attempt": str(attempt)}


def seqs_of(*records: JobDetails) -> list[jobs.Sequence]:
    return jobs.group(jobs.attempts_of("digits", records))


def test_submission_ids_parse_back_and_other_models_are_not_ours():
    assert jobs.parse_submission_id("digits", "driftloop-retrain-digits-v3-g7") == (3, 7, 0)
    assert jobs.parse_submission_id("digits", "driftloop-retrain-digits-v3-g7-r2") == (3, 7, 2)
    assert jobs.parse_submission_id("digits", "driftloop-retrain-digitsburst-v3-g0") is None
    assert jobs.parse_submission_id("a", "driftloop-retrain-a-v1-v3-g0") is None  # model "a-v1", not "a"
    assert jobs.parse_submission_id("digits", "raysubmit_abc") is None
    assert jobs.parse_submission_id("digits", None) is None


def test_only_the_same_trigger_may_reuse_a_job():
    """Regression (defect 1): 'already exists' counted as success whoever held the id."""
    a = meta(Trigger("drift", T0, 3), 0)
    assert jobs.same_trigger(a, dict(a, attempt="1", submitted_at="x"))  # a retry of the same trigger
    assert not jobs.same_trigger(a, meta(Trigger("drift", T0 + 1, 3), 0))  # a later trigger
    assert not jobs.same_trigger(a, meta(Trigger("drift", T0, 4), 0))  # another champion
    assert not jobs.same_trigger(a, {"model": "digits", "reason": "old job without identity"})


def test_a_trigger_during_retry_backoff_joins_the_sequence_not_the_failed_attempt():
    """Regression (defect 1): a second trigger while attempt 0 waits for its retry joins the sequence; it does
    not count as submitted and does not restart the retries from attempt 0."""
    first = Trigger("drift", T0, 3)
    seqs = seqs_of(job("driftloop-retrain-digits-v3-g0", "FAILED", meta(first, 0), T0 + 1, T0 + 5))
    kind, seq = jobs.plan("digits", Trigger("manual", T0 + 6, 3), seqs)
    assert kind == "join" and seq.latest.submission_id == "driftloop-retrain-digits-v3-g0"
    assert not seq.final and seq.next_retry_at() == pytest.approx(T0 + 5 + 10)
    assert "retry backoff" in jobs.why(kind, seq)


def test_a_restarted_monitor_handing_in_its_trigger_again_gets_that_trigger_s_job():
    trig = Trigger("drift", T0, 3)
    seqs = seqs_of(job("driftloop-retrain-digits-v3-g4", "SUCCEEDED", meta(trig, 4), T0 + 1, T0 + 50))
    assert jobs.plan("digits", trig, seqs)[0] == "own"


def test_after_a_final_sequence_a_new_trigger_gets_a_new_generation():
    """Regression (defect 2): a new trigger must never map onto an old SUCCEEDED job."""
    old = Trigger("drift", T0, 3)
    seqs = seqs_of(job("driftloop-retrain-digits-v3-g0", "SUCCEEDED", meta(old, 0), T0 + 1, T0 + 50))
    assert jobs.plan("digits", Trigger("drift", T0 + 60, 3), seqs) == ("new", None)
    assert jobs.next_generation(seqs) == 1
    # decided while that job ran (a delayed hand-in), the same trigger is answered by it
    assert jobs.plan("digits", Trigger("drift", T0 + 20, 3), seqs)[0] == "covered"
    assert jobs.plan("digits", Trigger("drift", T0 + 20, 4), seqs)[0] == "new"  # not for another champion


def test_generation_counts_every_job_of_the_model_even_without_metadata():
    seqs = seqs_of(job("driftloop-retrain-digits-v1-g5", "FAILED", {"model": "digits", "reason": "pre-metadata"}, T0, T0 + 1),
                   job("driftloop-retrain-digits-v2-g2", "SUCCEEDED", meta(Trigger("x", T0, 2), 2), T0, T0 + 1),
                   job("driftloop-retrain-other-v1-g9", "SUCCEEDED", {"model": "other"}, T0, T0 + 1))
    assert jobs.next_generation(seqs) == 6 and jobs.next_generation([]) == 0


def test_retries_follow_the_policy_the_trigger_was_submitted_under():
    trig = Trigger("drift", T0, 3)
    m = meta(trig, 1, max_retries=1, backoff=0.5)
    seqs = seqs_of(job("driftloop-retrain-digits-v3-g1", "FAILED", m, T0, T0 + 2),
                   job("driftloop-retrain-digits-v3-g1-r1", "FAILED", dict(m, attempt="1"), T0 + 3, T0 + 4, "boom\nmore"))
    (seq,) = seqs
    assert seq.final and seq.next_retry_at() is None  # 1 retry allowed, 1 made
    v = seq.view()
    assert v["submission_id"].endswith("-g1-r1") and v["base_id"].endswith("-g1") and v["attempt"] == 1
    assert v["final"] and v["status"] == "FAILED" and v["message"] == "boom" and v["trigger_at"] == T0
    assert [r["status"] for r in v["runs"]] == ["FAILED", "FAILED"]


def test_a_running_retry_and_a_stopped_job():
    trig = Trigger("drift", T0, 3)
    (seq,) = seqs_of(job("driftloop-retrain-digits-v3-g0", "FAILED", meta(trig, 0), T0, T0 + 1),
                     job("driftloop-retrain-digits-v3-g0-r1", "RUNNING", meta(trig, 0, 1), T0 + 20))
    assert not seq.final and seq.latest.attempt == 1 and seq.next_retry_at() is None
    (stopped,) = seqs_of(job("driftloop-retrain-digits-v3-g0", "STOPPED", meta(trig, 0), T0, T0 + 1))
    assert stopped.final, "a person stopped it: not retried"


def test_submission_backoff_is_exponential_capped_and_never_gives_up():
    assert [jobs.backoff_s(n) for n in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    assert jobs.backoff_s(50) == job_sequences.SUBMIT_BACKOFF_CAP_S
    h = jobs.PathHealth()
    assert h.error()["error"] is None and h.due("submit", T0)
    for i in range(5):
        h.failed("submit", "Ray Jobs API at x: 500 No available agent", T0 + i)
    e = h.error()
    assert (e["error"], e["since"], e["attempts"]) == ("Ray Jobs API at x: 500 No available agent", T0, 5)
    assert not h.due("submit", T0 + 5) and h.due("submit", T0 + 4 + job_sequences.SUBMIT_BACKOFF_CAP_S)
    assert h.submit_failures == 5
    h.ok("submit")
    assert h.error()["error"] is None and h.submit_failures == 5  # the counter only grows


def test_no_credential_reaches_a_job_a_replica_or_a_local_ray(tmp_path: Path, monkeypatch):
    """One filter (driftloop.envs) for the three environments that leave this process."""
    import yaml

    from driftloop import envs
    from driftloop.serving.deploy import prepare_config

    s = Settings(home=tmp_path, data_root=str(tmp_path / "t"), tracking_uri="postgresql://ml:hunter2@db/mlflow", ray_address=None)
    environ = {"DRIFTLOOP_POLL_S": "1", "DRIFTLOOP_ADMIN_TOKEN": "t", "MLFLOW_TRACKING_PASSWORD": "p",
               "MLFLOW_S3_SECRET_ACCESS_KEY": "k", "MLFLOW_TRACKING_USERNAME": "ml", "HOME": "/root",
               "DRIFTLOOP_X_URI": "https://u:pw@h/x", "DRIFTLOOP_ADMIN_TOKEN_FILE": "/run/secrets/admin"}
    env = envs.shared_env(s, environ)
    assert env["DRIFTLOOP_POLL_S"] == "1" and env["MLFLOW_TRACKING_USERNAME"] == "ml" and "HOME" not in env
    assert env["DRIFTLOOP_ADMIN_TOKEN_FILE"] == "/run/secrets/admin"  # a path to a secret may travel
    assert not any(k in env for k in ("DRIFTLOOP_ADMIN_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_S3_SECRET_ACCESS_KEY"))
    assert env["MLFLOW_TRACKING_URI"] == "postgresql://ml@db/mlflow" and env["DRIFTLOOP_X_URI"] == "https://u@h/x"
    assert "hunter2" not in str(env) and "pw@" not in str(env)
    # the Serve config path uses the same filter
    for k, v in environ.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DRIFTLOOP_HOME", str(tmp_path))
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(yaml.safe_dump({"applications": [{"name": "a", "route_prefix": "/a", "import_path": "driftloop.serving.app:build",
                                                     "args": {"spec": "configs/digits.yaml"}}]}))
    replica_env = prepare_config(cfg)["applications"][0]["runtime_env"]["env_vars"]
    assert "DRIFTLOOP_ADMIN_TOKEN" not in replica_env and "MLFLOW_TRACKING_PASSWORD" not in replica_env
    assert replica_env["DRIFTLOOP_ADMIN_TOKEN_FILE"] == "/run/secrets/admin" and replica_env["DRIFTLOOP_POLL_S"] == "1"


def test_a_monitor_s_pending_record_becomes_its_trigger():
    t = jobs.trigger_from({"reason": "r", "at": T0, "champion": 3, "event_id": "e1", "cause": "drift event e1"})
    assert (t.reason, t.at, t.champion_version) == ("r", T0, 3)
    assert getattr(t, "event_id", "e1") == "e1" and getattr(t, "cause", "drift event e1") == "drift event e1"
    assert jobs.trigger_from({"reason": "r", "at": T0, "champion": None}).champion_version is None


def test_error_lines_are_one_line():
    assert jobs.one_line(RuntimeError("Request failed with status code 500: No available agent.\nmore")) == \
        "Request failed with status code 500: No available agent."
    tb = "Request failed with status code 500: Traceback (most recent call last):\n  File x\nValueError: bad"
    assert jobs.one_line(tb) == "Request failed with status code 500: ValueError: bad"


def test_a_jobs_api_nobody_answers_is_an_error_not_no_jobs():
    """Regression (defect 2): the Jobs API is the source of truth, so not reaching it is an error, never 'none'."""
    port = free_port()  # a port nothing listens on: connection refused
    view = jobs.JobsView("digits", address=f"http://127.0.0.1:{port}")
    with pytest.raises(jobs.RetrainPathDown, match=f"127.0.0.1:{port}"):
        view.refresh()
    st = view.status()
    assert st["error"] and st["attempts"] == 1 and st["since"] and st["current"] is None


def test_a_retraining_job_carries_its_spec_on_its_command_line_not_as_a_file_of_this_node(home, tmp_path):
    """The job may run on another node, which has none of this node's DRIFTLOOP_HOME: the entrypoint holds the
    spec itself, and the job reads back the same spec from it."""
    import shlex

    from driftloop.config import load_spec
    from driftloop.retrain import spec_argument
    from driftloop.settings import get_settings

    spec = load_spec(Path(__file__).resolve().parents[2] / "configs" / "digits.yaml")
    tracker = jobs.JobTracker(spec, get_settings())
    trig = Trigger("drift in 2 of the last 3 windows", 1_700_000_000.0, 3)
    argv = shlex.split(tracker._entrypoint("driftloop-retrain-digits-v3-g0", meta(trig, 0)))
    assert not any(str(home) in a for a in argv), argv
    config = argv[argv.index("--config") + 1]
    assert spec_argument(config) == spec
    with pytest.raises(ValueError, match="--config: not valid JSON"):
        spec_argument("{not json")
    with pytest.raises(ValueError, match="no such spec file"):
        spec_argument(str(tmp_path / "nowhere.yaml"))


def test_a_node_keeps_its_own_home_under_an_object_store_data_root(tmp_path: Path):
    """Local data root: every process shares the one home (the sqlite store, the tables). s3:// data root: the home
    is each node's own cache, so a job or a replica on another node keeps the DRIFTLOOP_HOME its node started with."""
    from driftloop import envs

    environ = {"DRIFTLOOP_HOME": "/head/home", "DRIFTLOOP_POLL_S": "1"}
    local = Settings(home=tmp_path, data_root=str(tmp_path / "t"), tracking_uri="sqlite:///x.db", ray_address=None)
    assert envs.shared_env(local, environ)["DRIFTLOOP_HOME"] == str(tmp_path)
    remote = Settings(home=tmp_path, data_root="s3://b/dl", tracking_uri="http://mlflow:5000", ray_address="h:6379")
    env = envs.shared_env(remote, environ)
    assert "DRIFTLOOP_HOME" not in env and env["DRIFTLOOP_DATA_ROOT"] == "s3://b/dl" and env["DRIFTLOOP_POLL_S"] == "1"


def test_where_a_retraining_job_runs():
    assert jobs.entrypoint_placement({}) == {}
    assert jobs.entrypoint_placement({"DRIFTLOOP_RETRAIN_RESOURCES": '{"CPU": 1, "GPU": 0.5, "retrain": 1}'}) == {
        "entrypoint_num_cpus": 1, "entrypoint_num_gpus": 0.5, "entrypoint_resources": {"retrain": 1}}
    for bad in ('retrain', '["CPU"]', '{"CPU": "one"}', '{"CPU": -1}'):
        with pytest.raises(ValueError, match="DRIFTLOOP_RETRAIN_RESOURCES=.* is not a JSON object of resource amounts"):
            jobs.entrypoint_placement({"DRIFTLOOP_RETRAIN_RESOURCES": bad})
