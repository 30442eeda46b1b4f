"""Footprint: `driftloop --help` time, package import time, cold start and resident memory of a Predictor
replica and of the DriftMonitor (Serve deploy until RUNNING; RSS of the replica processes)."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path


def run() -> dict:
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

    setup_home("footprint")
    spec, s, out = train_champion(epochs=3)
    from driftloop.serving.app import DriftMonitor, Predictor

    d = spec.model_dump(mode="json")
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    t = time.perf_counter()
    serve.run(Predictor.options(num_replicas=1).bind(DriftMonitor.bind(d), d, True, 256), name="fp", route_prefix="/fp")
    app_ready = time.perf_counter() - t
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
            "note": "app cold start = serve.run until both deployments are RUNNING (replicas start in parallel); "
                    "it includes downloading the model from the registry and loading the detectors"}
