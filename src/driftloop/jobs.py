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

import json
import os
import shlex
import sys
import threading
import time
from typing import Any, Callable

from driftloop.config import Spec
from driftloop.drift.policy import Trigger, submission_id
from driftloop.envs import shared_env
from driftloop.job_sequences import (DEFAULT_BACKOFF_S, DEFAULT_RETRIES, Attempt, PathHealth, Sequence, attempts_of,  # noqa: F401
                                     backoff_s, group, log, make_trigger, next_generation, parse_submission_id, plan,
                                     same_trigger, trigger_from, trigger_metadata, why)
from driftloop.jobs_api import (TERMINAL, RetrainPathDown, check_accepts_jobs, jobs_address, jobs_client,  # noqa: F401
                                one_line)
from driftloop.settings import Settings

POLL_S = 2.0  # how old the monitor's view of a sequence in progress may get (x IDLE_FACTOR when nothing runs)
IDLE_FACTOR = 5

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


RETRAIN_RESOURCES_ENV = "DRIFTLOOP_RETRAIN_RESOURCES"


def entrypoint_placement(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Where a retraining job's entrypoint runs: DRIFTLOOP_RETRAIN_RESOURCES, a JSON object of Ray resources
    (`{"CPU": 1}` keeps it off a head started with --num-cpus=0; a custom resource such as `{"retrain": 1}` pins it to
    the nodes started with it). Unset: Ray's default, the head node. Not an object of numbers: ValueError, one line."""
    raw = (os.environ if environ is None else environ).get(RETRAIN_RESOURCES_ENV, "").strip()
    if not raw:
        return {}
    try:
        res = json.loads(raw)
        if not isinstance(res, dict) or not all(isinstance(v, (int, float)) and v >= 0 for v in res.values()):
            raise ValueError
    except ValueError:
        raise ValueError(f"{RETRAIN_RESOURCES_ENV}={raw!r} is not a JSON object of resource amounts, "
                         f'e.g. {{"CPU": 1}} or {{"retrain": 1}}') from None
    res = dict(res)
    out: dict[str, Any] = {}
    if "CPU" in res:
        out["entrypoint_num_cpus"] = res.pop("CPU")
    if "GPU" in res:
        out["entrypoint_num_gpus"] = res.pop("GPU")
    if res:
        out["entrypoint_resources"] = res
    return out


class JobTracker(JobsView):
    """Submits a model's retraining jobs: at most one sequence per trigger, retries of failed runs, and
    submissions the Jobs API refused retried with backoff until it takes them."""

    def __init__(self, spec: Spec, settings: Settings, address: str | None = None):
        super().__init__(spec.name, address, spec.retraining.max_retries, spec.retraining.backoff_s)
        self.spec, self.settings = spec, settings
        self.placement = entrypoint_placement()  # a bad value fails here, when the monitor starts, not per submission
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
                                             runtime_env={"env_vars": shared_env(self.settings)},
                                             **self.placement))
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
        args = [sys.executable, "-m", "driftloop.retrain", "--config", self._spec_json(), "--job-id", sid,
                "--reason", json.dumps(meta["reason"])]
        if meta.get("event_id"):
            args += ["--drift-event", meta["event_id"]]
        if meta.get("cause"):
            args += ["--cause", meta["cause"]]
        return " ".join(shlex.quote(a) for a in args)

    def _spec_json(self) -> str:
        """The spec itself, as JSON, for the job's command line: the job may run on a node that has no copy of any
        file of this one (a spec file under this node's DRIFTLOOP_HOME was not found on a worker node)."""
        return json.dumps(self.spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

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


def follow(tracker: JobTracker, base_id: str, say: Callable[[str], None], every_s: float = 2.0,
           heartbeat_s: float = 30.0) -> dict[str, Any]:
    """Wait until a sequence is final, retries included, riding out a Jobs API that stops answering for a while.
    Says each change of attempt or state, and every `heartbeat_s` how long the current state has lasted."""
    said, seen, since, last_beat = None, None, time.monotonic(), time.monotonic()
    while True:
        try:
            tracker.tick()
            job = tracker.find(base_id)
            if job:
                now = (job["submission_id"], job["status"])
                if now != seen:
                    say(f"job {job['submission_id']} {job['status']}" + (f" (attempt {job['attempt'] + 1})" if job.get("attempt") else ""))
                    seen, since, last_beat = now, time.monotonic(), time.monotonic()
                elif time.monotonic() - last_beat >= heartbeat_s and not job["final"]:
                    say(f"job {job['submission_id']} still {job['status']} after {time.monotonic() - since:.0f} s")
                    last_beat = time.monotonic()
                if job["final"]:
                    return job
        except RetrainPathDown as err:
            if str(err) != said:
                say(f"{err}; still waiting")
                said = str(err)
        time.sleep(every_s)
