"""The DriftMonitor's durable rows, as two small stores it holds: the inference log (served rows, buffered and
bounded while Delta writes fail) and the feedback store (ground-truth labels, once per served row, group-committed
to the feedback table before the 2xx). They do I/O and bookkeeping only; what a new label means for the windows,
the rolling accuracy and the policy is decided by the monitor (and its MonitorCore)."""

import asyncio
import time
from typing import Any, Callable

import numpy as np

from driftloop import ids as request_ids
from driftloop.config import Spec
from driftloop.invalid_input import InvalidInput
from driftloop.serving.common import FRESH_ID_S, KNOWN_IDS, LABEL_COVER_MARGIN_S, LOG_BUFFER_ROWS, log
from driftloop.serving.limits import BoundedMap, Coalescer, trim_oldest
from driftloop.settings import Settings


def _append(settings: Settings, spec: Spec, kind: str, df) -> None:
    from driftloop.data import logs

    logs.append(settings, spec, kind, df)


class InferenceLog:
    """Served rows on their way to the inference log table: one Delta version per flush. While writes fail the
    newest LOG_BUFFER_ROWS rows are kept for the next attempt and the older ones are counted as dropped."""

    def __init__(self, settings: Settings, spec: Spec, on_dropped: Callable[[int], None] = lambda n: None,
                 max_rows: int | None = None):
        self.settings, self.spec = settings, spec
        self.on_dropped = on_dropped  # e.g. a Prometheus counter's inc
        self.max_rows = LOG_BUFFER_ROWS if max_rows is None else max_rows
        self.buffer: list = []  # (ids, ts, version, x, predictions) per observed batch
        self.dropped = 0
        self.append = _append  # the table write (settings, spec, kind, frame)

    def add(self, ids: list[str], ts: list[float], version: int, x, preds) -> None:
        self.buffer.append((ids, ts, version, x, preds))
        self._bound()

    @property
    def rows(self) -> int:
        return sum(len(b[0]) for b in self.buffer)

    async def flush(self) -> int:
        """Write the buffered rows as one Delta version; on failure they stay buffered (within the bound) and it raises."""
        import pandas as pd

        from driftloop.data import logs

        if not self.buffer:
            return 0
        buf, self.buffer = self.buffer, []
        df = pd.concat([logs.inference_frame(self.spec, ids, ts, v, x, p) for ids, ts, v, x, p in buf], ignore_index=True)
        try:
            await asyncio.to_thread(self.append, self.settings, self.spec, "inference", df)
        except Exception:
            self.buffer = buf + self.buffer  # keep them for the next attempt, within the bound
            self._bound()
            raise
        return len(df)

    def _bound(self) -> None:
        self.buffer, dropped = trim_oldest(self.buffer, self.max_rows, lambda chunk: len(chunk[0]))
        if dropped:
            self.dropped += dropped
            self.on_dropped(dropped)
            log.warning("inference log buffer full: dropped the %d oldest served rows (%d in all)", dropped, self.dropped)


class FeedbackStore:
    """Labels of one application's served rows. `record` verifies the signed id, decides one label of an id at a time,
    answers a repeat (same label: acknowledged, different: 409) without counting it, finds the served row (memory,
    then the inference log) and commits a new label durably (group commit) before it returns."""

    def __init__(self, settings: Settings, spec: Spec, app_name: str, known: BoundedMap | None = None):
        self.settings, self.spec = settings, spec
        self.id_secret = request_ids.app_secret(settings.state_root, app_name)
        self.known = BoundedMap(KNOWN_IDS) if known is None else known  # request id -> (model version, prediction)
        # every label of an id issued after this went through this store (and is in `labelled` unless evicted)
        self.labels_cover_from = time.time() + LABEL_COVER_MARGIN_S
        self.labelled = BoundedMap(KNOWN_IDS, on_evict=self._forgot_label)  # id -> (label, issued_at)
        self._labelling: dict[str, asyncio.Future] = {}  # ids with a label being decided: one decision at a time
        self._label_lookups = Coalescer(self._read_labels)
        self._prediction_lookups = Coalescer(self._read_predictions)
        self._pending: list = []  # (request id, label, ts, future) waiting for the group commit
        self._writer: asyncio.Task | None = None
        self.append = _append  # the table write (settings, spec, kind, frame)

    def served(self, ids: list[str], version: int, preds) -> None:
        """Rows just served: their labels find them here without a lookup (the oldest are forgotten, then looked up)."""
        self.known.put_many(zip(ids, [(version, p) for p in np.asarray(preds).tolist()]))

    def _forgot_label(self, request_id: str, value: tuple[int, float]) -> None:
        """An evicted label must still be found: ids issued up to its issue time are looked up again."""
        self.labels_cover_from = max(self.labels_cover_from, value[1])

    async def record(self, request_id: str, label: int) -> dict[str, Any]:
        """What /feedback answers for one label: "status" (200, 404 unknown, 409 another label on record, 4xx a
        forged or expired id), and for a 200 "duplicate", "model_version" and "prediction" of the served row."""
        try:
            rid = request_ids.verify(self.id_secret, request_id)
        except InvalidInput as err:
            return {"status": err.status, "error": str(err)}
        while (busy := self._labelling.get(request_id)) is not None:  # simultaneous labels of one id: one decides
            await asyncio.shield(busy)
        done = self._labelling[request_id] = asyncio.get_running_loop().create_future()
        try:
            return await self._record_once(rid, label)
        finally:
            del self._labelling[request_id]
            done.set_result(None)

    async def _record_once(self, rid: request_ids.RequestId, label: int) -> dict[str, Any]:
        request_id = rid.request_id
        existing = await self._existing_label(rid)
        if existing is not None:
            if existing != label:
                return {"status": 409, "label": existing,
                        "error": f"request_id {request_id!r} already has label {existing}; a recorded label is not changed"}
            known = self.known.get(request_id)
            return {"status": 200, "request_id": request_id, "label": label, "duplicate": True, "model_version": rid.version,
                    "prediction": known[1] if known else None}
        known = await self._served_row(rid)
        if known is None:
            return {"status": 404, "error": f"unknown request_id {request_id!r}: no served row on record "
                                            "(rows sampled out under overload are not monitored)"}
        version, pred = known
        at = time.time()  # the label's time in the feedback table
        await self._commit(request_id, label, at)
        self.labelled[request_id] = (label, rid.issued_at)
        return {"status": 200, "request_id": request_id, "label": label, "duplicate": False, "model_version": version,
                "prediction": pred, "_at": at}

    async def _existing_label(self, rid: request_ids.RequestId) -> int | None:
        """The label already recorded for an id: from memory, or from the feedback table when the id may
        have been labelled before this replica (a restart) or was forgotten (bounded memory)."""
        hit = self.labelled.get(rid.request_id)
        if hit is not None:
            return hit[0]
        if rid.issued_at > self.labels_cover_from:
            return None
        label = await self._label_lookups.get(rid)
        if label is not None:
            self.labelled[rid.request_id] = (label, rid.issued_at)
        return label

    async def _served_row(self, rid: request_ids.RequestId) -> tuple[int, int] | None:
        """(model version, prediction) of a served row: from memory, after a short wait for a row still on its way
        from a predictor (only for a young id), else from the inference log."""
        known = self.known.get(rid.request_id)
        deadline = min(time.time() + 3.0, rid.issued_at + FRESH_ID_S)
        while known is None and time.time() < deadline:
            await asyncio.sleep(0.05)
            known = self.known.get(rid.request_id)
        if known is None:
            known = await self._prediction_lookups.get(rid)
            if known is not None:
                self.known[rid.request_id] = known
        return known

    async def _commit(self, request_id: str, label: int, now: float) -> None:
        """Group commit: labels that arrive together share one Delta append; each caller returns only
        after the append that holds its label has committed (or raises if it failed)."""
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((request_id, label, now, fut))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())
        await fut

    async def _write(self) -> None:
        from driftloop.data import logs

        while self._pending:
            batch, self._pending = self._pending, []
            try:
                await asyncio.to_thread(self.append, self.settings, self.spec, "feedback", logs.feedback_frame([b[:3] for b in batch]))
            except Exception as err:
                for b in batch:
                    if not b[3].done():
                        b[3].set_exception(err)
                continue
            for b in batch:
                if not b[3].done():
                    b[3].set_result(True)

    def _read_predictions(self, rids: list[request_ids.RequestId]) -> dict[request_ids.RequestId, tuple[int, int]]:
        """One filtered inference-log read for every id waiting: by id, and by the hand-off time its id implies."""
        from driftloop.data import logs

        hits = logs.lookup(logs.uris(self.settings, self.spec)["inference"], [r.request_id for r in rids],
                           ["model_version", "prediction"], min(r.issued_at for r in rids) - 60,
                           max(r.issued_at for r in rids) + 60)
        by_id = {r.request_id: r for r in rids}
        return {by_id[i]: (int(v), self.spec.dataset.label_value(p)) for i, (v, p) in hits.items()}

    def _read_labels(self, rids: list[request_ids.RequestId]) -> dict[request_ids.RequestId, int]:
        """One filtered feedback-table read for every id waiting (a label is never older than its id)."""
        from driftloop.data import logs

        hits = logs.lookup(logs.uris(self.settings, self.spec)["feedback"], [r.request_id for r in rids], ["label"],
                           min(r.issued_at for r in rids) - request_ids.CLOCK_SKEW_S)
        by_id = {r.request_id: r for r in rids}
        return {by_id[i]: self.spec.dataset.label_value(v[0]) for i, v in hits.items()}
