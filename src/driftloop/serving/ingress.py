"""The Predictor deployment, the application's HTTP ingress (FastAPI): auth, validation, batched inference on the
champion, signed request ids, the hand-off of served rows to the monitor, and proxies for feedback, drift, admin."""

import asyncio
import os
import time
import uuid
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from ray import serve

from driftloop.config import Spec
from driftloop.features import input_digest
from driftloop.scoring import predictions
from driftloop import ids as request_ids
from driftloop.serving import ui
from driftloop.serving.common import (ADMIN_TOKEN_ENV, FEEDBACK_BURST, FEEDBACK_RATE, FRESH_ID_S, HANDOFF_S,
                                      HEALTH_CHECK_PERIOD_S, POLL_S, PREDICT_TOKEN_ENV, ChampionWatcher, PollLoops, _app_name,
                                      _authorised, _error, _load_champion, _read_body, _token, log)
from driftloop.serving.limits import Reservoir, TokenBuckets
from driftloop.serving.validation import (MAX_BODY_BYTES, MAX_LABELS_PER_REQUEST, InvalidInput, parse_feedback_any, parse_json,
                                          parse_rows, request_schema)

FEEDBACK_BODY_BYTES = 200 * MAX_LABELS_PER_REQUEST  # an id and a label are well under 200 bytes
LABELS_PER_TOKEN = 100  # a batch of labels costs the rate limit one token per this many (a single label: one)


fastapi_app = FastAPI(title="driftloop", description="Predictions with drift monitoring, feedback and model lineage.")


@serve.deployment(name="Predictor", num_replicas=2, ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=64,
                  health_check_period_s=HEALTH_CHECK_PERIOD_S)
@serve.ingress(fastapi_app)
class Predictor(PollLoops):
    """Validates, batches and answers predictions; hands every served row to the monitor off the hot path."""

    MAX_BUFFER = 20_000

    def __init__(self, monitor, spec: dict[str, Any], monitoring: bool = True, max_batch_rows: int = 256,
                 feedback_rate: float | None = None, feedback_burst: float | None = None):
        from driftloop.settings import get_settings

        started = time.time()
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        self.spec = Spec.model_validate(spec)
        self.settings = get_settings()
        self.monitor = monitor
        self.monitoring = monitoring
        self.max_batch_rows = max_batch_rows
        self.features = self.spec.dataset.features
        self.watcher = ChampionWatcher(self.settings, self.spec.name)
        v = self.watcher.champion()
        if v is None:
            raise RuntimeError(f"model {self.spec.name!r} has no champion yet: run `driftloop sweep` first")
        model = _load_champion(self.settings, self.spec.name, v, input_digest(self.spec.dataset), self.spec.task)
        self.current = (model, v)
        self._init_ingress(feedback_rate, feedback_burst)
        self._tasks: list[asyncio.Task] = []
        self.admin_token = _token(ADMIN_TOKEN_ENV)
        self.predict_token = _token(PREDICT_TOKEN_ENV)
        try:  # which replica answered: lets an operator (and the fault tests) see a replacement come into service
            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:
            self.replica = uuid.uuid4().hex[:8]
        schema = fastapi_app.openapi()
        for path, op in schema.get("paths", {}).items():
            if path.endswith("/predict") and "post" in op:
                op["post"]["requestBody"] = {"required": True, "content": {"application/json": {"schema": request_schema(self.features, self.spec.dataset)}}}
        fastapi_app.openapi_schema = schema
        self.init_s = time.time() - started  # constructor time: registry lookup, download, model load

    def _init_ingress(self, feedback_rate: float | None, feedback_burst: float | None) -> None:
        """The hand-off sample, the request-id key (shared with the monitor) and the /feedback rate limit."""
        self.sample = Reservoir(self.MAX_BUFFER)  # (id, ts, x row, proba row, version) of rows served since the last flush
        self.id_secret = request_ids.app_secret(self.settings.state_root, _app_name())
        self.id_max_age_s = request_ids.max_age_s()
        rate = FEEDBACK_RATE if feedback_rate is None else float(feedback_rate)
        self.feedback_limits = TokenBuckets(rate, FEEDBACK_BURST if feedback_burst is None else float(feedback_burst))

    async def _poll_alias(self) -> None:
        while True:
            await asyncio.sleep(POLL_S)
            try:
                v = await asyncio.to_thread(self.watcher.moved, self.current[1])
                if v is not None:
                    model = await asyncio.to_thread(_load_champion, self.settings, self.spec.name, v,
                                                    input_digest(self.spec.dataset), self.spec.task)
                    self.current = (model, v)  # one assignment: in-flight batches keep the model they started with
                    log.info("predictor for %s swapped to version %s", self.spec.name, v)
            except Exception:  # a registry error is kept by the watcher (/healthz shows it); keep serving
                log.exception("alias poll failed; still serving version %s", self.current[1])

    @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.002)
    async def _infer(self, xs: list[np.ndarray]) -> list[tuple[np.ndarray, int]]:
        import torch

        model, version = self.current
        sizes = [len(x) for x in xs]
        with torch.no_grad():
            proba = model(torch.from_numpy(np.concatenate(xs))).numpy()
        out, i = [], 0
        for n in sizes:
            out.append((proba[i : i + n], version))
            i += n
        return out

    def _hand_to_monitor(self, ids: list[str], x: np.ndarray, proba: np.ndarray, version: int) -> None:
        """Offer served rows to the hand-off sample: past MAX_BUFFER rows per period it keeps a uniform sample
        of all rows (reservoir), so a burst is monitored evenly, and counts the rest."""
        if not self.monitoring:
            return
        now = time.time()
        self.sample.offer([(rid, now, x[i], proba[i], version) for i, rid in enumerate(ids)])

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(HANDOFF_S)
            await self._flush()

    async def _flush(self) -> None:
        if not len(self.sample):
            return
        rows, dropped = self.sample.drain()
        by_version: dict[int, list] = {}
        for row in rows:
            by_version.setdefault(row[4], []).append(row)
        for version, items in by_version.items():
            batch = {"ids": [r[0] for r in items], "ts": [r[1] for r in items], "x": np.stack([r[2] for r in items]),
                     "proba": np.stack([r[3] for r in items]), "version": version, "dropped": dropped}
            dropped = 0
            try:
                await self.monitor.observe.remote(batch)
            except Exception:
                log.exception("monitor unavailable; %d rows not monitored", len(batch["ids"]))

    # --- HTTP -----------------------------------------------------------------------------------------
    @fastapi_app.post("/predict", summary="Predict one row or a batch of rows (named features)")
    async def predict(self, request: Request):
        self._ensure_tasks()
        if self.predict_token is not None and not _authorised(request, self.predict_token):
            return _error(401, "missing or wrong bearer token")
        try:
            x = parse_rows(parse_json(await _read_body(request, MAX_BODY_BYTES)), self.features, self.max_batch_rows, self.spec.dataset)
        except InvalidInput as err:
            return _error(err.status, str(err))
        proba, version = await self._infer(x)
        rid = request_ids.issue(self.id_secret, version, len(x))
        ids = request_ids.row_ids(rid, len(x))
        self._hand_to_monitor(ids, x, proba, version)
        preds = predictions(proba, self.spec)
        if self.spec.regression:  # the predicted value, in the label's units
            rows = [{"id": i, "prediction": p} for i, p in zip(ids, preds.tolist())]
        else:  # probabilities to 6 decimals, rounded in one numpy call
            rows = [{"id": i, "prediction": p, "probabilities": pr}
                    for i, p, pr in zip(ids, preds.tolist(), np.round(proba.astype(np.float64), 6).tolist())]
        # plain JSON types, encoded by orjson (FastAPI would walk them again with jsonable_encoder, then json.dumps)
        return Response(orjson.dumps({"request_id": rid, "model": self.spec.name, "model_version": version, "predictions": rows}),
                        media_type="application/json")

    @fastapi_app.post("/feedback", summary="Record the ground-truth label of a served row, or a batch of labels")
    async def feedback(self, request: Request):
        self._ensure_tasks()
        client = request.client.host if request.client else "unknown"
        lim = self.feedback_limits

        def too_many() -> JSONResponse:
            return _error(429, f"too many /feedback requests from {client}: at most {lim.rate:g}/s (burst {lim.burst:g}), "
                               f"a batch of labels one more per {LABELS_PER_TOKEN}; retry later", {"Retry-After": "1"})

        if not lim.allow(client):  # before reading the body: a flood costs no parsing
            return too_many()
        try:
            items = parse_feedback_any(parse_json(await _read_body(request, FEEDBACK_BODY_BYTES), FEEDBACK_BODY_BYTES),
                                       self.spec.dataset.classes)  # None: a number (regression)
        except InvalidInput as err:
            return _error(err.status, str(err))
        if len(items) >= LABELS_PER_TOKEN and not lim.allow(client, len(items) // LABELS_PER_TOKEN):
            return too_many()
        issued = []
        for i, (rid, _) in enumerate(items):  # forged or expired: refused at once, no lookup (a batch names the item)
            try:
                issued.append(request_ids.verify(self.id_secret, rid, max_age=self.id_max_age_s))
            except InvalidInput as err:
                return _error(err.status, f"labels[{i}]: {err}" if len(items) > 1 else str(err))
        if time.time() - min(i.issued_at for i in issued) < FRESH_ID_S:
            await self._flush()  # a row may still be in this replica's buffer
        try:
            results = await self.monitor.feedback_many.remote(items)
        except Exception as err:
            log.error("feedback for %s not recorded: %s", items[0][0], type(err).__name__)
            return _error(503, f"{'label' if len(items) == 1 else 'labels'} not recorded (feedback store unavailable); retry later")
        if len(items) == 1:
            res = results[0]
            status = res.pop("status")
            return JSONResponse(res, status_code=status)
        counts = {}
        for r in results:
            counts[str(r["status"])] = counts.get(str(r["status"]), 0) + 1
        return JSONResponse({"results": results, "statuses": counts,
                             "recorded": sum(1 for r in results if r["status"] == 200 and not r.get("duplicate"))})

    @fastapi_app.get("/drift", summary="Drift monitor state: windows, detector results, policy, retraining")
    async def drift(self):
        self._ensure_tasks()
        return await self.monitor.status.remote()

    @fastapi_app.get("/ui", summary="Live drift page of this application (self-contained HTML; refreshes every 2 s)",
                     response_class=HTMLResponse)
    async def drift_page(self):
        self._ensure_tasks()
        return HTMLResponse(ui.PAGE, headers=ui.PAGE_HEADERS)

    @fastapi_app.get("/ui/data", summary="Champion history with gate scores and the champion's lineage, for /ui (503: registry unavailable)")
    async def drift_page_data(self):
        self._ensure_tasks()
        if getattr(self, "ui_data", None) is None:  # one cache per replica: many open pages, one registry read per 2 s
            self.ui_data = ui.CachedPayload(lambda: ui.read_payload(self.settings, self.spec))
        status, body = await self.ui_data.get()
        if status != 200:
            return _error(status, body["error"])
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    @fastapi_app.get("/healthz", summary="Liveness and the model version this replica serves")
    async def healthz(self):
        self._ensure_tasks()
        return {"status": "ok", "model": self.spec.name, "model_version": self.current[1], "replica": self.replica,
                "init_s": round(self.init_s, 3), "registry": self.watcher.error or {"ok": True}}

    def _admin_denied(self, request: Request) -> JSONResponse | None:
        """403 while no admin token is configured, 401 for a missing or wrong one, None when allowed."""
        if self.admin_token is None:
            return _error(403, f"admin endpoints are disabled: set {ADMIN_TOKEN_ENV} (or {ADMIN_TOKEN_ENV}_FILE)")
        if not _authorised(request, self.admin_token):
            return _error(401, "missing or wrong bearer token")
        return None

    @fastapi_app.post("/admin/retrain", summary="Trigger retraining now (bearer token)")
    async def admin_retrain(self, request: Request):
        if (denied := self._admin_denied(request)) is not None:
            return denied
        return await self.monitor.trigger.remote("manual (HTTP)")

    @fastapi_app.post("/admin/promote/{version}", summary="Move the champion alias to VERSION (bearer token)")
    async def admin_promote(self, version: int, request: Request):
        from driftloop import registry

        if (denied := self._admin_denied(request)) is not None:
            return denied
        try:
            await asyncio.to_thread(registry.promote, self.settings, self.spec.name, version, "manual (HTTP)")
        except Exception as err:
            archived = "is archived" in str(err)  # it exists; promoting it again takes `driftloop promote --force`
            return _error(409 if archived else 404, f"cannot promote version {version}: {str(err).splitlines()[0]}")
        return {"model": self.spec.name, "champion": version}

    @fastapi_app.post("/admin/rollback", summary="Move the champion alias back to the previous champion (bearer token)")
    async def admin_rollback(self, request: Request):
        from driftloop import registry

        if (denied := self._admin_denied(request)) is not None:
            return denied
        try:
            v = await asyncio.to_thread(registry.rollback, self.settings, self.spec.name)
        except Exception as err:
            return _error(409, str(err).splitlines()[0])
        return {"model": self.spec.name, "champion": v}
