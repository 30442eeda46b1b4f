"""`driftloop backtest`: what would a retraining policy have done on last year's data?

The stream is replayed test-then-train (prequential): every row is predicted by the strategy's champion,
then its label arrives `label_delay` rows later. Each strategy ("lane") runs the loop's own parts:
MonitorCore (the served app's detectors, windows and policy), the reference choice of drift/reference.py,
and retrain.train_and_gate (Ray Train, evaluation, detectors, MLflow registration, the promotion gate). Its
registered models, tables and runs are its own (`<model>-bt<stamp>-<strategy>`, tagged driftloop.kind=backtest),
so a backtest never touches the served champion.

The clock is the spec's time column in seconds (built-in rainfall: one day per row), else one second per row.
Retraining is instantaneous in stream time: the challenger answers from the row after the trigger.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from driftloop.config import Spec, SpecError
from driftloop.features import encode_frame
from driftloop.settings import Settings

BUILTIN_STREAMS = ("builtin:rainfall", "builtin:digits-phases")
DIGITS_PHASES = [("clean", 0, 1000), ("noise", 3, 3000), ("clean", 0, 1000), ("blur", 3, 3000)]


class BacktestError(ValueError):
    """A stream or option the backtest cannot use; nothing is registered or promoted."""


@dataclass
class Stream:
    """The rows that train the initial champion, then the time-ordered rows replayed after it."""

    name: str
    initial: pd.DataFrame
    rows: pd.DataFrame
    times: np.ndarray
    phases: list[tuple[str, int, int]] = field(default_factory=list)  # (name, first row, end row)


def load_stream(source: str, spec: Spec, initial: int | None = None) -> Stream:
    """A built-in stream or a CSV/Parquet file, checked before any Ray work."""
    from driftloop.data import examples
    from driftloop.data.ingest import SourceError, load_source

    ds = spec.dataset
    if source == "builtin:digits-phases":
        ex = examples.builtin("digits")
        parts, phases, at = [], [], 0
        for i, (kind, sev, n) in enumerate(DIGITS_PHASES):
            onset = 0 if sev else None
            parts.append(examples.digits_stream(ex.pool, n, onset, kind=kind if sev else "noise", severity=sev, seed=10 + i))
            phases.append((f"{kind}:{sev}" if sev else "clean", at, at + n))
            at += n
        rows = pd.concat(parts, ignore_index=True)
        return Stream(source, ex.reference, rows, np.arange(len(rows), dtype=np.float64), phases)
    if source == "builtin:rainfall":
        frame = examples.builtin("rainfall").frame
        n0 = initial or examples.builtin("rainfall").reference_rows
    else:
        try:
            frame = load_source(source)
        except SourceError as err:
            raise BacktestError(str(err)) from None
        n0 = initial or int(len(frame) * 0.4)
    missing = [c for c in [*ds.features, ds.label] if c not in frame.columns]
    if missing:
        what = "label column" if ds.label in missing else "feature column"
        raise BacktestError(f"{source}: no {what} {missing[0]!r} (the spec's dataset names it)")
    if ds.time_column and ds.time_column in frame.columns:
        t = pd.to_numeric(frame[ds.time_column], errors="coerce")
        if t.isna().any():
            t = pd.to_datetime(frame[ds.time_column], errors="coerce").astype("int64") / 1e9
        back = np.flatnonzero(np.diff(t.to_numpy()) < 0)
        if back.size:
            raise BacktestError(f"{source}: time column {ds.time_column!r} goes back in time at row {int(back[0]) + 1}; "
                                f"a backtest needs rows in time order")
        scale = 86400.0 if source == "builtin:rainfall" else 1.0
        times = t.to_numpy(np.float64) * scale
    else:
        times = np.arange(len(frame), dtype=np.float64)
    if not 0 < n0 < len(frame):
        raise BacktestError(f"{source}: --initial {n0} leaves no rows to replay ({len(frame)} rows)")
    rows = frame.iloc[n0:].reset_index(drop=True)
    if len(rows) < spec.drift.window:
        raise BacktestError(f"{source}: {len(rows)} rows to replay, fewer than one drift window ({spec.drift.window})")
    return Stream(source, frame.iloc[:n0].reset_index(drop=True), rows, times[n0:])


def parse_strategies(text: str) -> list[str]:
    """`static,periodic:N` -> the lanes to run beside driftloop's own policy."""
    out = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        if part in ("static", "driftloop"):
            out.append(part)
        elif part.startswith("periodic:") and part[9:].isdigit() and int(part[9:]) > 0:
            out.append(part)
        else:
            raise BacktestError(f"unknown strategy {part!r} (use static, periodic:N with N rows, driftloop)")
    return list(dict.fromkeys(out + ["driftloop"]))


@dataclass
class Lane:
    """One strategy's champion, monitor core, served rows and labelled rows as the stream goes by."""

    strategy: str
    spec: Spec
    model: Any
    version: int
    core: Any
    every: int | None = None
    labelled_upto: int = 0   # rows [0, labelled_upto) have their labels
    in_table: int = 0        # rows [0, in_table) of the labelled ones are in the lane's training table
    since_retrain: int = 0
    swapped_at: float = 0.0
    events: dict[str, tuple[float, int]] = field(default_factory=dict)  # drift event id -> window start (time, row)
    windows: list[dict] = field(default_factory=list)  # every closed window: end row, version, verdict
    detectors_from: int = 0  # the row at which the current champion's windows began
    retrains: list[dict] = field(default_factory=list)
    versions: np.ndarray | None = None  # the champion version that answered each row
    correct: np.ndarray | None = None


def _slug(strategy: str) -> str:
    return strategy.replace(":", "")


def _lane_spec(spec: Spec, stamp: str, strategy: str) -> Spec:
    d = spec.model_dump(mode="json")
    d["name"] = f"{spec.name}-bt{stamp}-{_slug(strategy)}"
    d["dataset"]["table"] = f"{spec.dataset.table}_bt{stamp}_{_slug(strategy)}"
    return Spec.model_validate(d)


def _champion(settings: Settings, spec: Spec, version: int):
    """The registered model and its detectors (loaded as the served app loads them)."""
    import shutil
    import tempfile

    from driftloop import registry
    from driftloop.drift.detectors import load_detectors
    from driftloop.drift.windows import WindowedDetectors

    tmp = tempfile.mkdtemp(prefix="driftloop-bt-")
    try:
        path = registry.download(settings, spec.name, version, tmp)
        model = registry.load_model(path)
        dets, manifest = load_detectors(path / "detectors", spec.output_names)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model, WindowedDetectors(dets, manifest.get("window", spec.drift.window), version, spec.drift.history)


def _initial_champion(settings: Settings, spec: Spec, stream: Stream, stamp: str, lanes: list[str]) -> dict[str, int]:
    """Train the starting champion once (Ray Train, registered, gated as a first version) and give every lane
    a copy of that version as its own champion."""
    from driftloop import registry
    from driftloop.data import tables
    from driftloop.data.ingest import ingest_frame
    from driftloop.retrain import train_and_gate
    from driftloop.train import decode_hparams

    first = _lane_spec(spec, stamp, lanes[0])
    uri = settings.table_uri(first.dataset.table)
    ingest_frame(stream.initial, uri, first.dataset, f"backtest:{stream.name}:initial")
    for s in lanes[1:]:
        other = _lane_spec(spec, stamp, s)
        ingest_frame(stream.initial, settings.table_uri(other.dataset.table), other.dataset, f"backtest:{stream.name}:initial")
    tags = {"driftloop.kind": "backtest", "backtest.id": stamp, "backtest.stream": stream.name}
    out = train_and_gate(first, settings, tables.data_version(uri), decode_hparams(first, {}), f"backtest-{stamp}-initial",
                         tags, {"lineage.cause": "backtest initial"}, pd.DataFrame(), None, {})
    c = registry.client(settings)
    versions = {lanes[0]: out["version"]}
    for s in lanes[1:]:
        name = _lane_spec(spec, stamp, s).name
        mv = c.copy_model_version(f"models:/{first.name}/{out['version']}", name)
        registry.promote(settings, name, int(mv.version), "backtest initial champion")
        versions[s] = int(mv.version)
    return versions


def _retrain(settings: Settings, lane: Lane, stream: Stream, trig, now: float, served_upto: int, stamp: str) -> None:
    """The live retraining job's steps on the lane's own rows: new data version, Ray Train, gate, promotion."""
    from driftloop.data import tables
    from driftloop.data.ingest import ingest_frame
    from driftloop.drift.reference import pick_reference
    from driftloop.retrain import train_and_gate
    from driftloop.train import decode_hparams

    spec, ds = lane.spec, lane.spec.dataset
    t0 = time.time()
    fresh = stream.rows.iloc[lane.in_table : lane.labelled_upto]
    n_eval = int(round(len(fresh) * spec.retraining.eval_fraction)) if len(fresh) else 0
    train_rows, eval_rows = fresh.iloc[: len(fresh) - n_eval], fresh.iloc[len(fresh) - n_eval :]
    uri = settings.table_uri(ds.table)
    if len(train_rows):
        ingest_frame(train_rows, uri, ds, f"backtest:{stream.name}:rows {lane.in_table}-{lane.in_table + len(train_rows)}")
        lane.in_table += len(train_rows)
    from driftloop.drift.reference import onset
    from driftloop.retrain import reference_min_rows

    since, cause_row = lane.events.get(trig.event_id or "", (lane.swapped_at, served_upto))
    runs = [(w["event_id"], float(stream.times[w["first"]]), w["is_drift"], w["version"]) for w in lane.windows]
    began = onset(runs, trig.event_id) if trig.event_id else None
    since = since if began is None else began
    served = stream.rows.iloc[:served_upto][ds.features].assign(
        request_id=[f"r{i}" for i in range(served_upto)], ts=stream.times[:served_upto])
    trained_ids = {f"r{i}" for i in range(lane.in_table)}
    reference = pick_reference(spec.retraining.reference, served, ds.features, trained_ids, since,
                               spec.drift.reference_rows, reference_min_rows(spec), lambda f: encode_frame(f, ds))
    tags = {"driftloop.kind": "backtest", "backtest.id": stamp, "backtest.strategy": lane.strategy,
            "lineage.cause": trig.cause or "schedule", "lineage.trigger": trig.reason[:250]}
    stages: dict[str, float] = {}
    out = train_and_gate(spec, settings, tables.data_version(uri), decode_hparams(spec, {}),
                         f"backtest-{stamp}-{_slug(lane.strategy)}-{len(lane.retrains) + 1}", tags,
                         {"lineage.cause": trig.cause or "schedule", "backtest.id": stamp}, eval_rows, reference, stages,
                         spec.retraining.training_window)
    if out["promoted"]:
        lane.model, windowed = _champion(settings, spec, out["version"])
        lane.version = out["version"]
        lane.core.use(out["version"], windowed, now)
        lane.swapped_at, lane.detectors_from = now, served_upto
    else:
        lane.core.retrained(now)
    lane.since_retrain = 0
    lane.retrains.append({"row": served_upto, "cause_row": cause_row, "labelled": lane.labelled_upto, "cause": trig.cause, "reason": trig.reason, "version": out["version"],
                          "promoted": out["promoted"], "gate": out["reason"], "reference": reference.source,
                          "seconds": round(time.time() - t0, 1)})


def run_lane(settings: Settings, spec: Spec, stream: Stream, strategy: str, version: int, stamp: str, label_delay: int,
             progress: Callable[[int], None] | None = None) -> Lane:
    """Replay the stream through one strategy: predict, then learn each label `label_delay` rows later."""
    from driftloop.drift.core import MonitorCore
    from driftloop.drift.policy import Trigger
    from driftloop.model import predict_outputs

    lspec = _lane_spec(spec, stamp, strategy)
    model, windowed = _champion(settings, lspec, version)
    core = MonitorCore(lspec)
    core.use(version, windowed, float(stream.times[0]), swapped=False)
    lane = Lane(strategy, lspec, model, version, core, every=int(strategy[9:]) if strategy.startswith("periodic:") else None,
                swapped_at=float(stream.times[0]))
    ds = lspec.dataset
    x_all = encode_frame(stream.rows, ds)
    y_all = stream.rows[ds.label].to_numpy(object if ds.string_labels else np.int64)
    classes = np.asarray(ds.classes, dtype=object if ds.string_labels else np.int64)
    pred_all = np.empty(len(y_all), dtype=classes.dtype)
    lane.versions = np.empty(len(y_all), dtype=np.int64)
    step = max(1, lspec.drift.window // 5)
    for start in range(0, len(y_all), step):
        end = min(start + step, len(y_all))
        now = float(stream.times[end - 1])
        proba = predict_outputs(lane.model, x_all[start:end])
        pred_all[start:end] = classes[proba.argmax(axis=1)]
        lane.versions[start:end] = lane.version
        lane.since_retrain += end - start
        triggers: list = []
        if strategy == "driftloop":
            d = core.decide(core.detect(x_all[start:end], proba, lane.version, now), now)
            for rep in d.windows:
                first = lane.detectors_from + rep.index * rep.rows
                lane.events[rep.event_id] = (float(stream.times[first]), first)  # the window's first row, not its chunk
                lane.windows.append({"event_id": rep.event_id, "first": first, "end": first + rep.rows, "version": rep.model_version,
                                     "is_drift": rep.is_drift})
            triggers += d.triggers
        upto = max(lane.labelled_upto, end - label_delay)
        if upto > lane.labelled_upto:
            rows = np.arange(lane.labelled_upto, upto)
            lane.labelled_upto = upto
            for v in np.unique(lane.versions[rows]):
                mine = rows[lane.versions[rows] == v]
                trig = core.label(int(v), list(pred_all[mine] == y_all[mine]), now)
                if trig is not None and strategy == "driftloop":
                    triggers.append(trig)
        if lane.every is not None and lane.since_retrain >= lane.every:
            triggers.append(Trigger(f"every {lane.every} rows", now, lane.version, "schedule"))
        if triggers and lane.labelled_upto > lane.in_table:
            _retrain(settings, lane, stream, triggers[0], now, end, stamp)
        if progress:
            progress(end - start)
    lane.correct = pred_all == y_all
    return lane


def summarise(stream: Stream, lanes: list[Lane], window: int) -> dict[str, Any]:
    """Prequential accuracy, retrains, labels used and retraining time per strategy (plus per phase)."""
    out: dict[str, Any] = {"stream": stream.name, "rows": len(stream.rows), "strategies": {}}
    for lane in lanes:
        c = lane.correct
        blocks = [float(c[i : i + window].mean()) for i in range(0, len(c), window)]
        entry = {"accuracy": round(float(c.mean()), 4), "retrains": len(lane.retrains),
                 "promoted": sum(r["promoted"] for r in lane.retrains),
                 "labels_used": int(max((r["labelled"] for r in lane.retrains), default=0)),
                 "retrain_seconds": round(sum(r["seconds"] for r in lane.retrains), 1),
                 "block_accuracy": [round(b, 4) for b in blocks], "retrain_log": lane.retrains,
                 "windows": len(lane.windows), "windows_flagged": sum(w["is_drift"] for w in lane.windows)}
        if stream.phases:
            entry["phases"] = {}
            for name, a, b in stream.phases:
                mine = [r for r in lane.retrains if a <= r["cause_row"] < b]  # retrains this phase's shift caused
                swap = next((r["row"] for r in mine if r["promoted"] and r["row"] < b), None)
                later = [w for w in lane.windows if swap is not None and w["first"] >= swap and w["end"] <= b]
                entry["phases"][f"{name}@{a}"] = {
                    "retrains": len(mine), "accuracy": round(float(c[a:b].mean()), 4), "swap_row": swap,
                    "accuracy_after_swap": round(float(c[swap:b].mean()), 4) if swap is not None else None,
                    "windows_after_swap": len(later), "flagged_after_swap": sum(w["is_drift"] for w in later)}
        out["strategies"][lane.strategy] = entry
    return out


def render(summary: dict[str, Any]) -> str:
    head = f"backtest of {summary['stream']} ({summary['rows']} rows, test-then-train)"
    lines = [head, f"{'strategy':<14}{'accuracy':>10}{'retrains':>10}{'promoted':>10}{'labels used':>13}{'retrain s':>11}"]
    for name, e in summary["strategies"].items():
        lines.append(f"{name:<14}{e['accuracy']:>10.4f}{e['retrains']:>10}{e['promoted']:>10}{e['labels_used']:>13}{e['retrain_seconds']:>11.1f}")
    return "\n".join(lines)


def plot(summary: dict[str, Any], lanes: list[Lane], window: int, path: Path) -> Path:
    """Accuracy per block of one window, one line per strategy, with its retrains marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    for lane in lanes:
        e = summary["strategies"][lane.strategy]
        xs = np.arange(len(e["block_accuracy"])) * window
        line, = ax.plot(xs, e["block_accuracy"], label=f"{lane.strategy} ({e['accuracy']:.3f}, {e['retrains']} retrains)")
        for r in lane.retrains:
            ax.axvline(r["row"], color=line.get_color(), alpha=0.4, linestyle="--" if r["promoted"] else ":")
    ax.set_xlabel("row of the stream")
    ax.set_ylabel(f"accuracy per {window} rows")
    ax.set_title(f"backtest: {summary['stream']}")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_backtest(spec: Spec, settings: Settings, source: str, strategies: list[str], label_delay: int = 0,
                 initial: int | None = None, out_dir: Path | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Check the stream, train the initial champion, run every lane, write table + JSON + PNG, log to MLflow."""
    from driftloop import registry
    from driftloop.cluster import ensure_ray

    if label_delay < 0:
        raise BacktestError(f"--label-delay must be 0 or more rows, got {label_delay}")
    stream = load_stream(source, spec, initial)
    if spec.task != "classification":
        raise SpecError("backtest: only classification specs can be backtested")
    stamp = time.strftime("%Y%m%d%H%M%S")
    ensure_ray(settings)
    versions = _initial_champion(settings, spec, stream, stamp, strategies)
    lanes = []
    total = len(stream.rows) * len(strategies)
    bar = None
    if show_progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="row", desc="backtest", leave=False)
    try:
        for s in strategies:
            lanes.append(run_lane(settings, spec, stream, s, versions[s], stamp, label_delay, bar.update if bar else None))
    finally:
        if bar:
            bar.close()
    summary = summarise(stream, lanes, spec.drift.window) | {"label_delay": label_delay, "backtest_id": stamp}
    out = Path(out_dir or settings.home / "backtests" / f"{spec.name}-{stamp}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "backtest.json").write_text(json.dumps(summary, indent=2, default=str))
    png = plot(summary, lanes, spec.drift.window, out / "backtest.png")
    c = registry.client(settings)
    run = c.create_run(registry.experiment_id(settings, spec.name), run_name=f"backtest-{stamp}",
                       tags={"driftloop.kind": "backtest", "backtest.id": stamp, "backtest.stream": source})
    for name, e in summary["strategies"].items():
        c.log_metric(run.info.run_id, f"{_slug(name)}.accuracy", e["accuracy"])
        c.log_metric(run.info.run_id, f"{_slug(name)}.retrains", e["retrains"])
    c.log_artifact(run.info.run_id, str(out / "backtest.json"))
    c.log_artifact(run.info.run_id, str(png))
    c.set_terminated(run.info.run_id, "FINISHED")
    summary["out_dir"], summary["png"], summary["mlflow_run"] = str(out), str(png), run.info.run_id
    return summary
