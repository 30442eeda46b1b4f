"""The Ray Serve application of one model: a Predictor ingress (FastAPI) and its DriftMonitor.

The registry is the source of truth: replicas poll the `champion` alias and swap model (and the
monitor its detectors, with fresh windows) in place when it moves, so a promotion by any path —
`driftloop promote`, `rollback`, a retraining job — reaches apps started by `serve run` or
`serve deploy` without a redeploy and without a failed request.
"""


import asyncio
import hmac
import logging
import os
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from driftloop.config import Spec, load_spec
from driftloop.serving.validation import InvalidInput, parse_feedback, parse_json, parse_rows, request_schema

log = logging.getLogger("ray.serve")
POLL_S = float(os.environ.get("DRIFTLOOP_POLL_S", "1.0"))
# Served rows travel predictor -> monitor in micro-batches, and monitor -> inference log (one Delta commit)
# in larger ones: fewer RPCs and commits per request is most of what monitoring costs a 2-core machine.
HANDOFF_S = float(os.environ.get("DRIFTLOOP_HANDOFF_S", "0.2"))
LOG_FLUSH_S = float(os.environ.get("DRIFTLOOP_LOG_FLUSH_S", "2.0"))
ADMIN_TOKEN_ENV = "DRIFTLOOP_ADMIN_TOKEN"
PREDICT_TOKEN_ENV = "DRIFTLOOP_PREDICT_TOKEN"
# Serve learns that a replica process died from that replica's next health check (Ray's default period is
# 10 s), so a crash went unnoticed for up to ~11 s before a replacement was started; a check is one cheap
# actor call, so check every 2 s.
HEALTH_CHECK_PERIOD_S = 2.0


def _token(name: str) -> str | None:
    """A bearer token from NAME or from the file named by NAME_FILE; None when not configured."""
    if os.environ.get(name):
        return os.environ[name]
    path = os.environ.get(f"{name}_FILE")
    if path and Path(path).is_file():
        return Path(path).read_text().strip() or None
    return None


def _authorised(request: Request, expected: str | None) -> bool:
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else ""
    return expected is not None and hmac.compare_digest(given.encode(), expected.encode())


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _load_champion(settings, name: str, version: int):
    """Download and load a model version (model + detectors path), off the event loop."""
    from driftloop import registry

    path = registry.download(settings, name, version, settings.home / "serving" / f"{name}-v{version}-{uuid.uuid4().hex[:6]}")
    return registry.load_model(path), path


fastapi_app = FastAPI(title="driftloop", description="Predictions with drift monitoring, feedback and model lineage.")


@serve.deployment(name="DriftMonitor", num_replicas=1, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256,
                  health_check_period_s=HEALTH_CHECK_PERIOD_S)
class DriftMonitor:
    """Owns the drift windows of one application: detectors from the champion, inference log, feedback,
    drift events, metrics, and the retraining policy."""

    def __init__(self, spec: dict[str, Any]):
        from ray.serve import metrics

        from driftloop.drift.policy import Policy
        from driftloop.settings import get_settings

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.spec = Spec.model_validate(spec)
        self.settings = get_settings()
        self.name = self.spec.name
        self.version: int | None = None
        self.detectors = None
        self.manifest: dict = {}
        self.policy = Policy(self.spec.retraining)
        self.known: OrderedDict[str, tuple[int, int]] = OrderedDict()  # request id -> (model version, prediction)
        self.correct: dict[int, deque] = {}
        self.log_buffer: list = []
        self.pending_labels: list = []
        self._label_writer: asyncio.Task | None = None
        self.feedback_count = 0
        self.dropped_reported = 0
        self.restored: list[dict] = []
        self.retrain = None  # set lazily: the job tracker (driftloop.retrain.JobTracker)
        try:  # one state file per Serve application: two apps serving the same model keep separate windows
            app_name = serve.get_replica_context().app_name
        except Exception:
            app_name = "default"
        self.state_path = self.settings.state_dir / f"monitor-{app_name}-{self.name}.npz"
        self.pending_submit: dict | None = None  # a trigger decided but not yet handed to the job tracker
        self._dirty = False
        self.persisted_at: float | None = None
        self.restored_state: dict | None = None
        self.first_started_at = time.time()  # label counts are "since this application first started"
        self.replica_started_at = self.first_started_at
        self._tasks: list[asyncio.Task] = []
        self._lock = asyncio.Lock()
        self._lookup_lock = asyncio.Lock()
        tags = ("model",)
        self.m_pval = metrics.Gauge("driftloop_drift_p_value", "Smallest p-value of a detector on the last window", tag_keys=("model", "detector"))
        self.m_score = metrics.Gauge("driftloop_drift_score", "Test statistic of a detector on the last window", tag_keys=("model", "detector"))
        self.m_drift = metrics.Gauge("driftloop_drift_is_drift", "1 when the last window drifted", tag_keys=tags)
        self.m_windows = metrics.Counter("driftloop_drift_windows_total", "Windows tested", tag_keys=tags)
        self.m_samples = metrics.Counter("driftloop_monitor_samples_total", "Served rows seen by the monitor", tag_keys=tags)
        self.m_dropped = metrics.Counter("driftloop_monitor_dropped_rows_total", "Rows sampled out under overload", tag_keys=tags)
        self.m_acc = metrics.Gauge("driftloop_rolling_accuracy", "Accuracy over recent labelled rows", tag_keys=("model", "version"))
        for m in (self.m_drift, self.m_windows, self.m_samples, self.m_dropped):
            m.set_default_tags({"model": self.name})
        self._swap_if_needed_sync()
        self._restore_history()
        self._restore_state()
        self.init_s = time.time() - self.replica_started_at  # constructor time: detectors loaded, state restored

    # --- lifecycle ---------------------------------------------------------------------------------
    def _ensure_tasks(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._poll_alias()), loop.create_task(self._flush_loop())]

    def _swap_if_needed_sync(self) -> bool:
        from driftloop import registry
        from driftloop.drift.detectors import load_detectors
        from driftloop.drift.windows import WindowedDetectors

        v = registry.champion_version(self.settings, self.name)
        if v is None or v == self.version:
            return False
        path = registry.download(self.settings, self.name, v, self.settings.home / "serving" / f"{self.name}-monitor-v{v}-{uuid.uuid4().hex[:6]}")
        dets, manifest = load_detectors(path / "detectors", self.spec.n_classes)
        self.detectors = WindowedDetectors(dets, manifest.get("window", self.spec.drift.window), v, self.spec.drift.history)
        self.manifest = manifest
        self.version = v
        log.info("drift monitor for %s now uses the detectors of version %s", self.name, v)
        return True

    async def _poll_alias(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                if self.pending_submit is not None:  # restored from a snapshot taken between decision and submission
                    await self._submit_pending()
                async with self._lock:
                    swapped = await asyncio.to_thread(self._swap_if_needed_sync)
                if swapped:
                    self.policy.retrained()
                    self._dirty = True
                if self.retrain is not None:
                    job = await asyncio.to_thread(self.retrain.tick)
                    if job and job.get("final") and not job.get("seen_final"):
                        job["seen_final"] = True
                        if job["status"] == "SUCCEEDED" and not swapped:
                            self.policy.retrained()  # refused challenger: start counting afresh
                        self._dirty = True
            except Exception:  # the registry may be briefly unreachable; keep serving with what we have
                log.exception("alias poll failed")

    def _restore_history(self) -> None:
        from driftloop.serving import logs

        try:
            df = logs.read_or_empty(logs.uris(self.settings, self.spec)["drift_events"])
            if len(df):
                df = df.sort_values("ts").tail(self.spec.drift.history)
                self.restored = [{"event_id": r.event_id, "ts": r.ts, "model_version": int(r.model_version),
                                  "is_drift": bool(r.is_drift), "min_p_val": r.min_p_val, "restored": True}
                                 for r in df.itertuples()]
        except Exception:
            log.exception("could not read drift_events history")

    # --- durable state: open window, online detectors, policy, pending trigger ----------------------
    def _snapshot(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta: dict[str, Any] = {"saved_at": time.time(), "model": self.name, "policy": asdict(self.policy.state),
                                "pending_submit": self.pending_submit, "first_started_at": self.first_started_at,
                                "correct": {str(v): [bool(b) for b in q] for v, q in self.correct.items()}}
        arrays: dict[str, np.ndarray] = {}
        if self.detectors is not None:
            meta["windows"], arrays = self.detectors.snapshot()
        return meta, arrays

    async def persist(self) -> None:
        """Snapshot under the detectors' lock (so no window is half-added), write off the event loop."""
        from driftloop.drift import state

        async with self._lock:
            self._dirty = False
            meta, arrays = self._snapshot()
        await asyncio.to_thread(state.save, self.state_path, meta, arrays)
        self.persisted_at = meta["saved_at"]

    def _restore_state(self) -> None:
        """Resume where the last replica stopped. Labels committed after the snapshot are counted from the
        feedback table, so a label acknowledged with 2xx is never lost to the policy."""
        from driftloop.drift import state
        from driftloop.drift.policy import Policy, PolicyState
        from driftloop.serving import logs

        snap = state.load(self.state_path)
        if snap is None:
            return
        meta, arrays = snap
        try:
            self.policy = Policy(self.spec.retraining, PolicyState(**meta["policy"]))
            self.pending_submit = meta.get("pending_submit")
            self.first_started_at = float(meta.get("first_started_at", self.first_started_at))
            for v, q in (meta.get("correct") or {}).items():
                self.correct[int(v)] = deque(q, maxlen=self.spec.drift.window)
            windows = bool(meta.get("windows")) and self.detectors is not None and self.detectors.restore(meta["windows"], arrays)
            # the label counters come from the feedback table itself (the source of truth), not the snapshot
            fb = logs.read_or_empty(logs.uris(self.settings, self.spec)["feedback"], ["ts"])
            ts = fb["ts"].to_numpy() if len(fb) else np.zeros(0)
            st = self.policy.state
            late = int((ts > meta["saved_at"]).sum())
            st.labelled = int((ts > st.labelled_since).sum())
            st.labels_since_trigger = int((ts > (st.last_trigger_at or st.labelled_since)).sum())
            self.feedback_count = int((ts >= self.first_started_at).sum())
            self.restored_state = {"saved_at": meta["saved_at"], "windows": windows, "labels_after_snapshot": late,
                                   "pending_submit": self.pending_submit is not None}
            log.info("drift monitor for %s restored its state from %s", self.name, self.state_path)
        except (KeyError, TypeError, ValueError):
            log.exception("monitor state at %s unusable; starting afresh", self.state_path)

    async def _submit_pending(self) -> None:
        from driftloop.drift.policy import Trigger

        p = self.pending_submit
        if p is None:  # the poll loop and a fresh trigger may both get here; the first one submitted it
            return
        tracker = self._tracker()
        await asyncio.to_thread(tracker.submit, Trigger(p["reason"], p["at"], p["champion"]), p.get("event_id"))
        if self.pending_submit is p:  # a newer trigger decided meanwhile stays pending
            self.pending_submit = None
        await self.persist()

    # --- rows in -----------------------------------------------------------------------------------
    async def observe(self, batch: dict[str, Any]) -> int:
        """Rows served by a predictor: windows, detectors, inference log. Returns rows accepted."""
        self._ensure_tasks()
        dropped = int(batch.get("dropped", 0))
        if dropped:
            self.m_dropped.inc(dropped)
            self.dropped_reported += dropped
        x, proba, version = batch["x"], batch["proba"], int(batch["version"])
        preds = np.asarray(self.spec.dataset.classes)[proba.argmax(axis=1)]
        for rid, p in zip(batch["ids"], preds):
            self.known[rid] = (version, int(p))
        while len(self.known) > 500_000:
            self.known.popitem(last=False)
        self.log_buffer.append((batch["ids"], batch["ts"], version, x, preds))
        self.m_samples.inc(len(x))
        if version != self.version or self.detectors is None:
            return 0  # rows of a model we no longer monitor are logged but do not enter the new windows
        async with self._lock:
            reports, alarms = await asyncio.to_thread(self.detectors.add, x, proba)
        self._dirty = True
        for rep in reports:
            await self._on_window(rep)
        for alarm in alarms:
            await self._on_trigger(self.policy.on_online_alarm(alarm.name, time.time(), self.version), alarm_event=alarm.as_dict())
        if reports and self._dirty:
            await self.persist()  # each closed window is durable before the next rows count
        return len(x)

    async def _on_window(self, rep) -> None:
        from driftloop.serving import logs

        self.m_windows.inc()
        self.m_drift.set(1.0 if rep.is_drift else 0.0)
        for r in rep.results:
            if r.p_val is not None:
                self.m_pval.set(r.p_val, tags={"model": self.name, "detector": r.name})
            if r.distance is not None:
                self.m_score.set(r.distance, tags={"model": self.name, "detector": r.name})
        trig = self.policy.on_window(rep.is_drift, time.time(), self.version)
        event = rep.as_dict()
        if trig is not None:
            event["trigger"] = trig.reason
        await asyncio.to_thread(self._append, logs.uris(self.settings, self.spec)["drift_events"], logs.drift_event_frame(event))
        if trig is not None:
            await self._on_trigger(trig, event_id=rep.event_id)

    async def _on_trigger(self, trig, event_id: str | None = None, alarm_event: dict | None = None) -> None:
        if trig is None:
            return
        from driftloop.serving import logs

        if alarm_event is not None:
            event_id = uuid.uuid4().hex[:16]
            ev = {"event_id": event_id, "ended_at": trig.at, "started_at": trig.at, "model_version": self.version,
                  "index": -1, "rows": 0, "is_drift": True, "detectors": [alarm_event], "kind": "online", "trigger": trig.reason}
            await asyncio.to_thread(self._append, logs.uris(self.settings, self.spec)["drift_events"], logs.drift_event_frame(ev))
        # decided -> durable -> submitted -> durable: a crash in between resubmits the same trigger, which
        # the tracker recognises (same trigger time), so a trigger is neither lost nor doubled
        self.pending_submit = {"reason": trig.reason, "at": trig.at, "champion": trig.champion_version, "event_id": event_id}
        await self.persist()
        await self._submit_pending()

    def _tracker(self):
        if self.retrain is None:
            from driftloop.retrain import JobTracker

            self.retrain = JobTracker(self.spec, self.settings)
        return self.retrain

    # --- durable writes ----------------------------------------------------------------------------
    def _append(self, uri: str, df) -> None:
        from driftloop.data import tables

        tables.append(uri, df, {"source": "driftloop-monitor"}, want_version=False)

    async def _flush_loop(self) -> None:
        last_log = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            try:
                if time.monotonic() - last_log >= LOG_FLUSH_S or sum(len(b[0]) for b in self.log_buffer) >= 5000:
                    last_log = time.monotonic()
                    await self.flush()
            except Exception:
                log.exception("inference log flush failed; will retry")
            try:
                if self._dirty:
                    await self.persist()  # periodically: the open window and counters survive a crash
            except Exception:
                log.exception("monitor state not persisted; will retry")

    async def flush(self) -> int:
        """Write buffered served rows to the inference log (one Delta version per micro-batch)."""
        from driftloop.serving import logs

        if not self.log_buffer:
            return 0
        buf, self.log_buffer = self.log_buffer, []
        frames = [logs.inference_frame(self.spec, ids, ts, v, x, p) for ids, ts, v, x, p in buf]
        import pandas as pd

        df = pd.concat(frames, ignore_index=True)
        try:
            await asyncio.to_thread(self._append, logs.uris(self.settings, self.spec)["inference"], df)
        except Exception:
            self.log_buffer = buf + self.log_buffer  # keep them for the next attempt
            raise
        return len(df)

    # --- feedback ----------------------------------------------------------------------------------
    async def feedback(self, request_id: str, label: int) -> dict[str, Any]:
        """Record a ground-truth label durably; unknown request ids are refused."""

        self._ensure_tasks()
        deadline = time.monotonic() + 3.0
        while request_id not in self.known and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the row may still be in a predictor's buffer
        known = self.known.get(request_id)
        if known is None:  # an older prediction: look it up in the inference log, one scan at a time, so a
            async with self._lookup_lock:  # flood of unknown ids queues up instead of piling scans onto the CPU
                known = self.known.get(request_id) or await asyncio.to_thread(self._lookup_logged, request_id)
        if known is None:
            return {"status": 404, "error": f"unknown request_id {request_id!r}"}
        version, pred = known
        now = time.time()
        await self._commit_label(request_id, label, now)
        self.feedback_count += 1
        dq = self.correct.setdefault(version, deque(maxlen=self.spec.drift.window))
        dq.append(pred == label)
        acc = float(np.mean(dq))
        self.m_acc.set(acc, tags={"model": self.name, "version": str(version)})
        trig = self.policy.on_labels(1, acc if len(dq) >= min(50, dq.maxlen) else None, now, self.version)
        self._dirty = True
        if trig is not None:
            await self._on_trigger(trig)
        return {"status": 200, "request_id": request_id, "label": label, "model_version": version, "prediction": pred}

    async def _commit_label(self, request_id: str, label: int, now: float) -> None:
        """Group commit: labels that arrive together share one Delta append; each caller returns only
        after the append that holds its label has committed (or raises if it failed)."""
        fut = asyncio.get_running_loop().create_future()
        self.pending_labels.append((request_id, label, now, fut))
        if self._label_writer is None or self._label_writer.done():
            self._label_writer = asyncio.get_running_loop().create_task(self._write_labels())
        await fut

    async def _write_labels(self) -> None:
        from driftloop.serving import logs

        uri = logs.uris(self.settings, self.spec)["feedback"]
        while self.pending_labels:
            batch, self.pending_labels = self.pending_labels, []
            try:
                await asyncio.to_thread(self._append, uri, logs.feedback_frame([b[:3] for b in batch]))
            except Exception as err:
                for b in batch:
                    if not b[3].done():
                        b[3].set_exception(err)
                continue
            for b in batch:
                if not b[3].done():
                    b[3].set_result(True)

    def _lookup_logged(self, request_id: str) -> tuple[int, int] | None:
        from driftloop.serving import logs

        hit = logs.read_or_empty(logs.uris(self.settings, self.spec)["inference"], ["request_id", "model_version", "prediction"],
                                 filters=[("request_id", "=", request_id)])
        return (int(hit.iloc[-1]["model_version"]), int(hit.iloc[-1]["prediction"])) if len(hit) else None

    # --- visibility and admin ----------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        self._ensure_tasks()
        d = self.detectors
        recent = [r.as_dict() for r in d.history] if d else []
        acc = {str(v): {"accuracy": float(np.mean(q)), "labelled": len(q)} for v, q in self.correct.items() if len(q)}
        job = self._tracker().status() if self.retrain is not None else None
        return {
            "model": self.name, "model_version": self.version, "samples": d.samples if d else 0,
            "window": {"size": d.window if d else self.spec.drift.window, "fill": d.fill if d else 0, "index": d.windows if d else 0},
            "detectors": [{"name": x.name, "kind": x.kind, "input": x.input, "online": x.online, "t": x.time if x.online else None}
                          for x in (d.batch + d.online)] if d else [],
            "recent": recent[::-1], "restored_history": self.restored[::-1], "online": d.online_last if d else {},
            "rolling_accuracy": acc, "feedback": self.feedback_count, "dropped_rows": self.dropped_reported,
            "policy": self.policy.snapshot(), "retraining": job,
            "state": {"path": str(self.state_path), "persisted_at": self.persisted_at, "restored": self.restored_state,
                      "pending_submit": self.pending_submit, "unsaved_changes": self._dirty,
                      "replica_started_at": self.replica_started_at, "init_s": round(self.init_s, 3)},
        }

    async def trigger(self, reason: str = "manual") -> dict[str, Any]:
        self._ensure_tasks()
        trig = self.policy.manual(time.time(), self.version)
        self._dirty = True
        tracker = self._tracker()
        return await asyncio.to_thread(tracker.submit, trig, None)


@serve.deployment(name="Predictor", num_replicas=2, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64,
                  health_check_period_s=HEALTH_CHECK_PERIOD_S)
@serve.ingress(fastapi_app)
class Predictor:
    """Validates, batches and answers predictions; hands every served row to the monitor off the hot path."""

    MAX_BUFFER = 20_000

    def __init__(self, monitor, spec: dict[str, Any], monitoring: bool = True, max_batch_rows: int = 256):
        from driftloop import registry
        from driftloop.settings import get_settings

        started = time.time()
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.spec = Spec.model_validate(spec)
        self.settings = get_settings()
        self.monitor = monitor
        self.monitoring = monitoring
        self.max_batch_rows = max_batch_rows
        self.features = self.spec.dataset.features
        self.classes = np.asarray(self.spec.dataset.classes)
        v = registry.champion_version(self.settings, self.spec.name)
        if v is None:
            raise RuntimeError(f"model {self.spec.name!r} has no champion yet: run `driftloop sweep` first")
        model, _ = _load_champion(self.settings, self.spec.name, v)
        self.current = (model, v)
        self.buffer: list = []
        self.buffered = 0
        self.dropped = 0
        self._tasks: list[asyncio.Task] = []
        self.admin_token = _token(ADMIN_TOKEN_ENV)
        self.predict_token = _token(PREDICT_TOKEN_ENV)
        try:  # which replica answered: lets an operator (and the fault tests) see a replacement come into service
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:
            self.replica = uuid.uuid4().hex[:8]
        schema = fastapi_app.openapi()
        for path, op in schema.get("paths", {}).items():
            if path.endswith("/predict") and "post" in op:
                op["post"]["requestBody"] = {"required": True, "content": {"application/json": {"schema": request_schema(self.features)}}}
        fastapi_app.openapi_schema = schema
        self.init_s = time.time() - started  # constructor time: registry lookup, download, model load

    def _ensure_tasks(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._poll_alias()), loop.create_task(self._flush_loop())]

    async def _poll_alias(self) -> None:
        from driftloop import registry

        while True:
            await asyncio.sleep(POLL_S)
            try:
                v = await asyncio.to_thread(registry.champion_version, self.settings, self.spec.name)
                if v is not None and v != self.current[1]:
                    model, _ = await asyncio.to_thread(_load_champion, self.settings, self.spec.name, v)
                    self.current = (model, v)  # one assignment: in-flight batches keep the model they started with
                    log.info("predictor for %s swapped to version %s", self.spec.name, v)
            except Exception:
                log.exception("alias poll failed; still serving version %s", self.current[1])

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.002)
    async def _infer(self, xs: list[np.ndarray]) -> list[tuple[np.ndarray, int]]:
        import torch

        model, version = self.current
        sizes = [len(x) for x in xs]
        with torch.no_grad():
            proba = model(torch.from_numpy(np.concatenate(xs))).numpy()
        out, i = [], 0
        for n in sizes:
            out.append((proba[i : i + n], version))
            i += n
        return out

    def _hand_to_monitor(self, ids: list[str], x: np.ndarray, proba: np.ndarray, version: int) -> None:
        if not self.monitoring:
            return
        if self.buffered + len(x) > self.MAX_BUFFER:
            self.dropped += len(x)  # overload: sample out and count, never queue without bound
            return
        self.buffer.append((ids, [time.time()] * len(ids), x, proba, version))
        self.buffered += len(x)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(HANDOFF_S)
            await self._flush()

    async def _flush(self) -> None:
        if not self.buffer:
            return
        buf, self.buffer, self.buffered = self.buffer, [], 0
        dropped, self.dropped = self.dropped, 0
        by_version: dict[int, list] = {}
        for item in buf:
            by_version.setdefault(item[4], []).append(item)
        for version, items in by_version.items():
            batch = {"ids": [i for it in items for i in it[0]], "ts": [t for it in items for t in it[1]],
                     "x": np.concatenate([it[2] for it in items]), "proba": np.concatenate([it[3] for it in items]),
                     "version": version, "dropped": dropped}
            dropped = 0
            try:
                await self.monitor.observe.remote(batch)
            except Exception:
                log.exception("monitor unavailable; %d rows not monitored", len(batch["ids"]))

    # --- HTTP -----------------------------------------------------------------------------------------
    @fastapi_app.post("/predict", summary="Predict one row or a batch of rows (named features)")
    async def predict(self, request: Request):
        self._ensure_tasks()
        if self.predict_token is not None and not _authorised(request, self.predict_token):
            return _error(401, "missing or wrong bearer token")
        try:
            length = int(request.headers.get("content-length") or 0)
            if length > 1_000_000:
                raise InvalidInput(f"body of {length} bytes exceeds the limit of 1000000 bytes", 413)
            x = parse_rows(parse_json(await request.body()), self.features, self.max_batch_rows)
        except InvalidInput as err:
            return _error(err.status, str(err))
        proba, version = await self._infer(x)
        rid = uuid.uuid4().hex
        ids = [rid] if len(x) == 1 else [f"{rid}-{i}" for i in range(len(x))]
        self._hand_to_monitor(ids, x, proba, version)
        preds = self.classes[proba.argmax(axis=1)]
        rows = [{"id": i, "prediction": int(p), "probabilities": [round(float(q), 6) for q in pr]} for i, p, pr in zip(ids, preds, proba)]
        return {"request_id": rid, "model": self.spec.name, "model_version": version, "predictions": rows}

    @fastapi_app.post("/feedback", summary="Record the ground-truth label of a served row")
    async def feedback(self, request: Request):
        self._ensure_tasks()
        try:
            rid, label = parse_feedback(parse_json(await request.body(), 10_000), self.spec.dataset.classes)
        except InvalidInput as err:
            return _error(err.status, str(err))
        await self._flush()  # the row may still be in this replica's buffer
        try:
            res = await self.monitor.feedback.remote(rid, label)
        except Exception as err:
            log.error("feedback for %s not recorded: %s", rid, type(err).__name__)
            return _error(503, "label not recorded (feedback store unavailable); retry later")
        status = res.pop("status")
        return JSONResponse(res, status_code=status)

    @fastapi_app.get("/drift", summary="Drift monitor state: windows, detector results, policy, retraining")
    async def drift(self):
        self._ensure_tasks()
        return await self.monitor.status.remote()

    @fastapi_app.get("/healthz", summary="Liveness and the model version this replica serves")
    async def healthz(self):
        self._ensure_tasks()
        return {"status": "ok", "model": self.spec.name, "model_version": self.current[1], "replica": self.replica,
                "init_s": round(self.init_s, 3)}

    def _admin_denied(self, request: Request) -> JSONResponse | None:
        """403 while no admin token is configured, 401 for a missing or wrong one, None when allowed."""
        if self.admin_token is None:
            return _error(403, f"admin endpoints are disabled: set {ADMIN_TOKEN_ENV} (or {ADMIN_TOKEN_ENV}_FILE)")
        if not _authorised(request, self.admin_token):
            return _error(401, "missing or wrong bearer token")
        return None

    @fastapi_app.post("/admin/retrain", summary="Trigger retraining now (bearer token)")
    async def admin_retrain(self, request: Request):
        if (denied := self._admin_denied(request)) is not None:
            return denied
        return await self.monitor.trigger.remote("manual (HTTP)")

    @fastapi_app.post("/admin/promote/{version}", summary="Move the champion alias to VERSION (bearer token)")
    async def admin_promote(self, version: int, request: Request):
        from driftloop import registry

        if (denied := self._admin_denied(request)) is not None:
            return denied
        try:
            await asyncio.to_thread(registry.promote, self.settings, self.spec.name, version, "manual (HTTP)")
        except Exception as err:
            return _error(404, f"cannot promote version {version}: {str(err).splitlines()[0]}")
        return {"model": self.spec.name, "champion": version}

    @fastapi_app.post("/admin/rollback", summary="Move the champion alias back to the previous champion (bearer token)")
    async def admin_rollback(self, request: Request):
        from driftloop import registry

        if (denied := self._admin_denied(request)) is not None:
            return denied
        try:
            v = await asyncio.to_thread(registry.rollback, self.settings, self.spec.name)
        except Exception as err:
            return _error(409, str(err).splitlines()[0])
        return {"model": self.spec.name, "champion": v}


def _resolve(path: str) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    alt = Path(__file__).resolve().parents[3] / path  # the project root, for `serve deploy` from elsewhere
    return alt if alt.is_file() else p


def build(args: dict[str, Any]):
    """Serve application builder (`import_path: driftloop.serving.app:build`, args: {spec: configs/x.yaml})."""
    spec = load_spec(_resolve(str(args["spec"])))
    monitoring = bool(args.get("monitoring", True))
    d = spec.model_dump(mode="json")
    return Predictor.bind(DriftMonitor.bind(d), d, monitoring, int(args.get("max_batch_rows", 256)))
