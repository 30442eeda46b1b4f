"""`driftloop init`: a user's file -> a spec and a Serve config the loop accepts, or one line and exit 2 with
nothing written. Run as a user would: the installed command, in the user's own folder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from driftloop.config import load_spec


def init(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("driftloop")
    return subprocess.run([str(exe), "init", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _sklearn(name: str) -> pd.DataFrame:
    import sklearn.datasets as ds

    b = getattr(ds, f"load_{name}")(as_frame=True)
    df = b.frame.rename(columns=lambda c: c.replace(" ", "_").replace("(", "").replace(")", "").replace("/", "_"))
    return df


def test_wine_multiclass_becomes_a_spec_and_serve_config_the_loop_accepts(tmp_path):
    _sklearn("wine").to_csv(tmp_path / "wine.csv", index=False)
    r = init(tmp_path, "wine.csv", "--label", "target")
    assert r.returncode == 0, r.stderr
    assert "wrote configs/wine.yaml (13 features, classes [0, 1, 2], window 50) and serve_configs/wine.yaml" in r.stdout
    spec = load_spec(tmp_path / "configs/wine.yaml")
    assert spec.name == spec.dataset.table == "wine" and spec.dataset.label == "target"
    assert spec.dataset.classes == [0, 1, 2] and len(spec.dataset.features) == 13 and "target" not in spec.dataset.features
    assert spec.drift.window == 50 and spec.retraining.min_labelled_rows == 50
    text = (tmp_path / "configs/wine.yaml").read_text()
    assert "# rows per class in the file: 0: 59, 1: 71, 2: 48" in text  # every inferred choice says why
    serve = yaml.safe_load((tmp_path / "serve_configs/wine.yaml").read_text())
    app = serve["applications"][0]
    assert app["name"] == "wine" and app["route_prefix"] == "/wine" and app["args"] == {"spec": "configs/wine.yaml"}
    assert serve["http_options"]["host"] == "127.0.0.1"
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(serve)
    # a second init does not silently replace the user's edits
    again = init(tmp_path, "wine.csv", "--label", "target")
    assert again.returncode == 2 and "configs/wine.yaml exists; pass --force" in again.stderr
    assert init(tmp_path, "wine.csv", "--label", "target", "--force").returncode == 0


def test_binary_parquet_text_and_missing_columns_become_categories_and_imputations_with_their_reasons(tmp_path):
    df = _sklearn("breast_cancer")
    df["hospital"] = np.where(np.arange(len(df)) % 3, "north", "south")  # text with two values: a category
    df.loc[::10, "hospital"] = None  # ... missing in a tenth of the rows: imputed
    df.loc[::4, "mean_radius"] = np.nan  # a number missing in a quarter of the rows: imputed
    df["patient"] = [f"p{i}" for i in range(len(df))]  # text, a value per row: an identifier, left out
    df["notes"] = np.where(np.arange(len(df)) % 5 == 0, "x", None)  # missing in most rows: left out
    df["constant"] = 1.0
    df.to_parquet(tmp_path / "cancer.parquet")
    r = init(tmp_path, "cancer.parquet", "--label", "target", "--name", "bc")
    assert r.returncode == 0, r.stderr
    spec = load_spec(tmp_path / "configs/bc.yaml")
    ds = spec.dataset
    assert ds.classes == [0, 1] and len(ds.features) == 31 and "hospital" in ds.features
    assert ds.categorical["hospital"].categories == ["north", "south"] and ds.categorical["hospital"].unseen == "other"
    assert ds.missing == {"mean_radius": "impute", "hospital": "impute"}
    assert "patient (text with 569 distinct values: an identifier or free text, not a category)" in r.stdout
    assert "notes (missing in 80% of rows (more than 50%))" in r.stdout and "constant (constant)" in r.stdout
    text = (tmp_path / "configs/bc.yaml").read_text()
    assert "mean_radius: impute           # missing in 25.1% of rows" in text  # 143 of 569
    assert "{kind: missing}" in text  # the missing rate is watched for drift


def test_string_labels_become_class_names_quoted_where_yaml_would_misread_them(tmp_path):
    df = _sklearn("wine")
    df["kind"] = np.array(["no", "barolo", "grignolino"])[df.pop("target")]  # "no" would read as false in YAML
    df.to_csv(tmp_path / "wine.csv", index=False)
    r = init(tmp_path, "wine.csv", "--label", "kind")
    assert r.returncode == 0, r.stderr
    spec = load_spec(tmp_path / "configs/wine.yaml")
    assert spec.dataset.classes == ["barolo", "grignolino", "no"] and spec.dataset.string_labels
    assert "# rows per class in the file: barolo: 71, grignolino: 48, no: 59" in (tmp_path / "configs/wine.yaml").read_text()


def test_a_numeric_target_becomes_a_regression_spec_with_its_range_and_error_gate(tmp_path):
    _sklearn("diabetes").to_csv(tmp_path / "diabetes.csv", index=False)
    r = init(tmp_path, "diabetes.csv", "--label", "target")
    assert r.returncode == 0, r.stderr
    assert "wrote configs/diabetes.yaml (10 features, regression of target, window 50)" in r.stdout
    spec = load_spec(tmp_path / "configs/diabetes.yaml")
    assert spec.task == "regression" and spec.dataset.classes is None and spec.gate_metric == "rmse"
    assert spec.tune_metric == ("val_rmse", "min") and spec.output_names == ["prediction"] and spec.n_classes == 1
    text = (tmp_path / "configs/diabetes.yaml").read_text()
    assert "# the label has 214 distinct integer values (more than 50): a quantity" in text
    assert "min 25, median 140.5, max 346" in text and "predictions (y-hat)" in text
    # an integer label with few values stays a classifier; --task regression makes it a quantity
    df = _sklearn("wine")
    df.to_csv(tmp_path / "wine.csv", index=False)
    r = init(tmp_path, "wine.csv", "--label", "target", "--task", "regression", "--name", "wine_r")
    assert r.returncode == 0 and load_spec(tmp_path / "configs/wine_r.yaml").regression, r.stderr


@pytest.mark.parametrize("setup, args, message", [
    (lambda p: (p / "x.csv").write_text("a,b\n1,2\n"), ["x.csv", "--label", "nope"], "--label 'nope' is not a column of x.csv"),
    (lambda p: (p / "x.csv").write_text("a,b\n1,2\n3,2\n"), ["x.csv", "--label", "b"], "label 'b' is constant"),
    (lambda p: (p / "x.csv").write_text("a,b\nu,0\nv,1\n"), ["x.csv", "--label", "b"], "no usable feature column"),
    (lambda p: (p / "x.parquet").write_bytes(b"not parquet at all"), ["x.parquet", "--label", "b"], "x.parquet: cannot read"),
    (lambda p: None, ["missing.csv", "--label", "b"], "missing.csv: no such file"),
    (lambda p: (p / "x.csv").write_text("a,b\n1,0.5\n2,1.5\n"), ["x.csv", "--label", "b", "--task", "classification"],
     "label 'b' is not a class"),
    (lambda p: _sklearn("diabetes").to_csv(p / "diabetes.csv", index=False),
     ["diabetes.csv", "--label", "target", "--task", "classification"], "more than 50 classes; a quantity is regression"),
    (lambda p: (p / "x.csv").write_text("a,b\n1,x\n2,y\n"), ["x.csv", "--label", "b", "--task", "regression"],
     "--task regression: label 'b' is not a number"),
    (lambda p: (p / "x.csv").write_text("a,b\n1,2\n2,3\n"), ["x.csv", "--label", "b", "--task", "ranking"],
     "--task 'ranking': use classification or regression"),
])
def test_a_file_init_cannot_use_gets_one_line_exit_2_and_no_files(tmp_path, setup, args, message):
    setup(tmp_path)
    r = init(tmp_path, *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "configs").exists() and not (tmp_path / "serve_configs").exists()
