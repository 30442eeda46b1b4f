"""`driftloop serve FILE`: a local Ray head on 127.0.0.1 when none runs, then `serve deploy` of FILE's applications
beside the ones already running (Serve's own deploy is declarative and would delete them)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

from driftloop.cluster import LOCAL_CPUS
from driftloop.errors import LoopError
from driftloop.envs import shared_env
from driftloop.settings import get_settings

DASHBOARD = "http://127.0.0.1:8265"


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


def _remote() -> bool:
    """A cluster named by the environment (its Serve ingress may not be reachable from here), not a local head."""
    return os.environ.get("DRIFTLOOP_JOBS_ADDRESS", "").startswith("http") or bool(os.environ.get("RAY_ADDRESS"))


def ensure_head(ingress: str = "proxy") -> str:
    """The dashboard address of the cluster to deploy to; starts a local head (127.0.0.1) if none runs, with
    INGRESS (`proxy`: Serve's default proxy actor; `haproxy`: Serve's HAProxy ingress, kept on loopback by
    driftloop-haproxy). A running cluster keeps the ingress it was started with.

    A local head must take a job before we return: one whose dashboard agent could not bind its port (a Ray
    that just stopped still held it) serves and lists jobs but refuses every retraining job with HTTP 500.
    """
    from driftloop.serving.haproxy import haproxy_env

    kept = (f"the running Ray cluster keeps the ingress it started with; for HAProxy, start its nodes with "
            f"{' '.join(f'{k}={v}' for k, v in haproxy_env().items())}")
    if _remote():
        from driftloop.jobs import jobs_address

        if ingress == "haproxy":
            print(kept)
        return jobs_address()
    probe = subprocess.run([_ray_bin(), "status"], capture_output=True, text=True, timeout=60)
    if probe.returncode == 0 and ingress == "haproxy":
        print(kept)
    if probe.returncode != 0:
        wrapper = haproxy_env()["RAY_SERVE_HAPROXY_BINARY_PATH"]
        if ingress == "haproxy" and not os.access(wrapper, os.X_OK):
            raise LoopError(f"--ingress haproxy: {wrapper} is missing (reinstall driftloop: pip install -e .); nothing started")
        cmd = [_ray_bin(), "start", "--head", "--dashboard-host=127.0.0.1", "--node-ip-address=127.0.0.1",
               f"--num-cpus={max(LOCAL_CPUS, os.cpu_count() or 1)}", "--disable-usage-stats",
               "--dashboard-agent-listen-port=0"]  # any free port: never the one a Ray just stopped still holds
        env = {**os.environ, **(haproxy_env() if ingress == "haproxy" else {})}
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
        if r.returncode != 0:
            raise LoopError(f"could not start local Ray: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    check_jobs_api(DASHBOARD)
    return DASHBOARD


def check_jobs_api(address: str, timeout_s: float = 90.0) -> None:
    """Fail with one line unless the Jobs API at ADDRESS takes and runs a trivial job (retraining depends on it)."""
    from driftloop.jobs import RetrainPathDown, check_accepts_jobs

    try:
        check_accepts_jobs(address, timeout_s)
    except RetrainPathDown as err:
        raise LoopError(f"{err}; retraining could not run there (`ray stop`, then try again)") from None


def prepare_config(file: Path) -> dict:
    """Read a Serve config, make spec paths absolute and hand the driftloop settings to the replicas."""
    from ray.serve.schema import ServeDeploySchema

    if not file.is_file():
        raise LoopError(f"{file}: no such Serve config")
    cfg = yaml.safe_load(file.read_text())
    s = get_settings().ensure()
    env = shared_env(s)  # settings and token *files*, never a token or password: see driftloop.envs
    for app in cfg.get("applications", []):
        spec = (app.get("args") or {}).get("spec")
        if spec and not Path(spec).is_absolute() and Path(spec).is_file():
            app["args"]["spec"] = str(Path(spec).resolve())
        rt = app.setdefault("runtime_env", {})
        rt.setdefault("env_vars", {}).update(env)
    try:
        ServeDeploySchema.model_validate(cfg) if hasattr(ServeDeploySchema, "model_validate") else ServeDeploySchema.parse_obj(cfg)
    except Exception as err:
        raise LoopError(f"{file}: not a valid Serve config: {str(err).splitlines()[0]}") from None
    return cfg


def check_champions(cfg: dict) -> None:
    """Refuse, before anything is deployed, an application whose model has no champion (or whose registry
    cannot be read): its replicas would only fail to start, with the cause buried in a replica log."""
    from driftloop import registry
    from driftloop.config import load_spec

    s = get_settings().ensure()
    for app in cfg.get("applications", []):
        spec = (app.get("args") or {}).get("spec")
        if not isinstance(spec, str):
            continue  # an inline spec (dict) is checked by the replica itself
        name = load_spec(spec).name
        if registry.champion_version(s, name) is None:  # RegistryUnavailable (a LoopError) says why it cannot tell
            raise LoopError(f"model {name!r} has no champion yet: run `driftloop sweep {spec}` first; nothing deployed")


def _redeploy_failed(client, cfg: dict) -> None:
    """Serve treats an unchanged config as a no-op, so an application that failed before (e.g. no champion then)
    would stay DEPLOY_FAILED: give each such application a fresh deployment stamp so that it is deployed again."""
    apps = (client.get_serve_details() or {}).get("applications", {})
    for app in cfg.get("applications", []):
        if apps.get(app["name"], {}).get("status") == "DEPLOY_FAILED":
            app.setdefault("runtime_env", {}).setdefault("env_vars", {})["DRIFTLOOP_DEPLOYED_AT"] = str(time.time())


def _replica_error(app: dict) -> str:
    """The failing deployment's own error (the replica's exception), else the application's message."""
    for dep in (app.get("deployments") or {}).values():
        msg = (dep.get("message") or "").strip()
        if dep.get("status") in ("DEPLOY_FAILED", "UNHEALTHY") and msg:
            lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
            errs = [ln for ln in lines if re.match(r"^[\w.]+(Error|Exception|Unavailable): ", ln)]
            return (errs or lines)[-1]
    msg = (app.get("message") or "").strip()
    return msg.splitlines()[-1] if msg else "see the Serve logs"


def keep_running(details: dict, cfg: dict) -> list[str]:
    """Add to CFG, as last deployed, every running application it does not name: a Serve deploy is declarative
    and deletes what its config leaves out, but serving a second model must not take the first one down.
    Refuses (nothing deployed) a route prefix that a kept application already serves."""
    mine = {a["name"]: a.get("route_prefix", "/") for a in cfg.get("applications", [])}
    kept = []
    for name, app in sorted((details.get("applications") or {}).items()):
        conf = app.get("deployed_app_config")
        if name in mine or app.get("status") == "DELETING":
            continue
        route = app.get("route_prefix") or (conf or {}).get("route_prefix", "/")
        clash = next((n for n, r in mine.items() if r == route), None)
        if clash:
            raise LoopError(f"route {route} of application {clash!r} is served by the running application {name!r}; "
                            f"change route_prefix, or `serve shutdown` first; nothing deployed")
        if conf:
            cfg["applications"].append(conf)
            kept.append(name)
    return kept


@contextlib.contextmanager
def _one_deploy_at_a_time():
    """Read the running applications and deploy them with ours under one lock: two `driftloop serve` started
    together would each keep only what ran before both, and the later deploy would delete the other's app."""
    import fcntl

    s = get_settings().ensure()
    with open(s.state_dir / "serve.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _shared_keys(cfg: dict) -> None:
    """Under an object-store data root, each application's request-id key is an object that every replica reads:
    created here, once, by the one process that deploys (ids.py)."""
    from driftloop.ids import ensure_shared_secret

    state_root = get_settings().state_root
    for app in cfg.get("applications", []):
        ensure_shared_secret(state_root, app["name"])  # nothing to do on a local root (replicas create it there)


def _answering(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def deploy_file(file: Path, wait_s: float = 300, ingress: str = "proxy") -> dict[str, str]:
    """Deploy every application of a Serve config, keep the other running ones, and wait until FILE's are RUNNING."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    cfg = prepare_config(Path(file))
    check_champions(cfg)
    address, remote = ensure_head(ingress), _remote()
    client = ServeSubmissionClient(address)
    _redeploy_failed(client, cfg)
    ours = [dict(a) for a in cfg["applications"]]
    with _one_deploy_at_a_time():
        if kept := keep_running(client.get_serve_details() or {}, cfg):
            print(f"kept running: {', '.join(kept)} (not in {Path(file).name}; `serve shutdown` stops every application)")
        _shared_keys(cfg)
        client.deploy_applications(cfg)
    http = cfg.get("http_options", {})
    base = f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"
    names = [a["name"] for a in ours]
    urls = {a["name"]: base + a.get("route_prefix", "/" + a["name"]) for a in ours}
    deadline = time.monotonic() + wait_s
    while True:
        details = client.get_serve_details()
        apps = details.get("applications", {})
        states = {n: apps.get(n, {}).get("status") for n in names}
        if all(v == "RUNNING" for v in states.values()):  # and the ingress routes to each (HAProxy learns a route
            waiting = [a["name"] for a in ours                 # a moment after its application is RUNNING)
                       if str(a.get("import_path", "")).startswith("driftloop.") and not remote and not _answering(urls[a["name"]])]
            if not waiting:
                return urls
            if time.monotonic() > deadline:
                raise LoopError(f"application {waiting[0]} is RUNNING but {urls[waiting[0]]}/healthz does not answer 200 "
                                f"after {wait_s:.0f}s: see the ingress's logs (HAProxy: /tmp/haproxy-serve/*/*.stderr.log)")
        failed = [n for n, v in states.items() if v == "DEPLOY_FAILED"]
        if failed:
            raise LoopError(f"application {failed[0]} failed to deploy: {_replica_error(apps[failed[0]])}")
        if time.monotonic() > deadline:
            raise LoopError(f"applications not RUNNING after {wait_s:.0f}s: {states}")
        time.sleep(1)
