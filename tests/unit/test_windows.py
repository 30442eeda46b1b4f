import numpy as np

from driftloop.drift.detectors import DetectorResult
from driftloop.drift.windows import WindowedDetectors


class MeanShift:
    """A stand-in batch detector with the wrapper's interface (the real ones are tested with alibi-detect)."""

    name, kind, input, online = "0-mean", "mean", "features", False

    def predict(self, x, p):
        d = float(abs(x.mean()))
        return DetectorResult(self.name, self.kind, d > 1.0, 0.0 if d > 1.0 else 1.0, d, 0.05)


def test_windows_fill_and_close_on_exact_boundaries():
    w = WindowedDetectors([MeanShift()], window=100, model_version=3)
    reports, _ = w.add(np.zeros((250, 4)), np.zeros((250, 2)))
    assert [r.rows for r in reports] == [100, 100] and w.fill == 50 and w.samples == 250
    reports, _ = w.add(np.full((60, 4), 5.0), np.zeros((60, 2)))
    assert len(reports) == 1 and reports[0].index == 2 and reports[0].model_version == 3
    assert reports[0].is_drift  # 50 clean + 50 shifted rows -> mean 2.5
    assert w.fill == 10 and len(w.history) == 3
