"""Categorical features and missing values, from the spec through the table, the model, the detectors and the
request: what a user with a table of names and gaps sees."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from driftloop.config import SpecError, parse_spec
from driftloop.data.validation import coerce, validate_frame
from driftloop.features import UNSEEN, decode_matrix, encode_frame
from driftloop.model import Outputs, build_model, predict_outputs
from driftloop.serving.validation import InvalidInput, parse_rows, request_schema

CITIES = [f"city-{i}" for i in range(20)]  # more than 16 values: embedded, not one-hot


def _spec(unseen: str = "other", **extra):
    return parse_spec({
        "name": "t", "dataset": {
            "source": "x.csv", "table": "t", "features": ["x", "color", "city"], "label": "y", "classes": ["no", "yes"],
            "categorical": {"color": {"categories": ["red", "green", "blue"], "unseen": unseen},
                            "city": {"categories": CITIES}},
            "missing": {"x": "impute", "color": "impute"}, **extra}})


def _frame(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"x": rng.normal(size=n), "color": rng.choice(["red", "green", "blue"], n).astype(object),
                       "city": rng.choice(CITIES, n)})
    df.loc[rng.random(n) < 0.1, "x"] = np.nan
    df.loc[rng.random(n) < 0.1, "color"] = None
    df["y"] = np.where((df["color"] == "red") | (df["x"] > 1), "yes", "no")
    return df


@pytest.mark.parametrize("dataset, message", [
    ({"categorical": {"shape": {"categories": ["a"]}}}, "categorical: 'shape' is not one of the features"),
    ({"missing": {"nope": "impute"}}, "missing: 'nope' is not one of the features"),
    ({"missing": {"x": "guess"}}, "dataset.missing.x: Input should be 'refuse' or 'impute'"),
    ({"categorical": {"color": {"categories": ["a", "a"]}}}, "duplicate categories: ['a']"),
])
def test_a_bad_categorical_or_missing_entry_names_the_field(dataset, message):
    base = {"source": "x.csv", "table": "t", "features": ["x", "color"], "label": "y", "classes": [0, 1]}
    with pytest.raises(SpecError) as err:
        parse_spec({"name": "t", "dataset": {**base, **dataset}})
    assert message in str(err.value), err.value


def test_names_and_gaps_encode_to_codes_and_nan_and_decode_back_to_what_the_table_holds():
    ds = _spec().dataset
    df = pd.DataFrame({"x": [1.5, np.nan, 0.0], "color": ["blue", None, "purple"], "city": ["city-3", "city-0", "city-19"]})
    x = encode_frame(df, ds)
    assert x.dtype == np.float32 and np.isnan(x[1, 0]) and np.isnan(x[1, 1])
    assert x[:, 1][[0, 2]].tolist() == [2.0, -1.0] and x[:, 2].tolist() == [3.0, 0.0, 19.0]
    back = decode_matrix(x, ds)
    assert back["color"].tolist()[0] == "blue" and pd.isna(back["color"][1]) and back["color"][2] == UNSEEN
    assert back["city"].tolist() == ["city-3", "city-0", "city-19"] and pd.isna(back["x"][1])
    np.testing.assert_array_equal(encode_frame(back, ds), x)  # what the log holds reads back as the same matrix


def test_ingest_refuses_a_gap_the_spec_does_not_impute_and_a_name_it_does_not_know_when_told_to():
    ds = _spec(unseen="refuse").dataset
    df = _frame(50)
    ok = validate_frame(df, ds.features, ds.label, ds.classes, categorical=ds.categorical, impute=set(ds.imputed))
    assert ok.ok, ok.problems
    gap = df.assign(city=df["city"].where(df.index != 7))
    rep = validate_frame(gap, ds.features, ds.label, ds.classes, categorical=ds.categorical, impute=set(ds.imputed))
    assert "feature 'city' has 1 missing value(s), first at row 7" in rep.summary()
    odd = df.assign(color=df["color"].where(df.index != 3, "purple"))
    rep = validate_frame(odd, ds.features, ds.label, ds.classes, categorical=ds.categorical, impute=set(ds.imputed))
    assert "feature 'color' has value(s) outside its categories ['red', 'green', 'blue']: ['purple']" in rep.summary()
    table = coerce(df, ds.features, ds.label, string_labels=True, categorical=ds.categorical, impute=set(ds.imputed))
    assert str(table["color"].dtype) == "string" and table["x"].dtype == np.float64 and table["color"].isna().sum() > 0


def test_the_model_learns_from_categories_with_gaps_and_carries_its_fill_values_into_the_exported_program():
    ds = _spec().dataset
    df = _frame(2000)
    x, y = encode_frame(df, ds), (df["y"] == "yes").to_numpy().astype(np.int64)
    torch.manual_seed(0)
    model = build_model(3, 2, [16], 0.0, ds.cardinalities)
    model.set_standardisation(x)
    assert np.isfinite(model.fill.numpy()).all() and model.fill[1] in (0.0, 1.0, 2.0)  # the most frequent colour
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y))
        loss.backward()
        opt.step()
    proba = Outputs(model).eval()
    acc = float((predict_outputs(proba, x).argmax(1) == y).mean())
    assert acc > 0.9, acc  # "red" is learnt through the one-hot colour column
    # the registered form: a torch.export program, any batch size, NaN and an unseen colour in
    program = torch.export.export(proba, (torch.from_numpy(x[:2]),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    odd = np.array([[np.nan, -1.0, 5.0], [0.5, np.nan, 19.0], [2.0, 0.0, 1.0]], dtype=np.float32)
    out = program.module()(torch.from_numpy(odd)).detach().numpy()
    assert out.shape == (3, 2) and np.isfinite(out).all()
    np.testing.assert_allclose(out, predict_outputs(proba, odd), rtol=1e-5)


def test_detectors_test_categories_with_chi_square_and_watch_the_missing_rate(tmp_path):
    from driftloop.drift.detectors import fit_detectors, load_detectors

    spec = _spec()
    ds = spec.dataset
    ref = encode_frame(_frame(1000, seed=1), ds)
    proba = np.full((len(ref), 2), 0.5, np.float32)
    path = fit_detectors(spec.drift, ref, proba, ds.features, tmp_path / "d", cardinalities=ds.cardinalities,
                         imputed=ds.imputed)
    dets, manifest = load_detectors(path, 2)
    assert [d.kind for d in dets] == ["bbsd", "ks", "missing"]  # the missing-rate test is added by itself
    features = next(d for d in dets if d.kind == "ks")
    missing = next(d for d in dets if d.kind == "missing")
    same = encode_frame(_frame(500, seed=2), ds)
    assert not features.predict(same, proba[:500]).is_drift and not missing.predict(same, proba[:500]).is_drift
    mix = _frame(500, seed=3)
    mix.loc[mix.index < 350, "color"] = "blue"  # the colour mix changes; numbers and gaps as before
    verdict = features.predict(encode_frame(mix, ds), proba[:500])
    assert verdict.is_drift and verdict.drifted_features == ["color"], verdict
    gaps = _frame(500, seed=4)
    gaps.loc[gaps.index < 200, "x"] = np.nan  # x goes missing far more often
    verdict = missing.predict(encode_frame(gaps, ds), proba[:500])
    assert verdict.is_drift and verdict.drifted_features == ["x (missing)"], verdict


def test_a_request_sends_names_and_nulls_where_the_spec_allows_them():
    ds = _spec().dataset
    x = parse_rows({"rows": [{"x": None, "color": "green", "city": "city-2"}, {"x": 1, "color": "teal", "city": "city-0"}]},
                   ds.features, ds=ds)
    assert np.isnan(x[0, 0]) and x[0, 1:].tolist() == [1.0, 2.0] and x[1, 1] == -1.0
    for row, message in [
        ({"x": 1, "color": "red", "city": None}, "row.city: a value is required (this feature's missing values are refused)"),
        ({"x": 1, "color": 3, "city": "city-0"}, "row.color: must be a string, one of ['red', 'green', 'blue']"),
        ({"x": "1", "color": "red", "city": "city-0"}, "row.x: must be a number, got string"),
    ]:
        with pytest.raises(InvalidInput) as err:
            parse_rows({"row": row}, ds.features, ds=ds)
        assert err.value.status == 422 and str(err.value) == message
    strict = _spec(unseen="refuse").dataset
    with pytest.raises(InvalidInput, match=r"row.color: 'teal' is not one of the known values \['red', 'green', 'blue'\]"):
        parse_rows({"row": {"x": 1, "color": "teal", "city": "city-0"}}, strict.features, ds=strict)
    props = request_schema(strict.features, strict)["oneOf"][0]["properties"]["row"]["properties"]
    assert props["color"] == {"anyOf": [{"type": "string", "enum": ["red", "green", "blue"]}, {"type": "null"}]}
    assert props["city"] == {"type": "string"} and props["x"] == {"anyOf": [{"type": "number"}, {"type": "null"}]}


def test_a_checkpoint_from_before_fill_values_still_loads():
    from driftloop.train import with_fill

    old = {k: v for k, v in build_model(3, 2, [8], 0.0).state_dict().items() if k != "fill"}
    model = build_model(3, 2, [8], 0.0)
    model.load_state_dict(with_fill(old, 3))
    assert model.fill.tolist() == [0.0, 0.0, 0.0]


def test_categories_that_are_booleans_or_numeric_codes_read_as_the_spec_lists_them():
    ds = parse_spec({"name": "t", "dataset": {
        "source": "x.csv", "table": "t", "features": ["flag", "zone"], "label": "y", "classes": [0, 1],
        "categorical": {"flag": {"categories": ["True", "False"]}, "zone": {"categories": ["1", "2"], "unseen": "refuse"}},
        "missing": {"zone": "impute"}}}).dataset
    # a CSV column of zone codes with a gap reads as floats (1.0, 2.0, NaN); a flag column as booleans
    df = pd.DataFrame({"flag": [True, False, True], "zone": [1.0, np.nan, 2.0], "y": [0, 1, 0]})
    assert validate_frame(df, ds.features, ds.label, ds.classes, categorical=ds.categorical, impute={"zone"}).ok
    table = coerce(df, ds.features, ds.label, categorical=ds.categorical, impute={"zone"})
    assert table["flag"].tolist() == ["True", "False", "True"] and table["zone"].tolist()[::2] == ["1", "2"]
    x = encode_frame(df, ds)
    assert x[:, 0].tolist() == [0.0, 1.0, 0.0] and x[0, 1] == 0.0 and np.isnan(x[1, 1]) and x[2, 1] == 1.0
    np.testing.assert_array_equal(encode_frame(table, ds), x)
    # JSON true and 2 are the categories they spell; a code the spec does not list is refused
    assert parse_rows({"row": {"flag": True, "zone": 2}}, ds.features, ds=ds).tolist() == [[0.0, 1.0]]
    with pytest.raises(InvalidInput, match=r"row.zone: must be a string, one of \['1', '2'\]"):
        parse_rows({"row": {"flag": "True", "zone": 3}}, ds.features, ds=ds)
