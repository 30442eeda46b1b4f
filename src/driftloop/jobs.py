"""Retraining jobs on the Ray Jobs API, which is the one record of which job ran for which trigger.

One trigger's attempts form a *sequence*: `driftloop-retrain-{model}-v{champion}-g{generation}`, then
`…-r{attempt}` for each retry of an attempt that ran and FAILED (`retraining.max_retries`). Every attempt
carries the trigger's identity and retry policy in its job metadata, so every process — a monitor replica,
the CLI, a restarted one — derives the same answer to "what ran, what runs, what comes next" from
`list_jobs()`. Nothing is kept in a local file.

A Jobs API that cannot be listed, or refuses a submission, is an error with a start time and a count
(`RetrainPathDown`), never "no jobs": submissions are retried with capped exponential backoff until the
API takes them, and `/drift` and `driftloop status` say that the path is failing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import re
import shlex
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from driftloop.config import Spec
from driftloop.drift.policy import Trigger, submission_id
from driftloop.settings import Settings

log = logging.getLogger("driftloop.jobs")
TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
SECRET_MARKS = ("TOKEN", "PASSWORD", "SECRET")  # environment variables with these in their name never reach a job
LOCAL_DASHBOARD = "http://127.0.0.1:8265"
HTTP_TIMEOUT_S = 30.0  # the Jobs client sets none: a hung dashboard would hang the monitor's poll loop
SUBMIT_BACKOFF_S = 2.0  # first wait after a refused submission; doubles per failure in a row ...
SUBMIT_BACKOFF_CAP_S = 30.0  # ... up to this, and never gives up
POLL_S = 2.0  # how old the monitor's view of a sequence in progress may get (x IDLE_FACTOR when nothing runs)
IDLE_FACTOR = 5
DEFAULT_RETRIES, DEFAULT_BACKOFF_S = 2, 10.0  # for jobs whose metadata predates the retry policy in it


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
    """Authorization header for a Jobs API with Ray token auth on (RAY_AUTH_TOKEN or ~/.ray/auth_token)."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not token and os.environ.get("RAY_AUTH_MODE", "").lower() == "token" and path.is_file():
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


# --- what a job carries -------------------------------------------------------------------------------------


def strip_password(value: str) -> str:
    """A URI without the password in its user-info (scheme://user:pw@host -> scheme://user@host)."""
    return re.sub(r"(://[^/@:\s]*):[^/@\s]*@", r"\1@", value)


def job_env(settings: Settings, environ: Mapping[str, str]) -> dict[str, str]:
    """The job's environment: driftloop's and MLflow's settings, never a credential (a cluster supplies its own)."""
    env = {k: v for k, v in environ.items()
           if k.startswith(("DRIFTLOOP_", "MLFLOW_")) and not any(s in k.upper() for s in SECRET_MARKS)}
    env.update({"DRIFTLOOP_HOME": str(settings.home), "MLFLOW_TRACKING_URI": settings.tracking_uri,
                "DRIFTLOOP_DATA_ROOT": settings.data_root})
    return {k: strip_password(v) for k, v in env.items()}


def make_trigger(reason: str, at: float, champion: int | None, **extra: Any) -> Trigger:
    """A Trigger with the optional fields this version of Trigger knows (cause, event id), the rest left out."""
    known = {f.name for f in dataclasses.fields(Trigger)}
    return Trigger(reason, at, champion, **{k: v for k, v in extra.items() if k in known and v is not None})


def trigger_from(pending: Mapping[str, Any]) -> Trigger:
    """The Trigger a monitor's durable pending record stands for."""
    return make_trigger(pending["reason"], pending["at"], pending["champion"],
                        cause=pending.get("cause"), event_id=pending.get("event_id"))


def trigger_metadata(model: str, trig: Trigger, generation: int, event_id: str | None, max_retries: int,
                     backoff_s: float, now: float) -> dict[str, str]:
    """The trigger's identity and retry policy, stored on the job so that every process reads the same story."""
    return {"driftloop": "retrain", "model": model, "champion": str(trig.champion_version or 0),
            "generation": str(generation), "attempt": "0", "trigger_at": repr(float(trig.at)),
            "reason": trig.reason[:200], "cause": str(getattr(trig, "cause", "") or "")[:200],
            "event_id": event_id or "", "max_retries": str(max_retries), "backoff_s": repr(float(backoff_s)),
            "submitted_at": repr(now)}


def same_trigger(a: Mapping[str, str], b: Mapping[str, str]) -> bool:
    """Whether two jobs' metadata name one trigger (model, champion, trigger time): only then may one reuse the other."""
    return all(a.get(k) is not None and a.get(k) == b.get(k) for k in ("model", "champion", "trigger_at"))


# --- what the Jobs API lists --------------------------------------------------------------------------------

_SUFFIX = re.compile(r"v(\d+)-g(\d+)(?:-r(\d+))?")


def parse_submission_id(model: str, sid: str | None) -> tuple[int, int, int] | None:
    """(champion, generation, attempt) of one of MODEL's retraining job ids; None for any other id."""
    prefix = f"driftloop-retrain-{model}-"
    m = _SUFFIX.fullmatch(sid[len(prefix):]) if sid and sid.startswith(prefix) else None
    return (int(m[1]), int(m[2]), int(m[3] or 0)) if m else None


@dataclass(frozen=True)
class Attempt:
    """One retraining job as the Jobs API records it."""

    submission_id: str
    champion: int
    generation: int
    attempt: int
    status: str
    meta: dict[str, str]
    started: float
    ended: float | None = None
    message: str = ""


def attempts_of(model: str, jobs: Iterable[Any]) -> list[Attempt]:
    """MODEL's retraining jobs among all of a cluster's jobs (JobDetails), by id and metadata model name."""
    out = []
    for j in jobs:
        meta = dict(j.metadata or {})
        ids = parse_submission_id(model, j.submission_id)
        if ids is None or meta.get("model", model) != model:
            continue
        status = str(getattr(j.status, "value", j.status))
        ended = j.end_time / 1000 if j.end_time else None
        out.append(Attempt(j.submission_id, *ids, status, meta, (j.start_time or 0) / 1000, ended,
                           one_line(j.message) if j.message else ""))
    return out


@dataclass
class Sequence:
    """One trigger's attempts, oldest first, with the retry policy the trigger was submitted under."""

    attempts: list[Attempt]
    max_retries: int = DEFAULT_RETRIES
    backoff_s: float = DEFAULT_BACKOFF_S

    def __post_init__(self) -> None:
        meta = self.first.meta
        self.max_retries = int(meta.get("max_retries", self.max_retries))
        self.backoff_s = float(meta.get("backoff_s", self.backoff_s))

    @property
    def first(self) -> Attempt:
        return self.attempts[0]

    @property
    def latest(self) -> Attempt:
        return self.attempts[-1]

    @property
    def generation(self) -> int:
        return self.first.generation

    @property
    def final(self) -> bool:
        """Succeeded, stopped by a person, or failed with no retry left: a new trigger starts a new sequence."""
        s = self.latest.status
        return s in ("SUCCEEDED", "STOPPED") or (s == "FAILED" and self.latest.attempt >= self.max_retries)

    def next_retry_at(self) -> float | None:
        """When the failed latest attempt is retried (backoff_s x 2^attempt after it ended); None if it is not."""
        last = self.latest
        if last.status != "FAILED" or self.final:
            return None
        return (last.ended or last.started) + self.backoff_s * 2 ** last.attempt

    def covers(self, champion: int, at: float) -> bool:
        """Whether this sequence answers a trigger decided at AT: it is in progress, or ended after AT for the same champion."""
        if not self.final:
            return True
        return self.first.champion == champion and at <= (self.latest.ended or 0.0)

    def view(self) -> dict[str, Any]:
        """The sequence as `/drift`, `driftloop status` and the CLI show it."""
        first, last, meta = self.first, self.latest, self.first.meta
        return {"submission_id": last.submission_id, "base_id": first.submission_id, "attempt": last.attempt,
                "status": last.status, "final": self.final, "reason": meta.get("reason", ""),
                "cause": meta.get("cause", ""), "event_id": meta.get("event_id") or None,
                "champion_before": first.champion,
                "trigger_at": float(meta["trigger_at"]) if meta.get("trigger_at") else None,
                "submitted_at": float(meta.get("submitted_at") or first.started),
                "finished_at": last.ended if self.final else None, "next_retry_at": self.next_retry_at(),
                "message": last.message if last.status in ("FAILED", "STOPPED") else "",
                "runs": [{"submission_id": a.submission_id, "status": a.status, "attempt": a.attempt} for a in self.attempts]}


def group(attempts: Iterable[Attempt], max_retries: int = DEFAULT_RETRIES,
          backoff_s: float = DEFAULT_BACKOFF_S) -> list[Sequence]:
    """Attempts by trigger (champion, generation), oldest sequence first."""
    by: dict[tuple[int, int], list[Attempt]] = {}
    for a in attempts:
        by.setdefault((a.champion, a.generation), []).append(a)
    seqs = [Sequence(sorted(v, key=lambda a: a.attempt), max_retries, backoff_s) for v in by.values()]
    return sorted(seqs, key=lambda s: (s.generation, s.first.started))


def next_generation(seqs: list[Sequence]) -> int:
    """The generation of a new sequence: one past every generation the Jobs API has seen for the model."""
    return max((s.generation for s in seqs), default=-1) + 1


def plan(model: str, trig: Trigger, seqs: list[Sequence]) -> tuple[str, Sequence | None]:
    """What a trigger does: reuse its own job ('own'), join one in progress or in retry backoff ('join'),
    count as answered by one that ended after it was decided ('covered'), or start a new sequence ('new')."""
    champion = trig.champion_version or 0
    mine = {"model": model, "champion": str(champion), "trigger_at": repr(float(trig.at))}
    for s in seqs:
        if any(same_trigger(a.meta, mine) for a in s.attempts):
            return "own", s
    active = [s for s in seqs if not s.final]
    if active:
        return "join", active[-1]
    if seqs and seqs[-1].covers(champion, trig.at):
        return "covered", seqs[-1]
    return "new", None


def why(kind: str, seq: Sequence) -> str:
    """One line on what became of a trigger that started no new job."""
    if kind == "own":
        return "this trigger already has a job"
    if kind == "covered":
        return f"retraining job {seq.latest.submission_id} ended after this trigger and answers it"
    retry = seq.next_retry_at()
    if retry is not None:
        return f"joined retraining job {seq.first.submission_id}, in retry backoff (attempt {seq.latest.attempt + 1} at {retry:.0f})"
    return f"joined retraining job {seq.latest.submission_id}, already {seq.latest.status}"


# --- the health of the path ---------------------------------------------------------------------------------


def backoff_s(failures: int, base: float = SUBMIT_BACKOFF_S, cap: float = SUBMIT_BACKOFF_CAP_S) -> float:
    """Capped exponential wait after the n-th failure in a row: quick first retries, bounded later ones."""
    return min(cap, base * 2 ** max(0, failures - 1))


@dataclass
class PathHealth:
    """Failures in a row of the Jobs API per operation ("submit", "list"); what `/drift` shows as the error."""

    failures: dict[str, dict[str, Any]] = field(default_factory=dict)
    submit_failures: int = 0  # submissions refused or unreachable, ever: the monitor's Prometheus counter follows it

    def failed(self, op: str, line: str, now: float) -> None:
        """Record a failure; every one is logged, since a silent dead path is the failure that matters."""
        f = self.failures.setdefault(op, {"error": line, "since": now, "attempts": 0})
        f.update(error=line, attempts=f["attempts"] + 1, last=now)
        if op == "submit":
            self.submit_failures += 1
        log.warning("retraining path failing (%s, %d in a row since %s): %s; next try in %.0f s", op, f["attempts"],
                    time.strftime("%H:%M:%S", time.localtime(f["since"])), line, backoff_s(f["attempts"]))

    def ok(self, op: str) -> None:
        """The operation worked: its failures are over."""
        f = self.failures.pop(op, None)
        if f:
            log.warning("retraining path works again (%s) after %d failed attempts", op, f["attempts"])

    def due(self, op: str, now: float) -> bool:
        """Whether the backoff after the last failure of OP has passed."""
        f = self.failures.get(op)
        return f is None or now >= f["last"] + backoff_s(f["attempts"])

    def error(self) -> dict[str, Any]:
        """The longest-standing failure as {error, since, attempts, next_try_at}; error is None while the path works."""
        if not self.failures:
            return {"error": None, "since": None, "attempts": 0, "next_try_at": None}
        f = min(self.failures.values(), key=lambda f: f["since"])
        return {"error": f["error"], "since": f["since"], "attempts": f["attempts"],
                "next_try_at": f["last"] + backoff_s(f["attempts"])}


# --- reading and submitting ---------------------------------------------------------------------------------


class JobsView:
    """A model's retraining sequences as the Jobs API lists them, and how well the API has been answering."""

    def __init__(self, model: str, address: str | None = None, max_retries: int = DEFAULT_RETRIES,
                 backoff_s: float = DEFAULT_BACKOFF_S):
        self.model = model
        self.address = address
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.health = PathHealth()
        self.seqs: list[Sequence] = []
        self.listed_at: float | None = None
        self._client = None
        self._where = address or "(the cluster's dashboard)"

    def _api(self, call: Callable[[Any], Any]) -> Any:
        """One Jobs API call; any failure, the client's own creation included, becomes RetrainPathDown."""
        try:
            if self._client is None:
                self._where = self.address or jobs_address()
                self._client = jobs_client(self._where)
            return call(self._client)
        except Exception as err:
            self._client = None  # ask for the address again next time: a restarted head may have moved
            raise RetrainPathDown(f"Ray Jobs API at {self._where}: {one_line(err)}") from err

    def refresh(self) -> list[Sequence]:
        """List the model's sequences now; raises RetrainPathDown rather than answer 'no jobs'."""
        try:
            jobs = self._api(lambda c: c.list_jobs())
        except RetrainPathDown as err:
            self.health.failed("list", str(err), time.time())
            raise
        self.health.ok("list")
        self.seqs = group(attempts_of(self.model, jobs), self.max_retries, self.backoff_s)
        self.listed_at = time.time()
        return self.seqs

    def find(self, base_id: str) -> dict[str, Any] | None:
        """The view of one sequence from the last listing."""
        return next((s.view() for s in self.seqs if s.first.submission_id == base_id), None)

    def status(self) -> dict[str, Any]:
        """The latest sequence, up to five before it, and the path's error state, as of the last listing."""
        seqs = self.seqs
        return {"current": seqs[-1].view() if seqs else None, "generation": seqs[-1].generation if seqs else None,
                "history": [s.view() for s in seqs[-6:-1]], **self.health.error(),
                "submit_failures": self.health.submit_failures, "listed_at": self.listed_at}


class JobTracker(JobsView):
    """Submits a model's retraining jobs: at most one sequence per trigger, retries of failed runs, and
    submissions the Jobs API refused retried with backoff until it takes them."""

    def __init__(self, spec: Spec, settings: Settings, address: str | None = None):
        super().__init__(spec.name, address, spec.retraining.max_retries, spec.retraining.backoff_s)
        self.spec, self.settings = spec, settings
        self.created_at = time.time()
        self._lock = threading.Lock()
        self._seen_final: set[str] = set()

    # --- a trigger in ---------------------------------------------------------------------------------------
    def submit(self, trig: Trigger, event_id: str | None = None) -> dict[str, Any]:
        """Place a trigger: its own job, a sequence it joins, or a new job; {'error': ...} when the API refuses."""
        with self._lock:
            try:
                out = self._place(trig, event_id or getattr(trig, "event_id", None))
            except RetrainPathDown as err:
                self.health.failed("submit", str(err), time.time())
                return {"submitted": False, "job": None, "error": str(err), "why": f"submission failed: {err}"}
            self.health.ok("submit")
            return out

    def _place(self, trig: Trigger, event_id: str | None) -> dict[str, Any]:
        """List, decide, submit; an id taken meanwhile by another trigger means list again (and join it)."""
        for _ in range(3):
            seqs = self.refresh()
            kind, seq = plan(self.model, trig, seqs)
            if seq is not None:
                return {"submitted": False, "job": seq.view(), "why": why(kind, seq)}
            gen = next_generation(seqs)
            sid = submission_id(self.model, trig.champion_version, gen)
            meta = trigger_metadata(self.model, trig, gen, event_id, self.max_retries, self.backoff_s, time.time())
            if self._submit_job(sid, meta) is None:
                seq = self._add(sid, meta)
                return {"submitted": True, "job": seq.view(), "why": "submitted"}
        raise RetrainPathDown(f"submission id {sid} is held by a job the Jobs API does not list for {self.model}")

    def _submit_job(self, sid: str, meta: dict[str, str]) -> dict[str, str] | None:
        """Submit under SID: None when this call created it, else the metadata of the job that holds SID.

        Whatever the error ("already exists", or the bare HTTP 500 the Jobs API answers to concurrent submissions
        of one id, or a lost response), the job's own record decides: it exists, or the submission failed."""
        try:
            self._api(lambda c: c.submit_job(entrypoint=self._entrypoint(sid, meta), submission_id=sid, metadata=meta,
                                             runtime_env={"env_vars": job_env(self.settings, os.environ)}))
            return None
        except RetrainPathDown as err:
            held = self._held(sid)
            if held is None:
                raise
            if held.get("submitted_at") == meta["submitted_at"] and same_trigger(held, meta):
                return None  # our own submission went through; only its answer was lost
            log.info("submission id %s already held (%s)", sid, err)
            return held

    def _held(self, sid: str) -> dict[str, str] | None:
        """The metadata of the job holding SID; None when there is none, or the Jobs API cannot say."""
        try:
            return dict(self._api(lambda c: c.get_job_info(sid)).metadata or {})
        except RetrainPathDown:
            return None

    def _add(self, sid: str, meta: dict[str, str]) -> Sequence:
        """Put a job just submitted into the listing, PENDING, until the next listing shows it."""
        champion, gen, attempt = parse_submission_id(self.model, sid)
        att = Attempt(sid, champion, gen, attempt, "PENDING", meta, time.time())
        seq = next((s for s in self.seqs if (s.first.champion, s.generation) == (champion, gen)), None)
        if seq is None:
            seq = Sequence([att], self.max_retries, self.backoff_s)
            self.seqs = self.seqs + [seq]
        else:
            seq.attempts.append(att)
        return seq

    def _entrypoint(self, sid: str, meta: dict[str, str]) -> str:
        """The job's command line (its reason JSON-quoted, as `retrain.main` reads it)."""
        args = [sys.executable, "-m", "driftloop.retrain", "--config", str(self._spec_file()), "--job-id", sid,
                "--reason", json.dumps(meta["reason"])]
        if meta.get("event_id"):
            args += ["--drift-event", meta["event_id"]]
        if meta.get("cause"):
            args += ["--cause", meta["cause"]]
        return " ".join(shlex.quote(a) for a in args)

    def _spec_file(self) -> Path:
        """The spec the job reads, named by its content: trackers with different specs never overwrite each other's."""
        text = json.dumps(self.spec.model_dump(mode="json"), sort_keys=True)
        path = self.settings.state_dir / "specs" / f"{self.model}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
        return path

    # --- following the jobs ------------------------------------------------------------------------------
    def tick(self, max_age_s: float = 0.0) -> dict[str, Any] | None:
        """The latest sequence as listed (again, when the last look is older than max_age_s, x IDLE_FACTOR when
        nothing runs), then submits a retry that is due; raises RetrainPathDown when the API cannot be listed."""
        with self._lock:
            now = time.time()
            busy = bool(self.health.failures) or any(not s.final for s in self.seqs)
            if self.listed_at is not None and now - self.listed_at < max_age_s * (1 if busy else IDLE_FACTOR):
                return self.seqs[-1].view() if self.seqs else None
            if not self.health.due("list", now):  # listing failed lately: ask again only after its backoff
                raise RetrainPathDown(self.health.failures["list"]["error"])
            seqs = self.refresh()
            latest = seqs[-1] if seqs else None
            seen = latest.view() if latest else None  # what the Jobs API says now: a failure is seen before its retry
            due = latest is not None and (latest.next_retry_at() or float("inf")) <= now
            if due and self.health.due("submit", now):
                self._retry(latest, now)
            return seen

    def _retry(self, seq: Sequence, now: float) -> None:
        """Submit the next attempt of a sequence whose last attempt ran and failed; a refusal is retried later."""
        n = seq.latest.attempt + 1
        sid = submission_id(self.model, seq.first.champion, seq.generation, n)
        meta = {**seq.first.meta, "attempt": str(n), "submitted_at": repr(now)}
        try:
            held = self._submit_job(sid, meta)
        except RetrainPathDown as err:
            self.health.failed("submit", str(err), now)
            return
        self.health.ok("submit")
        if held is None or same_trigger(held, meta):
            self._add(sid, meta)

    def newly_final(self, job: dict[str, Any] | None) -> bool:
        """True once per sequence that ended while this tracker watched (a restarted monitor does not recount old ones)."""
        if not job or not job.get("final") or job["base_id"] in self._seen_final:
            return False
        self._seen_final.add(job["base_id"])
        return (job.get("finished_at") or 0.0) >= self.created_at


# --- for a command line -------------------------------------------------------------------------------------


def submit_until_taken(tracker: JobTracker, trig: Trigger, keep_trying: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Submit a trigger; while the Jobs API refuses, retry with backoff (keep_trying) or raise RetrainPathDown."""
    while True:
        out = tracker.submit(trig)
        if not out.get("error"):
            return out
        if not keep_trying:
            raise RetrainPathDown(out["error"])
        delay = backoff_s(tracker.health.failures["submit"]["attempts"])
        say(f"submission failed ({out['error']}); trying again in {delay:.0f} s")
        time.sleep(delay)


def follow(tracker: JobTracker, base_id: str, say: Callable[[str], None], every_s: float = 2.0) -> dict[str, Any]:
    """Wait until a sequence is final, retries included, riding out a Jobs API that stops answering for a while."""
    said = None
    while True:
        try:
            tracker.tick()
            job = tracker.find(base_id)
            if job and job["final"]:
                return job
        except RetrainPathDown as err:
            if str(err) != said:
                say(f"{err}; still waiting")
                said = str(err)
        time.sleep(every_s)
