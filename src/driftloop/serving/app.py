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
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from driftloop.config import Spec, load_spec
from driftloop.drift.core import MonitorCore
from driftloop.serving import ids as request_ids
from driftloop.serving.limits import BoundedMap, Coalescer, Reservoir, TokenBuckets, trim_oldest
from driftloop.serving.validation import (MAX_BODY_BYTES, InvalidInput, parse_feedback, parse_json, parse_rows, read_limited,
                                          request_schema)

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
NEW_DATA_CHECK_S = float(os.environ.get("DRIFTLOOP_NEW_DATA_CHECK_S", "10"))  # one read of the table's log per check
# Bounds of the monitor's memory: ids it answers /feedback for from memory (older ones are looked up in the inference
# log, filtered by id), and served rows held for the inference log while Delta writes fail (oldest dropped, counted).
KNOWN_IDS = int(os.environ.get("DRIFTLOOP_KNOWN_IDS", "50000"))
LOG_BUFFER_ROWS = int(os.environ.get("DRIFTLOOP_LOG_BUFFER_ROWS", "100000"))
# /feedback per client host and Predictor replica: a token bucket (labels/s, burst).
FEEDBACK_RATE = float(os.environ.get("DRIFTLOOP_FEEDBACK_RATE", "200"))
FEEDBACK_BURST = float(os.environ.get("DRIFTLOOP_FEEDBACK_BURST", "400"))
# A row reaches the monitor within a hand-off period of its id being issued; only that young an unknown id is
# worth waiting for. Labels of ids issued before the monitor started (plus a margin for a draining predecessor
# and clock skew) are looked up in the feedback table; later ones all went through this replica's memory.
FRESH_ID_S = 5.0
LABEL_COVER_MARGIN_S = 30.0


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


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _app_name() -> str:
    """The Serve application this replica belongs to ("default" outside Serve): it names the request-id key."""
    try:
        return serve.get_replica_context().app_name
    except Exception:
        return "default"


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The body within MAX_BYTES: a declared length is checked up front, a chunked body as it streams in."""
    try:
        length = int(request.headers.get("content-length") or 0)
    except ValueError:
        raise InvalidInput("content-length: not a number", 400) from None
    if length > max_bytes:
        raise InvalidInput(f"body of {length} bytes exceeds the limit of {max_bytes} bytes", 413)
    return await read_limited(request.stream(), max_bytes)


def _load_champion(settings, name: str, version: int):
    """Download and load a model version, off the event loop; the downloaded copy is deleted once loaded
    (the node's disk is only a cache, and a copy per replica start and swap would pile up)."""
    import shutil

    from driftloop import registry

    path = registry.download(settings, name, version, settings.home / "serving" / f"{name}-v{version}-{uuid.uuid4().hex[:6]}")
    try:
        return registry.load_model(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)


fastapi_app = FastAPI(title="driftloop", description="Predictions with drift monitoring, feedback and model lineage.")


@serve.deployment(name="DriftMonitor", num_replicas=1, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256,
                  health_check_period_s=HEALTH_CHECK_PERIOD_S)
class DriftMonitor:
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
        self.registry_error: dict | None = None  # the last registry failure while polling the alias, until one succeeds
        self.champion_data_version = -1  # the training-table version the champion was trained on
        self._data_checked_at = 0.0
        self.manifest: dict = {}
        self.known: BoundedMap = BoundedMap(KNOWN_IDS)  # request id -> (model version, prediction); older: the log
        self.log_buffer: list = []
        self.pending_labels: list = []
        self._label_writer: asyncio.Task | None = None
        self.feedback_count = 0
        self.dropped_reported = 0
        self.restored: list[dict] = []
        self.retrain = None  # set lazily: the job tracker (driftloop.jobs.JobTracker)
        try:  # one state file per Serve application: two apps serving the same model keep separate windows
            app_name = serve.get_replica_context().app_name
        except Exception:
            app_name = "default"
        self.state_path = self.settings.state_dir / f"monitor-{app_name}-{self.name}.npz"
        self._init_feedback_state(app_name)
        self.pending_submit: dict | None = None  # a trigger decided but not yet handed to the job tracker
        self._dirty = False
        self.persisted_at: float | None = None
        self.restored_state: dict | None = None
        self.first_started_at = time.time()  # label counts are "since this application first started"
        self.replica_started_at = self.first_started_at
        self._tasks: list[asyncio.Task] = []
        self._lock = asyncio.Lock()
        tags = ("model",)
        self.m_pval = metrics.Gauge("driftloop_drift_p_value", "Smallest p-value of a detector on the last window", tag_keys=("model", "detector"))
        self.m_score = metrics.Gauge("driftloop_drift_score", "Test statistic of a detector on the last window", tag_keys=("model", "detector"))
        self.m_drift = metrics.Gauge("driftloop_drift_is_drift", "1 when the last window drifted", tag_keys=tags)
        self.m_windows = metrics.Counter("driftloop_drift_windows_total", "Windows tested", tag_keys=tags)
        self.m_samples = metrics.Counter("driftloop_monitor_samples_total", "Served rows seen by the monitor", tag_keys=tags)
        self.m_dropped = metrics.Counter("driftloop_monitor_dropped_rows_total", "Rows sampled out under overload", tag_keys=tags)
        self.m_log_dropped = metrics.Counter("driftloop_inference_log_dropped_rows_total",
                                             "Served rows dropped from the inference-log buffer while writes failed", tag_keys=tags)
        self.m_acc = metrics.Gauge("driftloop_rolling_accuracy", "Accuracy over recent labelled rows", tag_keys=("model", "version"))
        for m in (self.m_drift, self.m_windows, self.m_samples, self.m_dropped, self.m_log_dropped):
            m.set_default_tags({"model": self.name})
        self.m_submit_failures = metrics.Counter("driftloop_retrain_submit_failures_total",
                                                 "Retraining submissions the Ray Jobs API refused or never answered", tag_keys=tags)
        self.m_submit_failures.set_default_tags({"model": self.name})
        self._submit_failures_seen = 0  # the tracker's count already added to the counter
        self._last_submit: dict | None = None  # what the Jobs API said to the last trigger handed to it
        self._swap_if_needed_sync()
        self._restore_history()
        self._restore_state()
        self.init_s = time.time() - self.replica_started_at  # constructor time: detectors loaded, state restored

    # --- lifecycle ---------------------------------------------------------------------------------
    def _init_feedback_state(self, app_name: str) -> None:
        """Feedback bookkeeping: the shared request-id key, labels seen (bounded), lookups that coalesce."""
        self.id_secret = request_ids.app_secret(self.settings.state_dir, app_name)
        self.log_dropped = 0
        # every label of an id issued after this went through this replica (and is in `labelled` unless evicted)
        self.labels_cover_from = time.time() + LABEL_COVER_MARGIN_S
        self.labelled: BoundedMap = BoundedMap(KNOWN_IDS, on_evict=self._forgot_label)  # id -> (label, issued_at)
        self._labelling: dict[str, asyncio.Future] = {}  # ids with a label being decided: one decision at a time
        self._label_lookups = Coalescer(self._read_labels)
        self._prediction_lookups = Coalescer(self._read_predictions)

    def _forgot_label(self, request_id: str, value: tuple[int, float]) -> None:
        """An evicted label must still be found: ids issued up to its issue time are looked up again."""
        self.labels_cover_from = max(self.labels_cover_from, value[1])

    def _ensure_tasks(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._poll_alias()), loop.create_task(self._flush_loop())]

    async def check_health(self) -> None:
        """Serve's periodic health check also starts the poll loops, so an app with no traffic yet still follows
        the champion alias, new data and retraining jobs."""
        self._ensure_tasks()

    def _load_new_champion(self):
        """(version, windowed detectors, manifest) when the alias moved, else None; no lock held while downloading.
        A registry error is kept for /drift ("registry unreachable") and raised: never read as "no champion"."""
        import shutil

        from driftloop import registry
        from driftloop.drift.detectors import load_detectors
        from driftloop.drift.windows import WindowedDetectors

        try:
            v = registry.champion_version(self.settings, self.name)
        except registry.RegistryUnavailable as err:
            self.registry_error = {"error": str(err), "since": (self.registry_error or {}).get("since", time.time())}
            raise
        self.registry_error = None
        if v is None or v == self.version:
            return None
        path = registry.download(self.settings, self.name, v, self.settings.home / "serving" / f"{self.name}-monitor-v{v}-{uuid.uuid4().hex[:6]}")
        try:
            dets, manifest = load_detectors(path / "detectors", self.spec.n_classes)
        finally:
            shutil.rmtree(path, ignore_errors=True)  # loaded into memory; the download was only a cache
        data_version = int(registry.version_tags(self.settings, self.name, v).get("data.version") or -1)
        windowed = WindowedDetectors(dets, manifest.get("window", self.spec.drift.window), v, self.spec.drift.history)
        return v, windowed, manifest, data_version

    # the core owns what the policy reads; these names are the monitor's view of it
    policy = property(lambda self: self.core.policy)
    detectors = property(lambda self: self.core.detectors)
    version = property(lambda self: self.core.version)
    correct = property(lambda self: self.core.correct)

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
                if self.retrain.newly_final(job):
                    if job["status"] == "SUCCEEDED" and not swapped:
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

    def _restore_history(self) -> None:
        from driftloop.serving import logs

        try:
            df = logs.read_or_empty(logs.uris(self.settings, self.spec)["drift_events"])
            if len(df):
                df = df.sort_values("ts").tail(self.spec.drift.history)
                self.restored = [{"event_id": r.event_id, "ts": r.ts, "model_version": int(r.model_version),
                                  "is_drift": bool(r.is_drift), "min_p_val": None if r.min_p_val != r.min_p_val else float(r.min_p_val), "restored": True}
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
            self.core.policy = Policy(self.spec.retraining, PolicyState(**meta["policy"]))
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
        self.log_buffer.append((batch["ids"], batch["ts"], version, x, preds))
        self._bound_log_buffer()
        self.m_samples.inc(len(x))
        async with self._lock:  # the version check and the window update see the same detectors (no swap between)
            now = time.time()
            detected = await asyncio.to_thread(self.core.detect, x, proba, version, now)
        if detected is None:
            return 0  # rows of a model we no longer monitor are logged but do not enter the new windows
        decided = self.core.decide(detected, now)  # policy changes happen on the event loop only
        self._dirty = True
        for rep in decided.windows:
            await self._on_window(rep)
        for ev in decided.alarms:
            await self._on_alarm(ev)
        for trig in decided.triggers:
            await self._on_trigger(trig)
        if decided.windows and self._dirty:
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
        await asyncio.to_thread(self._append, logs.uris(self.settings, self.spec)["drift_events"], logs.drift_event_frame(rep.as_dict()))

    async def _on_alarm(self, event: dict) -> None:
        """An online detector's alarm is a drift event of its own; a trigger it causes names that event."""
        from driftloop.serving import logs

        await asyncio.to_thread(self._append, logs.uris(self.settings, self.spec)["drift_events"], logs.drift_event_frame(event))

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
        if self.retrain is None:
            from driftloop.jobs import JobTracker

            self.retrain = JobTracker(self.spec, self.settings)
        return self.retrain

    def _count_submit_failures(self) -> None:
        """Add the tracker's new refused submissions to the Prometheus counter (from the event loop, not a thread)."""
        n = self._tracker().health.submit_failures
        if n > self._submit_failures_seen:
            self.m_submit_failures.inc(n - self._submit_failures_seen)
            self._submit_failures_seen = n

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
            self.log_buffer = buf + self.log_buffer  # keep them for the next attempt, within the bound
            self._bound_log_buffer()
            raise
        return len(df)

    def _bound_log_buffer(self) -> None:
        """While the inference log cannot be written, keep the newest LOG_BUFFER_ROWS rows; count what is dropped."""
        self.log_buffer, dropped = trim_oldest(self.log_buffer, LOG_BUFFER_ROWS, lambda chunk: len(chunk[0]))
        if dropped:
            self.log_dropped += dropped
            self.m_log_dropped.inc(dropped)
            log.warning("inference log buffer full: dropped the %d oldest served rows (%d in all)", dropped, self.log_dropped)

    # --- feedback ----------------------------------------------------------------------------------
    async def feedback(self, request_id: str, label: int) -> dict[str, Any]:
        """Record a ground-truth label durably, once per served row: a repeat is acknowledged (same label) or
        refused (409, another label), never counted again, so repeating a label cannot trigger retraining."""
        self._ensure_tasks()
        try:
            rid = request_ids.verify(self.id_secret, request_id)
        except InvalidInput as err:
            return {"status": err.status, "error": str(err)}
        while (busy := self._labelling.get(request_id)) is not None:  # simultaneous labels of one id: one decides
            await asyncio.shield(busy)
        done = self._labelling[request_id] = asyncio.get_running_loop().create_future()
        try:
            return await self._label_once(rid, label)
        finally:
            del self._labelling[request_id]
            done.set_result(None)

    async def _label_once(self, rid: request_ids.RequestId, label: int) -> dict[str, Any]:
        """Decide one label while no other label of the same id is being decided."""
        request_id = rid.request_id
        existing = await self._existing_label(rid)
        if existing is not None:
            if existing != label:
                return {"status": 409, "label": existing,
                        "error": f"request_id {request_id!r} already has label {existing}; a recorded label is not changed"}
            known = self.known.get(request_id)
            return {"status": 200, "request_id": request_id, "label": label, "duplicate": True, "model_version": rid.version,
                    "prediction": known[1] if known else None}
        known = await self._served_row(rid)
        if known is None:
            return {"status": 404, "error": f"unknown request_id {request_id!r}: no served row on record "
                                            "(rows sampled out under overload are not monitored)"}
        version, pred = known
        now = time.time()
        await self._commit_label(request_id, label, now)
        self.labelled[request_id] = (label, rid.issued_at)
        self.feedback_count += 1
        trig = self.core.label(version, [pred == label], now)
        self.m_acc.set(float(np.mean(self.correct[version])), tags={"model": self.name, "version": str(version)})
        self._dirty = True
        if trig is not None:
            await self._on_trigger(trig)
        return {"status": 200, "request_id": request_id, "label": label, "duplicate": False, "model_version": version,
                "prediction": pred}

    async def _existing_label(self, rid: request_ids.RequestId) -> int | None:
        """The label already recorded for an id: from memory, or from the feedback table when the id may
        have been labelled before this replica (a restart) or was forgotten (bounded memory)."""
        hit = self.labelled.get(rid.request_id)
        if hit is not None:
            return hit[0]
        if rid.issued_at > self.labels_cover_from:
            return None
        label = await self._label_lookups.get(rid)
        if label is not None:
            self.labelled[rid.request_id] = (label, rid.issued_at)
        return label

    async def _served_row(self, rid: request_ids.RequestId) -> tuple[int, int] | None:
        """(model version, prediction) of a served row: from memory, after a short wait for a row still on its way
        from a predictor (only for a young id), else from the inference log."""
        known = self.known.get(rid.request_id)
        deadline = min(time.time() + 3.0, rid.issued_at + FRESH_ID_S)
        while known is None and time.time() < deadline:
            await asyncio.sleep(0.05)
            known = self.known.get(rid.request_id)
        if known is None:
            known = await self._prediction_lookups.get(rid)
            if known is not None:
                self.known[rid.request_id] = known
        return known

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

    def _read_predictions(self, rids: list[request_ids.RequestId]) -> dict[request_ids.RequestId, tuple[int, int]]:
        """One filtered inference-log read for every id waiting: by id, and by the hand-off time its id implies."""
        from driftloop.serving import logs

        hits = logs.lookup(logs.uris(self.settings, self.spec)["inference"], [r.request_id for r in rids],
                           ["model_version", "prediction"], min(r.issued_at for r in rids) - 60,
                           max(r.issued_at for r in rids) + 60)
        by_id = {r.request_id: r for r in rids}
        return {by_id[i]: (int(v), int(p)) for i, (v, p) in hits.items()}

    def _read_labels(self, rids: list[request_ids.RequestId]) -> dict[request_ids.RequestId, int]:
        """One filtered feedback-table read for every id waiting (a label is never older than its id)."""
        from driftloop.serving import logs

        hits = logs.lookup(logs.uris(self.settings, self.spec)["feedback"], [r.request_id for r in rids], ["label"],
                           min(r.issued_at for r in rids) - request_ids.CLOCK_SKEW_S)
        by_id = {r.request_id: r for r in rids}
        return {by_id[i]: int(v[0]) for i, v in hits.items()}

    # --- visibility and admin ----------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        self._ensure_tasks()
        d = self.detectors
        recent = [r.as_dict() for r in d.history] if d else []
        acc = self.core.rolling_accuracy()
        job = self._tracker().status()  # as of the poll loop's last look; error/since/attempts when the path fails
        return {
            "model": self.name, "model_version": self.version, "samples": d.samples if d else 0,
            "window": {"size": d.window if d else self.spec.drift.window, "fill": d.fill if d else 0, "index": d.windows if d else 0},
            "detectors": [{"name": x.name, "kind": x.kind, "input": x.input, "online": x.online, "t": x.time if x.online else None}
                          for x in (d.batch + d.online)] if d else [],
            "recent": recent[::-1], "restored_history": self.restored[::-1], "online": d.online_last if d else {},
            "rolling_accuracy": acc, "feedback": self.feedback_count, "dropped_rows": self.dropped_reported,
            "inference_log_dropped_rows": self.log_dropped,
            "policy": self.policy.snapshot(), "retraining": job, "registry": self.registry_error or {"ok": True},
            "state": {"path": str(self.state_path), "persisted_at": self.persisted_at, "restored": self.restored_state,
                      "pending_submit": self.pending_submit, "unsaved_changes": self._dirty,
                      "replica_started_at": self.replica_started_at, "init_s": round(self.init_s, 3)},
        }

    async def trigger(self, reason: str = "manual") -> dict[str, Any]:
        """A manual trigger goes the way of any other: durable, then to the Jobs API, retried until it is taken."""
        self._ensure_tasks()
        trig = self.policy.manual(time.time(), self.version)
        self._dirty = True
        await self._on_trigger(trig)
        return self._last_submit or {"submitted": False, "job": None, "why": "pending"}


@serve.deployment(name="Predictor", num_replicas=2, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64,
                  health_check_period_s=HEALTH_CHECK_PERIOD_S)
@serve.ingress(fastapi_app)
class Predictor:
    """Validates, batches and answers predictions; hands every served row to the monitor off the hot path."""

    MAX_BUFFER = 20_000

    def __init__(self, monitor, spec: dict[str, Any], monitoring: bool = True, max_batch_rows: int = 256,
                 feedback_rate: float | None = None, feedback_burst: float | None = None):
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
        model = _load_champion(self.settings, self.spec.name, v)
        self.current = (model, v)
        self._init_ingress(feedback_rate, feedback_burst)
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

    def _init_ingress(self, feedback_rate: float | None, feedback_burst: float | None) -> None:
        """The hand-off sample, the request-id key (shared with the monitor) and the /feedback rate limit."""
        self.sample = Reservoir(self.MAX_BUFFER)  # (id, ts, x row, proba row, version) of rows served since the last flush
        self.id_secret = request_ids.app_secret(self.settings.state_dir, _app_name())
        self.id_max_age_s = request_ids.max_age_s()
        rate = FEEDBACK_RATE if feedback_rate is None else float(feedback_rate)
        self.feedback_limits = TokenBuckets(rate, FEEDBACK_BURST if feedback_burst is None else float(feedback_burst))

    def _ensure_tasks(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [loop.create_task(self._poll_alias()), loop.create_task(self._flush_loop())]

    async def check_health(self) -> None:
        """Serve's periodic health check also starts the poll loops, so an app with no traffic yet still follows
        the champion alias, new data and retraining jobs."""
        self._ensure_tasks()

    async def _poll_alias(self) -> None:
        from driftloop import registry

        while True:
            await asyncio.sleep(POLL_S)
            try:
                v = await asyncio.to_thread(registry.champion_version, self.settings, self.spec.name)
                if v is not None and v != self.current[1]:
                    model = await asyncio.to_thread(_load_champion, self.settings, self.spec.name, v)
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
        """Offer served rows to the hand-off sample: past MAX_BUFFER rows per period it keeps a uniform sample
        of all rows (reservoir), so a burst is monitored evenly, and counts the rest."""
        if not self.monitoring:
            return
        now = time.time()
        self.sample.offer([(rid, now, x[i], proba[i], version) for i, rid in enumerate(ids)])

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(HANDOFF_S)
            await self._flush()

    async def _flush(self) -> None:
        if not len(self.sample):
            return
        rows, dropped = self.sample.drain()
        by_version: dict[int, list] = {}
        for row in rows:
            by_version.setdefault(row[4], []).append(row)
        for version, items in by_version.items():
            batch = {"ids": [r[0] for r in items], "ts": [r[1] for r in items], "x": np.stack([r[2] for r in items]),
                     "proba": np.stack([r[3] for r in items]), "version": version, "dropped": dropped}
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
            x = parse_rows(parse_json(await _read_body(request, MAX_BODY_BYTES)), self.features, self.max_batch_rows)
        except InvalidInput as err:
            return _error(err.status, str(err))
        proba, version = await self._infer(x)
        rid = request_ids.issue(self.id_secret, version, len(x))
        ids = request_ids.row_ids(rid, len(x))
        self._hand_to_monitor(ids, x, proba, version)
        preds = self.classes[proba.argmax(axis=1)]
        rows = [{"id": i, "prediction": int(p), "probabilities": [round(float(q), 6) for q in pr]} for i, p, pr in zip(ids, preds, proba)]
        return {"request_id": rid, "model": self.spec.name, "model_version": version, "predictions": rows}

    @fastapi_app.post("/feedback", summary="Record the ground-truth label of a served row")
    async def feedback(self, request: Request):
        self._ensure_tasks()
        client = request.client.host if request.client else "unknown"
        if not self.feedback_limits.allow(client):
            lim = self.feedback_limits
            return _error(429, f"too many /feedback requests from {client}: at most {lim.rate:g}/s (burst {lim.burst:g}); "
                               "retry later", {"Retry-After": "1"})
        try:
            rid, label = parse_feedback(parse_json(await _read_body(request, 10_000), 10_000), self.spec.dataset.classes)
            issued = request_ids.verify(self.id_secret, rid, max_age=self.id_max_age_s)  # forged or expired: no lookup
        except InvalidInput as err:
            return _error(err.status, str(err))
        if time.time() - issued.issued_at < FRESH_ID_S:
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
    return Predictor.bind(DriftMonitor.bind(d), d, monitoring, int(args.get("max_batch_rows", 256)),
                          args.get("feedback_rate"), args.get("feedback_burst"))
