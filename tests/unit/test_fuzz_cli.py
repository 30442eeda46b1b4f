"""The spec loader and the CLI, fuzzed: clear errors only (SpecError / exit 2 with one line), never a traceback."""

import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from driftloop.config import SpecError, parse_spec
from tests.conftest import ROOT, run_cli

BASE = yaml.safe_load((ROOT / "configs/digits.yaml").read_text())
values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                      lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=10)
paths = st.sampled_from([("name",), ("dataset", "features"), ("dataset", "classes"), ("dataset", "split"),
                         ("training", "workers"), ("training", "lr"), ("sweep", "search_space"),
                         ("sweep", "search_space", "lr"), ("drift", "detectors"), ("drift", "window"),
                         ("retraining", "policy"), ("retraining", "gate", "min_improvement"), ("model", "hidden")])


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(paths, values)
def test_spec_loader_gives_clear_errors_only(path, value):
    import copy

    d = copy.deepcopy(BASE)
    node = d
    for key in path[:-1]:
        node = node.setdefault(key, {}) if isinstance(node.get(key), dict) else node.__setitem__(key, {}) or node[key]
    node[path[-1]] = value
    try:
        parse_spec(d, "fuzz.yaml")
    except SpecError as err:
        msg = str(err)
        assert msg.startswith("fuzz.yaml: ") and "\n" not in msg


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12), min_size=1, max_size=3))
def test_cli_never_prints_a_traceback(args):
    r = run_cli("data", "ingest", *args, env={"DRIFTLOOP_HOME": "/tmp/driftloop-fuzz-home"}, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr[-1500:]
    assert r.returncode in (0, 2), (r.returncode, r.stderr[-500:])
