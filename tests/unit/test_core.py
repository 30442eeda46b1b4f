"""MonitorCore: the decisions the served monitor and the backtest share, driven by an explicit clock."""

from __future__ import annotations

import numpy as np

from driftloop.config import parse_spec
from driftloop.drift.core import MonitorCore
from driftloop.drift.detectors import DetectorResult
from driftloop.drift.windows import WindowedDetectors


class Threshold:
    """A real batch detector stand-in with the LoadedDetector interface: flags a window whose mean exceeds 1."""

    name, kind, input, online = "0-mean", "mean", "features", False

    def predict(self, x, proba):
        m = float(np.mean(x))
        return DetectorResult(self.name, self.kind, m > 1, 0.0 if m > 1 else 1.0, m, 1.0)


def spec(**policy):
    return parse_spec({"name": "m", "dataset": {"source": "x.csv", "table": "t", "features": ["a"], "label": "y", "classes": [0, 1]},
                       "drift": {"window": 10}, "retraining": {"cooldown_s": 0, "min_labelled_rows": 0,
                                                               "policy": {"k": 1, "m": 1, **policy}}})


def test_rows_of_another_version_never_enter_the_windows_and_a_swap_warms_up():
    core = MonitorCore(spec(warmup_windows=2))
    core.use(1, WindowedDetectors([Threshold()], 10, 1), now=0, swapped=False)
    assert core.decide(core.detect(np.full((10, 1), 5.0), np.zeros((10, 2)), 2, 1), 1).windows == []  # v2 rows: ignored
    d = core.decide(core.detect(np.full((10, 1), 5.0), np.zeros((10, 2)), 1, 2), 2)
    assert len(d.windows) == 1 and d.triggers and d.triggers[0].event_id == d.windows[0].event_id
    core.use(2, WindowedDetectors([Threshold()], 10, 2), now=3)        # swapped: a warm-up of 2 windows
    d = core.decide(core.detect(np.full((10, 1), 5.0), np.zeros((10, 2)), 2, 4), 4)
    assert d.windows and not d.triggers
    d = core.decide(core.detect(np.full((10, 1), 5.0), np.zeros((10, 2)), 2, 5), 5)
    assert d.triggers and d.triggers[0].champion_version == 2


def test_a_block_of_labels_below_the_champions_earlier_blocks_triggers():
    core = MonitorCore(spec(window_drift=False, accuracy_drop=0.1))
    core.use(1, WindowedDetectors([Threshold()], 10, 1), now=0, swapped=False)
    for t in range(3):                                                   # three blocks at 0.9
        assert core.label(1, [True] * 9 + [False], t) is None
    assert core.label(1, [True] * 8 + [False] * 2, 4) is None           # 0.8: exactly 0.1 below, not more
    trig = core.label(1, [True] * 5 + [False] * 5, 5)                    # 0.5
    assert trig is not None and trig.cause == "accuracy drop" and "0.500" in trig.reason
    assert core.label(2, [False] * 10, 6) is None                        # labels of an older version never trigger
