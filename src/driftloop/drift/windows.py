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
    trigger: str = ""  # the retraining trigger this window caused, if any

    def as_dict(self) -> dict[str, Any]:
        return {"event_id": self.event_id, "model_version": self.model_version, "index": self.index, "rows": self.rows,
                "started_at": self.started_at, "ended_at": self.ended_at, "is_drift": self.is_drift,
                "detectors": [r.as_dict() for r in self.results], "trigger": self.trigger}


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
                if res.is_drift:  # the detector has reset itself and run on over the batch's later rows
                    alarms.append(res)
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

    # --- durable state: the open window, counters, recent verdicts, online detectors' running state ----
    def snapshot(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """(JSON-able meta, arrays) that `restore` turns back into this exact state."""
        meta = {"model_version": self.model_version, "windows": self.windows, "samples": self.samples, "fill": self._fill,
                "started": self._started, "online_last": self.online_last, "history": [r.as_dict() for r in self.history]}
        arrays: dict[str, np.ndarray] = {}
        if self._fill:
            arrays["window_x"] = np.concatenate(self._x)
            arrays["window_p"] = np.concatenate(self._p)
        for d in self.online:
            for key, v in d.get_state().items():
                arrays[f"online/{d.name}/{key}"] = v
        return meta, arrays

    def restore(self, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> bool:
        """Resume from a snapshot of the same model version; False (and nothing changed) for another version."""
        if int(meta.get("model_version", -1)) != self.model_version:
            return False
        self.windows, self.samples = int(meta["windows"]), int(meta["samples"])
        self._fill, self._started = int(meta["fill"]), meta.get("started")
        self._x = [arrays["window_x"]] if self._fill else []
        self._p = [arrays["window_p"]] if self._fill else []
        self.online_last = dict(meta.get("online_last") or {})
        self.history.clear()
        for h in meta.get("history", []):
            results = [DetectorResult(**r) for r in h.pop("detectors", [])]
            self.history.append(WindowReport(**h, results=results))
        for d in self.online:
            prefix = f"online/{d.name}/"
            d.set_state({k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)})
        return True

    def _close(self, now: float) -> WindowReport:
        xw, pw = np.concatenate(self._x), np.concatenate(self._p)
        results = [d.predict(xw, pw) for d in self.batch]
        rep = WindowReport(uuid.uuid4().hex[:16], self.model_version, self.windows, len(xw), self._started or now, now,
                           any(r.is_drift for r in results), results)
        self.windows += 1
        self.history.append(rep)
        self._x, self._p, self._fill, self._started = [], [], 0, None
        return rep
