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
