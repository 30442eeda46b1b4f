"""Request validation for /predict and /feedback: every rejection names the field and the problem."""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any, AsyncIterator

import numpy as np
import orjson

from driftloop.invalid_input import InvalidInput
from driftloop.ids import REQUEST_ID  # what /predict issues; anything else is refused unlooked-up

MAX_BODY_BYTES = 1_000_000
MAX_BATCH_ROWS = 256
MAX_ID_CHARS = 128


def _reject_constant(name: str) -> float:
    raise InvalidInput(f"invalid JSON: {name} is not a number JSON allows", 400)


def parse_json(body: bytes, max_bytes: int = MAX_BODY_BYTES) -> Any:
    """Decode a body within the size limit; NaN/Infinity literals and bad UTF-8 are refused. orjson decodes what
    it takes (strict RFC 8259 UTF-8: the common body, at a fraction of the standard library's CPU; an integer past
    64 bits comes back as the nearest float, the value a feature or a label check makes of it anyway); anything it
    refuses goes to the standard library, which names the problem, or takes what only it accepts (a number past
    the double range, a UTF-16 body), as before."""
    if len(body) > max_bytes:
        raise InvalidInput(f"body of {len(body)} bytes exceeds the limit of {max_bytes} bytes", 413)
    if not body:
        raise InvalidInput("empty body: send a JSON object", 400)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except InvalidInput:
        raise
    except RecursionError:
        raise InvalidInput("invalid JSON: nested too deeply", 400) from None
    except (UnicodeDecodeError, ValueError) as err:
        raise InvalidInput(f"invalid JSON: {str(err).splitlines()[0][:120]}", 400) from None


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        kind = "null" if value is None else type(value).__name__.replace("str", "string").replace("dict", "object").replace("list", "array")
        raise InvalidInput(f"{where}: must be a number, got {kind}")
    try:
        f = float(value)
    except OverflowError:
        raise InvalidInput(f"{where}: number out of range") from None
    if not math.isfinite(f) or abs(f) > 1e30:
        raise InvalidInput(f"{where}: must be a finite number within ±1e30")
    return f


def _listed(values: list[str], most: int = 20) -> str:
    return str(values) if len(values) <= most else f"{str(values[:most])[:-1]}, ... ({len(values)} in all)]"


def _converters(ds) -> dict[str, Any]:
    """Per feature that is not a plain number: value, where -> the matrix's float (driftloop.features)."""
    from driftloop.features import category_str

    out: dict[str, Any] = {}
    for col in ds.features:
        cat, impute = ds.categorical.get(col), ds.missing.get(col) == "impute"
        if cat is None and not impute:
            continue

        def convert(value: Any, where: str, cat=cat, impute=impute, index_of=cat.index if cat else {}) -> float:
            if value is None:
                if impute:
                    return math.nan
                raise InvalidInput(f"{where}: a value is required (this feature's missing values are refused)")
            if cat is None:
                return _number(value, where)
            index = index_of.get(value if isinstance(value, str) else category_str(value))
            if index is not None:  # a boolean or integral number is taken as the category it spells (True, 3)
                return float(index)
            if not isinstance(value, str):
                raise InvalidInput(f"{where}: must be a string, one of {_listed(cat.categories)}")
            if cat.unseen == "refuse":
                raise InvalidInput(f"{where}: {value[:64]!r} is not one of the known values {_listed(cat.categories)}")
            return -1.0

        out[col] = convert
    return out


def parse_rows(payload: Any, features: list[str], max_rows: int = MAX_BATCH_ROWS, ds: Any = None) -> np.ndarray:
    """`{"row": {...}}` or `{"rows": [{...}, …]}` with named features -> float32 array (n, n_features). With the
    spec's dataset `ds`, categorical features take their names and imputed ones take null (driftloop.features)."""
    if not isinstance(payload, dict):
        raise InvalidInput('body must be a JSON object: {"row": {feature: value}} or {"rows": [...]}')
    extra = set(payload) - {"row", "rows"}
    if extra:
        raise InvalidInput(f"unknown field {sorted(extra)[0]!r}: expected 'row' or 'rows'")
    if ("row" in payload) == ("rows" in payload):
        raise InvalidInput("give exactly one of 'row' (one object) or 'rows' (a list of objects)")
    rows = [payload["row"]] if "row" in payload else payload["rows"]
    if not isinstance(rows, list):
        raise InvalidInput("rows: must be a list of objects")
    if not rows:
        raise InvalidInput("rows: must not be empty")
    if len(rows) > max_rows:
        raise InvalidInput(f"rows: batch of {len(rows)} rows exceeds the limit of {max_rows}", 413)
    convert = _converters(ds) if ds is not None and (ds.categorical or ds.missing) else {}
    if not convert and (fast := _plain_numbers(rows, features)) is not None:
        return fast
    index = {f: i for i, f in enumerate(features)}
    out = np.empty((len(rows), len(features)), dtype=np.float32)
    for r, row in enumerate(rows):
        where = "row" if "row" in payload else f"rows[{r}]"
        if not isinstance(row, dict):
            raise InvalidInput(f"{where}: must be an object of feature: value")
        missing = [f for f in features if f not in row]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise InvalidInput(f"{where}: missing feature {missing[0]!r}{more}")
        if len(row) != len(features):
            unknown = next(k for k in row if k not in index)
            raise InvalidInput(f"{where}: unknown feature {str(unknown)[:64]!r}")
        for name, value in row.items():
            c = convert.get(name)
            out[r, index[name]] = c(value, f"{where}.{name}") if c else _number(value, f"{where}.{name}")
    return out


def _plain_numbers(rows: list, features: list[str]) -> np.ndarray | None:
    """The common batch, checked in bulk: every row an object of exactly the features, every value an int or a
    float (not a bool), finite and within ±1e30. None when anything else is there: the row-by-row path of
    `parse_rows` then names the first problem."""
    try:
        values = [[row[f] for f in features] for row in rows]
        if any(len(row) != len(features) for row in rows) or not set(map(type, itertools.chain.from_iterable(values))) <= {int, float}:
            return None
        a = np.array(values, dtype=np.float64)
    except (KeyError, TypeError, OverflowError):
        return None
    return a.astype(np.float32) if np.all(np.abs(a) <= 1e30) else None  # NaN compares false, so it fails too


def parse_feedback(payload: Any, classes: list | None) -> tuple[str, int | str | float]:
    """`{"request_id": str, "label": int or str}` with the label in the model's class domain; with no classes
    (regression) the label is any finite number."""
    if not isinstance(payload, dict):
        raise InvalidInput('body must be a JSON object: {"request_id": "...", "label": 3}')
    extra = set(payload) - {"request_id", "label"}
    if extra:
        raise InvalidInput(f"unknown field {sorted(extra)[0]!r}: expected 'request_id' and 'label'")
    rid = payload.get("request_id")
    if not isinstance(rid, str) or not rid or len(rid) > MAX_ID_CHARS:
        raise InvalidInput(f"request_id: must be a non-empty string of at most {MAX_ID_CHARS} characters")
    if not REQUEST_ID.fullmatch(rid):
        raise InvalidInput("request_id: not an id issued by /predict (copy 'request_id' or a row's 'id' from its answer)")
    label = payload.get("label")
    if classes is None:  # regression: the observed value, a number as a feature's (finite, within ±1e30)
        try:
            return rid, _number(label, "label")
        except InvalidInput as err:
            raise InvalidInput(f"{err} (the model predicts a number)") from None
    if classes and isinstance(classes[0], str):  # the model's classes are names: the label is one of them
        if not isinstance(label, str) or label not in classes:
            raise InvalidInput(f"label: {label!r} is not one of the model's classes {classes}")
        return rid, label
    if isinstance(label, bool) or not isinstance(label, (int, float)) or (isinstance(label, float) and not label.is_integer()):
        raise InvalidInput("label: must be an integer class")
    if int(label) not in classes:
        raise InvalidInput(f"label: {label} is not one of the model's classes {classes}")
    return rid, int(label)


MAX_LABELS_PER_REQUEST = 1000


def parse_feedback_any(payload: Any, classes: list | None) -> list[tuple[str, int | str | float]]:
    """One label (`{"request_id", "label"}`) or a batch (`{"labels": [{"request_id", "label"}, ...]}`, at most
    MAX_LABELS_PER_REQUEST): the (id, label) pairs; a bad item is refused naming its index, and nothing is recorded."""
    if not (isinstance(payload, dict) and "labels" in payload):
        return [parse_feedback(payload, classes)]
    extra = set(payload) - {"labels"}
    if extra:
        raise InvalidInput(f"unknown field {sorted(extra)[0]!r}: a batch is {{\"labels\": [{{\"request_id\": ..., \"label\": ...}}, ...]}}")
    items = payload["labels"]
    if not isinstance(items, list) or not items:
        raise InvalidInput("labels: must be a non-empty list of {\"request_id\", \"label\"} objects")
    if len(items) > MAX_LABELS_PER_REQUEST:
        raise InvalidInput(f"labels: {len(items)} labels in one request; at most {MAX_LABELS_PER_REQUEST}", 413)
    out = []
    for i, item in enumerate(items):
        try:
            out.append(parse_feedback(item, classes))
        except InvalidInput as err:
            raise InvalidInput(f"labels[{i}]: {err}", err.status) from None
    if len({rid for rid, _ in out}) < len(out):
        raise InvalidInput("labels: the same request_id appears twice in one batch")
    return out


async def read_limited(chunks: AsyncIterator[bytes], max_bytes: int = MAX_BODY_BYTES) -> bytes:
    """Read a body chunk by chunk and stop at the limit: a chunked body (no content-length) is never buffered whole."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            raise InvalidInput(f"body exceeds the limit of {max_bytes} bytes", 413)
    return bytes(body)


def check_table_name(name: str) -> str:
    """A table name as a spec's `dataset.table` allows it: no path separators, so it stays under the data root."""
    from driftloop.config import DatasetSpec

    pattern = next(m.pattern for m in DatasetSpec.model_fields["table"].metadata if getattr(m, "pattern", None))
    if not re.fullmatch(pattern, name):
        raise InvalidInput(f"table name {name[:64]!r} is not allowed: use letters, digits, '_' and '-' only (pattern {pattern})")
    return name


def request_schema(features: list[str], ds: Any = None) -> dict[str, Any]:
    """OpenAPI schema of the /predict body, so /docs shows the named features (category names, nullable ones)."""
    props: dict[str, Any] = {}
    for f in features:
        cat = ds.categorical.get(f) if ds is not None else None
        prop: dict[str, Any] = {"type": "string"} if cat else {"type": "number"}
        if cat and cat.unseen == "refuse":
            prop["enum"] = list(cat.categories)
        if ds is not None and ds.missing.get(f) == "impute":
            prop = {"anyOf": [prop, {"type": "null"}]}
        props[f] = prop
    row = {"type": "object", "properties": props, "required": features, "additionalProperties": False}
    return {"oneOf": [
        {"type": "object", "properties": {"row": row}, "required": ["row"]},
        {"type": "object", "properties": {"rows": {"type": "array", "items": row, "maxItems": MAX_BATCH_ROWS}},
         "required": ["rows"]},
    ]}
