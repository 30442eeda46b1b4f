"""Connecting to Ray: the cluster at RAY_ADDRESS, or a local one bound to 127.0.0.1."""

from __future__ import annotations

import os

from driftloop.settings import Settings

LOCAL_CPUS = 4  # logical CPUs for the embedded cluster: fractional Train workers + Serve replicas on 2 cores


def ensure_ray(settings: Settings, namespace: str = "driftloop") -> None:
    """Join RAY_ADDRESS when set; otherwise start local Ray with the dashboard on 127.0.0.1 only.

    The dashboard is not optional: the Jobs API lives there, and Ray Train's placement-group cleaner
    asks its state API whether a controller is alive (without it, trials that ASHA stops early leak
    their worker placement group and later trials never start).
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env = {"env_vars": {k: v for k, v in os.environ.items() if k.startswith(("DRIFTLOOP_", "MLFLOW_"))}}
    runtime_env["env_vars"].setdefault("DRIFTLOOP_HOME", str(settings.home))
    runtime_env["env_vars"].setdefault("MLFLOW_TRACKING_URI", settings.tracking_uri)
    if settings.ray_address:
        # An existing cluster (or a Ray job's driver): its processes already carry their environment,
        # and a job's runtime env cannot be merged with another one.
        ray.init(address=settings.ray_address, namespace=namespace, log_to_driver=False)
        return
    ray.init(
        num_cpus=max(LOCAL_CPUS, os.cpu_count() or 1),
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _node_ip_address="127.0.0.1",
        namespace=namespace,
        runtime_env=runtime_env,
        log_to_driver=False,
        configure_logging=False,
    )


def dashboard_url() -> str:
    """The Jobs API address of the connected cluster, as the dashboard advertises it in the GCS
    (right inside any worker or replica, whatever port the dashboard was given)."""
    import ray
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    addr = _internal_kv_get(ray_constants.DASHBOARD_ADDRESS, namespace=ray_constants.KV_NAMESPACE_DASHBOARD)
    url = addr.decode() if addr else ray._private.worker.get_dashboard_url()  # noqa: SLF001
    return url if url.startswith("http") else f"http://{url}"
