import json

import numpy as np
import pytest

from driftloop.ids import issue
from driftloop.serving.validation import InvalidInput, check_table_name, parse_feedback, parse_json, parse_rows, read_limited

FEATS = ["a", "b", "c"]


def test_one_row_and_batch():
    assert parse_rows({"row": {"a": 1, "b": 2.5, "c": -3}}, FEATS).tolist() == [[1, 2.5, -3]]
    x = parse_rows({"rows": [{"c": 3, "b": 2, "a": 1}, {"a": 0, "b": 0, "c": 0}]}, FEATS)
    assert x.shape == (2, 3) and x.dtype == np.float32 and x[0].tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    "payload, status, message",
    [
        ({"row": {"a": 1, "b": 2}}, 422, "row: missing feature 'c'"),
        ({"rows": [{"a": 1, "b": 2, "c": 3}, {"a": 1, "b": "x", "c": 3}]}, 422, "rows[1].b: must be a number, got string"),
        ({"row": {"a": 1, "b": None, "c": 3}}, 422, "row.b: must be a number, got null"),
        ({"row": {"a": True, "b": 1, "c": 3}}, 422, "row.a: must be a number, got bool"),
        ({"row": {"a": 1e308, "b": 1, "c": 3}}, 422, "row.a: must be a finite number"),
        ({"rows": [{"a": 1, "b": 1, "c": 3}, {"a": 10**400, "b": 1, "c": 3}]}, 422, "rows[1].a: number out of range"),
        ({"row": {"a": 1, "b": 1, "c": 3, "d": 4}}, 422, "row: unknown feature 'd'"),
        ({"rows": []}, 422, "rows: must not be empty"),
        ({"rows": [{"a": 1, "b": 1, "c": 1}] * 300}, 413, "batch of 300 rows exceeds the limit of 256"),
        ({"row": {}, "rows": []}, 422, "exactly one of"),
        ([1, 2], 422, "body must be a JSON object"),
        ({"x": 1}, 422, "unknown field 'x'"),
    ],
)
def test_bad_rows_name_the_problem(payload, status, message):
    with pytest.raises(InvalidInput) as err:
        parse_rows(payload, FEATS)
    assert err.value.status == status
    assert message in str(err.value)


def test_json_limits():
    with pytest.raises(InvalidInput, match="NaN is not a number JSON allows"):
        parse_json(b'{"row": {"a": NaN}}')
    with pytest.raises(InvalidInput, match="Infinity"):
        parse_json(b'{"row": {"a": -Infinity}}')
    with pytest.raises(InvalidInput) as err:
        parse_json(b"x" * 2_000_000)
    assert err.value.status == 413
    with pytest.raises(InvalidInput, match="invalid JSON"):
        parse_json(b"{not json")
    with pytest.raises(InvalidInput, match="nested too deeply|invalid JSON"):
        parse_json(("[" * 100_000 + "]" * 100_000).encode())
    with pytest.raises(InvalidInput, match="invalid JSON"):
        parse_json(b"\xff\xfe")
    assert parse_json(json.dumps({"row": {"a": 1}}).encode()) == {"row": {"a": 1}}


@pytest.mark.parametrize("body", [
    b'{"row": {"a": 1.5, "b": -2, "c": 1e-7}}',  # orjson's path
    b'{"rows": [{"a": 0.1, "b": 2.2250738585072014e-308, "c": 123456789.123456789}], "x": [true, null, "\u00e9"]}',
    b'{"a": 1e400}',  # out of double range: infinity, as before (a row then names it)
    b'{"a": "\ud800"}',  # a lone surrogate escape
    json.dumps({"row": {"a": 1}}).encode("utf-16"),  # the standard library detects UTF-16 and UTF-32
    b'\xef\xbb\xbf{"a": 1}',  # a UTF-8 byte-order mark
])
def test_parse_json_takes_what_the_standard_library_takes(body):
    """orjson decodes the common body; whatever it refuses is decoded (or refused, naming why) as before."""
    assert parse_json(body) == json.loads(body)


def test_an_integer_past_64_bits_is_the_float_it_becomes_anyway():
    body = b'{"row": {"a": 123456789012345678901234567890, "b": 1, "c": 2}}'
    assert parse_json(body)["row"]["a"] == float(json.loads(body)["row"]["a"])
    assert parse_rows(parse_json(body), FEATS).tolist() == parse_rows(json.loads(body), FEATS).tolist()
    with pytest.raises(InvalidInput, match="out of range|within ±1e30"):
        parse_rows(parse_json(b'{"row": {"a": 1' + b"0" * 400 + b', "b": 1, "c": 2}}'), FEATS)


RID = issue(b"k" * 32, 3, 1)  # the shape of an id /predict issues (signed: driftloop.ids)


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"request_id": RID, "label": 11}, "label: 11 is not one of the model's classes"),
        ({"request_id": RID, "label": "3"}, "label: must be an integer class"),
        ({"request_id": RID, "label": 2.5}, "label: must be an integer class"),
        ({"request_id": "", "label": 1}, "request_id: must be a non-empty string"),
        ({"request_id": "x" * 500, "label": 1}, "request_id: must be a non-empty string"),
        ({"request_id": "no-such-id", "label": 1}, "request_id: not an id issued by /predict"),
        ({"request_id": RID.upper(), "label": 1}, "request_id: not an id issued by /predict"),
        ({"request_id": RID + "\n", "label": 1}, "request_id: not an id issued by /predict"),
        ({"label": 1}, "request_id"),
        ({"request_id": RID, "label": 1, "extra": 1}, "unknown field 'extra'"),
    ],
)
def test_bad_feedback(payload, message):
    with pytest.raises(InvalidInput, match=None) as err:
        parse_feedback(payload, list(range(10)))
    assert message in str(err.value)


def test_feedback_with_class_names():
    names = ["benign", "malignant"]
    assert parse_feedback({"request_id": RID, "label": "benign"}, names) == (RID, "benign")
    for bad in ("Benign", 1, None):
        with pytest.raises(InvalidInput) as err:
            parse_feedback({"request_id": RID, "label": bad}, names)
        assert f"label: {bad!r} is not one of the model's classes ['benign', 'malignant']" in str(err.value)


def test_good_feedback():
    assert parse_feedback({"request_id": RID, "label": 3}, list(range(10))) == (RID, 3)
    assert parse_feedback({"request_id": RID, "label": 3.0}, list(range(10))) == (RID, 3)


def test_a_batch_of_labels_is_checked_item_by_item():
    from driftloop.ids import row_ids
    from driftloop.serving.validation import MAX_LABELS_PER_REQUEST, parse_feedback_any

    ids = row_ids(issue(b"k" * 32, 3, 4), 4)
    assert parse_feedback_any({"labels": [{"request_id": r, "label": i} for i, r in enumerate(ids)]}, list(range(10))) \
        == [(r, i) for i, r in enumerate(ids)]
    assert parse_feedback_any({"request_id": RID, "label": 3}, list(range(10))) == [(RID, 3)]
    bad = [({"labels": []}, "labels: must be a non-empty list", 422),
           ({"labels": [{"request_id": ids[0], "label": 1}, {"request_id": ids[1], "label": 12}]},
            "labels[1]: label: 12 is not one of the model's classes", 422),
           ({"labels": [{"request_id": ids[0], "label": 1}] * 2}, "the same request_id appears twice", 422),
           ({"labels": [{"request_id": ids[0], "label": 1}], "x": 1}, "unknown field 'x'", 422),
           ({"labels": [{"request_id": RID, "label": 1}] * (MAX_LABELS_PER_REQUEST + 1)}, "at most 1000", 413)]
    for payload, message, status in bad:
        with pytest.raises(InvalidInput) as err:
            parse_feedback_any(payload, list(range(10)))
        assert message in str(err.value) and err.value.status == status


def test_every_row_id_of_a_batch_passes_the_shape_check():
    """Defect 1: /predict issues `<id>-<i>` for the rows of a batch; /feedback refused them (32 hex chars only)."""
    from driftloop.ids import row_ids

    for rid in row_ids(issue(b"k" * 32, 3, 4), 4):
        assert parse_feedback({"request_id": rid, "label": 1}, list(range(10))) == (rid, 1)
    with pytest.raises(InvalidInput, match="not an id issued by /predict"):
        parse_feedback({"request_id": "0123456789abcdef" * 2, "label": 1}, list(range(10)))  # the old unsigned shape


def test_chunked_body_is_read_only_up_to_the_limit():
    """Defect 4: a body without content-length was buffered whole; reading stops at the limit with 413."""
    import asyncio

    pulled = []

    async def endless():
        while True:
            pulled.append(1)
            yield b"x" * 65536

    with pytest.raises(InvalidInput) as err:
        asyncio.run(read_limited(endless(), 1_000_000))
    assert err.value.status == 413 and "exceeds the limit of 1000000 bytes" in str(err.value)
    assert len(pulled) <= 1_000_000 // 65536 + 1

    async def small():
        yield b'{"a": '
        yield b"1}"

    assert asyncio.run(read_limited(small())) == b'{"a": 1}'


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "", "x y", "t\n", "/abs"])
def test_table_names_that_leave_the_data_root_are_refused(name):
    with pytest.raises(InvalidInput, match="is not allowed"):
        check_table_name(name)


def test_table_names_like_a_spec_allows():
    assert check_table_name("digits_v2-a") == "digits_v2-a"
