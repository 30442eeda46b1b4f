"""Windows over served rows: fill, test with every batch detector, keep the recent results."""

from __future__ import annotations

import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from driftloop.drift.detectors import DetectorResult


@dataclass
class WindowReport:
    """One full window's verdict: the drift event the rest of the loop links to."""

    event_id: str
    model_version: int
    index: int
    rows: int
    started_at: float
    ended_at: float
    is_drift: bool
    results: list[DetectorResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"event_id": self.event_id, "model_version": self.model_version, "index": self.index, "rows": self.rows,
                "started_at": self.started_at, "ended_at": self.ended_at, "is_drift": self.is_drift,
                "detectors": [r.as_dict() for r in self.results]}


class WindowedDetectors:
    """Batch detectors over fixed-size windows, online detectors row by row."""

    def __init__(self, detectors: list, window: int, model_version: int, history: int = 20):
        self.batch = [d for d in detectors if not d.online]
        self.online = [d for d in detectors if d.online]
        self.window = window
        self.model_version = model_version
        self.history: deque[WindowReport] = deque(maxlen=history)
        self.windows = 0
        self.samples = 0
        self._x: list[np.ndarray] = []
        self._p: list[np.ndarray] = []
        self._fill = 0
        self._started: float | None = None
        self.online_last: dict[str, dict] = {}

    @property
    def fill(self) -> int:
        return self._fill

    def add(self, x: np.ndarray, proba: np.ndarray, now: float | None = None) -> tuple[list[WindowReport], list[DetectorResult]]:
        """Add served rows; return the windows completed and any online alarms raised."""
        now = time.time() if now is None else now
        alarms: list[DetectorResult] = []
        for d in self.online:
            res = d.update(x, proba)
            if res is not None:
                self.online_last[d.name] = res.as_dict() | {"t": d.time}
                if res.is_drift:
                    alarms.append(res)
                    d.reset()
        reports: list[WindowReport] = []
        self.samples += len(x)
        i = 0
        while i < len(x):
            if self._started is None:
                self._started = now
            take = min(self.window - self._fill, len(x) - i)
            self._x.append(x[i : i + take])
            self._p.append(proba[i : i + take])
            self._fill += take
            i += take
            if self._fill == self.window:
                reports.append(self._close(now))
        return reports, alarms

    def _close(self, now: float) -> WindowReport:
        xw, pw = np.concatenate(self._x), np.concatenate(self._p)
        results = [d.predict(xw, pw) for d in self.batch]
        rep = WindowReport(uuid.uuid4().hex[:16], self.model_version, self.windows, len(xw), self._started or now, now,
                           any(r.is_drift for r in results), results)
        self.windows += 1
        self.history.append(rep)
        self._x, self._p, self._fill, self._started = [], [], 0, None
        return rep
