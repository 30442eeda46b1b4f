"""What a model's outputs mean for a task, in numpy only (the serving deployments import this without torch):
the predicted class or value, the task's metrics, and one labelled row's score."""

from __future__ import annotations

import numpy as np


def predictions(out: np.ndarray, spec) -> np.ndarray:
    """What the model predicts per row: its most probable class, or (regression) the value."""
    if spec.regression:
        return np.asarray(out, dtype=np.float64).reshape(len(out), -1)[:, 0]
    return np.asarray(spec.dataset.classes)[np.asarray(out).argmax(axis=1)]


def scores(out: np.ndarray, y: np.ndarray, spec) -> dict[str, float]:
    """The task's metrics of outputs against labels: accuracy, or rmse and mae (NaN with no rows)."""
    if not len(y):
        return {"rmse": float("nan"), "mae": float("nan")} if spec.regression else {"accuracy": float("nan")}
    pred = predictions(out, spec)
    if spec.regression:
        err = pred - np.asarray(y, dtype=np.float64)
        return {"rmse": float(np.sqrt(np.mean(err ** 2))), "mae": float(np.mean(np.abs(err)))}
    return {"accuracy": float((pred == np.asarray(y)).mean())}


def label_score(prediction, label, regression: bool) -> float:
    """One labelled row, as rolling metrics count it: 1.0 when the class was right (else 0.0), or the absolute error."""
    return abs(float(prediction) - float(label)) if regression else float(prediction == label)


LOWER_IS_BETTER = {"rmse", "mae"}
