"""The DriftMonitor's durable rows: the inference log (buffered, bounded while Delta writes fail) and ground-truth
labels (once per served row, group-committed to the feedback table before the 2xx). A mixin of DriftMonitor."""

import asyncio
import time
from typing import Any

import numpy as np

from driftloop.scoring import label_score
from driftloop.serving import ids as request_ids
from driftloop.serving.common import FRESH_ID_S, KNOWN_IDS, LABEL_COVER_MARGIN_S, LOG_BUFFER_ROWS, log
from driftloop.serving.limits import BoundedMap, Coalescer, trim_oldest
from driftloop.serving.validation import InvalidInput


class RowStores:
    """Inference log and feedback of one application (state in DriftMonitor's constructor)."""

    def _init_feedback_state(self, app_name: str) -> None:
        """Feedback bookkeeping: the shared request-id key, labels seen (bounded), lookups that coalesce."""
        self.id_secret = request_ids.app_secret(self.settings.state_root, app_name)
        self.log_dropped = 0
        # every label of an id issued after this went through this replica (and is in `labelled` unless evicted)
        self.labels_cover_from = time.time() + LABEL_COVER_MARGIN_S
        self.labelled: BoundedMap = BoundedMap(KNOWN_IDS, on_evict=self._forgot_label)  # id -> (label, issued_at)
        self._labelling: dict[str, asyncio.Future] = {}  # ids with a label being decided: one decision at a time
        self._label_lookups = Coalescer(self._read_labels)
        self._prediction_lookups = Coalescer(self._read_predictions)

    def _forgot_label(self, request_id: str, value: tuple[int, float]) -> None:
        """An evicted label must still be found: ids issued up to its issue time are looked up again."""
        self.labels_cover_from = max(self.labels_cover_from, value[1])

    def _append(self, kind: str, df) -> None:
        from driftloop.data import logs

        logs.append(self.settings, self.spec, kind, df)

    async def flush(self) -> int:
        """Write buffered served rows to the inference log (one Delta version per micro-batch)."""
        from driftloop.data import logs

        if not self.log_buffer:
            return 0
        buf, self.log_buffer = self.log_buffer, []
        frames = [logs.inference_frame(self.spec, ids, ts, v, x, p) for ids, ts, v, x, p in buf]
        import pandas as pd

        df = pd.concat(frames, ignore_index=True)
        try:
            await asyncio.to_thread(self._append, "inference", df)
        except Exception:
            self.log_buffer = buf + self.log_buffer  # keep them for the next attempt, within the bound
            self._bound_log_buffer()
            raise
        return len(df)

    def _bound_log_buffer(self) -> None:
        """While the inference log cannot be written, keep the newest LOG_BUFFER_ROWS rows; count what is dropped."""
        self.log_buffer, dropped = trim_oldest(self.log_buffer, LOG_BUFFER_ROWS, lambda chunk: len(chunk[0]))
        if dropped:
            self.log_dropped += dropped
            self.m_log_dropped.inc(dropped)
            log.warning("inference log buffer full: dropped the %d oldest served rows (%d in all)", dropped, self.log_dropped)

    # --- feedback --------------------------------------------------------------------------------------
    async def feedback(self, request_id: str, label: int) -> dict[str, Any]:
        """Record a ground-truth label durably, once per served row: a repeat is acknowledged (same label) or
        refused (409, another label), never counted again, so repeating a label cannot trigger retraining."""
        self._ensure_tasks()
        try:
            rid = request_ids.verify(self.id_secret, request_id)
        except InvalidInput as err:
            return {"status": err.status, "error": str(err)}
        while (busy := self._labelling.get(request_id)) is not None:  # simultaneous labels of one id: one decides
            await asyncio.shield(busy)
        done = self._labelling[request_id] = asyncio.get_running_loop().create_future()
        try:
            return await self._label_once(rid, label)
        finally:
            del self._labelling[request_id]
            done.set_result(None)

    async def feedback_many(self, items: list[tuple[str, int]]) -> list[dict[str, Any]]:
        """Labels of a batch, decided together: their commits share the group commit's appends; each result is
        what /feedback would answer for that label alone."""
        return list(await asyncio.gather(*(self.feedback(rid, label) for rid, label in items)))

    async def _label_once(self, rid: request_ids.RequestId, label: int) -> dict[str, Any]:
        """Decide one label while no other label of the same id is being decided."""
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
        now = time.time()
        await self._commit_label(request_id, label, now)
        self.labelled[request_id] = (label, rid.issued_at)
        self.feedback_count += 1
        trig = self.core.label(version, [label_score(pred, label, self.spec.regression)], now)
        self.m_acc.set(float(np.mean(self.correct[version])), tags={"model": self.name, "version": str(version)})
        self._dirty = True
        if trig is not None:
            await self._on_trigger(trig)
        return {"status": 200, "request_id": request_id, "label": label, "duplicate": False, "model_version": version,
                "prediction": pred}

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

    async def _commit_label(self, request_id: str, label: int, now: float) -> None:
        """Group commit: labels that arrive together share one Delta append; each caller returns only
        after the append that holds its label has committed (or raises if it failed)."""
        fut = asyncio.get_running_loop().create_future()
        self.pending_labels.append((request_id, label, now, fut))
        if self._label_writer is None or self._label_writer.done():
            self._label_writer = asyncio.get_running_loop().create_task(self._write_labels())
        await fut

    async def _write_labels(self) -> None:
        from driftloop.data import logs

        while self.pending_labels:
            batch, self.pending_labels = self.pending_labels, []
            try:
                await asyncio.to_thread(self._append, "feedback", logs.feedback_frame([b[:3] for b in batch]))
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
