"""Soak ("Runs for months"): the served digits app over HTTP for a long stretch, with labels and drift-triggered
retraining, and what a long run must not do: grow resident memory, pile up files, get slower to answer or to read.

One app (Predictor + DriftMonitor, Serve's proxy in front) takes at least PREDICTIONS rows in batched /predict
requests and LABELS labels (one batched /feedback per /predict, for rows of the batch just answered), from CONCURRENCY
closed-loop clients. The stream alternates clean digits and corrupted ones (noise:3, blur:3, as in the backtest's
digits phases) at fixed points of the run (ONSETS: fractions of PREDICTIONS, or of SOAK_CAP_S when that comes
first), so the monitor's drift triggers the retraining jobs: at least MIN_RETRAINS must succeed. The run stops when
every total is reached (or at SOAK_CAP_S), then waits for jobs in progress.

Measured, start against end:
- memory: RSS of each Predictor and DriftMonitor replica and of the Serve proxy, every SAMPLE_S in a thread;
  level = median of the 2nd tenth of the soak (after warm-up), growth = median of the last tenth / level - 1;
- files: data files of the three log tables (active: in the current version; stored: Parquet on storage) every
  FILES_EVERY_S, at the start, at the end, and after a manual final `maintain`; the monitor's own scheduled
  maintenance runs every MAINTENANCE_EVERY_S with no vacuum grace;
- latency: a fixed probe (PROBE sequential single-row /predict, then PROBE_FEEDBACK /feedback for their ids) after the
  warm-up and after the soak, both while no retraining job runs; beside each, the CPU every process used during it
  (per request for the proxy and the predictors) and a fixed Python loop's time (the host's own pace);
- reads: assembling the labelled rows as a retraining job does (its watermark, then labelled_rows), at start
  and end; and the retraining jobs' own data_build_s stage (MLflow run metric), first job against last.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from bench.common import cpu_by_process

# --- totals and targets (the minimums) -------------------------------------------------------------------
PREDICTIONS = 200_000  # rows answered by /predict during the soak
LABELS = 50_000  # labels accepted by /feedback during the soak
MIN_RETRAINS = 3  # retraining jobs that succeeded, triggered by drift
ROWS_PER_REQUEST = 100
LABELS_PER_REQUEST = -(-LABELS * ROWS_PER_REQUEST // PREDICTIONS)  # 25: labels keep pace with predictions
CONCURRENCY = 12  # closed-loop clients: each posts a batch, then labels LABELS_PER_REQUEST of its rows
# the soak stops here even if a total is short (the totals then miss, with their numbers): with ~5 min of set-up,
# warm-up, probes and maintenance around it the section stays near 20 min on 2 cores
SOAK_CAP_S = 960.0
JOB_WAIT_S = 300.0  # after the traffic, wait this long at most for retraining jobs in progress
WARMUP_ROWS = 5_000  # clean rows (with labels) before the start probe
PROBE = 1_000  # sequential single-row /predict per probe: its p99 rests on its 10 slowest requests
PROBE_FEEDBACK = 500  # /feedback for the first this many of them (p99: the 5 slowest)
SAMPLE_S = 10.0
FILES_EVERY_S = 60.0
MAINTENANCE_EVERY_S = 60.0
MEMORY_GROWTH_MAX_PCT = 15.0
LATENCY_RATIO_MAX = 1.2
READ_RATIO_MAX = 1.5
FILES_AFTER_MAINTAIN_MAX = 10  # per table, stored and active, after the final maintenance
# drift: phase changes at these fractions of the soak (of PREDICTIONS, or of SOAK_CAP_S if that comes first), cycling
# through PHASES; past the last one, while fewer than MIN_RETRAINS jobs succeeded, the phase moves on whenever a job
# ends or after EXTRA_PHASE_S
ONSETS = (0.05, 0.30, 0.55, 0.80)
PHASES = ("noise:3", "clean", "blur:3", "clean")
EXTRA_PHASE_S = 240.0
CONTROL_S = 5.0
BODIES_PER_PHASE = 60  # distinct request bodies per phase (6,000 rows sampled from the 497-image pool)
# the spec: short training so that retraining jobs leave the 2 cores to the traffic most of the time
EPOCHS = 6
TRAINING_WINDOW = 5_000
COOLDOWN_S = 60
FEEDBACK_RATE = FEEDBACK_BURST = 1e6  # the per-client /feedback limit must not refuse the bench (one client host)
DIRECT_INGRESS = False  # True: bulk traffic to the replicas' own ports (Serve direct ingress); probes stay on the proxy
APP = "soak"
JSON = {"content-type": "application/json"}
WATCHED = ("Predictor", "DriftMonitor", "ProxyActor")


def run() -> dict:
    from ray import serve

    from bench.common import ROOT, free_port, setup_home
    from driftloop.cluster import ensure_ray
    from driftloop.config import load_spec, parse_spec
    from driftloop.data.ingest import ingest
    from driftloop.jobs import JobsView
    from driftloop.serving.app import DriftMonitor, Predictor
    from driftloop.settings import get_settings
    from driftloop.sweep import run_sweep

    t_run = time.perf_counter()
    setup_home("soak")
    if DIRECT_INGRESS:  # read when Serve starts
        os.environ.update({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"})
    s = get_settings().ensure()
    d = load_spec(ROOT / "configs/digits.yaml").model_dump(mode="json")
    d["name"] = d["dataset"]["table"] = "digits-soak"
    d["sweep"].update(trials=1, concurrency=1)
    d["training"]["epochs"] = EPOCHS
    d["retraining"].update(cooldown_s=COOLDOWN_S, training_window=TRAINING_WINDOW)
    d.setdefault("lifecycle", {}).update(maintenance_every_s=MAINTENANCE_EVERY_S, vacuum_grace_hours=0)
    spec = parse_spec(d)
    ingest("digits", s.table_uri(spec.dataset.table), spec.dataset)
    ensure_ray(s, join_running=False)
    run_sweep(spec, s, verbose=0)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
    sampler = _Sampler(s, spec, f"http://127.0.0.1:{port}/{APP}/drift")
    try:
        serve.run(Predictor.bind(DriftMonitor.bind(d), d, True, 256, FEEDBACK_RATE, FEEDBACK_BURST),
                  name=APP, route_prefix=f"/{APP}")
        sampler.start()
        base = f"http://127.0.0.1:{port}/{APP}"
        if DIRECT_INGRESS:
            from bench.serving import direct_ingress_urls

            bulk = [f"{u}/{APP}" for u in direct_ingress_urls(APP)]
        else:
            bulk = [base]
        pools, probe_bodies, probe_labels = _bodies(spec)
        setup_s = time.perf_counter() - t_run
        view = JobsView(spec.name)

        warm = _Traffic(phase="clean")
        asyncio.run(_traffic(bulk, pools, warm, _warmup_control(warm)))
        if warm.predictions < WARMUP_ROWS or not warm.labels:
            raise RuntimeError(f"warm-up: {warm.predictions} rows and {warm.labels} labels in {warm.seconds:.0f} s "
                               f"(/predict status {warm.predict_status}, /feedback status {warm.feedback_status})")
        start = {"latency": _probe(base, probe_bodies, probe_labels, sampler.names()), "read": _read(s, spec), "files": sampler.files_now()}
        print(f"soak: warm-up {warm.predictions} rows / {warm.labels} labels in {warm.seconds:.0f} s "
              f"({(warm.predict_requests + warm.feedback_requests) / max(warm.seconds, 1e-9):.0f} requests/s); "
              f"start probe {_brief(start['latency'])}", flush=True)

        soak = _Traffic(phase="clean")
        t0 = time.time()
        soak.phases.append({"at_s": 0.0, "at_rows": 0, "phase": "clean", "why": "start"})
        asyncio.run(_traffic(bulk, pools, soak, _soak_control(soak, view, t0)))
        t1 = time.time()
        seqs, waited = _wait_jobs(view)
        time.sleep(10)  # a champion just promoted reaches every replica within a poll or two
        drift = _get_json(f"{base}/drift")
        end_probe = _after_maintenance(base)
        end = {"latency": _probe(base, probe_bodies, probe_labels, sampler.names()), "read": _read(s, spec), "files": sampler.files_now()}
        end_probe["passes_during_probe"] = _get_json(f"{base}/drift").get("maintenance", {}).get("runs", 0) - end_probe.pop("runs")
        print(f"soak: end probe {_brief(end['latency'])}", flush=True)
        final_maintain = _maintain(s, spec)
        after_files = sampler.files_now()
        sampler.stop()
        jobs = _jobs(s, spec, seqs)
    finally:
        sampler.stop()
        try:
            serve.delete(APP)
        except Exception as err:
            print(f"soak: serve.delete({APP!r}) failed: {err}", flush=True)

    out = {
        "settings": {"predictions": PREDICTIONS, "labels": LABELS, "min_retrains": MIN_RETRAINS, "rows_per_request": ROWS_PER_REQUEST,
                     "labels_per_request": LABELS_PER_REQUEST, "concurrency": CONCURRENCY, "soak_cap_s": SOAK_CAP_S,
                     "onsets": list(ONSETS), "phases": list(PHASES), "epochs": EPOCHS, "training_window": TRAINING_WINDOW,
                     "cooldown_s": COOLDOWN_S, "maintenance_every_s": MAINTENANCE_EVERY_S, "vacuum_grace_hours": 0,
                     "sample_s": SAMPLE_S, "probe": PROBE, "probe_feedback": PROBE_FEEDBACK, "transport": "direct ingress" if DIRECT_INGRESS else "Serve proxy"},
        "totals": _totals(warm, soak, (start["latency"], end["latency"]), t0, t1, jobs, drift, setup_s, waited,
                          time.perf_counter() - t_run),
        "phases": soak.phases,
        "progress": soak.progress,
        "jobs": jobs,
        "memory": _memory(sampler.rss, t0, t1, sampler.errors),
        "files": _files(start["files"], end["files"], after_files, sampler.series, t0, t1, final_maintain, drift,
                        sampler.passes),
        "latency": {**_latency(start["latency"], end["latency"]), "end_probe": end_probe},
        "reads": _reads(start["read"], end["read"], jobs),
    }
    out["targets"] = _targets(out)
    return out


# --- traffic ------------------------------------------------------------------------------------------------------


def _bodies(spec):
    """Request bodies per phase (ROWS_PER_REQUEST rows each, with their labels) and the probe's single rows."""
    from driftloop.data import examples
    from driftloop.replay import parse_scenario

    pool = examples.builtin("digits").pool
    features, label = spec.dataset.features, spec.dataset.label
    n = BODIES_PER_PHASE * ROWS_PER_REQUEST

    def rows_of(df) -> list[dict]:
        x = np.round(df[features].to_numpy(dtype=float), 3)
        return [dict(zip(features, map(float, r))) for r in x]

    pools = {}
    for i, phase in enumerate(dict.fromkeys(PHASES + ("clean",))):
        kind, sev = parse_scenario("clean" if phase == "clean" else f"corrupt:{phase}")
        df = examples.digits_stream(pool, n, onset=0 if sev else None, kind=kind, severity=sev, seed=100 + i)
        rows, ys = rows_of(df), df[label].to_numpy().astype(int).tolist()
        pools[phase] = [(json.dumps({"rows": rows[j:j + ROWS_PER_REQUEST]}).encode(), ys[j:j + ROWS_PER_REQUEST])
                        for j in range(0, n, ROWS_PER_REQUEST)]
    probe = examples.digits_stream(pool, PROBE, onset=None, seed=7)
    bodies = [json.dumps({"row": r}).encode() for r in rows_of(probe)]
    return pools, bodies, probe[label].to_numpy().astype(int).tolist()


@dataclass
class _Traffic:
    phase: str
    predictions: int = 0
    labels: int = 0
    predict_requests: int = 0
    feedback_requests: int = 0
    predict_status: dict = field(default_factory=dict)
    feedback_status: dict = field(default_factory=dict)
    stop: bool = False
    phases: list = field(default_factory=list)
    progress: list = field(default_factory=list)
    seconds: float = 0.0


async def _traffic(urls: list[str], pools: dict, st: _Traffic, control) -> None:
    """CONCURRENCY closed-loop clients until `control` sets st.stop: a batch to /predict, then the labels of
    LABELS_PER_REQUEST of its rows in one /feedback batch."""
    import httpx

    async def worker(client, i: int) -> None:
        url = urls[i % len(urls)]
        rng = np.random.default_rng(1000 + i)
        while not st.stop:
            bodies = pools[st.phase]
            body, ys = bodies[int(rng.integers(len(bodies)))]
            try:
                r = await client.post(f"{url}/predict", content=body, headers=JSON)
                code = r.status_code
            except httpx.HTTPError:
                code = 599
            st.predict_requests += 1
            st.predict_status[code] = st.predict_status.get(code, 0) + 1
            try:
                preds = r.json()["predictions"] if code == 200 else None
            except ValueError:
                preds = None
            if preds is None:
                await asyncio.sleep(0.5)
                continue
            st.predictions += len(preds)
            n = min(LABELS_PER_REQUEST, len(preds))  # a labelling pipeline's batch: one /feedback for n labels
            batch = [{"request_id": preds[j]["id"], "label": int(ys[j])} for j in range(n)]
            try:
                fr = await client.post(f"{url}/feedback", json={"labels": batch})
                code = fr.status_code
                recorded = fr.json().get("statuses", {}).get("200", 0) if code == 200 else 0
            except (httpx.HTTPError, ValueError):
                code, recorded = 599, 0
            st.feedback_requests += 1
            st.feedback_status[code] = st.feedback_status.get(code, 0) + 1
            st.labels += recorded

    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    t = time.monotonic()
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await asyncio.gather(control, *(worker(client, i) for i in range(CONCURRENCY)))
    st.seconds = time.monotonic() - t


async def _warmup_control(st: _Traffic, limit_s: float = 300.0) -> None:
    t = time.monotonic()
    while st.predictions < WARMUP_ROWS and time.monotonic() - t < limit_s:
        await asyncio.sleep(0.5)
    st.stop = True


async def _soak_control(st: _Traffic, view, t0: float) -> None:
    """Every CONTROL_S: list the retraining jobs, move the phase at its onsets (and, past the last one, while too few
    jobs succeeded, whenever a job ends), print progress, and stop once every total is reached (or at the cap)."""
    onset, cycle, finals_at_switch, switched_at, printed = 0, 0, 0, time.time(), 0.0

    def switch(phase: str, why: str) -> None:
        nonlocal switched_at
        st.phase, switched_at = phase, time.time()
        st.phases.append({"at_s": round(time.time() - t0, 1), "at_rows": st.predictions, "phase": phase, "why": why})
        print(f"soak: phase -> {phase} at {st.predictions} rows ({why})", flush=True)

    while not st.stop:
        await asyncio.sleep(CONTROL_S)
        try:
            seqs = await asyncio.to_thread(view.refresh)
        except Exception:  # RetrainPathDown: the Jobs API did not answer this time; keep the last listing
            seqs = view.seqs
        finals = sum(1 for q in seqs if q.final)
        succeeded = sum(1 for q in seqs if q.final and q.latest.status == "SUCCEEDED")
        now = time.time()
        progress = max(st.predictions / PREDICTIONS, (now - t0) / SOAK_CAP_S)
        while onset < len(ONSETS) and progress >= ONSETS[onset]:
            switch(PHASES[onset % len(PHASES)], f"onset {onset + 1} of {len(ONSETS)}")
            onset, cycle = onset + 1, onset + 1
            finals_at_switch = finals
        if onset >= len(ONSETS) and succeeded < MIN_RETRAINS and (finals > finals_at_switch or now - switched_at >= EXTRA_PHASE_S):
            switch(PHASES[cycle % len(PHASES)], f"extra: {succeeded} of {MIN_RETRAINS} retrains so far")
            cycle, finals_at_switch = cycle + 1, finals
        elapsed = now - t0
        if now - printed >= 30:
            printed = now
            st.progress.append({"t_s": round(elapsed, 1), "predictions": st.predictions, "labels": st.labels,
                                "jobs": len(seqs), "succeeded": succeeded, "phase": st.phase})
            print(f"soak {elapsed:6.0f}s: {st.predictions} rows ({st.predictions / max(elapsed, 1e-9):.0f}/s), {st.labels} labels "
                  f"({st.labels / max(elapsed, 1e-9):.1f}/s), jobs {succeeded}/{len(seqs)}, phase {st.phase}", flush=True)
        totals = st.predictions >= PREDICTIONS and st.labels >= LABELS
        if (totals and succeeded >= MIN_RETRAINS) or elapsed >= SOAK_CAP_S:
            st.stop = True


def _wait_jobs(view) -> tuple[list, float]:
    """Until no retraining sequence is in progress (or JOB_WAIT_S): the end probe runs on a quiet machine, as the start's did."""
    t = time.monotonic()
    seqs = view.seqs
    while time.monotonic() - t < JOB_WAIT_S:
        try:
            seqs = view.refresh()
        except Exception:  # RetrainPathDown: keep the last listing, ask again
            pass
        if all(q.final for q in seqs):
            break
        time.sleep(3)
    return seqs, round(time.monotonic() - t, 1)


def _after_maintenance(base: str) -> dict:
    """Until the monitor's next scheduled maintenance pass has finished, so the end probe runs between passes, as the
    start's did (at the start the tables are too small for a pass to cost anything; at the end one pass rewrites the
    day's files, seconds of CPU on this 2-core machine). What the pass took is reported beside the probe."""
    runs0 = _get_json(f"{base}/drift").get("maintenance", {}).get("runs", 0)
    t = time.monotonic()
    m: dict = {}
    while time.monotonic() - t < 3 * MAINTENANCE_EVERY_S:
        m = _get_json(f"{base}/drift").get("maintenance", {})
        if m.get("runs", 0) > runs0:
            break
        time.sleep(0.5)
    return {"waited_s": round(time.monotonic() - t, 1), "pass_seconds": (m.get("last") or {}).get("seconds"),
            "runs": m.get("runs", 0)}


def _get_json(url: str) -> dict:
    import httpx

    try:
        return httpx.get(url, timeout=60).json()
    except Exception as err:
        return {"error": f"{type(err).__name__}: {err}"}


# --- probes -------------------------------------------------------------------------------------------------------


def _pct(ms: list[float]) -> dict:
    if not ms:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    a = np.asarray(ms)
    return {"n": len(ms), "p50_ms": round(float(np.percentile(a, 50)), 2), "p99_ms": round(float(np.percentile(a, 99)), 2)}


def _cpu_diff(before: dict[str, float], after: dict[str, float], wall_s: float, top: int = 8, requests: int = 0) -> dict:
    """The processes that used the most CPU between two snapshots, in CPU seconds per wall second (2.0 = both cores),
    and the CPU milliseconds per probe request of the proxy and of the predictors together (the request's own path)."""
    d = {k: after[k] - before.get(k, 0.0) for k in after}
    busiest = sorted(((k, v) for k, v in d.items() if v > 0), key=lambda kv: -kv[1])[:top]
    per = {kind: round(1000 * sum(v for k, v in d.items() if k.startswith(kind)) / requests, 2)
           for kind in ("ProxyActor", "Predictor")} if requests else {}
    return {"wall_s": round(wall_s, 2), "cores_busy": round(sum(v for v in d.values() if v > 0) / max(wall_s, 1e-9), 2),
            "by_process": {k: round(v / max(wall_s, 1e-9), 3) for k, v in busiest}, "cpu_ms_per_request": per}


def _probe(base: str, bodies: list[bytes], labels: list[int], names: dict[int, str] | None = None) -> dict:
    """PROBE sequential single-row /predict, then (once every id is past the predictor's fresh-id window, so each
    label takes the steady path) PROBE_FEEDBACK sequential /feedback for the first of those ids. With names (pid -> actor label), the CPU
    each process used during the /predict part is reported beside it: what shared the 2 cores with the probe."""
    import httpx

    from driftloop.serving.common import FRESH_ID_S

    pred, fb, ids = [], [], []
    errors = {"predict": 0, "feedback": 0}
    host = _host_speed()  # the machine's own pace, beside the probe: a slower host slows every process alike
    cpu0, t_cpu = (cpu_by_process(names), time.perf_counter()) if names is not None else (None, 0.0)
    versions: set = set()
    with httpx.Client(timeout=60) as c:
        for body in bodies:
            t = time.perf_counter()
            try:
                r = c.post(f"{base}/predict", content=body, headers=JSON)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            pred.append((time.perf_counter() - t) * 1000)
            answer = r.json() if ok else None
            ids.append(answer["predictions"][0]["id"] if ok else None)
            if ok:
                versions.add(answer["model_version"])
            errors["predict"] += not ok
        cpu = _cpu_diff(cpu0, cpu_by_process(names), time.perf_counter() - t_cpu, requests=len(bodies)) if cpu0 is not None else None
        time.sleep(FRESH_ID_S + 1)
        for rid, y in zip(ids[:PROBE_FEEDBACK], labels):
            if rid is None:
                continue
            t = time.perf_counter()
            try:
                ok = c.post(f"{base}/feedback", json={"request_id": rid, "label": int(y)}).status_code == 200
            except httpx.HTTPError:
                ok = False
            fb.append((time.perf_counter() - t) * 1000)
            errors["feedback"] += not ok
    out = {"predict": {**_pct(pred), "errors": errors["predict"], "model_versions": sorted(versions)},
           "feedback": {**_pct(fb), "errors": errors["feedback"]}}
    if cpu is not None:
        out["predict"]["cpu"] = cpu
    out["host_loop_ms"] = round(statistics.median([host, _host_speed()]), 1)
    return out


def _host_speed(n: int = 3_000_000) -> float:
    """Milliseconds this process takes for a fixed pure-Python loop (median of 3): the same work at start and end."""
    times = []
    for _ in range(3):
        t, x = time.perf_counter(), 0
        for i in range(n):
            x += i
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _brief(lat: dict) -> str:
    return ", ".join(f"/{k} p50 {v['p50_ms']} ms p99 {v['p99_ms']} ms" for k, v in lat.items() if isinstance(v, dict))


READ_ROWS = 1_000  # the reads are timed on the same amount of new data at start and end: the newest this many labels


def _read(s, spec, repeats: int = 3) -> dict:
    """Assemble labelled rows as a retraining job does (labelled_rows past a watermark), with the watermark put
    READ_ROWS labels back, so start and end read the same amount of new data: an incremental read costs the same
    however long the logs have grown, a full scan does not."""
    from driftloop.data import logs, tables

    fb = tables.read(logs.uris(s, spec)["feedback"], columns=["ts"], filters=[("ts", ">", time.time() - 600)])
    ts = np.sort(fb["ts"].to_numpy())
    mark = float(ts[-READ_ROWS - 1]) if len(ts) > READ_ROWS else 0.0
    times, rows = [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        rows = len(logs.labelled_rows(s, spec, after_ts=mark))
        times.append(time.perf_counter() - t)
    return {"seconds": round(statistics.median(times), 4), "runs_s": [round(x, 4) for x in times], "rows": rows, "after_ts": mark,
            "build": _build(s, spec, mark, repeats)}


def _build(s, spec, mark: float, repeats: int) -> dict:
    """A retraining job's whole data build (retrain.build_data: the table's commit history, the labelled rows, the
    time column, the new data version's commit, the drift reference from the inference log) past the same mark as
    the read above, each time on a fresh copy of the training table as it stands (the copy is not timed): the job's
    step at equal new data, start against end, however much the table and the logs have grown."""
    import shutil

    from driftloop.retrain import build_data

    src = s.table_uri(spec.dataset.table)
    times, got = [], None
    for i in range(repeats):
        dst = f"{s.home}/soak-build-copy"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)
        try:
            t = time.perf_counter()
            got = build_data(s, spec, dst, f"soak-build-{int(mark)}-{i}", None, champion_since=mark, after_ts=mark)
            times.append(time.perf_counter() - t)
        finally:
            shutil.rmtree(dst, ignore_errors=True)
    return {"seconds": round(statistics.median(times), 3), "runs_s": [round(x, 3) for x in times],
            "labelled_rows": got.labelled, "table_rows": got.dv.rows, "table_version": got.dv.version,
            "reference": got.reference.source}


def _maintain(s, spec) -> dict:
    from driftloop.data import maintenance

    t = time.perf_counter()
    try:
        rep = maintenance.maintain(s, spec)
    except Exception as err:
        return {"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]}
    return {"report": rep, "seconds": round(time.perf_counter() - t, 2)}


# --- background sampling ------------------------------------------------------------------------------------------


class _Sampler(threading.Thread):
    """RSS of the app's replicas and the proxy every SAMPLE_S; the log tables' file counts every FILES_EVERY_S."""

    def __init__(self, settings, spec, drift_url: str | None = None):
        super().__init__(name="soak-sampler", daemon=True)
        self.settings, self.spec, self.drift_url = settings, spec, drift_url
        self.passes: dict[str, dict] = {}  # the monitor's scheduled maintenance passes, by their time
        self.rss: dict[str, dict] = {}  # actor id -> {"label", "class_name", "pid", "samples": [(t, MiB)]}
        self.series: list[dict] = []  # {"t": unix time, kind: {"active", "stored"} | {"error"}}
        self.errors: list[str] = []
        self._halt = threading.Event()
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()  # the thread samples while the probes ask for names()

    def names(self) -> dict[int, str]:
        """pid -> label of the watched actors seen so far (refreshed now)."""
        try:
            self._sample_rss()
        except Exception as err:
            self.errors.append(f"rss: {type(err).__name__}: {err}"[:300])
        with self._lock:
            return {e["pid"]: e["label"] for e in self.rss.values()}

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=60)

    def run(self) -> None:
        next_files = 0.0
        while True:
            try:
                self._sample_rss()
            except Exception as err:
                self.errors.append(f"rss: {type(err).__name__}: {err}"[:300])
            if self.drift_url:
                try:
                    import httpx

                    last = (httpx.get(self.drift_url, timeout=30).json().get("maintenance") or {}).get("last")
                    if last and last.get("at"):
                        self.passes[last["at"]] = {k: {f: v.get(f) for f in ("files_before", "files_after", "files_compacted", "rows_expired")}
                                                   for k, v in (last.get("tables") or {}).items()}
                except Exception as err:
                    self.errors.append(f"drift: {type(err).__name__}: {err}"[:300])
            if time.time() >= next_files:
                next_files = time.time() + FILES_EVERY_S
                self.series.append(self.files_now())
            if self._halt.wait(SAMPLE_S):
                return

    def _sample_rss(self) -> None:
        from ray.util.state import list_actors

        now = time.time()
        actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10_000, raise_on_missing_output=False)
        with self._lock:
            self._record_rss(now, actors)

    def _record_rss(self, now: float, actors) -> None:
        import psutil

        for a in actors:
            cls = a.class_name or ""
            kind = next((k for k in WATCHED if k in cls), None)
            if kind is None or not a.pid:
                continue
            entry = self.rss.get(a.actor_id)
            if entry is None:
                self._seen[kind] = self._seen.get(kind, 0) + 1
                entry = self.rss[a.actor_id] = {"label": f"{kind}#{self._seen[kind]}", "class_name": cls, "pid": a.pid, "samples": []}
            try:
                entry["samples"].append((now, psutil.Process(a.pid).memory_info().rss / 2**20))
            except psutil.Error:
                pass

    def files_now(self) -> dict:
        """{"t": now, kind: file_counts(uri)} for each log table; a failure is kept as {"error": ...}."""
        from driftloop.data import logs

        out: dict = {"t": time.time()}
        for kind, uri in logs.uris(self.settings, self.spec).items():
            try:
                from driftloop.data import maintenance

                out[kind] = dict(maintenance.file_counts(uri))
            except Exception as err:
                out[kind] = {"error": f"{type(err).__name__}: {err}"[:300]}
        return out


# --- summaries ----------------------------------------------------------------------------------------------------


def _memory(rss: dict, t0: float, t1: float, errors: list[str]) -> dict:
    """Per watched actor: warm-up level (median of the soak's 2nd tenth), max after warm-up, last-tenth median, growth."""
    span = max(t1 - t0, 1e-9)
    actors = {}
    for a in rss.values():
        pts = [(t, m) for t, m in a["samples"] if t0 <= t <= t1]
        warm = [m for t, m in pts if t0 + 0.1 * span <= t < t0 + 0.2 * span]
        last = [m for t, m in pts if t >= t0 + 0.9 * span]
        after = [m for t, m in pts if t >= t0 + 0.1 * span]
        e = {"class_name": a["class_name"], "pid": a["pid"], "samples": len(pts),
             "series_mib": [[round(t - t0), round(m, 1)] for t, m in a["samples"]]}
        if warm and last:
            level, end = statistics.median(warm), statistics.median(last)
            growth = 100 * (end / level - 1)
            e.update(level_mib=round(level, 1), max_mib=round(max(after), 1), end_mib=round(end, 1), growth_pct=round(growth, 1),
                     within_target=growth <= MEMORY_GROWTH_MAX_PCT)
        else:
            e.update(level_mib=None, max_mib=round(max(after), 1) if after else None, end_mib=None, growth_pct=None,
                     within_target=False, note="not alive through the whole soak (replaced, or started late)")
        actors[a["label"]] = e
    return {"actors": dict(sorted(actors.items())), "target_growth_pct": MEMORY_GROWTH_MAX_PCT,
            "sampler_errors": errors[:5], "sampler_error_count": len(errors),
            "ok": bool(actors) and all(e["within_target"] for e in actors.values())}


def _files(start: dict, end: dict, after: dict, series: list[dict], t0: float, t1: float, final: dict, drift: dict,
           passes: dict | None = None) -> dict:
    """Per log table: files at start and end, the most any scheduled maintenance pass found and left, and after the
    final pass. Bounded: every pass's compaction leaves at most FILES_AFTER_MAINTAIN_MAX files (the files of the
    version it committed), however long the run; appends go on during a pass, so the count when it ends is kept
    beside it, and between passes the count is what one interval of commits adds."""
    passes = passes or {}
    tables = {}
    for kind in ("inference", "feedback", "drift_events"):
        found = [p[kind]["files_before"] for p in passes.values() if (p.get(kind) or {}).get("files_before") is not None]
        left = [p[kind].get("files_compacted", p[kind]["files_after"]) for p in passes.values()
                if (p.get(kind) or {}).get("files_after") is not None]
        at_end = [p[kind]["files_after"] for p in passes.values() if (p.get(kind) or {}).get("files_after") is not None]
        stored = [p[kind]["stored"] for p in [start, *series, end] if "stored" in (p.get(kind) or {})]
        errs = [p[kind]["error"] for p in (start, end, after) if "error" in (p.get(kind) or {})]
        aft = after.get(kind) or {}
        e = {"start": start.get(kind), "end": end.get(kind), "after_maintain": aft, "passes": len(left),
             "max_before_a_pass": max(found) if found else None, "max_after_a_pass": max(left) if left else None,
             "max_when_a_pass_ended": max(at_end) if at_end else None,
             "max_stored_sampled": max(stored) if stored else None}
        e["bounded"] = bool(left) and max(left) <= FILES_AFTER_MAINTAIN_MAX and not errs
        e["small_after_maintain"] = (aft.get("active", 1e9) <= FILES_AFTER_MAINTAIN_MAX
                                     and aft.get("stored", 1e9) <= FILES_AFTER_MAINTAIN_MAX)
        if errs:
            e["error"] = errs[0]
        tables[kind] = e
    return {"tables": tables, "series": series, "final_maintain": final, "passes": passes,
            "monitor_maintenance": {k: v for k, v in (drift.get("maintenance") or {}).items() if k != "last"},
            "monitor_maintenance_last": (drift.get("maintenance") or {}).get("last"),
            "ok": all(e["bounded"] and e["small_after_maintain"] for e in tables.values())}


def _ratio(a, b):
    return round(b / a, 3) if a and b is not None else None


def _latency(start: dict, end: dict) -> dict:
    ratios = {f"{ep}_{q}_ratio_end_over_start": _ratio(start[ep][f"{q}_ms"], end[ep][f"{q}_ms"])
              for ep in ("predict", "feedback") for q in ("p50", "p99")}
    return {"start": start, "end": end, **ratios, "target_ratio": LATENCY_RATIO_MAX,
            "ok": all(v is not None and v <= LATENCY_RATIO_MAX for v in ratios.values())}


def _jobs(s, spec, seqs) -> dict:
    """Retraining jobs (Jobs API) and their stages (MLflow run metrics `stage.*`, as bench/loop.py reads them)."""
    from driftloop import registry

    runs = []
    try:
        c = registry.client(s)
        found = c.search_runs([registry.experiment_id(s, spec.name)], "tags.`driftloop.kind` = 'retrain'",
                              order_by=["attributes.start_time ASC"], max_results=1000)
        for r in found:
            m = r.data.metrics
            runs.append({"job_id": r.data.tags.get("lineage.job_id"), "status": r.info.status,
                         "decision": r.data.tags.get("gate.decision"), "started": r.info.start_time / 1000,
                         **{k.removeprefix("stage."): round(v, 3) for k, v in m.items() if k.startswith("stage.")}})
        error = None
    except Exception as err:
        error = f"{type(err).__name__}: {err}"[:300]
    views = [q.view() for q in seqs]
    ours = {a["submission_id"] for v in views for a in v.get("runs", [])}
    later = [r for r in runs if r["job_id"] not in ours]  # e.g. a job the end probe's own traffic triggered
    runs = [r for r in runs if r["job_id"] in ours]
    _labelled_rows_of(runs)
    ok = [v for q, v in zip(seqs, views) if q.final and q.latest.status == "SUCCEEDED"]
    return {"sequences": views, "all": len(seqs), "succeeded": len(ok),
            "succeeded_drift_triggered": sum(1 for v in ok if str(v.get("cause") or "").startswith(("drift", "online alarm"))),
            "attempts": sum(len(q.attempts) for q in seqs), "promoted": sum(1 for r in runs if r["decision"] == "promoted"),
            "runs": runs, "runs_after_the_soak": later, **({"mlflow_error": error} if error else {})}


def _labelled_rows_of(runs: list[dict]) -> None:
    """Each job's labelled_rows from its summary line in the job log (best effort: the data each data build read)."""
    try:
        from driftloop.jobs_api import jobs_client

        c = jobs_client()
    except Exception:
        return
    for r in runs:
        try:
            text = c.get_job_logs(r["job_id"])
            line = next(ln for ln in reversed(text.splitlines()) if ln.startswith("DRIFTLOOP_RETRAIN_SUMMARY "))
            r["labelled_rows"] = json.loads(line.split(" ", 1)[1]).get("labelled_rows")
        except Exception:
            continue


def _reads(start: dict, end: dict, jobs: dict) -> dict:
    """Start against end at equal new data (the verdict): the labelled-rows read and a job's whole data build. The
    jobs' own data_build_s is kept beside it with each job's labelled rows: a job reads and commits the labels that
    came since the last one, so its time follows its own new data (the soak's later jobs had many more)."""
    built = [r for r in jobs["runs"] if r.get("data_build_s") is not None]
    first, last = (built[0], built[-1]) if built else (None, None)
    lr = {"start": {k: v for k, v in start.items() if k != "build"}, "end": {k: v for k, v in end.items() if k != "build"},
          "seconds_ratio_end_over_start": _ratio(start["seconds"], end["seconds"])}
    bd = {"start": start.get("build"), "end": end.get("build"),
          "seconds_ratio_end_over_start": _ratio((start.get("build") or {}).get("seconds"), (end.get("build") or {}).get("seconds"))}
    db = {"first": first, "last": last, "jobs": len(built), "runs": built,
          "seconds_ratio_last_over_first": _ratio(first["data_build_s"], last["data_build_s"]) if len(built) >= 2 else None}
    ratios = [lr["seconds_ratio_end_over_start"], bd["seconds_ratio_end_over_start"]]
    return {"labelled_rows": lr, "build": bd, "data_build": db, "target_ratio": READ_RATIO_MAX,
            "ok": all(v is not None and v <= READ_RATIO_MAX for v in ratios)}


def _totals(warm: _Traffic, soak: _Traffic, probes: tuple[dict, dict], t0: float, t1: float, jobs: dict, drift: dict,
            setup_s: float, waited: float, wall: float) -> dict:
    el = max(t1 - t0, 1e-9)
    probe_predictions = sum(p["predict"]["n"] - p["predict"]["errors"] for p in probes)
    probe_labels = sum(p["feedback"]["n"] - p["feedback"]["errors"] for p in probes)
    return {"predictions": soak.predictions, "labels": soak.labels, "predict_requests": soak.predict_requests,
            "feedback_requests": soak.feedback_requests, "predict_status": {str(k): v for k, v in sorted(soak.predict_status.items())},
            "feedback_status": {str(k): v for k, v in sorted(soak.feedback_status.items())},
            "warmup_predictions": warm.predictions, "warmup_labels": warm.labels, "probe_predictions": probe_predictions,
            "probe_labels": probe_labels, "all_predictions": soak.predictions + warm.predictions + probe_predictions,
            "all_labels": soak.labels + warm.labels + probe_labels,
            "retrain_jobs": jobs["all"], "retrain_succeeded": jobs["succeeded"], "retrain_promoted": jobs["promoted"],
            "monitor_feedback_count": drift.get("feedback"), "monitor_dropped_rows": drift.get("dropped_rows"),
            "inference_log_dropped_rows": drift.get("inference_log_dropped_rows"),
            "rows_per_s": round(soak.predictions / el, 1), "labels_per_s": round(soak.labels / el, 1),
            "requests_per_s": round((soak.predict_requests + soak.feedback_requests) / el, 1),
            "soak_s": round(el, 1), "setup_s": round(setup_s, 1), "job_wait_s": waited, "wall_s": round(wall, 1),
            "capped": el >= SOAK_CAP_S}


def _signed_pct(v) -> str:
    return "n/a" if v is None else f"{v:+.1f} %"


def _targets(r: dict) -> dict:
    """Every target with its verdict and the numbers it was decided on."""
    t, mem, fl, lat, rd = r["totals"], r["memory"], r["files"], r["latency"], r["reads"]
    out = {}

    def add(name: str, target: str, ok: bool, measured: str) -> None:
        out[name] = {"target": target, "pass": bool(ok), "measured": measured}

    add("predictions", f">= {PREDICTIONS:,}", t["predictions"] >= PREDICTIONS,
        f"{t['predictions']:,} rows in {t['predict_requests']:,} requests ({t['rows_per_s']}/s)")
    add("labels", f">= {LABELS:,}", t["labels"] >= LABELS, f"{t['labels']:,} in {t['feedback_requests']:,} batched /feedback requests ({t['labels_per_s']}/s)")
    add("retrains", f">= {MIN_RETRAINS} succeeded, triggered by drift", r["jobs"]["succeeded_drift_triggered"] >= MIN_RETRAINS,
        f"{t['retrain_succeeded']} succeeded of {t['retrain_jobs']} ({r['jobs']['succeeded_drift_triggered']} triggered by drift, "
        f"{t['retrain_promoted']} promoted)")
    add("memory", f"growth <= +{MEMORY_GROWTH_MAX_PCT:g} % per actor", mem["ok"],
        "; ".join(f"{k} {v['level_mib']} -> {v['end_mib']} MiB ({_signed_pct(v['growth_pct'])})"
                  for k, v in mem["actors"].items()) or "no samples")
    add("files", f"every scheduled maintenance pass's compaction, and the final pass, leave <= {FILES_AFTER_MAINTAIN_MAX} files per table",
        fl["ok"], "; ".join(f"{k}: {v['passes']} passes found up to {v['max_before_a_pass']} files, their compaction left at most "
                            f"{v['max_after_a_pass']} ({v.get('max_when_a_pass_ended')} when a pass ended, with the appends meanwhile); final {(v.get('after_maintain') or {}).get('active')} active / "
                            f"{(v.get('after_maintain') or {}).get('stored')} stored" + (f" ({v['error']})" if v.get("error") else "")
                            for k, v in fl["tables"].items()))
    add("latency", f"end/start <= {LATENCY_RATIO_MAX:g}x (p50 and p99, /predict and /feedback)", lat["ok"],
        "; ".join(f"{ep} {q} {lat['start'][ep][f'{q}_ms']} -> {lat['end'][ep][f'{q}_ms']} ms "
                  f"({lat[f'{ep}_{q}_ratio_end_over_start']}x)" for ep in ("predict", "feedback") for q in ("p50", "p99")))
    lr, bd, db = rd["labelled_rows"], rd.get("build") or {}, rd["data_build"]
    b0, b1 = bd.get("start") or {}, bd.get("end") or {}
    add("reads", f"end/start <= {READ_RATIO_MAX:g}x at equal new data ({READ_ROWS:,} labels past a watermark: the labelled "
        "rows read, and a retraining job's whole data build)", rd["ok"],
        f"labelled rows {lr['start']['seconds']} s ({lr['start']['rows']} rows) -> {lr['end']['seconds']} s ({lr['end']['rows']} rows) "
        f"= {lr['seconds_ratio_end_over_start']}x; data build {b0.get('seconds')} s (table {b0.get('table_rows')} rows) -> "
        f"{b1.get('seconds')} s (table {b1.get('table_rows')} rows) = {bd.get('seconds_ratio_end_over_start')}x; the jobs' own "
        "data_build_s (each on its own new labels): "
        + (", ".join(f"{r['data_build_s']} s for {r.get('labelled_rows')} rows" for r in db["runs"]) if db["jobs"] else "none"))
    return out
