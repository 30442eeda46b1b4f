"""One real Ray instance per test session (dashboard and Jobs API on 127.0.0.1), one trained digits model,
one Serve application. Everything here is real: Ray, Ray Train/Tune, Serve over HTTP, MLflow, Delta."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, free_port  # noqa: F401 (the integration tests import it from here)


def write_spec(path: Path, **overrides) -> Path:
    """configs/digits.yaml with test-sized overrides (dotted keys)."""
    d = yaml.safe_load((ROOT / "configs/digits.yaml").read_text())
    for key, value in overrides.items():
        node = d
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.fixture(scope="session")
def session_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("driftloop-home")
    env = {"DRIFTLOOP_HOME": str(home), "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "DRIFTLOOP_POLL_S": "0.5", "DRIFTLOOP_NEW_DATA_CHECK_S": "2", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    old = {k: os.environ.get(k) for k in list(env) + ["MLFLOW_TRACKING_URI", "DRIFTLOOP_DATA_ROOT", "RAY_ADDRESS"]}
    os.environ.update(env)
    for k in ("MLFLOW_TRACKING_URI", "DRIFTLOOP_DATA_ROOT", "RAY_ADDRESS"):
        os.environ.pop(k, None)
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


_SHARED: dict = {}  # the shared cluster while it runs: {"home": its DRIFTLOOP_HOME}; {"stopped": True} after


def pytest_collection_modifyitems(config, items):
    """Tests that start a Ray head of their own (marker `own_ray`) run before the shared cluster starts or after
    every test that shares it, never in between: the shared cluster is stopped before they run."""
    first = next((i for i, it in enumerate(items) if "ray_cluster" in it.fixturenames), None)
    if first is not None:
        rest = items[first:]
        items[first:] = [it for it in rest if not it.get_closest_marker("own_ray")] + \
                        [it for it in rest if it.get_closest_marker("own_ray")]


def pytest_runtest_setup(item):
    if item.get_closest_marker("own_ray"):
        stop_shared_cluster()
    elif "ray_cluster" in item.fixturenames and _SHARED.get("stopped"):
        pytest.fail("the shared Ray cluster was stopped for an own_ray test that ran before this one")


def stop_shared_cluster() -> None:
    """Stop the shared cluster (Serve, Ray, and the processes its retraining jobs left: an entrypoint runs in its
    own session and outlives its head), so that a test with a head of its own has the machine's cores to itself
    (an idle local Ray with Serve alone takes about 0.14 of a core here)."""
    home = _SHARED.pop("home", None)
    if home is None:
        return
    import ray

    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.pop("DRIFTLOOP_JOBS_ADDRESS", None)
    kill_leftovers(home)
    _SHARED["stopped"] = True


def kill_leftovers(home: Path, below: bool = False) -> None:
    """End every process of one DRIFTLOOP_HOME (with `below`, of any home under it) but this one: a job's
    entrypoint runs in its own session and can outlive the head that started it, keeping a core busy."""
    import psutil

    time.sleep(1)
    for p in psutil.process_iter():
        try:
            h = p.environ().get("DRIFTLOOP_HOME") or ""
            if (h == str(home) or (below and h.startswith(f"{home}/"))) and p.pid != os.getpid():
                p.kill()
        except (psutil.Error, OSError):
            continue


@pytest.fixture(scope="session")
def ray_cluster(session_home, s3):
    """A local Ray cluster bound to 127.0.0.1 with 4 logical CPUs on this 2-core machine. Its processes carry the
    object store's endpoint and keys (moto) in their environment, as a cloud cluster's nodes carry theirs (an
    instance role, a pod's secret): a test may put a data root on s3:// (the default stays the local folder)."""
    import ray

    os.environ.update(s3[0])
    dash = free_port()
    ctx = ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=dash,
                   _node_ip_address="127.0.0.1", object_store_memory=400 * 1024**2, namespace="driftloop",
                   log_to_driver=False, configure_logging=False)
    gcs = ctx.address_info["gcs_address"]
    os.environ["RAY_ADDRESS"] = gcs
    os.environ["DRIFTLOOP_JOBS_ADDRESS"] = f"http://127.0.0.1:{dash}"
    _SHARED["home"] = session_home
    yield {"gcs": gcs, "dashboard": f"http://127.0.0.1:{dash}"}
    stop_shared_cluster()


@pytest.fixture(scope="session")
def settings(ray_cluster):
    from driftloop.settings import get_settings

    return get_settings().ensure()


@pytest.fixture(scope="session")
def serving_spec(session_home):
    # Triggers stay pending (no retraining) while the serving tests run: the label minimum is out of reach.
    # The monitor's scheduled maintenance compacts its logs every 10 s under all of test_2's traffic (replaced
    # files stay an hour: no reader loses a file it is reading).
    return write_spec(session_home / "digits-serving.yaml", **{
        "sweep.trials": 2, "training.epochs": 8, "sweep.grace_period": 3, "retraining.min_labelled_rows": 10**9,
        "lifecycle.maintenance_every_s": 10, "lifecycle.vacuum_grace_hours": 1})


@pytest.fixture(scope="session")
def trained(settings, serving_spec):
    """Ingest digits and run the spec's sweep (2 trials at once, 2 workers each): the shared champion."""
    from driftloop.config import load_spec
    from driftloop.data.ingest import ingest
    from driftloop.sweep import run_sweep

    spec = load_spec(serving_spec)
    ingest("digits", settings.table_uri(spec.dataset.table), spec.dataset)
    outcome = run_sweep(spec, settings, verbose=0)
    return spec, outcome


@pytest.fixture(scope="session")
def serve_url(trained, ray_cluster):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def wait_for(predicate, timeout: float, every: float = 0.5, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def start_mlflow_server(port: int, backend: str, artifacts: Path | str) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:PORT over BACKEND, proxying artifacts to ARTIFACTS (a folder or an
    s3:// URI); returns once /health answers."""
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
                              "--backend-store-uri", backend, "--artifacts-destination", str(artifacts), "--workers", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: server.poll() is None and answers_200(f"http://127.0.0.1:{port}/health"), 90, what="mlflow server")
    except BaseException:
        server.terminate()
        raise
    return server


def answers_200(url: str) -> bool:
    """GET URL answers 200 within 2 s (a server that is up)."""
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
