"""Serving cost of drift monitoring: (a) driftloop with the monitor, (b) the same app with monitoring off,
(c) plain FastAPI + uvicorn serving the same torch model, (d) the model's forward pass in-process, batched,
(e) (a) through Serve's direct ingress, (f) and (g) (a) and (b) through Serve's HAProxy ingress.
Load: wrk (`make bench` installs Debian's where it can), else an async httpx client in this process; pinned
concurrency and duration per cell."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

from bench.common import free_port

DURATION_S = 8.0  # per target and cell, in ROUNDS interleaved slices
ROUNDS = 4
CONNECTIONS = (1, 16, 64)
BATCHES = (1, 32)


async def _load(url: str | list[str], body: bytes, conns: int, duration: float) -> dict:
    """`conns` keep-alive connections posting `body` back to back; with several URLs (one per replica, for direct
    ingress) the connections are spread over them round-robin, as a load balancer in front would."""
    import httpx

    urls = [url] if isinstance(url, str) else url
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration

    async def worker(client, url):
        nonlocal errors
        while time.perf_counter() < stop:
            t = time.perf_counter()
            try:
                r = await client.post(url, content=body, headers={"content-type": "application/json"})
                if r.status_code != 200:
                    errors += 1
            except Exception:
                errors += 1
            lat.append(time.perf_counter() - t)

    limits = httpx.Limits(max_connections=conns, max_keepalive_connections=conns)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client, urls[i % len(urls)]) for i in range(conns)))
        el = time.perf_counter() - t0
    a = np.asarray(lat) * 1000
    return {"rps": len(lat) / el, "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "errors": errors,
            "requests": len(lat), "elapsed_s": el, "lat_ms": a}


# As the shipped Serve configs (serve_configs/*.yaml: logging_config.enable_access_log false, which Serve applies to
# every application of the file); serve.run's applications would otherwise log every request, as plain FastAPI does not.
QUIET = {"enable_access_log": False}
LOADGEN = "wrk" if shutil.which("wrk") else "httpx"  # make bench installs wrk (Debian) where it can; httpx otherwise


def _run_load(url: str | list[str], body: bytes, conns: int, duration: float) -> dict:
    return _load_wrk(url, body, conns, duration) if LOADGEN == "wrk" else asyncio.run(_load(url, body, conns, duration))


def _load_wrk(url: str | list[str], body: bytes, conns: int, duration: float) -> dict:
    """The same load from wrk (C, one thread per process; its CPU per request is a fraction of a Python client's,
    on the same 2 cores as the servers). Several URLs: one wrk per URL, the connections split over them. Latency
    percentiles from each process's 100 quantiles, weighted by its requests."""
    import json
    import tempfile

    urls = [url] if isinstance(url, str) else url
    shares = [n for n in (conns // len(urls) + (1 if i < conns % len(urls) else 0) for i in range(len(urls))) if n]
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        f.write(body)
        f.flush()
        env = os.environ | {"WRK_BODY": f.name}
        procs = [subprocess.Popen(["wrk", "-t1", f"-c{n}", f"-d{max(1, round(duration))}s", "--timeout", "30s", "-s",
                                   str(Path(__file__).with_name("wrk_post.lua")), u], stdout=subprocess.PIPE, text=True, env=env)
                 for u, n in zip(urls, shares)]
        outs = [json.loads(next(line for line in p.communicate()[0].splitlines() if line.startswith("WRK "))[4:]) for p in procs]
    requests = sum(o["requests"] for o in outs)
    el = max(o["duration_us"] for o in outs) / 1e6
    lat = np.concatenate([np.repeat(np.asarray(o["quantiles_us"], dtype=float) / 1000, max(1, round(o["requests"] / 100))) for o in outs])
    return {"rps": requests / el, "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "errors": sum(o["status_errors"] + o["socket_errors"] for o in outs), "requests": requests, "elapsed_s": el, "lat_ms": lat}


def _cell(targets: dict[str, str | list[str]], body: bytes, conns: int, names: dict[int, str]) -> dict[str, dict]:
    """Every target of one cell (batch size, connections), each for DURATION_S in ROUNDS slices taken in turn
    (a, b, c, a, b, c, ...), so a change in the host's pace during the cell falls on every target alike; with the
    CPU every process on this machine spent meanwhile, in CPU milliseconds per answered request, the busiest
    first: where a ratio's cause is on 2 shared cores."""
    from bench.common import cpu_by_process

    got: dict[str, dict] = {k: {"requests": 0, "errors": 0, "elapsed_s": 0.0, "lat": [], "cpu": {}} for k in targets}
    for name, url in targets.items():
        _settle(names)
        _run_load(url, body, conns, 1.5)  # warm-up
    for _ in range(ROUNDS):
        for name, url in targets.items():
            _settle(names)  # rows a monitor is still testing from the slice before would bill this one
            before, kids = cpu_by_process(names), _children_cpu()
            r = _run_load(url, body, conns, DURATION_S / ROUNDS)
            after, g = cpu_by_process(names), got[name]
            if LOADGEN == "wrk":  # wrk starts and ends between the snapshots: its CPU is this process's reaped children's
                before["wrk (load generator)"], after["wrk (load generator)"] = 0.0, _children_cpu() - kids
            for k in after:
                g["cpu"][k] = g["cpu"].get(k, 0.0) + after[k] - before.get(k, 0.0)
            g["requests"] += r["requests"]
            g["errors"] += r["errors"]
            g["elapsed_s"] += r["elapsed_s"]
            g["lat"].append(r["lat_ms"])
    out = {}
    for name, g in got.items():
        lat, n = np.concatenate(g["lat"]), max(g["requests"], 1)
        per = sorted(((k, 1000 * v / n) for k, v in g["cpu"].items() if v > 0), key=lambda kv: -kv[1])
        out[name] = {"rps": g["requests"] / g["elapsed_s"], "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
                     "errors": g["errors"], "requests": g["requests"], "cpu_ms_per_request": {k: round(v, 2) for k, v in per if v >= 0.05},
                     "cores_busy": round(sum(v for v in g["cpu"].values() if v > 0) / g["elapsed_s"], 2)}
    return out


def _children_cpu() -> float:
    t = os.times()
    return t.children_user + t.children_system


def _settle(names: dict[int, str], most_s: float = 30.0) -> None:
    """Wait until the drift monitors are idle (under 5 % of a core over half a second), at most MOST_S."""
    from bench.common import cpu_by_process

    def busy() -> float:
        return sum(v for k, v in cpu_by_process(names).items() if "DriftMonitor" in k)

    deadline, last = time.monotonic() + most_s, busy()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = busy()
        if now - last < 0.025:
            return
        last = now


def _process_names(plain_pid: int) -> dict[int, str]:
    """pid -> what it is: Serve replicas as app:deployment, other actors by class, the FastAPI baseline, this process."""
    from ray.util.state import list_actors

    names = {plain_pid: "plain FastAPI", os.getpid(): "bench (this process)" if LOADGEN == "wrk" else "load generator (bench)"}
    for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10_000, raise_on_missing_output=False):
        if a.pid and (a.name or "").startswith("SERVE_REPLICA::"):
            names[a.pid] = ":".join(a.name.split("::", 1)[1].split("#")[:2])
        elif a.pid:
            names[a.pid] = a.class_name
    return names


def _bodies(features, pool):
    import json

    rows = [{f: float(v) for f, v in zip(features, r)} for r in pool[features].to_numpy()[:32]]
    return {1: json.dumps({"row": rows[0]}).encode(), 32: json.dumps({"rows": rows}).encode()}


PLAIN_APP = textwrap.dedent('''
    import sys, json, numpy as np, torch, mlflow.pytorch
    from fastapi import FastAPI, Request
    import uvicorn
    model = mlflow.pytorch.load_model(sys.argv[1]); torch.set_num_threads(1)
    features = json.loads(sys.argv[3])
    app = FastAPI()
    @app.post("/predict")
    async def predict(request: Request):
        body = await request.json()
        rows = [body["row"]] if "row" in body else body["rows"]
        x = torch.tensor([[float(r[f]) for f in features] for r in rows], dtype=torch.float32)
        with torch.no_grad():
            p = model(x).numpy()
        return {"predictions": [{"prediction": int(i), "probabilities": q.round(6).tolist()} for i, q in zip(p.argmax(1), p)]}
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[2]), log_level="warning", access_log=False)
''')


def run() -> dict:
    import httpx
    from ray import serve

    from bench.common import setup_home, train_champion
    from driftloop import registry
    from driftloop.data import examples
    from driftloop.serving.app import DriftMonitor, Predictor

    setup_home("serving")
    # Ray Serve's direct ingress (a Ray 2.60 feature flag, read when Serve starts): each ingress replica also
    # listens on its own 127.0.0.1 port, beside the proxy on the usual one. The short drain keeps shutdown quick.
    os.environ.update({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"})
    spec, s, out = train_champion(epochs=6)
    d = spec.model_dump(mode="json")
    d["retraining"]["min_labelled_rows"] = 10**9  # no retraining during the benchmark
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=QUIET)
    serve.run(Predictor.bind(DriftMonitor.bind(d), d, True, 256), name="mon", route_prefix="/mon", logging_config=QUIET)
    serve.run(Predictor.bind(DriftMonitor.bind(d), d, False, 256), name="off", route_prefix="/off", logging_config=QUIET)
    path = registry.download(s, spec.name, out["version"])
    plain_port = free_port()
    import json

    plain = subprocess.Popen([sys.executable, "-c", PLAIN_APP, str(path), str(plain_port), json.dumps(spec.dataset.features)])
    base = f"http://127.0.0.1:{port}"
    targets = {"a_monitored": f"{base}/mon/predict", "b_monitoring_off": f"{base}/off/predict",
               "c_plain_fastapi": f"http://127.0.0.1:{plain_port}/predict",
               "e_monitored_direct": [f"{u}/mon/predict" for u in direct_ingress_urls("mon")]}
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.post(targets["c_plain_fastapi"], content=_bodies(spec.dataset.features, examples.builtin("digits").pool)[1]).status_code == 200:
                break
        except Exception:
            time.sleep(1)
    bodies = _bodies(spec.dataset.features, examples.builtin("digits").pool)
    names = _process_names(plain.pid)
    rows = []
    try:
        for batch in BATCHES:
            for conns in CONNECTIONS:
                cell = {"batch": batch, "connections": conns} | _cell(targets, bodies[batch], conns, names)
                cell["d_in_process"] = _in_process(registry.load_model(path), spec, batch)
                rows.append(cell)
                print(f"serving batch={batch} conns={conns}: " + ", ".join(
                    f"{k}={v['rps']:.0f}/s" for k, v in cell.items() if isinstance(v, dict)), flush=True)
        serve.shutdown()
        try:
            listening, haproxy_error = _haproxy_cells(s, d, port, rows, bodies, targets["c_plain_fastapi"], plain.pid), None
        except Exception as err:  # the cells measured so far stand; the table says what failed
            listening, haproxy_error = [], f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    finally:
        plain.terminate()
        serve.shutdown()
    return {"duration_s": DURATION_S, "cells": rows, "haproxy_listening": listening, "haproxy_error": haproxy_error,
            "settings": "2 Predictor replicas (0.1 CPU), @serve.batch(max_batch_size=256, batch_wait_timeout_s=0.002), "
                        "access log off, rows handed to the monitor every 0.2 s, inference log committed every 2 s; load from "
                        + ("wrk (one thread per process)" if LOADGEN == "wrk" else "a Python httpx client in the bench process")
                        + "; each cell's targets "
                        f"measured in {ROUNDS} interleaved slices, after the drift monitors went idle; "
                        "(a) and (b) through Serve's proxy (the default), (e) is (a) through direct ingress "
                        "(RAY_SERVE_ENABLE_DIRECT_INGRESS=1: the client spreads its connections over the replicas' own ports); "
                        "(f) and (g) are (a) and (b) through Serve's HAProxy ingress (`driftloop serve --ingress haproxy`: "
                        "RAY_SERVE_ENABLE_HA_PROXY=1 with driftloop-haproxy), on a second local cluster started after the "
                        "first one stopped, with (c) measured again beside them as (c2)"}


def _haproxy_cells(s, d: dict, port: int, rows: list[dict], bodies: dict, plain_url: str, plain_pid: int) -> list[str]:
    """The same applications on a fresh local cluster whose Serve ingress is HAProxy; returns what HAProxy listens on."""
    import httpx
    import ray
    from ray import serve

    from driftloop.cluster import ensure_ray
    from driftloop.serving.app import DriftMonitor, Predictor
    from driftloop.serving.haproxy import haproxy_env

    ray.shutdown()
    since = time.time()
    for k in ("RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"):
        os.environ.pop(k, None)
    os.environ.update(haproxy_env())
    try:
        ensure_ray(s, join_running=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=QUIET)
        serve.run(Predictor.bind(DriftMonitor.bind(d), d, True, 256), name="mon", route_prefix="/mon", logging_config=QUIET)
        serve.run(Predictor.bind(DriftMonitor.bind(d), d, False, 256), name="off", route_prefix="/off", logging_config=QUIET)
        base = f"http://127.0.0.1:{port}"
        targets = {"f_monitored_haproxy": f"{base}/mon/predict", "g_monitoring_off_haproxy": f"{base}/off/predict",
                   "c2_plain_fastapi": plain_url}
        deadline = time.time() + 120  # HAProxy learns the routes from the controller a moment after serve.run
        while True:
            try:
                if all(httpx.post(u, content=bodies[1], timeout=10).status_code == 200 for u in list(targets.values())[:2]):
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("the applications did not answer 200 through HAProxy within 120 s")
            time.sleep(1)
        listening = _listening("haproxy", since)
        names = _process_names(plain_pid)
        for cell in rows:
            cell |= _cell(targets, bodies[cell["batch"]], cell["connections"], names)
            print(f"serving via HAProxy batch={cell['batch']} conns={cell['connections']}: " + ", ".join(
                f"{k}={cell[k]['rps']:.0f}/s" for k in targets), flush=True)
        return listening
    finally:
        serve.shutdown()
        for k in haproxy_env():
            os.environ.pop(k, None)


def _listening(process_name: str, since: float) -> list[str]:
    """Every address:port that a process of this name started since SINCE listens on (TCP)."""
    import psutil

    found: set[str] = set()
    for p in psutil.process_iter(["name", "create_time"]):
        if p.info["name"] == process_name and p.info["create_time"] >= since:
            try:
                found |= {f"{c.laddr.ip}:{c.laddr.port}" for c in p.net_connections("tcp") if c.status == psutil.CONN_LISTEN}
            except psutil.Error:
                pass
    return sorted(found)


def direct_ingress_urls(app: str) -> list[str]:
    """The HTTP addresses of an application's ingress replicas, from the Serve controller's target groups.
    The replicas bind to Serve's http host, 127.0.0.1 here (the targets name the node's IP)."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    groups = ray.get(controller.get_target_groups.remote(app))
    urls = [f"http://127.0.0.1:{t.port}" for g in groups if g.app_name == app and str(g.protocol).upper().endswith("HTTP")
            for t in g.targets]
    if not urls:
        raise RuntimeError(f"no direct-ingress targets for app {app!r}: {groups}")
    return urls


def _in_process(model, spec, batch: int) -> dict:
    import torch

    x = torch.zeros((batch, spec.n_features))
    lat: list[float] = []
    t0 = time.perf_counter()
    with torch.no_grad():
        while time.perf_counter() - t0 < 2.0:
            t = time.perf_counter()
            model(x)
            lat.append((time.perf_counter() - t) * 1000)
    el = time.perf_counter() - t0
    a = np.asarray(lat)
    return {"rps": len(lat) / el, "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "errors": 0}
