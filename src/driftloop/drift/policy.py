"""The retraining policy: when does drift (or feedback) justify a retraining job? Pure logic."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from driftloop.config import RetrainSpec


@dataclass(frozen=True)
class Trigger:
    """A decision to retrain, with the reason that caused it."""

    reason: str
    at: float
    champion_version: int | None


@dataclass
class PolicyState:
    recent: list[bool] = field(default_factory=list)
    labelled: int = 0  # labelled production rows seen since the last retraining
    labels_since_trigger: int = 0
    last_trigger_at: float | None = None
    pending: str | None = None  # a reason waiting for enough labelled rows
    fired: int = 0
    labelled_since: float = field(default_factory=time.time)  # `labelled` counts labels newer than this


class Policy:
    """Drift in k of the last m windows, an online alarm, accuracy below a floor, N new labels, or manual;
    with a cooldown after each trigger and a minimum of labelled production rows to retrain on."""

    def __init__(self, spec: RetrainSpec, state: PolicyState | None = None):
        self.spec = spec
        self.state = state or PolicyState()
        self._recent = deque(self.state.recent, maxlen=spec.policy.m)

    # --- inputs -------------------------------------------------------------------------------
    def on_window(self, is_drift: bool, now: float, champion: int | None) -> Trigger | None:
        self._recent.append(bool(is_drift))
        self.state.recent = list(self._recent)
        k = self.spec.policy.k
        if sum(self._recent) >= k:
            return self._fire(f"drift in {sum(self._recent)} of the last {len(self._recent)} windows (k={k})", now, champion)
        return self._retry_pending(now, champion)

    def on_online_alarm(self, detector: str, now: float, champion: int | None) -> Trigger | None:
        if not self.spec.policy.online_alarm:
            return None
        return self._fire(f"online detector {detector} raised an alarm", now, champion)

    def on_labels(self, n: int, rolling_accuracy: float | None, now: float, champion: int | None) -> Trigger | None:
        self.state.labelled += n
        self.state.labels_since_trigger += n
        p = self.spec.policy
        if p.accuracy_floor is not None and rolling_accuracy is not None and rolling_accuracy < p.accuracy_floor:
            return self._fire(f"rolling accuracy {rolling_accuracy:.3f} below floor {p.accuracy_floor}", now, champion)
        if p.new_labels is not None and self.state.labels_since_trigger >= p.new_labels:
            return self._fire(f"{self.state.labels_since_trigger} new labelled rows (>= {p.new_labels})", now, champion)
        return self._retry_pending(now, champion)

    def manual(self, now: float, champion: int | None) -> Trigger:
        """A manual trigger ignores the cooldown and the label minimum."""
        return self._emit("manual trigger", now, champion)

    def retrained(self, now: float | None = None) -> None:
        """A retraining finished (promoted or not): labelled rows are now part of the data; windows restart."""
        self.state.labelled = 0
        self.state.labelled_since = time.time() if now is None else now
        self._recent.clear()
        self.state.recent = []

    # --- state ----------------------------------------------------------------------------------
    def cooling_down(self, now: float) -> bool:
        last = self.state.last_trigger_at
        return last is not None and now - last < self.spec.cooldown_s

    def _fire(self, reason: str, now: float, champion: int | None) -> Trigger | None:
        if self.cooling_down(now):
            return None
        if self.state.labelled < self.spec.min_labelled_rows:
            self.state.pending = reason
            return None
        return self._emit(reason, now, champion)

    def _retry_pending(self, now: float, champion: int | None) -> Trigger | None:
        if self.state.pending and not self.cooling_down(now) and self.state.labelled >= self.spec.min_labelled_rows:
            return self._emit(f"{self.state.pending} (after {self.state.labelled} labelled rows)", now, champion)
        return None

    def _emit(self, reason: str, now: float, champion: int | None) -> Trigger:
        self.state.last_trigger_at = now
        self.state.pending = None
        self.state.labels_since_trigger = 0
        self.state.fired += 1
        return Trigger(reason, now, champion)

    def snapshot(self) -> dict[str, Any]:
        s = self.state
        return {"recent_windows": s.recent, "labelled_rows": s.labelled, "pending": s.pending,
                "last_trigger_at": s.last_trigger_at, "triggers": s.fired, "k": self.spec.policy.k, "m": self.spec.policy.m,
                "cooldown_s": self.spec.cooldown_s, "min_labelled_rows": self.spec.min_labelled_rows}


def submission_id(model: str, champion: int | None, generation: int, attempt: int = 0) -> str:
    """The Ray job id for a trigger: same model, champion and generation -> same job, however many triggers."""
    base = f"driftloop-retrain-{model}-v{champion if champion is not None else 0}-g{generation}"
    return base if attempt == 0 else f"{base}-r{attempt}"
