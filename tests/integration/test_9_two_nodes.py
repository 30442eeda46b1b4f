"""The loop on two real Ray nodes: a head and a worker, each its own `ray start` process with its own DRIFTLOOP_HOME
and its own environment, sharing nothing but the object store (moto, an s3:// data root) and an MLflow tracking
server (sqlite behind it, artifacts proxied to the same store). The CLI drives the loop from the head, each command
its own process joining the cluster at RAY_ADDRESS: data ingest -> sweep (trials on both nodes) -> serve -> drifted
traffic with labels -> a retraining job, which DRIFTLOOP_RETRAIN_RESOURCES sends to the worker node -> gate -> swap,
every request answered. Afterwards both homes hold only caches. Then the node that holds the monitor replica dies.

Both nodes run on this one machine (what a test can do here): they share a filesystem, so the test checks that
neither home holds shared state rather than that the other node could not read it."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from driftloop import envs
from driftloop.data import examples
from tests.conftest import BUCKET, ROOT, run_cli
from tests.integration.conftest import answers_200, free_port, kill_leftovers, start_mlflow_server, wait_for, write_spec
from tests.integration.test_0_newcomer import ray_node, stop_head
from tests.integration.test_4_faults import _jobs, _settled, drift_state, send

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]

# what a node's home may hold under an s3:// data root: model downloads, made again on demand (the demo's home is
# <home>/demo), and the empty lock file that keeps two `driftloop serve` runs on one machine from deploying at once
CACHES = ("serving/", "demo/serving/", "state/serve.lock")


# the worker node's custom resources: retraining jobs go there (DRIFTLOOP_RETRAIN_RESOURCES), and in the node-loss
# phase the monitor replica too, so that the node this test kills is the one that holds it
WORKER_RESOURCES = '--resources={"retrain": 1, "monitor": 1}'

# the spec: configs/digits.yaml at the demo's quick size (2 trials of 8 epochs; 600 labels before a retraining), with
# a 20 s cooldown so that the node-loss phase, which starts soon after the swap, is past it
QUICK = {"sweep.trials": 2, "training.epochs": 8, "retraining.min_labelled_rows": 600, "retraining.cooldown_s": 20}
WINDOW = 500  # configs/digits.yaml's drift window
BATCH = 25  # rows per /predict request for the drifted windows (the background traffic sends single rows)


def serve_pinned_monitor(tmp_path: Path, env: dict, spec: Path) -> str:
    """`driftloop serve` SPEC with the DriftMonitor replica pinned to nodes with a `monitor` resource."""
    cfg = yaml.safe_load((ROOT / "serve_configs/digits.yaml").read_text())
    port = free_port()
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    app["args"]["spec"] = str(spec)
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


def noisy(n: int, seed: int):
    """Digits under noise at severity 3: the shift the first champion has not seen (the demo's)."""
    return examples.digits_stream(examples.builtin("digits").pool, n, onset=0, kind="noise", severity=3, seed=seed)


class Background:
    """Drifted traffic at a steady pace in a thread while a job retrains and Serve swaps: every request must be
    answered, and the versions that answered are counted."""

    def __init__(self, base: str, rps: float = 20):
        self.failed, self.sent, self.versions, self.stop = 0, 0, {}, threading.Event()
        self.thread = threading.Thread(target=self._run, args=(base, rps), daemon=True)
        self.thread.start()

    def _run(self, base: str, rps: float) -> None:
        seed = 1000
        while not self.stop.is_set():
            r = send(base, "digits", noisy(50, seed), rps=rps)
            self.failed, self.sent, seed = self.failed + r.failed, self.sent + r.sent, seed + 1
            for v, n in r.versions.items():
                self.versions[v] = self.versions.get(v, 0) + n

    def end(self) -> None:
        self.stop.set()
        self.thread.join(120)


def blurred(n: int, seed: int):
    """Digits blurred at severity 3: a shift the champion retrained on noisy digits has not seen."""
    return examples.digits_stream(examples.builtin("digits").pool, n, onset=0, kind="blur", severity=3, seed=seed)


def settled_on(url: str, champion: int) -> dict:
    """The monitor's state on CHAMPION once every row sent has reached it (batched requests are answered before the
    monitor has windowed their rows): the same window and sample count on two reads 3 s apart, snapshot saved."""
    last: dict = {}

    def ok():
        s = drift_state(url)
        if not s or s["model_version"] != champion or s["state"]["unsaved_changes"]:
            return None
        key = (s["window"]["index"], s["window"]["fill"], s["samples"])
        same, last["key"] = last.get("key") == key, key
        return s if same else None

    return wait_for(ok, 120, every=3, what="the monitor on the champion, every row sent windowed")


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

        # the loop, driven from the head as a user would: each command joins the cluster at RAY_ADDRESS
        head_env = {**cluster_env, "DRIFTLOOP_HOME": str(homes["head"]), "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}
        spec = write_spec(tmp_path / "digits.yaml", **QUICK)
        for args in (("data", "ingest", "digits", "--table", "digits", "--spec", str(spec)), ("sweep", str(spec))):
            r = run_cli(*args, env=head_env, timeout=600)
            assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]

        # the sweep's trials trained on both nodes (Train workers of the sweep's own driver job)
        jobs = httpx.get(f"{dash}/api/jobs/", timeout=30).json()
        sweep_job = next(j["job_id"] for j in jobs if j.get("type") == "DRIVER" and "sweep" in (j.get("entrypoint") or ""))
        actors = httpx.get(f"{dash}/api/v0/actors", params={"detail": "true", "limit": 10000}, timeout=30).json()
        trained_on = {a["node_id"] for a in actors["data"]["result"]["result"]
                      if a.get("class_name") == "RayTrainWorker" and a.get("job_id") == sweep_job}
        print(f"sweep workers on nodes: {sorted(n[:8] for n in trained_on)} (head {head_id[:8]}, worker {worker_id[:8]})")
        assert trained_on == {head_id, worker_id}, trained_on

        # served with the monitor replica pinned to the worker, the node this test kills later
        url = serve_pinned_monitor(tmp_path, head_env, spec)
        app_base = base_url(url)
        wait_for(lambda: (s := drift_state(url)) and s["model_version"] == 1, 120, what="the monitor on v1")
        before = send(app_base, "digits", noisy(500, 99), batch=BATCH)  # drifted rows on the first champion (a flagged window)
        background = Background(app_base)  # traffic that goes on through the retraining and the swap
        try:
            fed = send(app_base, "digits", noisy(1000, 7), labels=True, batch=BATCH)  # two more drifted windows, 1,000 labels
            assert fed.failed == 0 and fed.labelled == 1000, fed
            swapped = wait_for(lambda: (h := httpx.get(f"{url}/healthz", timeout=30).json())["model_version"] > 1 and h,
                               480, every=1, what="the retrained champion answering")
            wait_for(lambda: len(background.versions) > 1, 60, what="the background traffic to see the new champion")
        finally:
            background.end()
        after = send(app_base, "digits", noisy(500, 99), batch=BATCH)  # the same drifted rows on the new champion
        champion = swapped["model_version"]
        print(f"drifted accuracy {before.accuracy:.3f} -> {after.accuracy:.3f} (v{champion}); through the swap "
              f"{background.sent} requests, {background.failed} failed, versions {background.versions}")
        assert background.failed == 0 and before.failed == 0 and after.failed == 0
        assert after.accuracy > before.accuracy + 0.3, (before.accuracy, after.accuracy)

        # the retraining job ran on the worker node
        job = wait_for(lambda: next((j for j in httpx.get(f"{dash}/api/jobs/", timeout=30).json()
                                     if (j.get("submission_id") or "").startswith("driftloop-retrain-digits-v1-")
                                     and j["status"] == "SUCCEEDED"), None), 60, what="the retraining job SUCCEEDED")
        print("retraining job:", job["submission_id"], job["status"], "on node", (job.get("driver_node_id") or "")[:8])
        assert job["driver_node_id"] == worker_id, job

        # shared state is in the bucket: tables, Train checkpoints, monitor snapshots, request-id key, model weights
        keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="two-nodes")
                for o in page.get("Contents", [])]
        for want in ("two-nodes/digits/_delta_log/", "two-nodes/_train/", "two-nodes/_state/monitor-digits",
                     "two-nodes/_state/ids-digits.key", "two-nodes-mlflow/"):
            assert any(k.startswith(want) for k in keys), f"nothing under s3://{BUCKET}/{want}"

        # --- the node holding the monitor replica dies mid-window; a replacement joins (what the autoscaler does) ---
        # the new champion's detectors first see their warm-up windows (the regime it was retrained for)
        assert send(app_base, "digits", noisy(3 * WINDOW, 500), batch=BATCH).failed == 0
        window = WINDOW
        st0 = settled_on(url, champion)
        # the promoted challenger's job ended after its swap was seen: not a refusal (no doubled cooldown)
        assert st0["policy"]["refusals"] == 0 and st0["policy"]["cooldown_s"] == QUICK["retraining.cooldown_s"], st0["policy"]

        def retrain_jobs() -> list[str]:
            return [j for j in _jobs(dash, "digits") if j.startswith(f"driftloop-retrain-digits-v{champion}-")]

        # complete the current window and half of the next with blurred digits: one more flagged window, no labels
        assert send(app_base, "digits", blurred(window - st0["window"]["fill"] + window // 2, 1), batch=BATCH).failed == 0
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
        assert send(app_base, "digits", blurred(600, 2), labels=True, batch=BATCH).labelled == 600
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
