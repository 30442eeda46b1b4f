"""The one place that decides which environment variables leave this process.

Three things carry an environment to other processes: a local Ray's runtime env (its workers and Serve replicas),
a retraining job submitted to the Jobs API, and the applications of a Serve config. All three get the same
`shared_env`: driftloop's and MLflow's settings, the paths the settings resolved to, and never a credential.
A variable whose name holds TOKEN, PASSWORD or SECRET stays here (a `…_FILE` variable, a path to a secret, may
travel), and a URI loses the password of its user-info. A cluster supplies its own credentials (a Kubernetes
secret, a mounted token file); the Jobs API, the dashboard and the logs never see one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from driftloop.settings import Settings

PREFIXES = ("DRIFTLOOP_", "MLFLOW_")
SECRET_MARKS = ("TOKEN", "PASSWORD", "SECRET")


def is_secret(name: str) -> bool:
    """A credential by its name (a path to one, `…_FILE`, is not)."""
    upper = name.upper()
    return any(m in upper for m in SECRET_MARKS) and not upper.endswith("_FILE")


def strip_password(value: str) -> str:
    """A URI without the password in its user-info (scheme://user:pw@host -> scheme://user@host)."""
    return re.sub(r"(://[^/@:\s]*):[^/@\s]*@", r"\1@", value)


def shared_env(settings: Settings, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a local Ray's workers, a retraining job and a Serve config's replicas are given."""
    environ = os.environ if environ is None else environ
    env = {k: v for k, v in environ.items() if k.startswith(PREFIXES) and not is_secret(k)}
    env.update({"MLFLOW_TRACKING_URI": settings.tracking_uri, "DRIFTLOOP_DATA_ROOT": settings.data_root})
    if settings.remote:
        # an object-store data root holds everything shared; DRIFTLOOP_HOME is a node's own cache folder and stays
        # the one each node was started with (this node's path may not exist, or be writable, on another)
        env.pop("DRIFTLOOP_HOME", None)
    else:
        env["DRIFTLOOP_HOME"] = str(settings.home)  # the sqlite store and tables live there: one folder for all
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return {k: strip_password(v) for k, v in env.items()}


# --- the environment of a multi-node cluster's nodes ------------------------------------------------------------

# set on every node from the platform's secret store (a Kubernetes secret, AWS Secrets Manager): named here, never
# printed with a value, and never handed on by shared_env. name -> (what it is, (Kubernetes secret, key))
CLUSTER_SECRETS = {
    "MLFLOW_TRACKING_USERNAME": ("the MLflow user driftloop logs in as (the tracking server's basic-auth app)",
                                 ("driftloop-mlflow", "username")),
    "MLFLOW_TRACKING_PASSWORD": ("that user's password", ("driftloop-mlflow", "password")),
    "DRIFTLOOP_ADMIN_TOKEN": ("the admin endpoints' bearer token: on every node that runs Serve replicas",
                              ("driftloop-admin", "token")),
}


def cluster_env(data_root: str, tracking_uri: str, retrain_resources: str | None = None) -> dict[str, str]:
    """The environment every node of a multi-node cluster starts with, head and workers alike: the one recipe behind
    `driftloop cluster-env`, the README's cloud section, `cluster.yaml`, the KubeRay manifests and the two-node test.
    Shared state needs an object store and a tracking server: a local folder or a sqlite file is one node's disk.
    DRIFTLOOP_HOME is not in it: each node keeps its own, a cache. A value that cannot work: ValueError, one line."""
    from driftloop.settings import is_object_store

    if not is_object_store(data_root):
        raise ValueError(f"data root {data_root!r} is a local folder: every node of a cluster must reach it, "
                        "use an object store (s3://bucket/prefix)")
    if not tracking_uri.startswith(("http://", "https://")):
        raise ValueError(f"tracking URI {strip_password(tracking_uri)!r} is not an MLflow server (http://host:5000): "
                        "every node logs runs and reads the registry through it")
    env = {"DRIFTLOOP_DATA_ROOT": data_root.rstrip("/"), "MLFLOW_TRACKING_URI": strip_password(tracking_uri),
           "RAY_AUTH_MODE": "token",  # the Jobs API and the dashboard refuse a request without the cluster's token
           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}  # spot nodes: Train checkpoints before a drain
    if retrain_resources:
        import json

        from driftloop.jobs import RETRAIN_RESOURCES_ENV, entrypoint_placement

        entrypoint_placement({RETRAIN_RESOURCES_ENV: retrain_resources})  # ValueError, naming the variable
        env[RETRAIN_RESOURCES_ENV] = json.dumps(json.loads(retrain_resources), separators=(",", ":"))
    return env
