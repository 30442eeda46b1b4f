"""The live drift page: the /ui/data payload (pure), its cache and fail-closed registry read, and a page that
talks to its own origin only. No MLflow, no Ray."""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace

import pytest

from driftloop.serving import ui
from tests.conftest import ROOT

DRIFT = {"p_val": 0.05, "window": 500, "history": 20, "detectors": [{"name": "0-bbsd", "kind": "bbsd", "correction": "bonferroni"}]}


def row(version: int, champion: bool = False, **kw) -> dict:
    """A row as registry.list_versions returns it (scores are tag strings, "" when absent; created in ms)."""
    base = {"version": version, "champion": champion, "test_accuracy": "0.9", "data": f"s3://bucket/tables/digits@v{version}",
            "digest": f"sha256:{version:04d}", "decision": "promoted", "reason": "beats champion", "challenger_score": "0.950000",
            "champion_score": "0.900000", "run_id": f"run{version}", "drift_event": "", "job_id": "", "cause": "", "reference": "",
            "created": 1_800_000_000_000 + version * 1000}
    return base | kw


def test_payload_history_scores_and_champion_lineage():
    versions = [row(3, champion=True, drift_event="ev9", job_id="driftloop-retrain-digits-v2-g1", cause="drift event ev9",
                    reference="recent: 500 rows"),
                row(1, decision="promoted", reason="first version", challenger_score="0.930000", champion_score=""),
                row(2, decision="refused", challenger_score="0.880000", champion_score="0.930000")]
    tags = {"data.version": "3", "lineage.trigger": "drift in 2 of the last 3 windows (k=2)", "lineage.champion_before": "1"}
    p = ui.payload("digits", versions, [1, 3], tags, DRIFT, 123.0)

    assert p["model"] == "digits" and p["champion"] == 3 and p["champion_history"] == [1, 3] and p["generated_at"] == 123.0
    assert p["drift"] == DRIFT
    assert [v["version"] for v in p["versions"]] == [1, 2, 3]                      # oldest first
    v1, v2, v3 = p["versions"]
    assert v1["challenger_score"] == pytest.approx(0.93) and v1["champion_score"] is None   # "" -> None, never 0
    assert v2["decision"] == "refused" and v2["champion_score"] == pytest.approx(0.93)
    assert [v["was_champion"] for v in p["versions"]] == [True, False, True]
    assert [v["champion"] for v in p["versions"]] == [False, False, True]
    assert v3["created"] == pytest.approx(1_800_000_003.0)                          # ms -> s
    assert v3["data"] == "digits@v3" and v3["data_version"] == 3                   # the table's name, not its URI
    assert all("s3://" not in str(v) for v in p["versions"])
    assert set(v1) == {"version", "champion", "was_champion", "run_id", "data", "data_version", "digest", "decision", "reason",
                       "challenger_score", "champion_score", "cause", "drift_event", "job_id", "reference", "created"}

    lin = p["lineage"]
    assert lin["version"] == 3 and lin["run_id"] == "run3" and lin["data"] == "digits@v3" and lin["data_version"] == 3
    assert lin["trigger"] == tags["lineage.trigger"] and lin["cause"] == "drift event ev9" and lin["drift_event"] == "ev9"
    assert lin["job_id"] == "driftloop-retrain-digits-v2-g1" and lin["champion_before"] == 1
    assert lin["challenger_score"] == pytest.approx(0.95) and lin["reference"] == "recent: 500 rows"


def test_payload_without_a_champion_has_no_lineage():
    p = ui.payload("digits", [row(1, decision="refused")], [], {}, DRIFT, 0.0)
    assert p["champion"] is None and p["lineage"] is None and p["champion_history"] == []
    assert ui.payload("digits", [], [], {}, DRIFT, 0.0)["versions"] == []


def test_payload_tolerates_odd_tags():
    p = ui.payload("m", [row(1, champion=True, challenger_score="nan", champion_score="?", data="", created=None)], [1],
                   {"data.version": ""}, DRIFT, 0.0)
    (v,) = p["versions"]
    assert v["challenger_score"] is None and v["champion_score"] is None    # a NaN score is no JSON and v["data"] == "" and v["data_version"] is None and v["created"] is None
    assert p["lineage"]["data_version"] is None and p["lineage"]["trigger"] == "" and p["lineage"]["champion_before"] is None


def test_drift_settings_name_detectors_as_their_manifest_does():
    from driftloop.config import load_spec

    spec = load_spec(ROOT / "configs/digits.yaml")
    d = ui.drift_settings(spec)
    assert d["p_val"] == spec.drift.p_val and d["window"] == spec.drift.window
    assert [x["name"] for x in d["detectors"]] == [f"{i}-{x.kind}" for i, x in enumerate(spec.drift.detectors)]
    assert d["gate_metric"] == "accuracy" and d["lower_is_better"] is False


# --- the registry read fails closed, and is cached -----------------------------------------------------


def test_read_payload_turns_any_registry_error_into_registry_unavailable(monkeypatch):
    from driftloop import registry

    def broken(settings, name):
        raise RuntimeError("connection refused\ntraceback noise")

    monkeypatch.setattr(registry, "list_versions", broken)
    settings = SimpleNamespace(tracking_uri="http://127.0.0.1:1")
    with pytest.raises(registry.RegistryUnavailable, match=r"model registry at http://127.0.0.1:1 unavailable: connection refused$"):
        ui.read_payload(settings, SimpleNamespace(name="digits"))


class Clock:
    """A settable monotonic clock for the cache."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_cache_reads_once_per_ttl_however_many_callers():
    clock, reads = Clock(), []

    def read():
        reads.append(clock.t)
        return {"n": len(reads)}

    cache = ui.CachedPayload(read, ttl_s=2.0, clock=clock)

    async def scenario():
        first = await asyncio.gather(*[cache.get() for _ in range(20)])  # concurrent pages: one read
        clock.t = 1.9
        cached = await cache.get()
        clock.t = 2.1
        fresh = await cache.get()
        return first, cached, fresh

    first, cached, fresh = asyncio.run(scenario())
    assert all(x == (200, {"n": 1}) for x in first) and cached == (200, {"n": 1})
    assert fresh == (200, {"n": 2}) and len(reads) == 2


def test_cache_fails_closed_with_one_line_and_no_credentials():
    clock, calls = Clock(), []

    def read():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("model registry at https://alice:s3cret@mlflow.example:5000 unavailable: 502\nsecond line")
        return {"versions": []}

    cache = ui.CachedPayload(read, ttl_s=2.0, clock=clock)
    status, body = asyncio.run(cache.get())
    assert status == 503 and set(body) == {"error"}
    assert body["error"] == "model registry at https://***@mlflow.example:5000 unavailable: 502"
    assert asyncio.run(cache.get()) == (503, body) and len(calls) == 1     # the error is cached too
    clock.t = 5.0
    assert asyncio.run(cache.get()) == (200, {"versions": []})             # and the registry is asked again later


# --- the page ----------------------------------------------------------------------------------------------


def test_page_talks_to_its_own_origin_only():
    page = ui.PAGE
    low = page.lower()
    for bad in ("http://", "https://", "//cdn", "<script src", "<link", "@import", "url(", "<iframe", "<img", "xmlns"):
        assert bad not in low, bad
    assert not re.search(r"""\b(src|href|action)\s*=""", low)
    fetched = re.findall(r"fetch\(([^,)]*)", page)
    assert fetched == ["base + path"]                                      # one fetch helper...
    assert set(re.findall(r"""getJSON\("([^"]*)"\)""", page)) == {"/drift", "/ui/data"}   # ...for these two paths
    assert 'location.pathname.replace(/\\/ui\\/?$/, "")' in page            # /<app>/ui -> /<app>
    assert "connect-src 'self'" in ui.PAGE_HEADERS["Content-Security-Policy"]
    assert "default-src 'none'" in ui.PAGE_HEADERS["Content-Security-Policy"]


def test_page_carries_the_stable_ids_and_refreshes_every_two_seconds():
    page = ui.PAGE
    for el in ("drift-events", "jobs", "champion", "lineage", "history", "detectors", "features", "accuracy"):
        assert page.count(f'id="{el}"') == 1, el
    assert "REFRESH_MS = 2000" in page
    for attr in ("data-event-id", "data-submission-id", "data-status", "data-version", "data-decision", "data-feature", "data-detector"):
        assert attr in page, attr
    assert page.lstrip().startswith("<!doctype html>") and page.rstrip().endswith("</html>")
