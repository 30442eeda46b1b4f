"""`driftloop status`: champion, drift history, retraining jobs and the lineage that links them."""

from __future__ import annotations

import json
import time
from typing import Any

from driftloop.settings import get_settings


def model_status(name: str, url: str | None = None, events: int = 10) -> dict[str, Any]:
    from driftloop import registry
    from driftloop.errors import LoopError
    from driftloop.data.logs import read_or_empty

    s = get_settings()
    versions = registry.list_versions(s, name)
    if not versions:
        raise LoopError(f"no registered versions of model {name!r}")
    champ = next((v for v in versions if v["champion"]), None)
    tags = registry.version_tags(s, name, champ["version"]) if champ else {}
    table_uri = tags.get("data.uri") or versions[-1]["data"].rsplit("@", 1)[0]
    ev = read_or_empty(f"{table_uri}_drift_events")
    recent = []
    if len(ev):
        for r in ev.sort_values("ts").tail(events).itertuples():
            recent.append({"event_id": r.event_id, "ts": float(r.ts), "model_version": int(r.model_version),
                           "window": int(r.window_index), "rows": int(r.rows), "is_drift": bool(r.is_drift),
                           "min_p_val": float(r.min_p_val), "drifted_features": json.loads(r.drifted_features)[:8],
                           "trigger": r.trigger})
    jobs = retraining_status(name)
    lineage = [{"version": v["version"], "champion": v["champion"], "decision": v["decision"], "reason": v["reason"],
                "data": v["data"], "digest": v["digest"], "run_id": v["run_id"], "job_id": v["job_id"],
                "drift_event": v["drift_event"]} for v in versions]
    live = None
    if url:
        import httpx

        base = url.rstrip("/")
        base = base[: -len(name) - 1] if base.endswith(f"/{name}") else base  # the app's own URL works too
        try:
            r = httpx.get(f"{base}/{name}/drift", timeout=10)
            live = r.json() if r.status_code == 200 else {"error": f"{base}/{name}/drift answered HTTP {r.status_code}: "
                                                                   f"{r.text.strip()[:200]}"}
        except Exception as err:
            live = {"error": f"cannot reach {url}: {err}"}
    return {"model": name, "champion": champ["version"] if champ else None, "drift_events": recent,
            "retraining": jobs, "lineage": lineage, "live": live,
            "drift_events_table": f"{table_uri}_drift_events"}


def retraining_status(name: str) -> dict[str, Any]:
    """The model's retraining jobs from the Ray Jobs API; an API that does not answer is an error, never "none"."""
    from driftloop.jobs import JobsView, RetrainPathDown

    view = JobsView(name)
    try:
        view.refresh()
    except RetrainPathDown:
        pass  # kept in view.health: the status says so and the command exits 1
    return view.status()


def retraining_failure(st: dict[str, Any]) -> str | None:
    """One line when the retraining path is failing, as the Jobs API or the live monitor reports it."""
    own = (st.get("retraining") or {}).get("error")
    live = ((st.get("live") or {}).get("retraining") or {}).get("error")
    return own or (f"the live drift monitor reports: {live}" if live else None)


def _clock(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _jobs_lines(rt: dict[str, Any]) -> list[str]:
    """Each retraining job, one line per attempt, after the path's error state when it is failing."""
    out = []
    if rt.get("error"):
        out.append(f"  FAILING since {_clock(rt['since'])} ({rt['attempts']} attempts in a row): {rt['error']}")
    seqs = list(rt.get("history") or []) + ([rt["current"]] if rt.get("current") else [])
    if not seqs and not rt.get("error"):
        out.append("  (none)")
    for j in seqs:
        for r in j.get("runs") or [j]:
            out.append(f"  {r['submission_id']}  {r['status']:<9} attempt {r['attempt']}  event {j.get('event_id') or '-'}"
                       f"  reason: {j['reason']}")
        if j.get("next_retry_at"):
            out.append(f"    next attempt at {_clock(j['next_retry_at'])}")
        elif j.get("message"):
            out.append(f"    {j['message']}")
    return out


def render(st: dict[str, Any]) -> str:
    out = [f"model {st['model']}: champion version {st['champion']}", "", "drift events (newest last):"]
    if not st["drift_events"]:
        out.append("  (none yet)")
    for e in st["drift_events"]:
        flag = "DRIFT" if e["is_drift"] else "ok   "
        feats = f" features {','.join(e['drifted_features'])}" if e["drifted_features"] else ""
        trig = f"  -> trigger: {e['trigger']}" if e["trigger"] else ""
        out.append(f"  {e['event_id']}  v{e['model_version']} window {e['window']:>3}  {flag} p={e['min_p_val']:.2e}{feats}{trig}")
    out += ["", "retraining jobs (Ray Jobs API):", *_jobs_lines(st["retraining"] or {})]
    out += ["", "lineage (model version <- run <- data version <- drift event <- job):"]
    for v in st["lineage"]:
        star = "*" if v["champion"] else " "
        out.append(f" {star}v{v['version']:<3} {v['decision'] or '-':<9} run {v['run_id'][:8]}  data {v['data']} {v['digest']}"
                   f"  event {v['drift_event'] or '-'}  job {v['job_id'] or '-'}")
    if st.get("live"):
        lv = st["live"]
        if "error" in lv:
            out += ["", f"live: {lv['error']}"]
        else:
            out += ["", f"live: serving v{lv.get('model_version')}, {lv.get('samples')} rows seen, window fill "
                    f"{lv.get('window', {}).get('fill')}/{lv.get('window', {}).get('size')}, "
                    + (f"rolling error {lv['rolling_error']}" if "rolling_error" in lv else f"rolling accuracy {lv.get('rolling_accuracy')}")]
    return "\n".join(out)
