"""Footprint: `driftloop --help` time, package import time, cold start and resident memory of a Predictor
replica and of the DriftMonitor (Serve deploy until RUNNING; RSS of the replica processes)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path


def run() -> dict:
    import httpx
    import psutil
    import ray
    from ray import serve

    from bench.common import free_port, setup_home, train_champion

    exe = str(Path(sys.executable).with_name("driftloop"))
    helps = []
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run([exe, "--help"], capture_output=True, check=True)
        helps.append(time.perf_counter() - t)
    imp = subprocess.run([sys.executable, "-X", "importtime", "-c", "import driftloop.cli"], capture_output=True, text=True)
    cli_import_us = int(imp.stderr.strip().splitlines()[-1].split("|")[1])
    bare = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare.append(time.perf_counter() - t)

    drift_import = _drift_library_import()

    setup_home("footprint")
    spec, s, out = train_champion(epochs=3)
    from driftloop.serving.app import DriftMonitor, Predictor

    d = spec.model_dump(mode="json")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t = time.perf_counter()
    serve.run(Predictor.options(num_replicas=1).bind(DriftMonitor.bind(d), d, True, 256), name="fp", route_prefix="/fp")
    app_ready = time.perf_counter() - t
    # a replica's cold start, the way Serve pays it when one crashes: kill one Predictor replica (no traffic) and
    # time until its replacement answers /healthz (worker process start, imports, registry lookup, model load)
    base = f"http://127.0.0.1:{port}/fp"
    first = httpx.get(f"{base}/healthz", timeout=30).json()["replica"]
    t = time.perf_counter()
    _kill_replica("fp", "Predictor")
    h = _wait_json(f"{base}/healthz", lambda h: h["replica"] != first)
    replica_ready, replica_init = time.perf_counter() - t, h["init_s"]
    # the monitor likewise, until /drift shows a new monitor (detectors loaded, durable state restored)
    started = httpx.get(f"{base}/drift", timeout=30).json()["state"]["replica_started_at"]
    t = time.perf_counter()
    _kill_replica("fp", "DriftMonitor")
    st = _wait_json(f"{base}/drift", lambda d: d["state"]["replica_started_at"] != started)
    monitor_ready, monitor_init = time.perf_counter() - t, st["state"]["init_s"]
    rss = {}
    for a in ray.util.state.list_actors(filters=[("state", "=", "ALIVE")], detail=True):
        for name in ("Predictor", "DriftMonitor"):
            if name in (a.class_name or "") or name in (a.get("repr_name") or "" if hasattr(a, "get") else ""):
                try:
                    rss[name] = round(psutil.Process(a.pid).memory_info().rss / 2**20, 1)
                except Exception:
                    pass
    serve.shutdown()
    return {"help_s_median": statistics.median(helps), "python_startup_s": statistics.median(bare),
            "cli_import_s": cli_import_us / 1e6, "app_cold_start_s": app_ready, "rss_mib": rss,
            "replica_cold_start_s": replica_ready, "replica_init_s": replica_init,
            "monitor_cold_start_s": monitor_ready, "monitor_init_s": monitor_init,
            "monitor_init_stages_s": st["state"].get("init_stages_s"), "drift_library_import": drift_import,
            "note": "app cold start = serve.run until both deployments are RUNNING (replicas start in parallel), including "
                    "downloading the model from the registry and loading the detectors. Replica cold start = a replica "
                    "killed (ray.kill, no traffic) until its replacement answers over HTTP: Serve notices the death at the "
                    "replica's next health check (every 2 s), then starts a worker process, imports torch/Ray/MLflow and "
                    "runs the constructor."}


IMPORT_PROBE = """
import json, sys, time
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024
import ray, mlflow
from ray import serve
before, had = rss(), set(sys.modules)
t = time.perf_counter()
if sys.argv[1] == "driftloop":
    from driftloop.drift.deferred import import_alibi_detect
    import_alibi_detect(need_torch=False)
else:
    from alibi_detect.saving import load_detector
took, after = time.perf_counter() - t, rss()
new = {}
for m in set(sys.modules) - had:
    new[m.split(".")[0]] = new.get(m.split(".")[0], 0) + 1
print(json.dumps({"seconds": took, "rss_before_mib": before, "rss_after_mib": after, "new_modules_by_package": new}))
"""


def _drift_library_import() -> dict:
    """What importing alibi-detect adds, in a fresh process that has already imported what the monitor imports
    before it (Ray, Serve, MLflow): seconds, resident MiB, and the packages it pulls in (its `cd` package imports
    every detector, and with them numba/llvmlite and scikit-learn). As driftloop's monitor imports it
    (transformers deferred, torch hidden: drift/deferred.py) and plain (torch, transformers), beside it. Median of
    3 processes each."""
    import json

    out = {}
    for how in ("driftloop", "plain"):
        runs = sorted((json.loads(subprocess.run([sys.executable, "-c", IMPORT_PROBE, how], capture_output=True, text=True,
                                                 check=True).stdout.strip().splitlines()[-1]) for _ in range(3)),
                      key=lambda r: r["seconds"])
        mid = runs[1]
        top = sorted(mid["new_modules_by_package"].items(), key=lambda kv: -kv[1])[:8]
        out[how] = {"seconds": round(mid["seconds"], 2), "rss_added_mib": round(mid["rss_after_mib"] - mid["rss_before_mib"], 1),
                    "rss_before_mib": round(mid["rss_before_mib"], 1), "packages": dict(top)}
    return out["driftloop"] | {"plain": out["plain"]}


def _kill_replica(app: str, deployment: str) -> None:
    import ray
    from ray.util.state import list_actors

    prefix = f"SERVE_REPLICA::{app}#{deployment}#"
    name = next(a.name for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000) if (a.name or "").startswith(prefix))
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)


def _wait_json(url: str, ok, timeout_s: float = 120) -> dict:
    """GET `url` every 50 ms until it answers 200 with a body for which `ok(body)` holds."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=30)
            if r.status_code == 200 and ok(body := r.json()):
                return body
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come back within {timeout_s} s")
