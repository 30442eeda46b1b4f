"""The registry fails closed: "no champion yet" only when MLflow itself says so, never on an error."""

from __future__ import annotations

import json
import re
import sqlite3
import threading

import pytest

from driftloop import registry
from driftloop.errors import LoopError
from driftloop.settings import get_settings

from tests.conftest import free_port


def test_no_model_and_no_alias_read_as_no_champion(home):
    s = get_settings().ensure()
    assert registry.champion_version(s, "nothing-registered") is None
    registry.client(s).create_registered_model("bare")
    assert registry.champion_version(s, "bare") is None     # registered, never promoted


def test_a_broken_registry_store_is_an_error_not_no_champion(home):
    s = get_settings().ensure()
    registry.client(s).create_registered_model("m")
    db = s.tracking_uri.removeprefix("sqlite:///")
    with sqlite3.connect(db) as con:                          # the alias table disappears under MLflow: a real store fault
        con.execute("ALTER TABLE registered_model_aliases RENAME TO aliases_gone")
    with pytest.raises(registry.RegistryUnavailable, match="model registry at sqlite:///.* unavailable"):
        registry.champion_version(s, "m")


def test_an_unreachable_tracking_server_is_an_error_not_no_champion(home, monkeypatch):
    port = free_port()  # a port nothing listens on
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    s = get_settings()
    with pytest.raises(registry.RegistryUnavailable, match=f"127.0.0.1:{port}"):
        registry.champion_version(s, "digits")


# --- champion history (append-only alias-move events) and archiving ---------------------------


def _model(s, name: str, n: int):
    """A registered model with n bare versions (no artifacts: the alias and the tags are all these tests need)."""
    c = registry.client(s)
    c.create_registered_model(name)
    for _ in range(n):
        c.create_model_version(name, source="file:///tmp/none", run_id=None)
    return c


def test_concurrent_promotions_lose_no_history_entry(home):
    s = get_settings().ensure()
    _model(s, "m", 2)
    registry.promote(s, "m", 1)   # the alias exists: MLflow's first-ever alias write is itself a racy select-then-insert
    barrier, errors = threading.Barrier(2), []

    def promote_ten(v: int) -> None:
        try:
            barrier.wait(30)
            for _ in range(10):
                registry.promote(s, "m", v)
        except Exception as err:  # noqa: BLE001 - surfaced by the assert below
            errors.append(err)

    threads = [threading.Thread(target=promote_ten, args=(v,)) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    hist = registry._history(registry.client(s), "m")   # a read-modify-write of one JSON tag lost some of these
    assert sorted(hist) == [1] * 11 + [2] * 10
    assert registry.champion_version(s, "m") in (1, 2)


def test_rollback_twice_goes_back_two_champions_from_a_legacy_history(home):
    s = get_settings().ensure()
    c = _model(s, "m", 4)
    c.set_registered_model_tag("m", registry.HISTORY_TAG, "[1, 2]")   # as the old code left a store
    c.set_registered_model_alias("m", registry.CHAMPION, "2")
    registry.promote(s, "m", 3)
    registry.promote(s, "m", 4)
    assert registry.champion_history(s, "m") == [1, 2, 3, 4]
    assert registry.rollback(s, "m") == 3 and registry.champion_history(s, "m") == [1, 2, 3]
    assert registry.rollback(s, "m") == 2 and registry.champion_history(s, "m") == [1, 2]   # further back, not to 4
    assert registry.champion_version(s, "m") == 2
    assert registry.version_tags(s, "m", 2)["gate.decision"] == "rollback"
    registry.promote(s, "m", 4)
    assert registry.champion_history(s, "m") == [1, 2, 4]
    assert registry.rollback(s, "m") == 2 and registry.rollback(s, "m") == 1
    with pytest.raises(LoopError, match="no previous champion"):
        registry.rollback(s, "m")
    assert c.get_registered_model("m").tags[registry.HISTORY_TAG] == "[1, 2]"   # never rewritten


def test_history_replays_events_in_key_order_and_keeps_the_last_50():
    ev = lambda v, op="promote": json.dumps({"v": v, "op": op})  # noqa: E731
    tags = {registry.HISTORY_TAG: "[7, 8]", "champion_history.0000000000003-aaaaaa": ev(9, "manual"),
            "champion_history.0000000000001-ffffff": ev(1), "champion_history.0000000000002-000000": ev(7, "rollback"),
            "champion_history.0000000000004-000000": ev(5, "rollback"), "other": "x"}
    assert registry._replay("m", tags) == [7, 9, 5]   # rollback to 7 cut [7, 8, 1] to [7]; to an absent 5 appends
    many = {f"champion_history.{i:013d}-000000": ev(i) for i in range(120)}
    assert registry._replay("m", many) == list(range(70, 120))
    with pytest.raises(LoopError, match="unreadable champion history event"):
        registry._replay("m", {"champion_history.0000000000001-000000": "{"})


def test_archive_old_keeps_the_newest_the_champion_and_the_recent_champions(home):
    s = get_settings().ensure()
    c = _model(s, "m", 8)
    for v in (1, 2, 5, 6, 3):                        # champion 3; the last two distinct champions: 3, 6
        registry.promote(s, "m", v)
    c.set_registered_model_alias("m", "shadow", "2")  # any other alias keeps its version too
    assert registry.archive_old(s, "m", keep_versions=2, keep_champions=2, dry_run=True) == [1, 4, 5]
    assert not any(r["archived"] for r in registry.list_versions(s, "m"))   # dry run: nothing written
    assert registry.archive_old(s, "m", keep_versions=2, keep_champions=2) == [1, 4, 5]
    archived = {r["version"]: r["archived"] for r in registry.list_versions(s, "m")}
    assert {v for v, t in archived.items() if t} == {1, 4, 5}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", archived[4])
    assert registry.archive_old(s, "m", keep_versions=2, keep_champions=2) == []   # idempotent
    assert registry.archive_old(s, "nothing-registered", 2, 2) == []

    with pytest.raises(LoopError, match=rf"m version 5 is archived \(on {archived[5]}\); .*--force"):
        registry.promote(s, "m", 5)
    assert registry.champion_version(s, "m") == 3
    registry.promote(s, "m", 5, force=True)
    assert registry.champion_version(s, "m") == 5
    assert next(r for r in registry.list_versions(s, "m") if r["version"] == 5)["archived"] == ""   # serves again


def test_archive_old_fails_closed_on_a_registry_error(home):
    s = get_settings().ensure()
    _model(s, "m", 4)
    db = s.tracking_uri.removeprefix("sqlite:///")
    with sqlite3.connect(db) as con:
        con.execute("ALTER TABLE registered_model_aliases RENAME TO aliases_gone")
    with pytest.raises(registry.RegistryUnavailable):
        registry.archive_old(s, "m", keep_versions=1, keep_champions=1)


def test_the_gate_refuses_on_a_registry_error_and_moves_nothing(home):
    """Defect 1 of #12 without Ray: the gate read an erroring registry as "no champion yet" and promoted the
    challenger as the "first version". Now the store fault is raised, the alias stays, no decision is recorded."""
    import numpy as np

    from driftloop.config import parse_spec

    spec = parse_spec({"name": "m", "dataset": {"source": "x.csv", "table": "t", "features": ["a"], "label": "y",
                                                 "classes": [0, 1]}})
    s = get_settings().ensure()
    c = _model(s, "m", 2)
    registry.promote(s, "m", 1)
    db = s.tracking_uri.removeprefix("sqlite:///")
    with sqlite3.connect(db) as con:
        con.execute("ALTER TABLE registered_model_aliases RENAME TO aliases_gone")
    with pytest.raises(registry.RegistryUnavailable, match="model registry at sqlite:///.* unavailable"):
        registry.gate_and_promote(s, spec, 2, np.zeros((4, 1), np.float32), np.zeros(4, int), "t")
    with sqlite3.connect(db) as con:
        con.execute("ALTER TABLE aliases_gone RENAME TO registered_model_aliases")
    assert registry.champion_version(s, "m") == 1                 # not the challenger
    assert registry.champion_history(s, "m") == [1]
    assert "gate.decision" not in c.get_model_version("m", "2").tags   # no half-recorded decision


def test_a_version_trained_on_other_category_lists_is_not_served_with_this_spec(home):
    from driftloop.config import parse_spec
    from driftloop.features import input_digest
    from driftloop.serving.common import check_inputs

    def spec(categories):
        return parse_spec({"name": "m", "dataset": {"source": "x.csv", "table": "t", "features": ["x", "colour"],
                                                     "label": "y", "classes": [0, 1],
                                                     "categorical": {"colour": {"categories": categories}}}})

    s = get_settings().ensure()
    c = _model(s, "m", 2)
    trained = input_digest(spec(["red", "blue"]).dataset)
    c.set_model_version_tag("m", "1", "inputs.digest", trained)
    check_inputs(s, "m", 1, trained)                     # the spec it was trained with
    check_inputs(s, "m", 2, "anything")                  # registered before versions carried a digest
    reordered = input_digest(spec(["blue", "red"]).dataset)       # `init` re-run on newer data: same names, new codes
    with pytest.raises(LoopError, match=r"model 'm' v1 was trained on other inputs than the spec names"):
        check_inputs(s, "m", 1, reordered)
    # `init --task regression --force` over a classifier's name: its first probability is no predicted value
    c.set_model_version_tag("m", "1", "task", "classification")
    check_inputs(s, "m", 1, trained, "classification")
    check_inputs(s, "m", 2, "anything", "regression")      # registered before versions carried their task
    with pytest.raises(LoopError, match=r"v1 is a classification model and the spec's task is regression"):
        check_inputs(s, "m", 1, trained, "regression")


def test_commands_started_together_on_a_fresh_folder_share_one_new_store(home, tmp_path):
    """Two sweeps started at once on a fresh folder each open the sqlite store first: MLflow's migrations of one
    broke the other's ("table _alembic_tmp_model_versions already exists"). Four processes, one new store."""
    import subprocess
    import sys

    code = ("from driftloop import registry; from driftloop.settings import get_settings; "
            "c = registry.client(get_settings()); c.search_registered_models(); print('ok')")
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    out = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [e[-400:] for _, e in out]
    assert registry.champion_version(get_settings(), "none") is None


@pytest.mark.parametrize("regression", [False, True])
def test_a_versions_weights_load_back_to_the_same_outputs(tmp_path, regression):
    """What replicas and the gate load (registry.load_model): the state dict and constructor arguments logged beside
    the export archive, read with torch.load(weights_only=True); same outputs as the model that was registered,
    gaps, an unseen category and embedded categories included."""
    import numpy as np
    import torch

    from driftloop.model import Outputs, build_model, predict_outputs, save_weights

    rng = np.random.default_rng(0)
    card = [0, 0, 3, 40]  # two numbers, one one-hot coded category, one embedded
    model = build_model(4, 1 if regression else 3, [16, 8], 0.2, card, regression)
    x = np.column_stack([rng.normal(5, 2, 300), rng.normal(-1, 9, 300), rng.integers(0, 3, 300), rng.integers(0, 40, 300)])
    model.set_standardisation(x)
    if regression:
        model.set_target_standardisation(rng.normal(150, 60, 300))
    for p in model.parameters():
        torch.nn.init.normal_(p)
    save_weights(model, tmp_path / registry.WEIGHTS)  # as register_bundle logs it
    x[::7, 0] = np.nan
    x[1, 2] = -1  # a category the model never saw
    loaded = registry.load_model(tmp_path)
    np.testing.assert_array_equal(predict_outputs(loaded, x.astype(np.float32)),
                                  predict_outputs(Outputs(model).eval(), x.astype(np.float32)))
    assert torch.load(tmp_path / registry.WEIGHTS, weights_only=True)["arch"]["cardinalities"] == card
