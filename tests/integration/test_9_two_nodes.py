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
import signal
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from driftloop import envs
from driftloop.data import examples
from tests.conftest import BUCKET, ROOT, run_cli
from tests.integration.conftest import answers_200, free_port, kill_leftovers, start_mlflow_server, wait_for
from tests.integration.test_0_newcomer import ray_node, stop_head
from tests.integration.test_4_faults import _jobs, _settled, drift_state, send

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]

# what a node's home may hold under an s3:// data root: model downloads, made again on demand (the demo's home is
# <home>/demo), and the empty lock file that keeps two `driftloop serve` runs on one machine from deploying at once
CACHES = ("serving/", "demo/serving/", "state/serve.lock")


# the worker node's custom resources: retraining jobs go there (DRIFTLOOP_RETRAIN_RESOURCES), and in the node-loss
# phase the monitor replica too, so that the node this test kills is the one that holds it
WORKER_RESOURCES = '--resources={"retrain": 1, "monitor": 1}'


def serve_pinned_monitor(tmp_path: Path, env: dict) -> str:
    """`driftloop serve` the demo's spec with the DriftMonitor replica pinned to nodes with a `monitor` resource."""
    cfg = yaml.safe_load((ROOT / "serve_configs/digits.yaml").read_text())
    port = free_port()
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    app["args"]["spec"] = str(tmp_path / "out" / "spec.json")  # the spec the demo ran (JSON is YAML)
    for dep in app["deployments"]:
        dep.pop("autoscaling_config", None)
        dep["num_replicas"] = 1
        if dep["name"] == "DriftMonitor":
            dep["ray_actor_options"]["resources"] = {"monitor": 1}
    path = tmp_path / "serve-pinned.yaml"
    path.write_text(yaml.safe_dump(cfg))
    served = run_cli("serve", str(path), env=env, timeout=400)
    assert served.returncode == 0, (served.stdout + served.stderr)[-3000:]
    return f"http://127.0.0.1:{port}/digits"


def blurred(n: int, seed: int):
    """Digits blurred at severity 3: a shift the demo's champion, retrained on noisy digits, has not seen."""
    return examples.digits_stream(examples.builtin("digits").pool, n, onset=0, kind="blur", severity=3, seed=seed)


def base_url(app_url: str) -> str:
    return app_url.rsplit("/", 1)[0]


def files_under(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file())


def test_loop_on_two_ray_start_nodes_sharing_only_the_object_store(tmp_path, s3, monkeypatch):
    aws, client = s3
    for k, v in aws.items():
        monkeypatch.setenv(k, v)  # the MLflow server proxies artifacts to moto
    raytmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's unix sockets live under it
    mlflow_port, gcs_port, dash_port = free_port(), free_port(), free_port()
    mlflow = start_mlflow_server(mlflow_port, f"sqlite:///{tmp_path / 'mlflow.db'}", f"s3://{BUCKET}/two-nodes-mlflow")
    homes = {"head": tmp_path / "head-home", "worker": tmp_path / "worker-home", "replacement": tmp_path / "worker2-home"}
    # what every node of such a cluster is started with: `driftloop cluster-env`'s recipe (no DRIFTLOOP_HOME in it),
    # the object store's endpoint and keys (an instance role's, on a cloud), and this suite's own choices: Ray
    # without token auth (as the whole suite runs it), a 1 s monitor poll, one Ray temp dir for this machine
    cluster_env = {**envs.cluster_env(f"s3://{BUCKET}/two-nodes", f"http://127.0.0.1:{mlflow_port}", '{"retrain": 1}'),
                   **aws, "RAY_AUTH_MODE": "disabled", "DRIFTLOOP_JOBS_ADDRESS": f"http://127.0.0.1:{dash_port}",
                   "DRIFTLOOP_POLL_S": "1.0", "RAY_TMPDIR": str(raytmp), "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": "",
                   "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DRIFTLOOP_", "MLFLOW_", "RAY_"))}
    nodes = []
    try:
        nodes.append(ray_node({**base, **cluster_env, "DRIFTLOOP_HOME": str(homes["head"])}, tmp_path / "head.log",
                              "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
                              "--num-cpus=2", f"--ray-client-server-port={free_port()}"))
        dash = f"http://127.0.0.1:{dash_port}"
        wait_for(lambda: answers_200(f"{dash}/api/version"), 120, what="the head's dashboard")
        nodes.append(ray_node({**base, **cluster_env, "DRIFTLOOP_HOME": str(homes["worker"])}, tmp_path / "worker.log",
                              f"--address=127.0.0.1:{gcs_port}", "--num-cpus=2", WORKER_RESOURCES))

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

        # --- the node holding the monitor replica dies mid-window; a replacement joins (what the autoscaler does) ---
        url = serve_pinned_monitor(tmp_path, {**cluster_env, "DRIFTLOOP_HOME": str(homes["head"]),
                                              "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"})
        window, champion = 500, summary["champion_after"]
        # it restores the demo's monitor state (same application, same champion): the test goes on from there
        st0 = wait_for(lambda: (s := drift_state(url)) and s["model_version"] == champion and not s["state"]["unsaved_changes"]
                       and s, 120, what="the monitor on the champion")
        # the promoted challenger's job ended after its swap was seen: not a refusal (no doubled cooldown)
        assert st0["policy"]["refusals"] == 0 and st0["policy"]["cooldown_s"] == 60, st0["policy"]

        def retrain_jobs() -> list[str]:
            return [j for j in _jobs(dash, "digits") if j.startswith(f"driftloop-retrain-digits-v{champion}-")]

        # complete the current window and half of the next with blurred digits: one more flagged window, no labels
        assert send(base_url(url), "digits", blurred(window - st0["window"]["fill"] + window // 2, 1)).failed == 0
        pre = _settled(url, index=st0["window"]["index"] + 1, fill=window // 2)
        assert pre["recent"][0]["is_drift"], pre["recent"][0]
        jobs_before = retrain_jobs()
        os.killpg(nodes[1].pid, signal.SIGKILL)  # the worker node dies: every process started with its environment
        kill_leftovers(homes["worker"])
        t0 = time.monotonic()
        nodes.append(ray_node({**base, **cluster_env, "DRIFTLOOP_HOME": str(homes["replacement"])}, tmp_path / "worker2.log",
                              f"--address=127.0.0.1:{gcs_port}", "--num-cpus=2", WORKER_RESOURCES))
        st = wait_for(lambda: (s := drift_state(url)) and s["state"]["replica_started_at"] != pre["state"]["replica_started_at"]
                      and s, 240, every=1, what="the monitor replica on the replacement node")
        print(f"monitor back on the replacement node {time.monotonic() - t0:.1f} s after its node died: "
              f"{st['state']['restored']}")
        assert st["state"]["restored"], "restored from the snapshot in the bucket"
        assert (st["window"]["index"], st["window"]["fill"], st["samples"]) == (pre["window"]["index"], window // 2, pre["samples"])
        for k in ("recent_windows", "triggers", "pending", "labelled_rows"):
            assert st["policy"][k] == pre["policy"][k], (k, st["policy"][k], pre["policy"][k])
        assert [e["event_id"] for e in st["recent"]] == [e["event_id"] for e in pre["recent"]]
        # labels and the next drifted window: the restored policy triggers once (unless it had before), one job
        assert send(base_url(url), "digits", blurred(600, 2), labels=True).labelled == 600
        try:
            jobs = wait_for(lambda: (js := retrain_jobs()) and len(js) >= 1 and js, 180, every=1, what="a retraining job")
        except AssertionError:
            st = drift_state(url) or {}
            raise AssertionError(f"no retraining job; monitor: window {st.get('window')}, policy {st.get('policy')}, "
                                 f"retraining {st.get('retraining')}, recent {[e.get('is_drift') for e in st.get('recent', [])]}")
        time.sleep(5)
        print("retraining jobs of the champion:", jobs_before, "->", retrain_jobs())
        assert retrain_jobs() == jobs and len(jobs) == 1, "one trigger, one job"
        assert drift_state(url)["policy"]["triggers"] == pre["policy"]["triggers"] + (0 if jobs_before else 1)
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
        shared = [f for f in listing if not f.startswith(CACHES)]
        assert not shared, f"{name} home holds more than caches: {shared[:10]}"
