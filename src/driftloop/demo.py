"""`driftloop demo`: the whole loop on the embedded default, with a summary and a drift timeline plot.

Traffic design (so that before/after accuracies are honest): the 497 held-out digits are split in two.
The *traffic* part produces labelled production rows (they may end up in the retraining data); the
*evaluation* part is replayed, identically corrupted, once before and once after the swap and is never
labelled, so the two accuracies are on the same unseen rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from driftloop.data import examples

CORRUPTION = ("noise", 3)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OUT = None  # where driftloop's own lines go (`driftloop demo` sends everything else to demo-out/demo.log)


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=OUT or sys.stdout, flush=True)


@contextlib.contextmanager
def libraries_to(log: Path):
    """Point file descriptors 1 and 2 (Python's and native libraries' output alike) at LOG for the duration; yield
    a stream on the real standard output for the command's own lines. Restored before any error is printed."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    own = os.fdopen(os.dup(1), "w", buffering=1)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    failed = True
    try:
        yield own
        failed = False
    finally:
        own.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        for target, fd in zip((1, 2), saved):
            os.dup2(fd, target)
            os.close(fd)
        if failed:
            print(f"the libraries' output (Ray, Tune, Serve, MLflow) is in {log}", file=sys.stderr, flush=True)


def summary_text(summary: dict[str, Any]) -> str:
    """The demo's summary for people: one `name  value` line each, the loop's moments as clock times."""
    lines = []
    for k, v in summary.items():
        if k == "events_at" and isinstance(v, dict):
            start = v.get("onset")

            def at(name: str, t: float | None) -> str:
                if t is None:
                    return f"{name} -"
                since = f" (+{t - start:.1f} s)" if start is not None and name != "onset" else ""
                return f"{name} {time.strftime('%H:%M:%S', time.localtime(t))}{since}"

            k, v = "events (local time)", " · ".join(at(name, t) for name, t in v.items())
        lines.append(f"{k:<28} {v}")
    return "\n".join(lines)


def check_options(quick: bool, as_shipped: bool) -> None:
    if quick and as_shipped:
        from driftloop.config import SpecError

        raise SpecError("--quick and --as-shipped contradict each other: --as-shipped runs configs/digits.yaml unchanged")


def run_demo(out: Path, quick: bool = False, quiet: bool = False, timeout_s: float = 480, as_shipped: bool = False) -> dict[str, Any]:
    """The loop on its own local Ray. By default with the demo's overrides (below); AS_SHIPPED runs
    configs/digits.yaml unchanged and paces every drifted row at the labelled traffic's rate (60 rows/s)."""
    check_options(quick, as_shipped)
    from driftloop.config import load_spec, parse_spec
    from driftloop.settings import get_settings

    base = get_settings()
    home = base.home / "demo"
    shutil.rmtree(home, ignore_errors=True)
    os.environ["DRIFTLOOP_HOME"] = str(home)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("DRIFTLOOP_POLL_S", "1.0")
    s = get_settings().ensure()
    root = Path(__file__).resolve().parents[2]  # the project root, when run from elsewhere
    spec_path = Path("configs/digits.yaml") if Path("configs/digits.yaml").is_file() else root / "configs/digits.yaml"
    spec = load_spec(spec_path)
    d = spec.model_dump(mode="json")
    if quick:
        d["sweep"]["trials"], d["training"]["epochs"] = 2, 8
    if not as_shipped:  # the demo's overrides: a longer label minimum, a shorter cooldown
        d["retraining"]["min_labelled_rows"] = 600
        d["retraining"]["cooldown_s"] = 60
    spec = parse_spec(d, "demo spec")
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(d, indent=2))  # the spec this run used, beside its results

    import ray
    from ray import serve

    from driftloop import registry
    from driftloop.cluster import ensure_ray
    from driftloop.data.ingest import ingest
    from driftloop.sweep import run_sweep

    t_start = time.monotonic()
    try:
        _say(quiet, f"starting local Ray (dashboard on 127.0.0.1), home {home}")
        ensure_ray(s, join_running=False)  # its own cluster: it deploys and tears down Serve apps
        v0 = ingest("digits", s.table_uri(spec.dataset.table), spec.dataset)
        _say(quiet, f"ingested digits: table version {v0}")
        _say(quiet, f"sweep: {spec.sweep.trials} trials x {spec.training.workers} workers (Ray Tune + Ray Train)")
        sw = run_sweep(spec, s, verbose=0)
        champion_before = registry.champion_version(s, spec.name)
        _say(quiet, f"sweep done in {sw.seconds:.0f}s: version {sw.version} champion (test accuracy {sw.best_metrics.get('test_accuracy', 0):.3f})")

        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        from driftloop.serving.app import DriftMonitor, Predictor
        from driftloop.ids import ensure_shared_secret

        ensure_shared_secret(s.state_root, spec.name)  # under an s3:// data root: the key every replica reads

        serve.run(Predictor.bind(DriftMonitor.bind(d), d, True, 256), name=spec.name, route_prefix=f"/{spec.name}")
        url = f"http://127.0.0.1:{port}"
        _say(quiet, f"serving {url}/{spec.name}/predict (2 replicas + drift monitor)")
        summary = asyncio.run(_traffic(url, spec, quiet, timeout_s, pace=PACE if as_shipped else 0))
        summary["champion_before"] = champion_before
        summary["champion_after"] = registry.champion_version(s, spec.name)
        summary["sweep_seconds"] = round(sw.seconds, 1)
        summary["total_seconds"] = round(time.monotonic() - t_start, 1)
        png = _plot(summary, out / "drift_timeline.png")
        summary["timeline_png"] = str(png)
        _log_to_mlflow(s, spec, summary, png)
        keys = ["detection_delay_rows", "accuracy_drifted_before", "accuracy_drifted_after", "seconds_onset_to_swap",
                "retrain_job_id", "champion_before", "champion_after", "windows_after_swap", "windows_after_swap_flagged"]
        result = {k: summary[k] for k in keys} | {k: summary[k] for k in ("accuracy_clean", "failed_requests", "timeline_png", "total_seconds")}
        # when each step of the loop happened (Unix seconds): onset, first drifted window, job submitted, swap
        result["events_at"] = {k: (round(summary["_t0"] + v, 3) if v is not None else None) for k, v in summary["_marks"].items()}
        (out / "summary.json").write_text(json.dumps(result, indent=2))
        return result
    finally:
        _say(quiet, "stopping Serve and Ray")
        try:
            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()


PACE = 60  # rows per second of the labelled drifted traffic (and, --as-shipped, of every drifted row)


async def _traffic(url: str, spec, quiet: bool, timeout_s: float, pace: float = 0) -> dict[str, Any]:
    import httpx

    from driftloop.replay import replay_async

    ex = examples.builtin("digits")
    pool = ex.pool
    cut = int(len(pool) * 0.6)
    traffic_pool, eval_pool = pool.iloc[:cut].reset_index(drop=True), pool.iloc[cut:].reset_index(drop=True)
    feats, label = examples.DIGITS_FEATURES, "digit"
    window = spec.drift.window
    kind, sev = CORRUPTION
    rows_seen = 0
    timeline: list[dict] = []

    async def drift_state() -> dict:
        async with httpx.AsyncClient(timeout=30) as c:
            return (await c.get(f"{url}/{spec.name}/drift")).json()

    t_traffic = time.time()
    points: list[tuple[float, int]] = []  # (seconds since traffic start, correct) for the rolling accuracy

    def track(df):
        y = df[label].to_numpy()
        return lambda i, data: points.append((time.time() - t_traffic, int(data["predictions"][0]["prediction"] == y[i])))

    # 1. clean traffic: two full windows. It is not labelled, so that the labelled production rows the
    #    retraining job adds to the data are the drifted ones (labels for clean rows would only dilute them).
    clean = examples.digits_stream(traffic_pool, 2 * window, onset=None, seed=1)
    r_clean = await replay_async(url, spec.name, clean, feats, label, rps=0, labels=False, concurrency=16, on_response=track(clean))
    rows_seen += r_clean.sent
    _say(quiet, f"clean traffic: {r_clean.ok}/{r_clean.sent} ok, accuracy {r_clean.accuracy:.3f}")
    await asyncio.sleep(1.5)
    st = await drift_state()
    onset_row = st["samples"]
    t_onset = time.monotonic()
    onset_at = time.time() - t_traffic
    _say(quiet, f"drift onset at row {onset_row}: {kind} severity {sev} from now on")

    # 2. drifted evaluation rows (unlabelled) with the old champion
    eval_stream = examples.digits_stream(eval_pool, window, onset=0, kind=kind, severity=sev, seed=99)
    r_before = await replay_async(url, spec.name, eval_stream, feats, label, rps=pace, labels=False, concurrency=16,
                                  on_response=track(eval_stream))
    _say(quiet, f"drifted traffic on the champion: accuracy {r_before.accuracy:.3f}")

    # 3. drifted labelled traffic until the new champion answers
    old_version = st["model_version"]
    job_id, detection_row, t_swap, failed = None, None, None, r_clean.failed + r_before.failed
    swap_at = detected_at = job_at = None
    seed = 200
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        chunk = examples.digits_stream(traffic_pool, 100, onset=0, kind=kind, severity=sev, seed=seed)
        seed += 1
        r = await replay_async(url, spec.name, chunk, feats, label, rps=PACE, labels=True, concurrency=8, on_response=track(chunk))
        failed += r.failed
        st = await drift_state()
        for ev in st["recent"]:
            timeline.append(ev)
        if detection_row is None:
            hit = [e for e in st["recent"] if e["is_drift"]]
            if hit:
                detection_row = st["samples"] - st["window"]["fill"] - onset_row
                detected_at = min(e["ended_at"] for e in hit) - t_traffic
                _say(quiet, f"drift detected {detection_row} rows after onset; policy: {st['policy']['pending'] or 'fired'}")
        job = (st.get("retraining") or {}).get("current")
        if job and job_id != job["submission_id"]:
            job_id = job["submission_id"]
            job_at = job["submitted_at"] - t_traffic
            _say(quiet, f"retraining job {job_id} ({job['status']}): {job['reason']}")
        if r.versions and max(r.versions) != old_version:
            t_swap = time.monotonic()
            swap_at = time.time() - t_traffic
            _say(quiet, f"new champion answering: versions seen {r.versions}")
            break
        if job and job.get("final") and job["status"] != "SUCCEEDED":
            _say(quiet, f"retraining job ended {job['status']}")
            break
    await asyncio.sleep(0.5)
    # 4. the same drifted evaluation rows on the new champion
    r_after = await replay_async(url, spec.name, eval_stream, feats, label, rps=0, labels=False, concurrency=16,
                                 on_response=track(eval_stream))
    failed += r_after.failed
    _say(quiet, f"drifted traffic on the new champion: accuracy {r_after.accuracy:.3f}")
    # 5. the loop converges: two more windows of the same regime, which the new champion's detectors (fitted on
    #    that regime's newest served rows) should not flag, so the policy does not retrain again
    more = examples.digits_stream(traffic_pool, 2 * window, onset=0, kind=kind, severity=sev, seed=500)
    r_more = await replay_async(url, spec.name, more, feats, label, rps=0, labels=False, concurrency=16, on_response=track(more))
    failed += r_more.failed
    await asyncio.sleep(1.5)
    st = await drift_state()
    new_version = st["model_version"]
    after = [e for e in st["recent"] if e["model_version"] == new_version and new_version != old_version]
    flagged_after = sum(e["is_drift"] for e in after)
    _say(quiet, f"after the swap: {flagged_after} of {len(after)} windows of the same drifted regime flagged on v{new_version}")
    seen = {e["event_id"]: e for e in timeline + st["recent"]}
    return {
        "detection_delay_rows": detection_row,
        "accuracy_clean": round(r_clean.accuracy, 4),
        "accuracy_drifted_before": round(r_before.accuracy, 4),
        "accuracy_drifted_after": round(r_after.accuracy, 4),
        "seconds_onset_to_swap": round(t_swap - t_onset, 1) if t_swap else None,
        "retrain_job_id": job_id,
        "windows_after_swap": len(after), "windows_after_swap_flagged": flagged_after,
        "failed_requests": failed,
        "_events": sorted(seen.values(), key=lambda e: e["ended_at"]),
        "_onset_row": onset_row,
        "_t0": t_traffic, "_points": points,
        "_marks": {"onset": onset_at, "detected": detected_at, "job submitted": job_at, "new champion": swap_at},
        "_job": (st.get("retraining") or {}).get("current"),
    }


def _plot(summary: dict[str, Any], path: Path) -> Path:
    """Detector statistic (-log10 p) per window against its threshold, rolling accuracy, and the loop's events."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0, events = summary["_t0"], summary["_events"]
    fig, ax = plt.subplots(figsize=(10, 5))
    series: dict[str, list] = {}
    for e in events:
        for d in e["detectors"]:
            if d.get("p_val") is None:
                continue
            stat = min(-np.log10(max(d["p_val"], 1e-300)), 60.0)
            thr = -np.log10(d["threshold"]) if d.get("threshold") else None
            series.setdefault(d["name"], []).append((e["ended_at"] - t0, stat, thr, e["model_version"]))
    for name, pts in series.items():
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name}: -log10 p (capped at 60)")
        if pts[0][2] is not None:
            ax.axhline(pts[0][2], color=line.get_color(), linestyle=":", linewidth=1, label=f"{name} threshold")
    colours = {"onset": "red", "detected": "orange", "job submitted": "purple", "new champion": "green"}
    for mark, at in summary["_marks"].items():
        if at is not None:
            ax.axvline(at, color=colours[mark], linestyle="--", label=mark)
    ax.set_xlabel("seconds since traffic started")
    ax.set_ylabel("drift statistic (-log10 p-value)")
    ax2 = ax.twinx()
    pts = sorted(summary["_points"])
    if pts:
        xs = np.array([p[0] for p in pts])
        c = np.cumsum(np.array([p[1] for p in pts], float))
        n = np.minimum(np.arange(1, len(c) + 1), 100)
        ys = (c - np.concatenate([np.zeros(100), c[:-100]])[: len(c)]) / n  # trailing mean of the last 100 rows
        ax2.plot(xs, ys, color="black", alpha=0.5, linewidth=1, label="rolling accuracy (100 rows)")
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("rolling accuracy")
    ax.set_title(f"driftloop demo: drifted accuracy {summary['accuracy_drifted_before']:.2f} -> "
                 f"{summary['accuracy_drifted_after']:.2f}, onset to swap {summary['seconds_onset_to_swap']} s")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="center left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _log_to_mlflow(s, spec, summary: dict[str, Any], png: Path) -> None:
    from driftloop import registry

    c = registry.client(s)
    run = c.create_run(registry.experiment_id(s, spec.name), run_name="demo", tags={"driftloop.kind": "demo"})
    for k in ("detection_delay_rows", "accuracy_drifted_before", "accuracy_drifted_after", "seconds_onset_to_swap"):
        if summary.get(k) is not None:
            c.log_metric(run.info.run_id, k, float(summary[k]))
    c.log_artifact(run.info.run_id, str(png))
    c.set_terminated(run.info.run_id, "FINISHED")
