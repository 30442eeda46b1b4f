"""Connecting to Ray: the cluster at RAY_ADDRESS, or a local one bound to 127.0.0.1."""

from __future__ import annotations

import os
from contextlib import contextmanager

from driftloop.envs import shared_env
from driftloop.settings import Settings

LOCAL_CPUS = 4  # logical CPUs for the embedded cluster: fractional Train workers + Serve replicas on 2 cores


def ensure_ray(settings: Settings, namespace: str = "driftloop", join_running: bool = True) -> None:
    """Join RAY_ADDRESS when set; else (with `join_running`) the local head that `ray start` left running, as
    `driftloop serve` does; otherwise start local Ray with the dashboard on 127.0.0.1 only. The demo and the
    benchmarks pass join_running=False: they deploy and tear down Serve apps of their own, and must never do
    that on a user's running head.

    The dashboard is not optional: the Jobs API lives there, and Ray Train's placement-group cleaner
    asks its state API whether a controller is alive (without it, trials that ASHA stops early leak
    their worker placement group and later trials never start).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # never a credential: see driftloop.envs; a Ray on this machine shares this machine's home, also under an
    # object-store data root (where shared_env leaves each node its own)
    runtime_env = {"env_vars": {**shared_env(settings), "DRIFTLOOP_HOME": str(settings.home)}}
    if settings.ray_address:
        # An existing cluster (or a Ray job's driver): its processes already carry their environment,
        # and a job's runtime env cannot be merged with another one.
        ray.init(address=settings.ray_address, namespace=namespace, log_to_driver=False)
        return
    running = running_local_cluster() if join_running else None
    if running:
        # a local head that `driftloop serve` (or `ray start`) left running: join it, as Ray itself would
        ray.init(address=running, namespace=namespace, runtime_env=runtime_env, log_to_driver=False)
        return
    with any_agent_port():
        ray.init(
            address="local",  # a new cluster, never the one a stale `ray start` address file names
            num_cpus=max(LOCAL_CPUS, os.cpu_count() or 1),
            include_dashboard=True,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            namespace=namespace,
            runtime_env=runtime_env,
            log_to_driver=False,
            configure_logging=False,
        )


def running_local_cluster() -> str | None:
    """The GCS address of the local cluster the last `ray start` on this machine started, if it still runs."""
    from ray._private.services import canonicalize_bootstrap_address, find_gcs_addresses

    try:
        addr = canonicalize_bootstrap_address(None)
    except Exception:
        return None
    if not addr:
        return None
    port = addr.rsplit(":", 1)[-1]
    find_gcs_addresses.cache_clear()  # Ray caches a non-empty answer for the life of the process
    alive = {a.rsplit(":", 1)[-1] for a in find_gcs_addresses()}
    return addr if port in alive else None  # a stale address file of a cluster that is gone: start our own


@contextmanager
def any_agent_port():
    """Let a local head's dashboard agent bind any free port instead of Ray's fixed 52365.

    `ray.init()` has no argument for that port, and a second local Ray started while the last one still
    holds 52365 (a CLI command right after another) gets an agent without HTTP: its Jobs API then answers
    every submission with HTTP 500 "No available agent to submit job". 0 is what `ray start
    --dashboard-agent-listen-port=0` and Ray's own multi-node test harness use; the Jobs API finds the
    agent's real port in the GCS.
    """
    from ray._private import parameter

    fixed = parameter.RayParams

    def params(*args, **kwargs):
        kwargs.setdefault("dashboard_agent_listen_port", 0)
        return fixed(*args, **kwargs)

    parameter.RayParams = params
    try:
        yield
    finally:
        parameter.RayParams = fixed


def dashboard_url() -> str:
    """The Jobs API address of the connected cluster, as the dashboard advertises it in the GCS
    (right inside any worker or replica, whatever port the dashboard was given)."""
    import ray
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    addr = _internal_kv_get(ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
    url = addr.decode() if addr else ray._private.worker.get_dashboard_url()  # noqa: SLF001
    return url if url.startswith("http") else f"http://{url}"
