"""Closing the loop: the retraining job (`jobs/retrain.py` / `python -m driftloop.retrain`), as it runs inside
Ray. Submitting it, once per trigger, and following it through the Ray Jobs API is `driftloop.jobs`.

The job: new data version = the model's table + labelled production rows (inference log ⋈ feedback,
validated like any ingest) → Ray Train on the champion's hyperparameters → challenger and champion
scored on the same held-out recent labelled rows → gate → detectors refit → register → promote.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from driftloop.config import Spec, SpecError, load_spec, parse_spec
from driftloop.errors import LoopError
from driftloop.settings import Settings, get_settings

log = logging.getLogger("driftloop.retrain")


# --- the job ---------------------------------------------------------------------------------------


def _watermark(uri: str) -> float:
    """Feedback time up to which production rows are already in the table (from commit metadata)."""
    from deltalake import DeltaTable

    marks = [float(h["production_upto"]) for h in DeltaTable(uri).history() if h.get("production_upto")]
    return max(marks) if marks else 0.0


def _trigger_id(job_id: str) -> str:
    """The submission id of a trigger's first attempt: its retries (`-rN`) share it."""
    return re.sub(r"-r\d+$", "", job_id)


def _cause(cause: str, drift_event: str | None) -> str:
    """Lineage's one word on why: the trigger's own cause, else the drift event, else manual."""
    return cause or (f"drift event {drift_event}" if drift_event else "manual")


def _version_of_trigger(uri: str, trigger_id: str) -> dict | None:
    """The table commit an earlier attempt of this trigger made (a retry reuses it instead of adding the rows twice)."""
    from deltalake import DeltaTable

    hits = [h for h in DeltaTable(uri).history() if h.get("trigger_id") == trigger_id]
    return max(hits, key=lambda h: int(h["version"])) if hits else None


def with_time_column(rows, uri: str, spec: Spec):
    """Production rows carry no value for the spec's time column (a request names features only): give them the
    time they were served, on the table's own timeline. A datetime column gets the serving time itself; a numeric
    one (e.g. rainfall's day index) continues after the table's last value, in serving order."""
    import pandas as pd

    from driftloop.data import tables

    tc = spec.dataset.time_column
    if not tc or tc in rows.columns:
        return rows
    current = tables.read(uri, columns=[tc])[tc]
    rows = rows.copy()
    if pd.api.types.is_datetime64_any_dtype(current):
        served = pd.to_datetime(rows["ts"].to_numpy(), unit="s", utc=True)
        rows[tc] = served if getattr(current.dt, "tz", None) is not None else served.tz_localize(None)
    else:
        last = current.max() if len(current) else 0
        rows[tc] = last + 1 + rows["ts"].rank(method="first").to_numpy().astype(np.int64) - 1
    return rows


def reference_min_rows(spec: Spec) -> int:
    """Fewest recent rows a reference may hold: half a window (two-sample tests stay valid with unequal sizes)."""
    return max(spec.drift.window // 2, 50)


def _reference(settings: Settings, spec: Spec, drift_event: str | None, champion_since: float | None,
               trained_ids: set[str]):
    """The new champion's drift reference: served rows since the drift began (drift/reference.py)."""
    from driftloop.drift.reference import onset, pick_reference
    from driftloop.features import encode_frame
    from driftloop.data import logs

    u = logs.uris(settings, spec)
    since = champion_since
    if drift_event:
        ev = logs.read_or_empty(u["drift_events"], ["event_id", "started_at", "is_drift", "model_version", "ts"],
                                filters=[("ts", ">=", champion_since)] if champion_since else None)
        ev = ev.sort_values("ts")
        began = onset(list(zip(ev["event_id"], ev["started_at"], ev["is_drift"], ev["model_version"])), drift_event)
        since = began if began is not None else since
    cols = ["request_id", "ts", *spec.dataset.features]
    served = logs.read_or_empty(u["inference"], cols, filters=[("ts", ">=", since)] if since else None)
    return pick_reference(spec.retraining.reference, served, spec.dataset.features, trained_ids, since,
                          spec.drift.reference_rows, reference_min_rows(spec), lambda f: encode_frame(f, spec.dataset))


@dataclass
class DataBuild:
    """Step 1 of a retraining job: the data version it trains on, the held-out rows its gate scores, the reference
    its detectors are fitted on."""

    labelled: int  # labelled production rows found past the watermark
    eval_rows: Any  # the newest eval_fraction of them, held out for the gate
    dv: Any  # the table's data version to train on (with the production rows, when enough were found)
    reference: Any


def build_data(settings: Settings, spec: Spec, uri: str, job_id: str, drift_event: str | None = None,
               champion_since: float | None = None, after_ts: float | None = None) -> DataBuild:
    """New data version = the table + labelled production rows not yet in it (inference log joined with feedback,
    past the table's watermark, or past `after_ts`); the newest eval_fraction is held out. A retry of the same
    trigger finds the version its earlier attempt committed and reuses it. Then the drift reference."""
    from driftloop.data import logs, tables
    from driftloop.data.ingest import ingest_frame

    base_id = _trigger_id(job_id)
    earlier = _version_of_trigger(uri, base_id)
    if earlier is not None:
        labelled = logs.labelled_rows(settings, spec, after_ts=float(earlier["production_from"]))
        upto = float(earlier["production_upto"])
        train_rows, eval_rows = labelled[labelled["feedback_ts"] <= upto], labelled[labelled["feedback_ts"] > upto]
        version = int(earlier["version"])
    else:
        mark = _watermark(uri) if after_ts is None else after_ts
        labelled = logs.labelled_rows(settings, spec, after_ts=mark)
        n = len(labelled)
        n_eval = int(round(n * spec.retraining.eval_fraction)) if n else 0
        train_rows, eval_rows = labelled.iloc[: n - n_eval], labelled.iloc[n - n_eval :]
        version = None
        if len(train_rows) >= spec.dataset.min_rows:  # fewer wait for the next retrain (the watermark stays)
            upto = float(train_rows["feedback_ts"].max())
            train_rows = with_time_column(train_rows, uri, spec)
            version = ingest_frame(train_rows, uri, spec.dataset, f"production:{job_id}",
                                   {"production_upto": str(upto), "production_from": str(mark), "job_id": job_id,
                                    "trigger_id": base_id, "drift_event": drift_event or ""})
    reference = _reference(settings, spec, drift_event, champion_since, set(train_rows["request_id"]))
    return DataBuild(len(labelled), eval_rows, tables.data_version(uri, version), reference)


def run_retrain(spec: Spec, settings: Settings, job_id: str, reason: str, drift_event: str | None = None,
                cause: str = "") -> dict[str, Any]:
    """Build the new data version, retrain with Ray Train, gate against the champion, register, promote."""
    from driftloop import registry
    from driftloop.cluster import ensure_ray
    from driftloop.data import tables
    from driftloop.train import decode_hparams

    t0 = time.time()
    uri = settings.table_uri(spec.dataset.table)
    if not tables.exists(uri):
        raise LoopError(f"no table {spec.dataset.table!r} at {uri}: retraining needs the training data (`driftloop data ingest`)")
    champion = registry.champion_version(settings, spec.name)
    stages: dict[str, float] = {}
    base_id = _trigger_id(job_id)

    # 1. new data version and reference
    champion_since = None
    if champion is not None:
        champion_since = registry.client(settings).get_model_version(spec.name, str(champion)).creation_timestamp / 1000
    built = build_data(settings, spec, uri, job_id, drift_event, champion_since)
    dv, eval_rows, reference, n, n_eval = built.dv, built.eval_rows, built.reference, built.labelled, len(built.eval_rows)
    stages["data_build_s"] = time.time() - t0

    # 2. distributed retraining on the champion's hyperparameters, 3. gate, register, promote
    hp_json = registry.version_tags(settings, spec.name, champion).get("hparams") if champion else None
    hp = decode_hparams(spec, json.loads(hp_json) if hp_json else {})
    ensure_ray(settings)
    c = registry.client(settings)
    exp = registry.experiment_id(settings, spec.name)
    # an earlier attempt of this trigger that died without closing its run (e.g. MLflow was unreachable)
    for stale in c.search_runs([exp], f"tags.`lineage.trigger_id` = '{base_id}' and attributes.status = 'RUNNING'"):
        c.set_tag(stale.info.run_id, "failure", "attempt ended without closing its run; retried as " + job_id)
        c.set_terminated(stale.info.run_id, "FAILED")
    lineage = {"lineage.job_id": job_id, "lineage.drift_event": drift_event or "", "lineage.trigger": reason[:250],
               "lineage.cause": _cause(cause, drift_event)}
    tags = {"driftloop.kind": "retrain", **lineage, "lineage.champion_before": str(champion), "lineage.trigger_id": base_id}
    out = train_and_gate(spec, settings, dv, hp, f"retrain-{job_id}", tags, lineage, eval_rows, reference, stages,
                         spec.retraining.training_window)
    return {"job_id": job_id, "data": dv.as_dict(), "labelled_rows": n, "eval_rows": int(n_eval),
            "champion_before": champion, **out, "reference": reference.source, "stages": stages, "seconds": time.time() - t0}


def train_and_gate(spec: Spec, settings: Settings, dv, hp: dict[str, Any], run_name: str, run_tags: dict[str, str],
                   version_tags: dict[str, str], eval_rows, reference, stages: dict[str, float],
                   tail_rows: int | None = None) -> dict[str, Any]:
    """Ray Train on one data version (or its newest `tail_rows` rows), then evaluate, fit detectors, register and
    gate: the step that live retraining and the backtest share. The gate scores on `eval_rows` (the test split
    when there are none)."""
    from driftloop import registry
    from driftloop.features import encode_frame
    from driftloop.gate import register_and_gate
    from driftloop.sweep import data_sample
    from driftloop.train import METRICS, make_trainer

    c = registry.client(settings)
    run = c.create_run(registry.experiment_id(settings, spec.name), run_name=run_name, tags=run_tags)
    rid = run.info.run_id
    try:
        for k, v in hp.items():
            c.log_param(rid, k, json.dumps(v) if isinstance(v, list) else v)
        registry.log_data_input(c, rid, spec, dv, data_sample(spec, dv))
        t1 = time.time()
        tail = tail_rows
        if tail:
            version_tags = {**version_tags, "data.window": f"newest {tail} rows"}
        result = make_trainer(spec, dv, hp, name=run_name, storage_path=settings.train_storage,
                              extra={"tail_rows": tail}).fit()
        stages["training_s"] = time.time() - t1
        if result.checkpoint is None:
            raise RuntimeError(f"training produced no checkpoint: {result.error}")
        for epoch_metrics in (result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else []):
            step = int(epoch_metrics.get("epoch", 0))
            for k in METRICS:
                if k in epoch_metrics:
                    c.log_metric(rid, k, float(epoch_metrics[k]), step=step)
        t2 = time.time()
        x_eval = y_eval = label = None
        if len(eval_rows):
            x_eval = encode_frame(eval_rows, spec.dataset)
            ds = spec.dataset
            y_eval = eval_rows[ds.label].to_numpy(object if ds.string_labels else np.float64 if ds.regression else np.int64)
            label = f"{len(eval_rows)} recent labelled production rows (held out)"
        with result.checkpoint.as_directory() as ckpt:
            out = register_and_gate(spec, settings, dv, Path(ckpt), rid, version_tags, x_eval, y_eval, label, reference, tail)
        stages["register_and_gate_s"] = time.time() - t2
        for k, v in stages.items():
            c.log_metric(rid, f"stage.{k}", v)
        c.set_tag(rid, "gate.decision", "promoted" if out["promoted"] else "refused")
        c.set_terminated(rid, "FINISHED")
    except BaseException:
        c.set_terminated(rid, "FAILED")
        raise
    return {"run_id": rid, **out}


def spec_argument(value: str) -> Spec:
    """--config: the spec itself as JSON (from driftloop's job tracker), else a spec file."""
    if value.lstrip().startswith("{"):
        try:
            data = json.loads(value)
        except ValueError as err:
            raise SpecError(f"--config: not valid JSON: {err}") from None
        return parse_spec(data, "--config")
    return load_spec(value)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jobs/retrain.py", description="Retrain a model on its newest data version, gate, promote.")
    p.add_argument("--config", required=True, help="model spec: a YAML or JSON file, or the spec itself as JSON "
                   "(what driftloop's job tracker passes, so that the job needs no file of the node that submitted it)")
    p.add_argument("--job-id", default=os.environ.get("RAY_JOB_SUBMISSION_ID") or f"manual-{int(time.time())}")
    p.add_argument("--reason", default="manual")
    p.add_argument("--drift-event", default=None)
    p.add_argument("--cause", default="", help='what caused the trigger: "drift event ID", "labels", "accuracy floor", "manual", "data version N"')
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    spec = spec_argument(a.config)
    reason = a.reason
    try:
        reason = json.loads(reason) if reason.startswith('"') else reason
    except ValueError:
        pass
    settings = get_settings()
    try:
        summary = run_retrain(spec, settings, a.job_id, reason, a.drift_event, a.cause)
    except Exception as err:  # the traceback goes to the job log; the last line says what failed, in one line
        log.exception("retraining job %s failed", a.job_id)
        first = str(err).splitlines()[0][:300] if str(err) else ""
        if any(s in first for s in ("Max retries exceeded", "Connection refused", "NewConnectionError")):
            first = "cannot reach the MLflow tracking server"
        where = f" (MLflow at {settings.tracking_uri})" if "mlflow" in type(err).__module__.lower() or \
            "connection" in (type(err).__name__ + first).lower() else ""
        print(f"DRIFTLOOP_RETRAIN_FAILED {type(err).__name__}: {first}{where}; the champion is unchanged", flush=True)
        return 1
    print("DRIFTLOOP_RETRAIN_SUMMARY " + json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
