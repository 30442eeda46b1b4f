"""The monitor's decisions, with no I/O and no Ray: the champion's windowed detectors, rolling accuracy (or, for
regression, rolling error) per model version, and the retraining policy, driven by an explicit clock (`now`).

The live DriftMonitor (serving/monitor.py) and `driftloop backtest` both drive this one class, so a backtest
decides exactly what the served app would have decided on the same rows, labels and times.
Detection (`detect`, CPU-heavy) and decisions (`decide`, `label`) are separate calls so that a caller may run
detection in a worker thread while every policy change happens on one thread.
"""

from __future__ import annotations

import uuid
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from driftloop.config import Spec
from driftloop.drift.detectors import DetectorResult
from driftloop.drift.policy import Policy, Trigger
from driftloop.drift.windows import WindowedDetectors, WindowReport

MIN_ACCURACY_LABELS = 50  # rolling accuracy (or error) is not trusted on fewer labelled rows


@dataclass
class Decisions:
    """What one batch of served rows produced: closed windows, online alarms (as drift events), triggers."""

    windows: list[WindowReport] = field(default_factory=list)
    alarms: list[dict] = field(default_factory=list)
    triggers: list[Trigger] = field(default_factory=list)


class MonitorCore:
    """Windows + detectors of one champion, rolling accuracy per version, and the policy that reads them."""

    def __init__(self, spec: Spec, policy: Policy | None = None):
        self.spec = spec
        self.policy = policy or Policy(spec.retraining)
        self.version: int | None = None
        self.detectors: WindowedDetectors | None = None
        self.correct: dict[int, deque] = {}  # per version: 1.0 / 0.0 per labelled row (right class), or its absolute error
        self.blocks: dict[int, list[float]] = {}  # accuracy of each full block (one window) of labels, per version
        self._block: dict[int, list[int]] = {}    # the block being filled: [labelled, correct]

    def use(self, version: int, detectors: WindowedDetectors, now: float, swapped: bool = True) -> None:
        """Serve a (new) champion's detectors with fresh windows; a swap restarts the policy's counting."""
        self.version, self.detectors = version, detectors
        if swapped:
            self.policy.retrained(now, swapped=True)

    def detect(self, x: np.ndarray, proba: np.ndarray, version: int, now: float):
        """Add served rows of `version` to the windows; rows of any other version never enter them."""
        if version != self.version or self.detectors is None:
            return None
        return self.detectors.add(x, proba, now)

    def decide(self, detected, now: float) -> Decisions:
        """Turn closed windows and online alarms into policy decisions."""
        out = Decisions()
        if detected is None:
            return out
        reports, alarms = detected
        for rep in reports:
            out.windows.append(rep)
            trig = self.policy.on_window(rep.is_drift, now, self.version, rep.event_id)
            if trig is not None:
                rep.trigger = trig.reason
                out.triggers.append(trig)
        for alarm in alarms:
            event_id = uuid.uuid4().hex[:16]
            trig = self.policy.on_online_alarm(alarm.name, now, self.version, event_id)
            out.alarms.append(alarm_event(alarm, event_id, now, self.version, trig))
            if trig is not None:
                out.triggers.append(trig)
        return out

    def label(self, version: int, correct: list[float], now: float, stamped: list[float] | None = None) -> Trigger | None:
        """Labelled rows served by `version` (per row: right or not, or the absolute error): the rolling metric of that
        version, label counts for the policy (`stamped`: each label's time on record, see Policy.on_labels)."""
        dq = self.correct.setdefault(version, deque(maxlen=self.spec.drift.window))
        dq.extend(float(c) for c in correct)
        acc = float(np.mean(dq)) if version == self.version and len(dq) >= min(MIN_ACCURACY_LABELS, dq.maxlen) else None
        if self.spec.regression:  # the error's floor (max_error); accuracy drops are a classifier's
            return self.policy.on_labels(len(correct), None, now, self.version, rolling_error=acc, stamped=stamped)
        trig = self.policy.on_labels(len(correct), acc, now, self.version, stamped=stamped)
        return trig or self._block_check(version, correct, now)

    def _block_check(self, version: int, correct: list[bool], now: float) -> Trigger | None:
        """Non-overlapping blocks of one window of labels: the last block against the version's earlier ones."""
        drop = self.spec.retraining.policy.accuracy_drop
        if drop is None or version != self.version:
            return None
        b = self._block.setdefault(version, [0, 0])
        b[0] += len(correct)
        b[1] += int(sum(bool(c) for c in correct))
        if b[0] < self.spec.drift.window:
            return None
        block = b[1] / b[0]
        self._block[version] = [0, 0]
        earlier = self.blocks.setdefault(version, [])
        earlier.append(block)
        if len(earlier) < 2:
            return None
        baseline = float(np.mean(earlier[:-1]))
        return self.policy.on_accuracy_drop(block, baseline, now, self.version) if block < baseline - drop else None

    def retrained(self, now: float) -> None:
        """A retraining ended without a swap (refused challenger): count afresh, keep the detectors."""
        self.policy.retrained(now)

    def rolling(self) -> dict[str, dict]:
        """Per version over its last window of labelled rows: accuracy, or (regression) mae and rmse."""
        if self.spec.regression:
            return {str(v): {"mae": float(np.mean(q)), "rmse": float(np.sqrt(np.mean(np.square(q)))), "labelled": len(q)}
                    for v, q in self.correct.items() if len(q)}
        return {str(v): {"accuracy": float(np.mean(q)), "labelled": len(q)} for v, q in self.correct.items() if len(q)}


def alarm_event(alarm: DetectorResult, event_id: str, now: float, version: int | None, trig: Trigger | None) -> dict:
    """An online detector's alarm as a drift event (the row the drift_events table keeps)."""
    return {"event_id": event_id, "ended_at": now, "started_at": now, "model_version": version, "index": -1, "rows": 0,
            "is_drift": True, "detectors": [alarm.as_dict()], "kind": "online", "trigger": trig.reason if trig else ""}
