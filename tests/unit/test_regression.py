"""Regression, from the spec to the model, its scores, its drift test on the predictions, the table, feedback and
the policy: a number to predict wherever a class was."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from driftloop.config import parse_spec
from driftloop.data.validation import coerce, validate_frame
from driftloop.drift.core import MonitorCore
from driftloop.model import Outputs, label_score, predict_outputs, predictions, scores, spec_model
from driftloop.serving.validation import InvalidInput, parse_feedback_any


def _spec(**policy):
    return parse_spec({"name": "r", "task": "regression", "dataset": {
        "source": "x.csv", "table": "r", "features": ["a", "b"], "label": "y"},
        "drift": {"window": 100}, "retraining": {"min_labelled_rows": 0, "policy": {"window_drift": False, **policy}}})


def _data(n: int, seed: int = 0, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 2)).astype(np.float32)
    x[:, 0] += shift
    y = 300.0 + 80.0 * x[:, 0] - 40.0 * x[:, 1] + rng.normal(scale=5.0, size=n)  # a large scale, as a real target
    return x, y


def _trained(spec, x, y):
    torch.manual_seed(0)
    model = spec_model(spec, [32], 0.0)
    model.set_standardisation(x)
    model.set_target_standardisation(y)
    mean, std = (float(v) for v in model.target)
    yt = torch.from_numpy(((y - mean) / std).astype(np.float32))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(torch.from_numpy(x))[:, 0], yt)
        loss.backward()
        opt.step()
    return Outputs(model).eval()


def test_the_model_predicts_in_the_labels_units_and_its_exported_program_agrees():
    spec = _spec()
    x, y = _data(2000)
    out_model = _trained(spec, x, y)
    out = predict_outputs(out_model, x)
    assert out.shape == (2000, 1)
    s = scores(out, y, spec)
    assert set(s) == {"rmse", "mae"} and s["rmse"] < 15 and s["mae"] <= s["rmse"], s  # noise is 5, the target's std ~90
    assert abs(float(predictions(out, spec).mean()) - float(y.mean())) < 5  # de-standardised: the label's own scale
    program = torch.export.export(out_model, (torch.from_numpy(x[:2]),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    np.testing.assert_allclose(program.module()(torch.from_numpy(x[:7])).detach().numpy(), out[:7], rtol=1e-5)
    assert label_score(310.0, 300.0, True) == 10.0 and label_score("a", "a", False) == 1.0


def test_bbsd_is_a_ks_test_on_the_predictions(tmp_path):
    from driftloop.drift.detectors import fit_detectors, load_detectors

    spec = _spec()
    x, y = _data(2000)
    model = _trained(spec, x, y)
    path = fit_detectors(spec.drift, x[:1000], predict_outputs(model, x[:1000]), spec.dataset.features, tmp_path / "d")
    bbsd = next(d for d in load_detectors(path, spec.output_names)[0] if d.kind == "bbsd")
    same, _ = _data(300, seed=1)
    assert not bbsd.predict(same, predict_outputs(model, same)).is_drift
    moved, _ = _data(300, seed=2, shift=1.0)  # the predictions move with the shifted feature
    verdict = bbsd.predict(moved, predict_outputs(model, moved))
    assert verdict.is_drift and verdict.drifted_features == ["prediction"], verdict


def test_a_table_label_must_be_a_finite_number_and_is_stored_as_float():
    df = pd.DataFrame({"a": [1.0, 2.0], "b": [0.0, 1.0], "y": [151, 75]})
    assert validate_frame(df, ["a", "b"], "y", None, regression=True).ok
    assert coerce(df, ["a", "b"], "y", regression=True)["y"].dtype == np.float64
    bad = validate_frame(df.assign(y=["high", "low"]), ["a", "b"], "y", None, regression=True)
    assert bad.problems == ["label 'y' is not a number (dtype object): a regression label is a number"]
    bad = validate_frame(df.assign(y=[1.0, np.inf]), ["a", "b"], "y", None, regression=True)
    assert bad.problems == ["label 'y' has 1 inf value(s)"]


def test_feedback_takes_a_finite_number():
    from driftloop.ids import issue

    rid = issue(b"k" * 32, 1, 1)
    assert parse_feedback_any({"request_id": rid, "label": 151}, None) == [(rid, 151.0)]
    assert parse_feedback_any({"labels": [{"request_id": rid, "label": 2.5}]}, None) == [(rid, 2.5)]
    for bad in ("151", True, None, float("nan"), 1e200, 10 ** 400):
        with pytest.raises(InvalidInput, match=r"label: (must be a (finite )?number|number out of range).*predicts a number"):
            parse_feedback_any({"request_id": rid, "label": bad}, None)


def test_rolling_error_per_version_and_the_max_error_floor_triggers():
    core = MonitorCore(_spec(max_error=20.0))
    core.version = 1
    assert core.label(1, [5.0] * 60, 0.0) is None
    assert core.rolling() == {"1": {"mae": 5.0, "rmse": 5.0, "labelled": 60}}
    trig = None
    for i in range(100):  # the error grows: the window's mean passes 20 at some point
        trig = trig or core.label(1, [60.0], 1.0 + i)
    assert trig is not None and trig.cause == "max error" and "above max 20" in trig.reason, trig
