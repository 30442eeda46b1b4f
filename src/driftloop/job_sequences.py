"""What the Jobs API lists, read as retraining *sequences*: one trigger's attempts, their retry policy, what a
new trigger does (reuse, join, covered, new), and the health of the path. Pure: no I/O, unit-tested alone."""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from driftloop.drift.policy import Trigger
from driftloop.jobs_api import one_line

log = logging.getLogger("driftloop.jobs")
SUBMIT_BACKOFF_S = 2.0  # first wait after a refused submission; doubles per failure in a row ...
SUBMIT_BACKOFF_CAP_S = 30.0  # ... up to this, and never gives up
DEFAULT_RETRIES, DEFAULT_BACKOFF_S = 2, 10.0  # for jobs whose metadata predates the retry policy in it


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
