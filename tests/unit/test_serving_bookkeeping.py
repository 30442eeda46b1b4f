"""The Predictor's hand-off and the DriftMonitor's feedback bookkeeping, run on bare instances without Ray:
real Delta tables under a temporary data root, no Serve, no actors."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import numpy as np
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.filterwarnings("ignore:coroutine .*ASGIIngressWrapper.__del__:RuntimeWarning")


class Metric:
    def __init__(self):
        self.total = 0.0

    def inc(self, n=1.0, tags=None):
        self.total += n

    def set(self, value, tags=None):
        pass


@pytest.fixture
def served(tmp_path, monkeypatch):
    """(settings, spec, make_monitor, make_predictor) over a private home; the app key from a fixed secret."""
    from driftloop.config import load_spec
    from driftloop.settings import Settings

    monkeypatch.setenv("DRIFTLOOP_ID_SECRET", "unit-test-secret-" + "0" * 16)
    settings = Settings(home=tmp_path, data_root=str(tmp_path / "tables"), tracking_uri="", ray_address=None)
    spec = load_spec(ROOT / "configs/digits.yaml")
    return settings, spec


def bare_monitor(settings, spec):
    """A DriftMonitor without its constructor (no registry, no Serve): what /feedback and observe touch, with its
    real stores (inference log and feedback) over the private home's Delta tables."""
    from driftloop.drift.core import MonitorCore
    from driftloop.serving.app import DriftMonitor
    from driftloop.serving.stores import FeedbackStore, InferenceLog

    cls = DriftMonitor.func_or_class
    m = cls.__new__(cls)
    m.spec, m.settings, m.name = spec, settings, spec.name
    m.core = MonitorCore(spec)
    m.core.version = 1  # serving version 1, no detectors
    m.feedback_count, m.dropped_reported, m._dirty, m._tasks, m._lock = 0, 0, False, [object()], asyncio.Lock()
    m._persist_lock = asyncio.Lock()
    m.m_acc, m.m_dropped, m.m_samples, m.m_log_dropped = Metric(), Metric(), Metric(), Metric()
    m.inference_log = InferenceLog(settings, spec, on_dropped=m.m_log_dropped.inc)
    m.labels = FeedbackStore(settings, spec, "digits")
    m.pending_submit = None
    counted = []
    on_labels = m.policy.on_labels
    m.policy.on_labels = lambda n, *a, **kw: (counted.append(n), on_labels(n, *a, **kw))[1]
    m.counted = counted
    return m


def issue(version: int = 1, rows: int = 1, age_s: float = 0.0) -> str:
    import os

    from driftloop.ids import issue as _issue

    return _issue(os.environ["DRIFTLOOP_ID_SECRET"].encode(), version, rows, now=time.time() - age_s)


def feedback_rows(settings, spec, rid: str) -> int:
    from driftloop.data.logs import read_or_empty, uris

    fb = read_or_empty(uris(settings, spec)["feedback"])
    return int((fb["request_id"] == rid).sum()) if len(fb) else 0


def test_a_repeated_label_is_idempotent_and_a_different_one_is_refused(served):
    """Defect 2: every repeat of /feedback counted again toward the policy, the accuracy and the feedback count."""
    settings, spec = served
    m = bare_monitor(settings, spec)
    rid = issue()
    m.labels.known[rid] = (1, 3)

    async def main():
        return [await m.feedback(rid, 3) for _ in range(5)] + [await m.feedback(rid, 4)]

    first, *repeats, other = asyncio.run(main())
    assert first["status"] == 200 and first["duplicate"] is False
    assert all(r["status"] == 200 and r["duplicate"] is True and r["prediction"] == 3 for r in repeats)
    assert other["status"] == 409 and "already has label 3" in other["error"] and other["label"] == 3
    assert m.counted == [1] and m.feedback_count == 1 and len(m.correct[1]) == 1
    assert feedback_rows(settings, spec, rid) == 1


def test_a_batch_of_labels_is_decided_label_by_label_and_committed_together(served):
    """POST /feedback {"labels": [...]}: each label answered as it would be alone; the new ones share commits."""
    from driftloop.data import logs, tables

    settings, spec = served
    m = bare_monitor(settings, spec)
    fresh = [issue() for _ in range(40)]
    for rid in fresh:
        m.labels.known[rid] = (1, 3)
    seen = issue()
    m.labels.known[seen] = (1, 3)
    asyncio.run(m.feedback(seen, 3))
    unknown = issue(age_s=3600)  # never served here, too old to be still on its way
    uri = logs.uris(settings, spec)["feedback"]
    before = tables.data_version(uri).version
    out = asyncio.run(m.feedback_many([(r, 3) for r in fresh] + [(seen, 3), (unknown, 1)]))
    assert [r["status"] for r in out] == [200] * 41 + [404]
    assert not any(r["duplicate"] for r in out[:40]) and out[40]["duplicate"] is True
    assert m.counted.count(1) == 41 and m.feedback_count == 41
    assert all(feedback_rows(settings, spec, r) == 1 for r in fresh)
    assert tables.data_version(uri).version - before <= 2, "the batch's new labels share the group commit"


def test_simultaneous_labels_for_one_id_count_once(served):
    settings, spec = served
    m = bare_monitor(settings, spec)
    rid = issue()
    m.labels.known[rid] = (1, 3)

    async def main():
        return await asyncio.gather(*(m.feedback(rid, 3 if i % 2 else 5) for i in range(16)))

    out = asyncio.run(main())
    fresh = [r for r in out if r["status"] == 200 and not r["duplicate"]]
    assert len(fresh) == 1 and m.counted == [1] and feedback_rows(settings, spec, rid) == 1
    winner = fresh[0]["label"]
    assert all(r["status"] == (200 if lbl == winner else 409)
               for r, lbl in zip(out, [3 if i % 2 else 5 for i in range(16)]) if r is not fresh[0])


def test_a_label_given_before_a_restart_is_found_in_the_feedback_table(served):
    settings, spec = served
    before = bare_monitor(settings, spec)
    rid = issue(age_s=1)
    before.labels.known[rid] = (1, 3)
    assert asyncio.run(before.feedback(rid, 3))["duplicate"] is False
    after = bare_monitor(settings, spec)  # a new replica: empty memory, the same tables

    async def main():
        return await after.feedback(rid, 3), await after.feedback(rid, 7)

    same, other = asyncio.run(main())
    assert same["status"] == 200 and same["duplicate"] is True
    assert other["status"] == 409 and "already has label 3" in other["error"]
    assert after.counted == [] and after.feedback_count == 0 and feedback_rows(settings, spec, rid) == 1


def test_forged_and_old_unknown_ids_are_answered_at_once(served):
    """Defect 3: a well-formed unknown id waited 3 s and queued for a serialized log scan."""
    settings, spec = served
    m = bare_monitor(settings, spec)

    async def main():
        t0 = time.monotonic()
        forged = await m.feedback("1.abc.1." + "0" * 16 + "." + "0" * 32, 3)
        unknown = await m.feedback(issue(age_s=60), 3)  # signed, never served here: one filtered lookup, no wait
        return forged, unknown, time.monotonic() - t0

    forged, unknown, secs = asyncio.run(main())
    assert forged["status"] == 422 and "not an id issued by /predict" in forged["error"]
    assert unknown["status"] == 404 and "unknown request_id" in unknown["error"]
    assert secs < 2.0 and m.counted == []


def test_the_inference_log_buffer_is_bounded_while_writes_fail(served, monkeypatch):
    """Defect 4: log_buffer grew without limit while Delta writes failed."""
    import driftloop.serving.stores as stores

    settings, spec = served
    monkeypatch.setattr(stores, "LOG_BUFFER_ROWS", 1_000)
    m = bare_monitor(settings, spec)

    def broken(settings, spec, kind, df):
        raise OSError("storage down")

    m.inference_log.append = broken

    async def main():
        for i in range(30):
            x = np.zeros((100, len(spec.dataset.features)), dtype=np.float32)
            proba = np.full((100, spec.n_classes), 0.1, dtype=np.float32)
            await m.observe({"ids": [issue() for _ in range(100)], "ts": [time.time()] * 100, "x": x, "proba": proba,
                             "version": 2, "dropped": 0})
            with pytest.raises(OSError):
                await m.inference_log.flush()

    asyncio.run(main())
    assert m.inference_log.rows == 1_000
    assert m.inference_log.dropped == 3_000 - 1_000 and m.m_log_dropped.total == m.inference_log.dropped
    # storage back: the rows kept are written, once
    from driftloop.data import logs

    m.inference_log.append = stores._append
    assert asyncio.run(m.inference_log.flush()) == 1_000 and m.inference_log.rows == 0
    assert len(logs.read_or_empty(logs.uris(settings, spec)["inference"])) == 1_000


def test_overload_sampling_is_uniform_over_a_burst_and_counted(served):
    """Defect 5: past MAX_BUFFER rows the hand-off dropped the tail of a burst; the windows saw only its head."""
    from driftloop.serving.app import Predictor

    settings, spec = served
    cls = Predictor.func_or_class
    p = cls.__new__(cls)
    p.settings, p.monitoring = settings, True
    batches = []

    async def observe(batch):
        batches.append(batch)

    p.monitor = SimpleNamespace(observe=SimpleNamespace(remote=observe))
    p._init_ingress(None, None)
    n_feat, requests, rows = len(spec.dataset.features), 100, 256
    for r in range(requests):  # 25,600 rows between two flushes: more than MAX_BUFFER
        x = np.full((rows, n_feat), r, dtype=np.float32)
        p._hand_to_monitor([f"r{r}-{i}" for i in range(rows)], x, np.zeros((rows, 10), dtype=np.float32), 1)
    asyncio.run(p._flush())
    (batch,) = batches
    total = requests * rows
    assert len(batch["ids"]) == p.MAX_BUFFER and batch["dropped"] == total - p.MAX_BUFFER
    assert batch["x"].shape == (p.MAX_BUFFER, n_feat)
    which = batch["x"][:, 0].astype(int)  # the request each kept row came from
    assert np.all(np.diff(which) >= 0), "kept rows stay in arrival order"
    per_request = np.bincount(which, minlength=requests)
    assert per_request.min() > 0.5 * p.MAX_BUFFER / requests, "the end of the burst is monitored as much as its start"
    assert abs(which.mean() - (requests - 1) / 2) < 5


def test_the_feedback_store_is_bounded_and_still_answers_for_ids_it_forgot(served):
    """Defect 7b: the request-id map kept up to 500k entries. The store keeps at most `bound` served rows and labels
    in memory; an id it forgot is looked up in the tables, so a repeat is still a duplicate (or a 409), never a
    second count, and the label of a forgotten served row is still accepted."""
    from driftloop.serving.limits import BoundedMap
    from driftloop.serving.stores import FeedbackStore, InferenceLog

    settings, spec = served
    bound = 50
    store = FeedbackStore(settings, spec, "digits", known=BoundedMap(bound))
    store.labelled = BoundedMap(bound, on_evict=store._forgot_label)
    log = InferenceLog(settings, spec)
    rids = [issue(age_s=120 - i * 0.01) for i in range(3 * bound)]  # issued a while ago, oldest first
    x = np.zeros((len(rids), len(spec.dataset.features)), dtype=np.float32)
    preds = np.full(len(rids), 3)

    async def main():
        store.served(rids, 1, preds)
        log.add(rids, [time.time() - 120] * len(rids), 1, x, preds)
        await log.flush()  # the served rows are in the inference log, as the monitor's flush loop puts them
        first = await asyncio.gather(*(store.record(r, 3) for r in rids))  # 150 new labels, a store that remembers 50
        again = await asyncio.gather(*(store.record(r, 3) for r in rids[:bound]))  # the oldest: forgotten by now
        other = await store.record(rids[0], 4)
        return first, again, other

    first, again, other = asyncio.run(main())
    assert len(store.known) <= bound and len(store.labelled) <= bound
    assert all(r["status"] == 200 and r["duplicate"] is False for r in first)
    assert all(r["status"] == 200 and r["duplicate"] is True for r in again), "a forgotten label is found in the table"
    assert other["status"] == 409 and "already has label 3" in other["error"]
    assert all(feedback_rows(settings, spec, r) == 1 for r in rids)


def test_a_swap_never_mixes_versions_in_a_window_nor_stalls_rows_while_it_downloads(served, tmp_path):
    """Defect 4 through the monitor's shell: observe checked the version outside the lock while the swap held the
    lock through its whole download, so rows of the old model entered the new detectors' first window (and rows
    waited for the download). Predictors here keep sending rows of version 1 during and after the swap (one has
    not swapped yet) and of version 2 before the monitor has swapped (one swapped first)."""
    from driftloop.drift.detectors import DetectorResult
    from driftloop.drift.windows import WindowedDetectors

    settings, spec = served
    n_features = len(spec.dataset.features)
    seen: dict[int, list[set]] = {1: [], 2: []}

    class VersionCheck:  # records which model versions fed each window it tests (a row carries its version)
        name, kind, input, online = "0-check", "check", "features", False

        def __init__(self, version):
            self.version = version

        def predict(self, x, proba):
            seen[self.version].append(set(np.unique(x).tolist()))
            return DetectorResult(self.name, self.kind, False, 1.0, 0.0, 0.5)

    m = bare_monitor(settings, spec)
    for name in ("m_windows", "m_drift", "m_pval", "m_score"):
        setattr(m, name, Metric())
    m.state_path, m.first_started_at, m.persisted_at = str(tmp_path / "state.npz"), time.time(), None
    m.core.use(1, WindowedDetectors([VersionCheck(1)], 10, 1), time.time(), swapped=False)
    downloading = 0.5

    def load_v2():  # the download and the detectors' load, in a thread, as _load_new_champion does
        time.sleep(downloading)
        return 2, WindowedDetectors([VersionCheck(2)], 10, 2), {}, -1

    m._load_new_champion = load_v2

    def rows(version: int, n: int = 5) -> dict:
        return {"ids": [issue(version) for _ in range(n)], "ts": [time.time()] * n, "dropped": 0, "version": version,
                "x": np.full((n, n_features), float(version), dtype=np.float32),
                "proba": np.full((n, spec.n_classes), 0.1, dtype=np.float32)}

    async def traffic(stop: asyncio.Event, waits: list[float]):
        i = 0
        while not stop.is_set():
            t = time.monotonic()
            await m.observe(rows(1 if i % 3 else 2))  # mostly the old model, some rows of the new one
            waits.append(time.monotonic() - t)
            i += 1
            await asyncio.sleep(0.01)

    async def main():
        stop, waits = asyncio.Event(), []
        task = asyncio.get_running_loop().create_task(traffic(stop, waits))
        await asyncio.sleep(0.1)
        swapped = await m._swap_if_needed()
        for _ in range(20):  # after the swap: stragglers of version 1 and the new model's rows
            await asyncio.sleep(0.01)
        stop.set()
        await task
        for _ in range(10):
            await m.observe(rows(2))
        return swapped, waits

    swapped, waits = asyncio.run(main())
    assert swapped and m.core.version == 2
    assert seen[1] and all(s == {1.0} for s in seen[1]), seen[1]
    assert seen[2] and all(s == {2.0} for s in seen[2]), "a window of the new detectors saw rows of the old model"
    assert max(waits) < downloading / 2, f"rows waited {max(waits):.2f} s for the swap's download"


def test_the_windows_one_batch_closes_are_one_commit_of_the_drift_events_log(served, tmp_path):
    """Each window's drift event is durable before observe returns (and before a trigger names it); the windows
    and alarms one batch of rows closes share one commit instead of one commit each."""
    from deltalake import DeltaTable

    from driftloop.data.logs import read_or_empty, uris
    from driftloop.drift.detectors import DetectorResult
    from driftloop.drift.windows import WindowedDetectors

    settings, spec = served

    class Quiet:
        name, kind, input, online = "0-quiet", "quiet", "features", False

        def predict(self, x, proba):
            return DetectorResult(self.name, self.kind, False, 0.5, 0.1, 0.01)

    m = bare_monitor(settings, spec)
    for name in ("m_windows", "m_drift", "m_pval", "m_score"):
        setattr(m, name, Metric())
    m.state_path, m.first_started_at, m.persisted_at = str(tmp_path / "state.npz"), time.time(), None
    m.core.use(1, WindowedDetectors([Quiet()], 10, 1), time.time(), swapped=False)

    def rows(n: int) -> dict:
        return {"ids": [issue() for _ in range(n)], "ts": [time.time()] * n, "dropped": 0, "version": 1,
                "x": np.zeros((n, len(spec.dataset.features)), dtype=np.float32),
                "proba": np.full((n, spec.n_classes), 0.1, dtype=np.float32)}

    uri = uris(settings, spec)["drift_events"]
    asyncio.run(m.observe(rows(35)))  # three windows of 10 close, 5 rows stay open
    events = read_or_empty(uri)
    assert len(events) == 3 and events["window_index"].nunique() == 3 and not events["is_drift"].any()
    assert DeltaTable(uri).version() == 0  # the one commit that created the log holds all three
    asyncio.run(m.observe(rows(5)))  # the fourth window
    assert len(read_or_empty(uri)) == 4 and DeltaTable(uri).version() == 1
    assert m.m_windows.total == 4
