"""The DriftMonitor's durable state: the open window, online detectors, policy counters and a pending trigger,
snapshotted after each closed window and restored by a replacement replica; drift-event history for `/drift`.
A mixin of DriftMonitor."""

import asyncio
import time
from collections import deque
from dataclasses import asdict
from typing import Any

import numpy as np

from driftloop.serving.common import log


class MonitorState:
    """Snapshot and restore (state in DriftMonitor's constructor)."""

    def _restore_history(self) -> None:
        from driftloop.data import logs

        try:
            df = logs.read_or_empty(logs.uris(self.settings, self.spec)["drift_events"])
            if len(df):
                df = df.sort_values("ts").tail(self.spec.drift.history)
                self.restored = [{"event_id": r.event_id, "ts": r.ts, "model_version": int(r.model_version),
                                  "is_drift": bool(r.is_drift), "min_p_val": None if r.min_p_val != r.min_p_val else float(r.min_p_val), "restored": True}
                                 for r in df.itertuples()]
        except Exception:
            log.exception("could not read drift_events history")

    def _snapshot(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        meta: dict[str, Any] = {"saved_at": time.time(), "model": self.name, "policy": asdict(self.policy.state),
                                "pending_submit": self.pending_submit, "first_started_at": self.first_started_at,
                                "correct": {str(v): [float(b) for b in q] for v, q in self.correct.items()}}
        arrays: dict[str, np.ndarray] = {}
        if self.detectors is not None:
            meta["windows"], arrays = self.detectors.snapshot()
        return meta, arrays

    async def persist(self) -> None:
        """Snapshot under the detectors' lock (so no window is half-added), write off the event loop."""
        from driftloop.drift import state

        async with self._persist_lock:  # one write at a time, in snapshot order: an older one never lands last
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
        from driftloop.data import logs

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
