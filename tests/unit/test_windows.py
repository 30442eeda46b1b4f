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


def test_snapshot_restores_the_open_window_and_history_exactly(tmp_path):
    from driftloop.drift import state

    w = WindowedDetectors([MeanShift()], window=100, model_version=3)
    w.add(np.zeros((130, 4)), np.zeros((130, 2)))
    meta, arrays = w.snapshot()
    state.save(tmp_path / "m.npz", {"windows": meta}, arrays)
    loaded_meta, loaded_arrays = state.load(tmp_path / "m.npz")
    fresh = WindowedDetectors([MeanShift()], window=100, model_version=3)
    assert fresh.restore(loaded_meta["windows"], loaded_arrays)
    assert (fresh.fill, fresh.samples, fresh.windows, len(fresh.history)) == (30, 130, 1, 1)
    # the restored window closes after the same 70 rows as the original would, on the same data
    for d in (w, fresh):
        reports, _ = d.add(np.full((70, 4), 5.0), np.zeros((70, 2)))
        assert len(reports) == 1 and reports[0].index == 1 and reports[0].is_drift
    assert not WindowedDetectors([MeanShift()], window=100, model_version=4).restore(loaded_meta["windows"], loaded_arrays)


def test_state_file_is_replaced_atomically_and_a_corrupt_one_is_ignored(tmp_path):
    from driftloop.drift import state

    path = tmp_path / "m.npz"
    assert state.load(path) is None
    state.save(path, {"a": 1}, {"x": np.arange(3)})
    state.save(path, {"a": 2}, {"x": np.arange(4)})
    meta, arrays = state.load(path)
    assert meta == {"a": 2} and arrays["x"].tolist() == [0, 1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["m.npz"]  # no temp files left behind
    path.write_bytes(b"not a zip")
    assert state.load(path) is None
