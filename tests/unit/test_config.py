import copy

import pytest
import yaml

from driftloop.config import SpecError, load_spec, parse_spec
from tests.conftest import ROOT


@pytest.fixture
def digits_dict():
    return yaml.safe_load((ROOT / "configs/digits.yaml").read_text())


def test_shipped_specs_load():
    digits = load_spec(ROOT / "configs/digits.yaml")
    assert digits.n_features == 64 and digits.dataset.features[-1] == "pixel_63"
    assert digits.n_classes == 10
    rain = load_spec(ROOT / "configs/rainfall.yaml")
    assert rain.dataset.time_column == "day" and rain.n_classes == 2


@pytest.mark.parametrize(
    "path, value, expected",
    [
        (("training", "workers"), 0, "training.workers: Input should be greater than or equal to 1"),
        (("sweep", "search_space", "lr"), {"gaussian": [0, 1]}, "sweep.search_space: lr: unknown distribution 'gaussian'"),
        (("sweep", "search_space", "lr"), {"loguniform": [0.1, 0.01]}, "lr: low must be below high"),
        (("dataset", "split"), [0.5, 0.5, 0.5], "dataset.split: train/val/test fractions"),
        (("drift", "detectors"), [{"kind": "magic"}], "drift.detectors.0.kind"),
        (("retraining", "policy", "k"), 5, "retraining.policy: Value error, k must not exceed m"),
        (("model", "hiddden"), [3], "model.hiddden: Extra inputs are not permitted"),
        (("dataset", "label"), "pixel_3", "label 'pixel_3' is also listed as a feature"),
        (("dataset", "classes"), ["a", "b", "a"], "duplicate classes: ['a']"),
        (("dataset", "classes"), [0, "b"], "dataset.classes"),
        (("dataset", "classes"), None, "dataset.classes: a classifier needs its classes (or set task: regression)"),
        (("retraining", "policy", "max_error"), 3.0, "max_error: applies to regression; use accuracy_floor"),
        (("retraining", "gate", "metric"), "rmse", "retraining.gate.metric: rmse applies to regression"),
        (("sweep", "metric"), "val_rmse", "sweep.metric: a classifier's trials report val_accuracy, not errors"),
        (("task",), "ranking", "task: Input should be 'classification' or 'regression'"),
    ],
)
def test_bad_field_is_named(digits_dict, path, value, expected):
    d = copy.deepcopy(digits_dict)
    node = d
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    with pytest.raises(SpecError) as err:
        parse_spec(d, "digits.yaml")
    msg = str(err.value).replace("Value error, ", "")
    assert msg.startswith("digits.yaml: ")
    assert expected.replace("Value error, ", "") in msg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    bad.write_text("- a list\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(bad)


def test_a_regression_spec_has_no_classes_and_is_scored_on_errors(digits_dict):
    d = copy.deepcopy(digits_dict)
    d["task"] = "regression"
    with pytest.raises(SpecError, match="a regression label has no classes; remove them"):
        parse_spec(d, "r.yaml")
    d["dataset"].pop("classes")
    d["retraining"].pop("gate", None)
    for key in ("metric", "mode"):
        d["sweep"].pop(key, None)
    spec = parse_spec(d, "r.yaml")
    assert spec.n_classes == 1 and spec.output_names == ["prediction"] and spec.dataset.label_value(3) == 3.0
    assert spec.tune_metric == ("val_rmse", "min") and spec.gate_metric == "rmse"
    for path, value, message in [(("retraining", "policy", "accuracy_floor"), 0.8, "use max_error"),
                                 (("retraining", "gate", "metric"), "accuracy", "gated on rmse or mae"),
                                 (("sweep", "metric"), "val_accuracy", "report val_rmse and val_mae")]:
        bad = copy.deepcopy(d)
        node = bad
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
        with pytest.raises(SpecError, match=message):
            parse_spec(bad, "r.yaml")
    d["sweep"]["metric"] = "val_mae"
    assert parse_spec(d, "r.yaml").tune_metric == ("val_mae", "min")


def test_cvm_online_on_many_features_is_refused_with_what_to_do():
    base = {"name": "m", "dataset": {"source": "x.csv", "table": "t", "features": [f"f{i}" for i in range(64)],
                                      "label": "y", "classes": [0, 1]}}
    with pytest.raises(SpecError, match=r"cvm_online tests each of the 64 features .* at ert 1000 .* 76,763 simulated "
                                        r"streams .* lower ert, or use mmd_online"):
        parse_spec({**base, "drift": {"detectors": [{"kind": "cvm_online"}]}})
    assert parse_spec({**base, "drift": {"detectors": [{"kind": "cvm_online", "ert": 250}]}}).drift.detectors[0].ert == 250
    assert parse_spec({**base, "drift": {"detectors": [{"kind": "mmd_online"}]}})   # one multivariate test: any width
