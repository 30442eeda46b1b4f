"""The retraining policy: when does drift (or feedback) justify a retraining job? Pure logic."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from driftloop.config import RetrainSpec


@dataclass(frozen=True)
class Trigger:
    """A decision to retrain, with the reason and the cause that lineage records: the drift event (window or
    online alarm) that caused it, or "labels", "accuracy floor", "max error", "manual", "data version N"."""

    reason: str
    at: float
    champion_version: int | None
    cause: str = ""
    event_id: str | None = None


@dataclass
class PolicyState:
    recent: list[bool] = field(default_factory=list)
    labelled: int = 0  # labelled production rows seen since the last retraining
    labels_since_trigger: int = 0
    last_trigger_at: float | None = None
    pending: str | None = None  # a reason waiting for enough labelled rows
    pending_cause: str = ""  # ...and what caused it (the drift event id survives the wait for labels)
    pending_event: str | None = None
    fired: int = 0
    labelled_since: float = field(default_factory=time.time)  # `labelled` counts labels newer than this
    swapped_at: float | None = None  # when the current champion took over: the cooldown counts from here too
    refusals: int = 0  # challengers refused since the last swap: each doubles the cooldown (benign drift backs off)
    data_seen: int = -1  # the table version a new-data trigger last fired for: its rows are not new again
    windows_since_swap: int = 0


class Policy:
    """Drift in k of the last m windows, an online alarm, accuracy below a floor, N new labels, or manual;
    with a cooldown after each trigger and after each swap, a warm-up of windows for a new champion's
    detectors, and a minimum of labelled production rows to retrain on."""

    def __init__(self, spec: RetrainSpec, state: PolicyState | None = None):
        self.spec = spec
        self.state = state or PolicyState()
        self._recent = deque(self.state.recent, maxlen=spec.policy.m)

    # --- inputs -------------------------------------------------------------------------------
    def on_window(self, is_drift: bool, now: float, champion: int | None, event_id: str | None = None) -> Trigger | None:
        """A closed window's verdict. A new champion's first windows only fill the k-of-m memory (warm-up)."""
        self._recent.append(bool(is_drift))
        self.state.recent = list(self._recent)
        self.state.windows_since_swap += 1
        k = self.spec.policy.k
        if self.spec.policy.window_drift and sum(self._recent) >= k and not self.warming_up():
            return self._fire(f"drift in {sum(self._recent)} of the last {len(self._recent)} windows (k={k})", now, champion,
                              f"drift event {event_id}" if event_id else "drift", event_id)
        return self._retry_pending(now, champion)

    def on_online_alarm(self, detector: str, now: float, champion: int | None, event_id: str | None = None) -> Trigger | None:
        if not self.spec.policy.online_alarm or self.warming_up():
            return None
        return self._fire(f"online detector {detector} raised an alarm", now, champion,
                          f"drift event {event_id}" if event_id else f"online alarm {detector}", event_id)

    def on_labels(self, n: int, rolling_accuracy: float | None, now: float, champion: int | None,
                  rolling_error: float | None = None, stamped: list[float] | None = None) -> Trigger | None:
        """Labelled rows came in; the champion's rolling accuracy (classification) or mean absolute error (regression)
        over its last window of labels, None while too few. With `stamped` (each label's time in the feedback table)
        a label counts only toward the periods it was recorded in, as a restart counts them from the table: one
        recorded just before a retraining finished, and acknowledged just after, is not a label since it."""
        s = self.state
        if stamped is None:
            s.labelled += n
            s.labels_since_trigger += n
        else:
            s.labelled += sum(t > s.labelled_since for t in stamped)
            s.labels_since_trigger += sum(t > (s.last_trigger_at or s.labelled_since) for t in stamped)
        p = self.spec.policy
        if p.max_error is not None and rolling_error is not None and rolling_error > p.max_error:
            return self._fire(f"rolling error (MAE) {rolling_error:.4g} above max {p.max_error:g}", now, champion, "max error")
        if p.accuracy_floor is not None and rolling_accuracy is not None and rolling_accuracy < p.accuracy_floor:
            return self._fire(f"rolling accuracy {rolling_accuracy:.3f} below floor {p.accuracy_floor}", now, champion,
                              "accuracy floor")
        if p.new_labels is not None and self.state.labels_since_trigger >= p.new_labels:
            return self._fire(f"{self.state.labels_since_trigger} new labelled rows (>= {p.new_labels})", now, champion, "labels")
        return self._retry_pending(now, champion)

    def on_accuracy_drop(self, block: float, baseline: float, now: float, champion: int | None) -> Trigger | None:
        """A block of labels scored `policy.accuracy_drop` below the champion's own earlier blocks: the error
        moved, whatever the p-values say."""
        return self._fire(f"accuracy {block:.3f} on the last block vs {baseline:.3f} before", now, champion, "accuracy drop")

    def on_new_data(self, rows: int, version: int, now: float, champion: int | None) -> Trigger | None:
        """The training table gained `rows` rows since the champion's data version (e.g. `data ingest`)."""
        p = self.spec.policy
        if p.new_data is None or rows < p.new_data.min_rows:
            return None
        if self.cooling_down(now):
            return None
        self.state.data_seen = version
        return self._emit(f"{rows} new rows in the training table (>= {p.new_data.min_rows})", now, champion,
                          f"data version {version}")

    def manual(self, now: float, champion: int | None) -> Trigger:
        """A manual trigger ignores the cooldown and the label minimum."""
        return self._emit("manual trigger", now, champion, "manual")

    def retrained(self, now: float | None = None, swapped: bool = False) -> None:
        """A retraining finished (promoted or not): labelled rows are now part of the data; windows restart.
        After a swap the cooldown counts from the swap, and the new detectors get their warm-up windows."""
        now = time.time() if now is None else now
        self.state.labelled = 0
        self.state.labelled_since = now
        self._recent.clear()
        self.state.recent = []
        self.state.pending, self.state.pending_cause, self.state.pending_event = None, "", None
        if swapped:
            self.state.swapped_at = now
            self.state.windows_since_swap = 0
            self.state.refusals = 0
        else:
            self.state.refusals += 1

    # --- state ----------------------------------------------------------------------------------
    @property
    def warmup_windows(self) -> int:
        w = self.spec.policy.warmup_windows
        return self.spec.policy.m if w is None else w

    def warming_up(self) -> bool:
        """A new champion's detectors have not yet seen enough windows to be trusted with a trigger."""
        return self.state.swapped_at is not None and self.state.windows_since_swap < self.warmup_windows

    @property
    def cooldown_s(self) -> float:
        """The spec's cooldown, doubled for every challenger refused since the last swap: drift that a retrained
        model cannot improve on is benign for this champion, and re-testing it at full rate is a retrain storm."""
        return self.spec.cooldown_s * 2 ** min(self.state.refusals, 6)

    def cooling_down(self, now: float) -> bool:
        last = max((t for t in (self.state.last_trigger_at, self.state.swapped_at) if t is not None), default=None)
        return last is not None and now - last < self.cooldown_s

    def _fire(self, reason: str, now: float, champion: int | None, cause: str, event_id: str | None = None) -> Trigger | None:
        if self.cooling_down(now):
            return None
        if self.state.labelled < self.spec.min_labelled_rows:
            if self.state.pending is None:  # the first cause waits for the labels; a later one does not re-attribute it
                self.state.pending, self.state.pending_cause, self.state.pending_event = reason, cause, event_id
            return None
        if self.state.pending:  # a decision that waited for labels fires now, under its own cause (its drift event)
            return self._retry_pending(now, champion)
        return self._emit(reason, now, champion, cause, event_id)

    def _retry_pending(self, now: float, champion: int | None) -> Trigger | None:
        s = self.state
        if s.pending and not self.cooling_down(now) and s.labelled >= self.spec.min_labelled_rows:
            return self._emit(f"{s.pending} (after {s.labelled} labelled rows)", now, champion, s.pending_cause or "labels",
                              s.pending_event)
        return None

    def _emit(self, reason: str, now: float, champion: int | None, cause: str, event_id: str | None = None) -> Trigger:
        self.state.last_trigger_at = now
        self.state.pending, self.state.pending_cause, self.state.pending_event = None, "", None
        self.state.labels_since_trigger = 0
        self.state.fired += 1
        return Trigger(reason, now, champion, cause, event_id)

    def snapshot(self) -> dict[str, Any]:
        s = self.state
        return {"recent_windows": s.recent, "labelled_rows": s.labelled, "pending": s.pending, "pending_cause": s.pending_cause,
                "last_trigger_at": s.last_trigger_at, "triggers": s.fired, "k": self.spec.policy.k, "m": self.spec.policy.m,
                "cooldown_s": self.cooldown_s, "refusals": s.refusals, "min_labelled_rows": self.spec.min_labelled_rows,
                "swapped_at": s.swapped_at, "windows_since_swap": s.windows_since_swap, "warming_up": self.warming_up()}


def submission_id(model: str, champion: int | None, generation: int, attempt: int = 0) -> str:
    """The Ray job id for a trigger: same model, champion and generation -> same job, however many triggers."""
    base = f"driftloop-retrain-{model}-v{champion if champion is not None else 0}-g{generation}"
    return base if attempt == 0 else f"{base}-r{attempt}"
