"""MonitorCore under any interleaving of observe, label, swap, refusal, manual trigger and restart (a hypothesis
state machine): no window mixes two model versions, no label is lost or counted twice, no drift event causes two
triggers, no trigger fires inside a cooldown (doubled), and none is lost: a decision waiting for labels fires with
its own drift event as soon as labels and cooldown allow, unless a retraining (swap, refusal, manual) took it."""

from __future__ import annotations

import copy
from dataclasses import asdict

import numpy as np
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from driftloop.config import parse_spec
from driftloop.drift.core import MonitorCore
from driftloop.drift.detectors import DetectorResult
from driftloop.drift.policy import Policy, PolicyState
from driftloop.drift.windows import WindowedDetectors

WINDOW = 10


class VersionCheck:
    """A batch detector that records which model versions fed each window (rows carry their version as value)."""

    name, kind, input, online = "0-check", "check", "features", False

    def __init__(self, seen: list):
        self.seen = seen

    def predict(self, x, proba):
        self.seen.append(set(np.unique(x).tolist()))
        drift = bool(np.mean(x) % 2)  # odd versions "drift": triggers happen
        return DetectorResult(self.name, self.kind, drift, 0.0 if drift else 1.0, 0.0, 0.5)


SPEC = parse_spec({"name": "m", "dataset": {"source": "x.csv", "table": "t", "features": ["a"], "label": "y", "classes": [0, 1]},
                   "drift": {"window": WINDOW},
                   "retraining": {"cooldown_s": 5, "min_labelled_rows": 3, "policy": {"k": 1, "m": 2, "new_labels": 7}}})


class CoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.seen: list[set] = []
        self.core = MonitorCore(SPEC)
        self.core.use(1, self._detectors(1), 0.0, swapped=False)
        self.now = 0.0
        self.labels_since_reset = 0
        self.trigger_events: list[str] = []
        self.waiting: str | None = None   # the drift event of a decision that waits for labels
        self.last_trigger_at: float | None = None

    def _detectors(self, version: int) -> WindowedDetectors:
        return WindowedDetectors([VersionCheck(self.seen)], WINDOW, version)

    def _take(self, triggers) -> None:
        pol = self.core.policy
        for t in triggers:
            if t.cause != "manual":  # a manual trigger ignores the cooldown; no other fires inside one
                for since in (self.last_trigger_at, pol.state.swapped_at):
                    assert since is None or t.at - since >= SPEC.retraining.cooldown_s, (t, since)
                if self.waiting is not None:  # the waiting decision fires with its own cause, not a later one's
                    assert t.event_id == self.waiting, (t, self.waiting)
            self.waiting = None
            self.last_trigger_at = t.at
        self.trigger_events += [t.event_id for t in triggers if t.event_id]
        if pol.state.pending_event is not None:
            assert self.waiting in (None, pol.state.pending_event)
            self.waiting = pol.state.pending_event

    def _nothing_held_back(self) -> None:
        """Right after the policy heard a window or labels, a waiting decision whose labels and cooldown allow it
        has fired: none is lost."""
        pol = self.core.policy
        assert not (pol.state.pending and pol.state.labelled >= SPEC.retraining.min_labelled_rows
                    and not pol.cooling_down(self.now)), pol.snapshot()

    @rule(n=st.integers(1, 20), old=st.booleans(), dt=st.floats(0, 3))
    def observe(self, n, old, dt):
        self.now += dt
        v = self.core.version - 1 if old and self.core.version > 1 else self.core.version
        x = np.full((n, 1), float(v))
        d = self.core.decide(self.core.detect(x, np.zeros((n, 2)), v, self.now), self.now)
        self._take(d.triggers)
        if d.windows:
            self._nothing_held_back()

    @rule(n=st.integers(1, 6), old=st.booleans())
    def label(self, n, old):
        v = self.core.version - 1 if old and self.core.version > 1 else self.core.version
        trig = self.core.label(v, [True] * n, self.now)
        self.labels_since_reset += n
        self._take([trig] if trig is not None else [])
        self._nothing_held_back()

    @rule()
    def swap(self):
        self.now += 1
        self.core.use(self.core.version + 1, self._detectors(self.core.version + 1), self.now)
        self.labels_since_reset, self.waiting = 0, None
        assert self.core.policy.state.pending is None

    @rule()
    def refused(self):
        self.now += 1
        self.core.retrained(self.now)
        self.labels_since_reset, self.waiting = 0, None
        assert self.core.policy.state.pending is None

    @rule(dt=st.floats(0, 3))
    def manual(self, dt):
        """`driftloop retrain` / POST /admin/retrain: fires at once, cooldown or not, and takes a waiting decision."""
        self.now += dt
        trig = self.core.policy.manual(self.now, self.core.version)
        assert trig.cause == "manual" and self.core.policy.state.pending is None
        self._take([trig])

    @rule()
    def restart(self):
        """What the monitor persists (policy state, open window) restored into a fresh core."""
        meta, arrays = self.core.detectors.snapshot()
        fresh = MonitorCore(SPEC, Policy(SPEC.retraining, PolicyState(**copy.deepcopy(asdict(self.core.policy.state)))))
        det = self._detectors(self.core.version)
        assert det.restore(meta, arrays)
        fresh.use(self.core.version, det, self.now, swapped=False)
        fresh.correct = self.core.correct
        self.core = fresh

    @invariant()
    def no_window_mixes_versions(self):
        assert all(len(s) == 1 for s in self.seen), self.seen

    @invariant()
    def labels_counted_exactly_once(self):
        assert self.core.policy.state.labelled == self.labels_since_reset

    @invariant()
    def no_drift_event_triggers_twice(self):
        assert len(self.trigger_events) == len(set(self.trigger_events)), self.trigger_events


TestCoreMachine = CoreMachine.TestCase
TestCoreMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
