"""The DriftMonitor deployment of an application: one replica that follows the champion's detectors, closes
windows, keeps the inference log and feedback (stores), and hands the policy's triggers to the Ray Jobs API.
The decisions are MonitorCore's (pure, in driftloop.drift.core); this is its shell of I/O, time and Ray."""

import asyncio
import os
import time
import uuid
from typing import Any

from ray import serve

from driftloop.config import Spec
from driftloop.drift.core import MonitorCore
from driftloop.scoring import label_score, predictions
from driftloop.serving.common import (HEALTH_CHECK_PERIOD_S, LOG_FLUSH_S, NEW_DATA_CHECK_S, POLL_S, ChampionWatcher, PollLoops,
                                      _app_name, log)
from driftloop.serving.monitor_state import MonitorState
from driftloop.serving.stores import FeedbackStore, InferenceLog


@serve.deployment(name="DriftMonitor", num_replicas=1, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256,
                  health_check_period_s=HEALTH_CHECK_PERIOD_S)
class DriftMonitor(MonitorState, PollLoops):
    """Owns the drift windows of one application: detectors from the champion, inference log, feedback,
    drift events, metrics, and the retraining policy."""

    def __init__(self, spec: dict[str, Any]):
        from ray.serve import metrics

        from driftloop.settings import get_settings

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.spec = Spec.model_validate(spec)
        self.settings = get_settings()
        self.name = self.spec.name
        self.core = MonitorCore(self.spec)  # windows, detectors, rolling accuracy, policy: the decisions, no I/O
        self.watcher = ChampionWatcher(self.settings, self.name)  # its error shows in /drift: "registry unreachable"
        self.champion_data_version = -1  # the training-table version the champion was trained on
        self._data_checked_at = 0.0
        self.manifest: dict = {}
        self.feedback_count = 0
        self.dropped_reported = 0
        self.restored: list[dict] = []
        self.job_tracker = None  # set lazily: the job tracker (driftloop.jobs.JobTracker)
        app_name = _app_name()  # one state file per Serve application: two apps of one model keep separate windows
        self.state_path = f"{self.settings.state_root}/monitor-{app_name}-{self.name}.npz"  # a local path or an object
        self.pending_submit: dict | None = None  # a trigger decided but not yet handed to the job tracker
        self._dirty = False
        self.persisted_at: float | None = None
        self.restored_state: dict | None = None
        self.first_started_at = time.time()  # label counts are "since this application first started"
        self.replica_started_at = self.first_started_at
        self._tasks: list[asyncio.Task] = []
        self._lock = asyncio.Lock()
        self._persist_lock = asyncio.Lock()
        self.maintenance: dict = {"runs": 0, "every_s": self.spec.lifecycle.maintenance_every_s}
        self._maintenance_task: asyncio.Task | None = None
        self._maintained_at = time.monotonic()  # the first pass comes one interval after the replica starts
        tags = ("model",)
        self.m_pval = metrics.Gauge("driftloop_drift_p_value", "Smallest p-value of a detector on the last window", tag_keys=("model", "detector"))
        self.m_score = metrics.Gauge("driftloop_drift_score", "Test statistic of a detector on the last window", tag_keys=("model", "detector"))
        self.m_drift = metrics.Gauge("driftloop_drift_is_drift", "1 when the last window drifted", tag_keys=tags)
        self.m_windows = metrics.Counter("driftloop_drift_windows_total", "Windows tested", tag_keys=tags)
        self.m_samples = metrics.Counter("driftloop_monitor_samples_total", "Served rows seen by the monitor", tag_keys=tags)
        self.m_dropped = metrics.Counter("driftloop_monitor_dropped_rows_total", "Rows sampled out under overload", tag_keys=tags)
        self.m_log_dropped = metrics.Counter("driftloop_inference_log_dropped_rows_total",
                                             "Served rows dropped from the inference-log buffer while writes failed", tag_keys=tags)
        self.m_acc = (metrics.Gauge("driftloop_rolling_mae", "Mean absolute error over recent labelled rows", tag_keys=("model", "version"))
                      if self.spec.regression else
                      metrics.Gauge("driftloop_rolling_accuracy", "Accuracy over recent labelled rows", tag_keys=("model", "version")))
        for m in (self.m_drift, self.m_windows, self.m_samples, self.m_dropped, self.m_log_dropped):
            m.set_default_tags({"model": self.name})
        self.m_submit_failures = metrics.Counter("driftloop_retrain_submit_failures_total",
                                                 "Retraining submissions the Ray Jobs API refused or never answered", tag_keys=tags)
        self.m_submit_failures.set_default_tags({"model": self.name})
        self.inference_log = InferenceLog(self.settings, self.spec, on_dropped=self.m_log_dropped.inc)  # served rows
        self.labels = FeedbackStore(self.settings, self.spec, app_name)  # ground truth, once per served row
        self._submit_failures_seen = 0  # the tracker's count already added to the counter
        self._last_submit: dict | None = None  # what the Jobs API said to the last trigger handed to it
        marks = [time.time()]
        for step in (self._swap_if_needed_sync, self._restore_history, self._restore_state):
            step()
            marks.append(time.time())
        self.init_s = marks[-1] - self.replica_started_at  # constructor time: detectors loaded, state restored
        # where the constructor's time went (footprint bench; /drift "state")
        self.init_stages_s = {k: round(b - a, 3) for k, a, b in zip(("setup", "champion detectors", "drift history", "state restore"),
                                                                     [self.replica_started_at, *marks], marks)}
        self.init_stages_s |= {f"... of which {k}": v for k, v in getattr(self, "load_stages_s", {}).items()}

    def _load_new_champion(self):
        """(version, windowed detectors, manifest) when the alias moved, else None; no lock held while downloading.
        A registry error is kept for /drift ("registry unreachable") and raised: never read as "no champion"."""
        import shutil

        from driftloop import registry
        from driftloop.drift.detectors import load_detectors
        from driftloop.drift.windows import WindowedDetectors

        t0 = time.time()
        v = self.watcher.moved(self.version)
        if v is None:
            return None
        path = registry.download(self.settings, self.name, v, self.settings.home / "serving" / f"{self.name}-monitor-v{v}-{uuid.uuid4().hex[:6]}")
        t1 = time.time()
        try:
            dets, manifest = load_detectors(path / "detectors", self.spec.output_names)
        finally:
            shutil.rmtree(path, ignore_errors=True)  # loaded into memory; the download was only a cache
        self.load_stages_s = {"registry lookup + download": round(t1 - t0, 3), "detectors load (alibi-detect)": round(time.time() - t1, 3)}
        data_version = int(registry.version_tags(self.settings, self.name, v).get("data.version") or -1)
        windowed = WindowedDetectors(dets, manifest.get("window", self.spec.drift.window), v, self.spec.drift.history)
        return v, windowed, manifest, data_version

    # the core owns what the policy reads; these names are the monitor's view of it
    policy = property(lambda self: self.core.policy)
    detectors = property(lambda self: self.core.detectors)
    version = property(lambda self: self.core.version)
    correct = property(lambda self: self.core.correct)
    registry_error = property(lambda self: self.watcher.error)


    def _use(self, loaded, swapped: bool = False) -> None:
        """Switch to a champion's detectors with fresh windows (under the lock when serving)."""
        version, windowed, self.manifest, self.champion_data_version = loaded
        self.core.use(version, windowed, time.time(), swapped)
        log.info("drift monitor for %s now uses the detectors of version %s", self.name, self.version)

    def _swap_if_needed_sync(self) -> bool:
        loaded = self._load_new_champion()
        if loaded is not None:
            self._use(loaded)
        return loaded is not None

    async def _swap_if_needed(self) -> bool:
        """Download off the lock, switch under it: rows of the old model never enter the new windows."""
        loaded = await asyncio.to_thread(self._load_new_champion)
        if loaded is None:
            return False
        async with self._lock:
            self._use(loaded, swapped=True)
            self._dirty = True
        return True

    async def _poll_alias(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                if self.pending_submit is not None:  # restored from a snapshot taken between decision and submission
                    await self._submit_pending()
                swapped = await self._swap_if_needed()
                await self._check_new_data()
                from driftloop.jobs import POLL_S as JOBS_POLL_S, RetrainPathDown

                try:  # the Jobs API is the record: a restarted replica sees the jobs its predecessor started
                    job = await asyncio.to_thread(self._tracker().tick, JOBS_POLL_S)
                except RetrainPathDown:
                    job = None  # /drift shows the error (since, attempts); the next poll asks again, after backoff
                self._count_submit_failures()
                if self.job_tracker.newly_final(job):
                    # refused: the job succeeded and the champion is still the one it tried to replace. A promoted
                    # challenger's swap is often seen a poll before its job ends (the job exits after moving the
                    # alias): that is no refusal (it doubled the cooldown and cleared the windows after each swap)
                    if job["status"] == "SUCCEEDED" and not swapped and job.get("champion_before") == self.version:
                        self.core.retrained(time.time())  # refused challenger: count afresh, back off benign drift
                    self._dirty = True
            except Exception:  # the registry may be briefly unreachable; keep serving with what we have
                log.exception("alias poll failed")

    async def _check_new_data(self) -> None:
        """`retraining.policy.new_data`: ingested rows past the champion's data version are a trigger too."""
        from driftloop.data import tables

        if self.spec.retraining.policy.new_data is None or self.version is None:
            return
        if time.monotonic() - self._data_checked_at < NEW_DATA_CHECK_S:
            return
        self._data_checked_at = time.monotonic()
        base = max(self.champion_data_version, self.policy.state.data_seen)
        rows, newest = await asyncio.to_thread(tables.ingested_since, self.settings.table_uri(self.spec.dataset.table), base)
        if rows:
            self._dirty = True
            await self._on_trigger(self.policy.on_new_data(rows, newest, time.time(), self.version))

    async def _submit_pending(self) -> dict[str, Any] | None:
        """Hand the pending trigger to the Jobs API. Refused or unreachable, it stays pending (durable) and the
        poll loop tries again after a capped exponential backoff, until the API takes it: never dropped."""
        from driftloop.jobs import trigger_from

        p = self.pending_submit
        if p is None:  # the poll loop and a fresh trigger may both get here; the first one submitted it
            return self._last_submit
        tracker = self._tracker()
        if not tracker.health.due("submit", time.time()):
            err = tracker.health.error()
            return {"submitted": False, "job": None, "error": err["error"],
                    "why": f"the retraining path is failing; this trigger is kept and retried at {err['next_try_at']:.0f}"}
        out = await asyncio.to_thread(tracker.submit, trigger_from(p), p.get("event_id"))
        self._count_submit_failures()
        self._last_submit = out
        if out.get("error"):
            return out
        if self.pending_submit is p:  # a newer trigger decided meanwhile stays pending
            self.pending_submit = None
        await self.persist()
        return out

    # --- rows in ---------------------------------------------------------------------------------------

    async def observe(self, batch: dict[str, Any]) -> int:
        """Rows served by a predictor: windows, detectors, inference log. Returns rows accepted."""
        self._ensure_tasks()
        dropped = int(batch.get("dropped", 0))
        if dropped:
            self.m_dropped.inc(dropped)
            self.dropped_reported += dropped
        x, proba, version = batch["x"], batch["proba"], int(batch["version"])
        preds = predictions(proba, self.spec)
        self.labels.served(batch["ids"], version, preds)
        self.inference_log.add(batch["ids"], batch["ts"], version, x, preds)
        self.m_samples.inc(len(x))
        async with self._lock:  # the version check and the window update see the same detectors (no swap between)
            now = time.time()
            detected = await asyncio.to_thread(self.core.detect, x, proba, version, now)
        if detected is None:
            return 0  # rows of a model we no longer monitor are logged but do not enter the new windows
        decided = self.core.decide(detected, now)  # policy changes happen on the event loop only
        self._dirty = True
        for rep in decided.windows:
            self._on_window(rep)
        # every window this batch closed, and every online alarm, in one commit, durable before a trigger names one
        await self._record_events([rep.as_dict() for rep in decided.windows] + list(decided.alarms))
        for trig in decided.triggers:
            await self._on_trigger(trig)
        if decided.windows and self._dirty:
            await self.persist()  # each closed window is durable before the next rows count
        return len(x)

    def _on_window(self, rep) -> None:
        self.m_windows.inc()
        self.m_drift.set(1.0 if rep.is_drift else 0.0)
        for r in rep.results:
            if r.p_val is not None:
                self.m_pval.set(r.p_val, tags={"model": self.name, "detector": r.name})
            if r.distance is not None:
                self.m_score.set(r.distance, tags={"model": self.name, "detector": r.name})

    async def _record_events(self, events: list[dict]) -> None:
        """Closed windows and online alarms (an alarm is a drift event of its own; a trigger it causes names that
        event) appended to the drift_events log together."""
        from driftloop.data import logs

        if events:
            await asyncio.to_thread(logs.append, self.settings, self.spec, "drift_events", logs.drift_events_frame(events))

    # --- labels in --------------------------------------------------------------------------------------

    async def feedback(self, request_id: str, label: int) -> dict[str, Any]:
        """Record a ground-truth label (the feedback store: durable, once per served row) and count a new one toward
        the rolling accuracy and the policy; a repeat is answered without counting, so repeats cannot trigger retraining."""
        self._ensure_tasks()
        res = await self.labels.record(request_id, label)
        at = res.pop("_at", None)  # a new label's time on record: it counts as a restart would count it
        if res["status"] != 200 or res["duplicate"]:
            return res
        version = res["model_version"]
        self.feedback_count += 1
        trig = self.core.label(version, [label_score(res["prediction"], label, self.spec.regression)], time.time(),
                               stamped=None if at is None else [at])
        self.m_acc.set(float(sum(self.correct[version]) / len(self.correct[version])), tags={"model": self.name, "version": str(version)})
        self._dirty = True
        await self._on_trigger(trig)
        return res

    async def feedback_many(self, items: list[tuple[str, int]]) -> list[dict[str, Any]]:
        """Labels of a batch, decided together: their commits share the group commit's appends; each result is
        what /feedback would answer for that label alone."""
        return list(await asyncio.gather(*(self.feedback(rid, label) for rid, label in items)))

    async def _on_trigger(self, trig) -> None:
        if trig is None:
            return
        # decided -> durable -> submitted -> durable: a crash in between resubmits the same trigger, which
        # the tracker recognises (same trigger time), so a trigger is neither lost nor doubled
        self.pending_submit = {"reason": trig.reason, "at": trig.at, "champion": trig.champion_version,
                               "event_id": trig.event_id, "cause": trig.cause}
        await self.persist()
        await self._submit_pending()

    def _tracker(self):
        """The job tracker, made on first use: it reads the Jobs API, so it holds no state a restart could lose."""
        if self.job_tracker is None:
            from driftloop.jobs import JobTracker

            self.job_tracker = JobTracker(self.spec, self.settings)
        return self.job_tracker

    def _count_submit_failures(self) -> None:
        """Add the tracker's new refused submissions to the Prometheus counter (from the event loop, not a thread)."""
        n = self._tracker().health.submit_failures
        if n > self._submit_failures_seen:
            self.m_submit_failures.inc(n - self._submit_failures_seen)
            self._submit_failures_seen = n

    async def _maintain(self) -> None:
        """One scheduled maintenance pass (data/maintenance.py) off the event loop; its report shows in /drift."""
        from driftloop.data import maintenance

        try:
            rep = await asyncio.to_thread(maintenance.maintain, self.settings, self.spec)
            self.maintenance = {"last": rep, "runs": self.maintenance.get("runs", 0) + 1}
        except Exception as err:
            log.exception("maintenance failed; will retry at the next interval")
            self.maintenance = {**self.maintenance, "error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300],
                                "error_at": time.time()}

    def _maintenance_due(self) -> bool:
        every = self.spec.lifecycle.maintenance_every_s
        if not every or (self._maintenance_task is not None and not self._maintenance_task.done()):
            return False
        if time.monotonic() - self._maintained_at < every:
            return False
        self._maintained_at = time.monotonic()
        return True

    async def _flush_loop(self) -> None:
        last_log = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            if self._maintenance_due():  # its own task: flushing and snapshots go on while it compacts
                self._maintenance_task = asyncio.get_running_loop().create_task(self._maintain())
            try:
                if time.monotonic() - last_log >= LOG_FLUSH_S or self.inference_log.rows >= 5000:
                    last_log = time.monotonic()
                    await self.inference_log.flush()
            except Exception:
                log.exception("inference log flush failed; will retry")
            try:
                if self._dirty:
                    await self.persist()  # periodically: the open window and counters survive a crash
            except Exception:
                log.exception("monitor state not persisted; will retry")

    # --- visibility and admin -------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        self._ensure_tasks()
        d = self.detectors
        recent = [r.as_dict() for r in d.history] if d else []
        rolling = self.core.rolling()
        job = self._tracker().status()  # as of the poll loop's last look; error/since/attempts when the path fails
        return {
            "model": self.name, "model_version": self.version, "samples": d.samples if d else 0,
            "window": {"size": d.window if d else self.spec.drift.window, "fill": d.fill if d else 0, "index": d.windows if d else 0},
            "detectors": [{"name": x.name, "kind": x.kind, "input": x.input, "online": x.online, "t": x.time if x.online else None}
                          for x in (d.batch + d.online)] if d else [],
            "recent": recent[::-1], "restored_history": self.restored[::-1], "online": d.online_last if d else {},
            ("rolling_error" if self.spec.regression else "rolling_accuracy"): rolling, "feedback": self.feedback_count, "dropped_rows": self.dropped_reported,
            "inference_log_dropped_rows": self.inference_log.dropped,
            "policy": self.policy.snapshot(), "retraining": job, "maintenance": self.maintenance, "registry": self.watcher.error or {"ok": True},
            "state": {"path": str(self.state_path), "persisted_at": self.persisted_at, "restored": self.restored_state,
                      "pending_submit": self.pending_submit, "unsaved_changes": self._dirty,
                      "replica_started_at": self.replica_started_at, "init_s": round(self.init_s, 3),
                      "init_stages_s": self.init_stages_s},
        }

    async def trigger(self, reason: str = "manual") -> dict[str, Any]:
        """A manual trigger goes the way of any other: durable, then to the Jobs API, retried until it is taken."""
        self._ensure_tasks()
        trig = self.policy.manual(time.time(), self.version)
        self._dirty = True
        await self._on_trigger(trig)
        return self._last_submit or {"submitted": False, "job": None, "why": "pending"}
