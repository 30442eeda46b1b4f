"""Closing the loop: the retraining job (`jobs/retrain.py` / `python -m driftloop.retrain`) and the tracker
the drift monitor uses to submit it through the Ray Jobs API exactly once per trigger.

The job: new data version = the model's table + labelled production rows (inference log ⋈ feedback,
validated like any ingest) → Ray Train on the champion's hyperparameters → challenger and champion
scored on the same held-out recent labelled rows → gate → detectors refit → register → promote.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from driftloop.config import Spec, load_spec
from driftloop.drift.policy import Trigger, submission_id
from driftloop.settings import Settings, get_settings

log = logging.getLogger("driftloop.retrain")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
FAIL_MARKER = "fail-retrain-{name}"  # fault injection for tests: the job fails while this file exists


def ray_token_headers() -> dict[str, str]:
    """Authorization header for a Jobs API with Ray token auth on (RAY_AUTH_TOKEN or ~/.ray/auth_token)."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def jobs_client(address: str | None = None):
    from ray.job_submission import JobSubmissionClient

    if address is None:
        from driftloop.cluster import dashboard_url

        address = os.environ.get("DRIFTLOOP_JOBS_ADDRESS") or dashboard_url()
    return JobSubmissionClient(address, headers=ray_token_headers() or None)


class JobTracker:
    """Submits retraining jobs with deterministic submission ids, tracks them, retries failures with backoff."""

    def __init__(self, spec: Spec, settings: Settings, address: str | None = None):
        self.spec = spec
        self.settings = settings
        self.address = address
        self._client = None
        self._lock = threading.Lock()
        self.path = settings.state_dir / f"retrain-{spec.name}.json"
        self.state: dict[str, Any] = {"generation": 0, "current": None, "history": []}
        if self.path.is_file():
            try:
                self.state = json.loads(self.path.read_text())
            except ValueError:
                pass

    def _save(self) -> None:
        self.settings.ensure()
        tmp = self.path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")  # writers never share a temp file
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.path)

    @property
    def client(self):
        if self._client is None:
            self._client = jobs_client(self.address)
        return self._client

    def _spec_file(self) -> Path:
        p = self.settings.state_dir / "specs" / f"{self.spec.name}.json"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.spec.model_dump(mode="json")))
        return p

    def _submit_once(self, sid: str, job: dict[str, Any]) -> str:
        """Submit under `sid`; an id that already exists means another trigger won the race: reuse it."""
        entry = [sys.executable, "-m", "driftloop.retrain", "--config", str(self._spec_file()), "--job-id", sid,
                 "--reason", json.dumps(job["reason"])]
        if job.get("event_id"):
            entry += ["--drift-event", job["event_id"]]
        env = {k: v for k, v in os.environ.items() if k.startswith(("DRIFTLOOP_", "MLFLOW_")) and "TOKEN" not in k}
        env.update({"DRIFTLOOP_HOME": str(self.settings.home), "MLFLOW_TRACKING_URI": self.settings.tracking_uri,
                    "DRIFTLOOP_DATA_ROOT": self.settings.data_root})
        try:
            self.client.submit_job(entrypoint=" ".join(_quote(a) for a in entry), submission_id=sid,
                                   runtime_env={"env_vars": env}, metadata={"model": self.spec.name, "reason": job["reason"][:200]})
        except Exception as err:  # RuntimeError: "Job with submission_id ... already exists"
            if "already exists" not in str(err):
                raise
        return sid

    def submit(self, trig: Trigger, event_id: str | None) -> dict[str, Any]:
        """One job per (model, champion, generation): simultaneous triggers collapse onto it."""
        with self._lock:
            cur = self.state.get("current")
            if cur and cur.get("status") not in TERMINAL:
                return {"submitted": False, "job": cur, "why": "a retraining job is already running"}
            for seen in [cur] + self.state.get("history", []):
                if seen and seen.get("trigger_at") == trig.at:  # a restarted monitor handing in the same trigger again
                    return {"submitted": False, "job": seen, "why": "this trigger already has a job"}
            sid = submission_id(self.spec.name, trig.champion_version, self.state["generation"])
            job = {"submission_id": sid, "base_id": sid, "attempt": 0, "status": "PENDING", "reason": trig.reason,
                   "event_id": event_id, "champion_before": trig.champion_version, "submitted_at": time.time(),
                   "trigger_at": trig.at, "next_retry_at": None}
            self.state["current"] = job
            self._save()
        try:
            self._submit_once(sid, job)
        except Exception as err:  # the Jobs API is unreachable: count it as a failed attempt, retried by tick()
            with self._lock:
                job["status"], job["status_error"] = "FAILED", f"submission failed: {str(err).splitlines()[0][:200]}"
                self._save()
            return {"submitted": False, "job": job, "why": job["status_error"]}
        return {"submitted": True, "job": job}

    def tick(self) -> dict[str, Any] | None:
        """Refresh the current job's status; retry a failed one after backoff, up to the limit."""
        with self._lock:
            job = self.state.get("current")
            if not job or job.get("final"):
                return job
            try:
                status = job["status"] if job.get("status_error", "").startswith("submission failed") else \
                    str(self.client.get_job_status(job["submission_id"]).value)
            except Exception as err:
                job["status_error"] = str(err).splitlines()[0][:200]
                return job
            job["status"] = status
            now = time.time()
            if status == "SUCCEEDED":
                job["final"] = True
                job["finished_at"] = now
                self.state["generation"] += 1
                self.state["history"] = (self.state["history"] + [dict(job)])[-20:]
            elif status in ("FAILED", "STOPPED"):
                if job["attempt"] < self.spec.retraining.max_retries:
                    if job.get("next_retry_at") is None:
                        job["next_retry_at"] = now + self.spec.retraining.backoff_s * (2 ** job["attempt"])
                    elif now >= job["next_retry_at"]:
                        job["attempt"] += 1
                        job["submission_id"] = submission_id(self.spec.name, job["champion_before"], self.state["generation"], job["attempt"])
                        job["status"], job["next_retry_at"] = "PENDING", None
                        job.pop("status_error", None)
                        self._save()
                        try:
                            self._submit_once(job["submission_id"], job)
                        except Exception as err:
                            job["status"], job["status_error"] = "FAILED", f"submission failed: {str(err).splitlines()[0][:200]}"
                else:
                    job["final"] = True
                    job["finished_at"] = now
                    self.state["generation"] += 1  # a later trigger may try again, under a new id
                    self.state["history"] = (self.state["history"] + [dict(job)])[-20:]
            self._save()
            return job

    def status(self) -> dict[str, Any]:
        return {"current": self.state.get("current"), "generation": self.state["generation"],
                "history": self.state.get("history", [])[-5:]}


def _quote(a: str) -> str:
    import shlex

    return shlex.quote(a)


# --- the job ---------------------------------------------------------------------------------------


def _watermark(uri: str) -> float:
    """Feedback time up to which production rows are already in the table (from commit metadata)."""
    from deltalake import DeltaTable

    marks = [float(h["production_upto"]) for h in DeltaTable(uri).history() if h.get("production_upto")]
    return max(marks) if marks else 0.0


def run_retrain(spec: Spec, settings: Settings, job_id: str, reason: str, drift_event: str | None = None) -> dict[str, Any]:
    """Build the new data version, retrain with Ray Train, gate against the champion, register, promote."""
    from driftloop import registry
    from driftloop.cluster import ensure_ray
    from driftloop.data import tables
    from driftloop.data.ingest import ingest_frame
    from driftloop.serving import logs
    from driftloop.sweep import data_sample, finish_training
    from driftloop.train import decode_hparams, make_trainer

    t0 = time.time()
    if (settings.state_dir / FAIL_MARKER.format(name=spec.name)).exists():
        raise RuntimeError("injected failure (fault-injection marker present)")
    champion = registry.champion_version(settings, spec.name)
    uri = settings.table_uri(spec.dataset.table)
    stages: dict[str, float] = {}

    # 1. new data version: labelled production rows not yet in the table; newest eval_fraction held out
    labelled = logs.labelled_rows(settings, spec, after_ts=_watermark(uri))
    n = len(labelled)
    n_eval = int(round(n * spec.retraining.eval_fraction)) if n else 0
    train_rows, eval_rows = labelled.iloc[: n - n_eval], labelled.iloc[n - n_eval :]
    if len(train_rows):
        upto = float(train_rows["feedback_ts"].max())
        version = ingest_frame(train_rows, uri, spec.dataset, f"production:{job_id}",
                               {"production_upto": str(upto), "job_id": job_id, "drift_event": drift_event or ""})
    else:
        version = None
    dv = tables.data_version(uri, version)
    stages["data_build_s"] = time.time() - t0

    # 2. distributed retraining on the champion's hyperparameters
    hp_json = registry.version_tags(settings, spec.name, champion).get("hparams") if champion else None
    hp = decode_hparams(spec, json.loads(hp_json) if hp_json else {})
    ensure_ray(settings)
    c = registry.client(settings)
    exp = registry.experiment_id(settings, spec.name)
    base_id = re.sub(r"-r\d+$", "", job_id)  # retries of one trigger share it
    tags = {"driftloop.kind": "retrain", "lineage.job_id": job_id, "lineage.drift_event": drift_event or "",
            "lineage.trigger": reason[:250], "lineage.champion_before": str(champion), "lineage.trigger_id": base_id}
    # an earlier attempt of this trigger that died without closing its run (e.g. MLflow was unreachable)
    for stale in c.search_runs([exp], f"tags.`lineage.trigger_id` = '{base_id}' and attributes.status = 'RUNNING'"):
        c.set_tag(stale.info.run_id, "failure", "attempt ended without closing its run; retried as " + job_id)
        c.set_terminated(stale.info.run_id, "FAILED")
    run = c.create_run(exp, run_name=f"retrain-{job_id}", tags=tags)
    rid = run.info.run_id
    try:
        for k, v in hp.items():
            c.log_param(rid, k, json.dumps(v) if isinstance(v, list) else v)
        registry.log_data_input(c, rid, spec, dv, data_sample(spec, dv))
        t1 = time.time()
        result = make_trainer(spec, dv, hp, name=f"retrain-{job_id}", storage_path=str(settings.home / "ray_results")).fit()
        stages["training_s"] = time.time() - t1
        if result.checkpoint is None:
            raise RuntimeError(f"training produced no checkpoint: {result.error}")
        for epoch_metrics in (result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []):
            step = int(epoch_metrics.get("epoch", 0))
            for k in ("train_loss", "val_accuracy", "test_accuracy"):
                if k in epoch_metrics:
                    c.log_metric(rid, k, float(epoch_metrics[k]), step=step)
        # 3. gate on the same recent labelled rows (or the new version's test split when there are none)
        t2 = time.time()
        if len(eval_rows):
            x_eval = eval_rows[spec.dataset.features].to_numpy(np.float32)
            y_eval = eval_rows[spec.dataset.label].to_numpy(np.int64)
            label = f"{len(eval_rows)} recent labelled production rows (held out)"
        else:
            x_eval = y_eval = label = None
        lineage = {"lineage.job_id": job_id, "lineage.drift_event": drift_event or "", "lineage.trigger": reason[:250]}
        with result.checkpoint.as_directory() as ckpt:
            out = finish_training(spec, settings, dv, Path(ckpt), rid, lineage, x_eval, y_eval, label)
        stages["register_and_gate_s"] = time.time() - t2
        for k, v in stages.items():
            c.log_metric(rid, f"stage.{k}", v)
        c.set_tag(rid, "gate.decision", "promoted" if out["promoted"] else "refused")
        c.set_terminated(rid, "FINISHED")
    except BaseException:
        c.set_terminated(rid, "FAILED")
        raise
    summary = {"job_id": job_id, "run_id": rid, "data": dv.as_dict(), "labelled_rows": n, "eval_rows": int(n_eval),
               "champion_before": champion, **out, "stages": stages, "seconds": time.time() - t0}
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jobs/retrain.py", description="Retrain a model on its newest data version, gate, promote.")
    p.add_argument("--config", required=True, help="model spec (YAML or JSON)")
    p.add_argument("--job-id", default=os.environ.get("RAY_JOB_SUBMISSION_ID") or f"manual-{int(time.time())}")
    p.add_argument("--reason", default="manual")
    p.add_argument("--drift-event", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    spec = load_spec(a.config)
    reason = a.reason
    try:
        reason = json.loads(reason) if reason.startswith('"') else reason
    except ValueError:
        pass
    settings = get_settings()
    try:
        summary = run_retrain(spec, settings, a.job_id, reason, a.drift_event)
    except Exception as err:  # the traceback goes to the job log; the last line says what failed, in one line
        log.exception("retraining job %s failed", a.job_id)
        first = str(err).splitlines()[0][:300] if str(err) else ""
        if any(s in first for s in ("Max retries exceeded", "Connection refused", "NewConnectionError")):
            first = "cannot reach the MLflow tracking server"
        where = f" (MLflow at {settings.tracking_uri})" if "mlflow" in type(err).__module__.lower() or \
            "connection" in (type(err).__name__ + first).lower() else ""
        print(f"DRIFTLOOP_RETRAIN_FAILED {type(err).__name__}: {first}{where}; the champion is unchanged", flush=True)
        return 1
    print("DRIFTLOOP_RETRAIN_SUMMARY " + json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
