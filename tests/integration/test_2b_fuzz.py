"""Bad input, fuzzed over real HTTP: random JSON, wrong types, huge and deeply nested bodies, unicode,
extreme numbers. Never a 5xx, never a crashed replica, never a row in a window or a table."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from driftloop.data import examples

pytestmark = pytest.mark.slow
F = examples.DIGITS_FEATURES

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(10**40), 10**40),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                             st.dictionaries(st.text(max_size=10), inner, max_size=5)),
                           max_leaves=30)
# rows that are almost right: every feature, with one value of a wrong kind
near_rows = st.builds(lambda bad, col: {f: (bad if f == col else 1.0) for f in F},
                      st.one_of(st.text(max_size=5), st.none(), st.booleans(), st.just(1e40), st.lists(st.integers(), max_size=2)),
                      st.sampled_from(F))
bodies = st.one_of(
    json_values,
    st.builds(lambda r: {"row": r}, json_values),
    st.builds(lambda r: {"rows": r}, st.lists(json_values, max_size=4)),
    st.builds(lambda r: {"row": r}, near_rows),
    st.builds(lambda rs: {"rows": rs}, st.lists(near_rows, min_size=1, max_size=3)),
)
raw = st.one_of(st.binary(max_size=200), st.just(b"[" * 5000 + b"]" * 5000), st.just(b'{"row": ' * 3000),
                st.just(json.dumps({"rows": [{f: 1 for f in F}] * 3000}).encode()))
PER_ENDPOINT = 1000


@pytest.fixture(scope="module")
def fuzz_app(serve_url, serving_spec, trained):
    from ray import serve

    from driftloop.serving.app import build

    serve.run(build({"spec": str(serving_spec)}), name="fuzz", route_prefix="/fuzz")
    with httpx.Client(base_url=f"{serve_url}/fuzz", timeout=60) as client:
        yield client
    serve.delete("fuzz")


def _check(resp, counts):
    counts[resp.status_code] = counts.get(resp.status_code, 0) + 1
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])


@pytest.mark.parametrize("endpoint", ["/predict", "/feedback"])
def test_fuzzed_requests_never_5xx_and_never_enter_a_window(fuzz_app, endpoint, settings, trained):
    from driftloop.data.logs import read_or_empty, uris

    spec, _ = trained
    inference_before = len(read_or_empty(uris(settings, spec)["inference"]))
    samples_before = fuzz_app.get("/drift").json()["samples"]
    counts: dict[int, int] = {}

    @hsettings(max_examples=PER_ENDPOINT * 3 // 4, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(bodies)
    def json_case(body):
        _check(fuzz_app.post(endpoint, content=json.dumps(body, ensure_ascii=False).encode(),
                             headers={"content-type": "application/json"}), counts)

    @hsettings(max_examples=PER_ENDPOINT // 4, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(raw)
    def raw_case(body):
        _check(fuzz_app.post(endpoint, content=body, headers={"content-type": "application/json"}), counts)

    json_case()
    raw_case()
    sent = sum(counts.values())
    print(f"{endpoint}: {sent} generated requests, status counts {dict(sorted(counts.items()))}")
    assert sent >= PER_ENDPOINT * 0.95  # hypothesis may deduplicate a few examples
    assert fuzz_app.get("/healthz").status_code == 200  # no crashed replica
    import time

    time.sleep(1.5)
    if endpoint == "/predict":
        # a fuzzed body may happen to be a valid row (all 64 numbers): only those may enter the window
        valid = counts.get(200, 0)
        assert fuzz_app.get("/drift").json()["samples"] - samples_before <= valid * 256
        if valid == 0:
            assert fuzz_app.get("/drift").json()["samples"] == samples_before
            assert len(read_or_empty(uris(settings, spec)["inference"])) == inference_before
    else:
        assert counts.get(200, 0) == 0  # no fuzzed request id exists
