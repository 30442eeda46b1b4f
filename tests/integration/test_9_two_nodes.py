"""The loop on two real Ray nodes: a head and a worker, each its own `ray start` process with its own DRIFTLOOP_HOME
and its own environment, sharing nothing but the object store (moto, an s3:// data root) and an MLflow tracking
server (sqlite behind it, artifacts proxied to the same store). `driftloop demo --quick` drives the loop from the
head: ingest -> sweep (trials on both nodes) -> Serve -> drift -> a retraining job, which
DRIFTLOOP_RETRAIN_RESOURCES sends to the worker node -> gate -> swap. Afterwards both homes hold only caches.

Both nodes run on this one machine (what a test can do here): they share a filesystem, so the test checks that
neither home holds shared state rather than that the other node could not read it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import BUCKET, run_cli
from tests.integration.conftest import answers_200, free_port, kill_leftovers, start_mlflow_server, wait_for
from tests.integration.test_0_newcomer import stop_head

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]

# what a node's home may hold under an s3:// data root: model downloads, made again on demand (the demo's home is
# <home>/demo)
CACHES = ("serving", "demo/serving")


def ray_node(env: dict, log: Path, *args: str) -> subprocess.Popen:
    """One `ray start --block` node on 127.0.0.1, in its own process group (stop_head ends it and nothing else)."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    with open(log, "w") as out:
        return subprocess.Popen([ray_bin, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                                 "--dashboard-agent-listen-port=0", *args],
                                env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)


def files_under(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())


def test_loop_on_two_ray_start_nodes_sharing_only_the_object_store(tmp_path, s3, monkeypatch):
    aws, client = s3
    for k, v in aws.items():
        monkeypatch.setenv(k, v)  # the MLflow server proxies artifacts to moto
    raytmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's unix sockets live under it
    mlflow_port, gcs_port, dash_port = free_port(), free_port(), free_port()
    mlflow = start_mlflow_server(mlflow_port, f"sqlite:///{tmp_path / 'mlflow.db'}", f"s3://{BUCKET}/two-nodes-mlflow")
    homes = {"head": tmp_path / "head-home", "worker": tmp_path / "worker-home"}
    # what every node of such a cluster is started with (the README's cloud section): no DRIFTLOOP_HOME in it
    cluster_env = {**aws, "DRIFTLOOP_DATA_ROOT": f"s3://{BUCKET}/two-nodes", "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
                   "DRIFTLOOP_JOBS_ADDRESS": f"http://127.0.0.1:{dash_port}", "DRIFTLOOP_RETRAIN_RESOURCES": '{"retrain": 1}',
                   "DRIFTLOOP_POLL_S": "1.0", "RAY_TMPDIR": str(raytmp), "RAY_USAGE_STATS_ENABLED": "0",
                   "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": "", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DRIFTLOOP_", "MLFLOW_", "RAY_"))}
    nodes = []
    try:
        nodes.append(ray_node({**base, **cluster_env, "DRIFTLOOP_HOME": str(homes["head"])}, tmp_path / "head.log",
                              "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
                              "--num-cpus=2", f"--ray-client-server-port={free_port()}"))
        dash = f"http://127.0.0.1:{dash_port}"
        wait_for(lambda: answers_200(f"{dash}/api/version"), 120, what="the head's dashboard")
        nodes.append(ray_node({**base, **cluster_env, "DRIFTLOOP_HOME": str(homes["worker"])}, tmp_path / "worker.log",
                              f"--address=127.0.0.1:{gcs_port}", "--num-cpus=2", '--resources={"retrain": 1}'))

        def alive_nodes() -> list[dict]:
            r = httpx.get(f"{dash}/api/v0/nodes", params={"detail": "true", "limit": 100}, timeout=10).json()
            return [n for n in r["data"]["result"]["result"] if n["state"] == "ALIVE"]

        nodes_up = wait_for(lambda: (lambda ns: ns if len(ns) == 2 else None)(alive_nodes()), 120, what="two alive nodes")
        worker_id = next(n["node_id"] for n in nodes_up if "retrain" in (n.get("resources_total") or {}))
        head_id = next(n["node_id"] for n in nodes_up if n["node_id"] != worker_id)

        # the loop, driven from the head as a user would: the CLI joins the cluster at RAY_ADDRESS
        r = run_cli("demo", "--quick", "--out", str(tmp_path / "out"), timeout=1200,
                    env={**cluster_env, "DRIFTLOOP_HOME": str(homes["head"]), "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"})
        print(r.stdout)
        assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert summary["champion_after"] != summary["champion_before"] and summary["failed_requests"] == 0, summary
        assert summary["accuracy_drifted_after"] > summary["accuracy_drifted_before"], summary

        # the sweep's trials trained on both nodes (Train workers of the demo's own driver job)
        jobs = httpx.get(f"{dash}/api/jobs/", timeout=30).json()
        demo_job = next(j["job_id"] for j in jobs if j.get("type") == "DRIVER" and "demo" in (j.get("entrypoint") or ""))
        actors = httpx.get(f"{dash}/api/v0/actors", params={"detail": "true", "limit": 10000}, timeout=30).json()
        trained_on = {a["node_id"] for a in actors["data"]["result"]["result"]
                      if a.get("class_name") == "RayTrainWorker" and a.get("job_id") == demo_job}
        print(f"sweep workers on nodes: {sorted(n[:8] for n in trained_on)} (head {head_id[:8]}, worker {worker_id[:8]})")
        assert trained_on == {head_id, worker_id}, trained_on
        # the retraining job ran on the worker node
        job = next(j for j in jobs if j.get("submission_id") == summary["retrain_job_id"])
        print("retraining job:", job["submission_id"], job["status"], "on node", (job.get("driver_node_id") or "")[:8])
        assert job["status"] == "SUCCEEDED" and job["driver_node_id"] == worker_id, job

        # shared state is in the bucket: tables, Train checkpoints, monitor snapshots, request-id key, model weights
        keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="two-nodes")
                for o in page.get("Contents", [])]
        for want in ("two-nodes/digits/_delta_log/", "two-nodes/_train/", "two-nodes/_state/monitor-digits",
                     "two-nodes/_state/ids-digits.key", "two-nodes-mlflow/"):
            assert any(k.startswith(want) for k in keys), f"nothing under s3://{BUCKET}/{want}"
    finally:
        for node in reversed(nodes):
            stop_head(node)
        mlflow.terminate()
        kill_leftovers(tmp_path, below=True)
        shutil.rmtree(raytmp, ignore_errors=True)
    # each home holds only caches: no table, tracking store, checkpoint, snapshot or key
    for name, home in homes.items():
        listing = files_under(home) if home.exists() else []
        print(f"{name} home ({len(listing)} files): {sorted({f.split('/')[0] for f in listing})}")
        shared = [f for f in listing if not f.startswith(tuple(c + "/" for c in CACHES))]
        assert not shared, f"{name} home holds more than caches: {shared[:10]}"
