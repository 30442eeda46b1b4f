"""The Ray Jobs API client: where it is, a client pinned to that address with timeouts and Ray's auth token,
and a probe that a head really takes jobs. No driftloop state: `driftloop.jobs` builds the record on it."""

from __future__ import annotations

import functools
import os
import time
import uuid
from pathlib import Path
from typing import Any

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
LOCAL_DASHBOARD = "http://127.0.0.1:8265"
HTTP_TIMEOUT_S = 30.0  # the Jobs client sets none: a hung dashboard would hang the monitor's poll loop


class RetrainPathDown(RuntimeError):
    """The Jobs API refused or could not be reached: no retraining can start until it answers again."""


def one_line(err: Any) -> str:
    """An error as one readable line (a server traceback keeps its last line, where the exception is)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
    head = lines[0]
    if "Traceback" in head and len(lines) > 1:
        head = head.split("Traceback")[0] + lines[-1]
    return head[:300]


# --- the client ---------------------------------------------------------------------------------------------


def ray_token_headers() -> dict[str, str]:
    """Authorization header for a Jobs API with Ray token auth on (RAY_AUTH_TOKEN or ~/.ray/auth_token). With
    RAY_AUTH_MODE unset, Ray 2.60 turns token auth on for a new local cluster (and for `ray start` once a token
    file exists), so the file's token is sent unless auth is explicitly disabled."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled" and path.is_file():
        token = path.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


@functools.cache
def _client_class():
    """JobSubmissionClient that talks to the address it is given (Ray's lets RAY_ADDRESS or RAY_API_SERVER_ADDRESS
    override an explicit one) with a timeout on every request (Ray sets none: a hung dashboard would hang us)."""
    import ray
    from ray.dashboard.modules.dashboard_sdk import SubmissionClient
    from ray.job_submission import JobSubmissionClient

    class PinnedJobSubmissionClient(JobSubmissionClient):
        def __init__(self, address: str, headers: dict[str, str] | None = None):
            SubmissionClient.__init__(self, address=address, headers=headers)
            self._client_ray_version = ray.__version__
            self._check_connection_and_version(min_version="2.0", version_error_message="the cluster runs Ray < 2.0")

        def _do_request(self, method, endpoint, **kwargs):
            kwargs.setdefault("timeout", HTTP_TIMEOUT_S)
            return super()._do_request(method, endpoint, **kwargs)

    return PinnedJobSubmissionClient


def jobs_address() -> str:
    """Where the Jobs API is: DRIFTLOOP_JOBS_ADDRESS, an http RAY_ADDRESS, the cluster at RAY_ADDRESS, else the local head."""
    import ray

    from driftloop.cluster import dashboard_url

    for var in ("DRIFTLOOP_JOBS_ADDRESS", "RAY_ADDRESS"):
        if os.environ.get(var, "").startswith("http"):
            return os.environ[var]
    if ray.is_initialized():
        return dashboard_url()
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        try:
            return dashboard_url()
        finally:
            ray.shutdown()
    return LOCAL_DASHBOARD


def jobs_client(address: str | None = None):
    """A Jobs API client with Ray's auth token (when on) and request timeouts."""
    return _client_class()(address or jobs_address(), headers=ray_token_headers() or None)


def check_accepts_jobs(address: str, timeout_s: float = 90.0) -> float:
    """Submit a trivial job and see it succeed: a head whose dashboard agent never bound its port lists jobs
    happily and answers every submission with HTTP 500, so only a real submission shows it. Returns seconds."""
    t0 = time.monotonic()
    deadline = t0 + timeout_s
    sid = f"driftloop-probe-{uuid.uuid4().hex[:12]}"
    client = _submit_probe(address, sid, deadline)
    status = "PENDING"
    while status not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.25)
        try:
            status = str(client.get_job_status(sid).value)
        except Exception as err:
            raise RetrainPathDown(f"the Ray Jobs API at {address} lost a trivial job: {one_line(err)}") from err
    if status != "SUCCEEDED":
        raise RetrainPathDown(f"the Ray Jobs API at {address} took a trivial job but it is {status} after {timeout_s:.0f}s")
    try:
        client.delete_job(sid)  # a probe is not part of the record
    except Exception:
        pass
    return time.monotonic() - t0


def _submit_probe(address: str, sid: str, deadline: float):
    """Submit the probe job until the Jobs API takes it (a new head's agent needs a moment) or time runs out."""
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            client = jobs_client(address)
            client.submit_job(entrypoint="true", submission_id=sid, metadata={"driftloop": "probe"})
            return client
        except Exception as err:
            last = one_line(err)
            time.sleep(1.0)
    raise RetrainPathDown(f"the Ray Jobs API at {address} accepts no job: {last}")
