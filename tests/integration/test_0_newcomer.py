"""A newcomer's first commands, each its own process, against a local Ray head that `ray start` left running (as
`driftloop serve` does): serving a model with no champion is refused in one line before anything is deployed;
`driftloop sweep` joins the running head instead of failing with Ray's "num_cpus and num_gpus must not be
provided"; then `driftloop serve` deploys the new champion there.

The head runs in its own process group and Ray temp dir (RAY_TMPDIR), so it is found the way a user's is (the
address file of the last `ray start`), and stopping it touches no other Ray on the machine."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT, run_cli
from tests.integration.conftest import answers_200, free_port, wait_for, write_spec

pytestmark = [pytest.mark.slow, pytest.mark.own_ray]

DASHBOARD_PORT = 8265  # what `ray start` and `driftloop serve` use by default


def test_serve_refuses_without_champion_then_sweep_joins_the_running_head(tmp_path):
    import tempfile

    raytmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's unix sockets live under it (108-byte limit)
    if not ports_free(DASHBOARD_PORT):
        pytest.skip(f"port {DASHBOARD_PORT} is taken (another Ray head runs here): this test needs a machine without one")
    # empty = unset for driftloop and Ray: no session cluster, tracking server or data root leaks in
    env = {"RAY_ADDRESS": "", "DRIFTLOOP_JOBS_ADDRESS": "", "MLFLOW_TRACKING_URI": "", "DRIFTLOOP_DATA_ROOT": "",
           "RAY_TMPDIR": str(raytmp), "DRIFTLOOP_HOME": str(tmp_path / "home"), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "disabled"}  # as `make test` runs it (Ray 2.60 would turn token auth on)
    spec = write_spec(tmp_path / "newcomer.yaml", **{
        "name": "newcomer", "dataset.table": "newcomer", "sweep.trials": 1, "sweep.concurrency": 1,
        "sweep.scheduler": "fifo", "training.epochs": 2, "training.workers": 1})
    cfg = yaml.safe_load((ROOT / "serve_configs/digits.yaml").read_text())
    port = free_port()
    cfg["http_options"]["port"] = port
    app = cfg["applications"][0]
    app.update(name="newcomer", route_prefix="/newcomer", args={"spec": str(spec)})
    for dep in app["deployments"]:
        dep.pop("autoscaling_config", None)
        dep["num_replicas"] = 1
    serve_cfg = tmp_path / "serve.yaml"
    serve_cfg.write_text(yaml.safe_dump(cfg))

    def cli(*args: str, timeout: float = 400) -> subprocess.CompletedProcess:
        return run_cli(*args, env=env, timeout=timeout)

    ingested = cli("data", "ingest", "digits", "--table", "newcomer", "--spec", str(spec))
    assert ingested.returncode == 0, ingested.stderr[-2000:]
    # 1. no champion yet: one line, exit 2, nothing started or deployed
    refused = cli("serve", str(serve_cfg))
    print("serve before any sweep:", refused.stderr.strip())
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert refused.stderr.strip().count("\n") == 0
    assert "'newcomer' has no champion yet" in refused.stderr and "driftloop sweep" in refused.stderr
    assert not (raytmp / "ray" / "ray_current_cluster").exists(), "a refused serve starts no Ray"

    head = start_head({**os.environ, **env}, tmp_path / "head.log", cpus=2)
    try:
        dash = f"http://127.0.0.1:{DASHBOARD_PORT}"
        try:
            wait_for(lambda: (raytmp / "ray" / "ray_current_cluster").exists() and answers_200(f"{dash}/api/version"), 120,
                     what="the local head")
        except AssertionError:
            raise AssertionError("the local head did not come up: " + (tmp_path / "head.log").read_text()[-2000:]) from None
        # 2. the sweep joins the running head (a driver job of that cluster) and registers the champion
        swept = cli("sweep", str(spec))
        assert swept.returncode == 0, (swept.stdout + swept.stderr)[-3000:]
        drivers = [j for j in httpx.get(f"{dash}/api/jobs/", timeout=30).json() if j.get("type") == "DRIVER"]
        assert any("sweep" in (j.get("entrypoint") or "") for j in drivers), drivers
        # 3. now `driftloop serve` deploys it on that head and it answers
        served = cli("serve", str(serve_cfg))
        assert served.returncode == 0, (served.stdout + served.stderr)[-3000:]
        url = f"http://127.0.0.1:{port}/newcomer"
        assert f"newcomer: {url}/predict" in served.stdout
        assert httpx.get(f"{url}/healthz", timeout=30).json()["model_version"] == 1
    finally:
        stop_head(head)
        shutil.rmtree(raytmp, ignore_errors=True)


def ray_node(env: dict, log: Path, *args: str) -> subprocess.Popen:
    """One `ray start --block` node on 127.0.0.1 (ARGS: --head and its ports, or --address), in its own process
    group: stop_head ends it and nothing else."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([ray_bin, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
                                 "--dashboard-agent-listen-port=0", *args],
                                env=env, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)


def start_head(env: dict, log: Path, cpus: int) -> subprocess.Popen:
    """`ray start --head --block` on 127.0.0.1 with the dashboard on DASHBOARD_PORT, in its own process group."""
    return ray_node(env, log, "--head", "--port=0", "--dashboard-host=127.0.0.1", f"--dashboard-port={DASHBOARD_PORT}",
                    f"--num-cpus={cpus}", f"--ray-client-server-port={free_port()}")


def stop_head(head: subprocess.Popen) -> None:
    """SIGTERM first: `ray start --block` then stops its own processes; its workers (own process groups) exit once
    their raylet is gone. The group kill is the fallback. Nothing of any other Ray is touched."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            break
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            pass


def _free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def ports_free(*ports: int, wait: float = 60) -> bool:
    """True once nothing listens on any of PORTS, within WAIT seconds: a head the test before stopped can leave
    workers (the Serve proxy on 8000) that exit a few seconds after their raylet."""
    try:
        return wait_for(lambda: all(_free(p) for p in ports), wait, every=1, what=f"ports {ports} to be free")
    except AssertionError:
        return False
